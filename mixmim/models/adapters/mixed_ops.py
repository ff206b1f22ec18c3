"""Mixed convolution (section 9, Figure 4) and the other spatial operators of a ConvNet, per group.

Partial convolution treats some inputs as missing and rescales a window's response by
``window size / number of valid inputs``. The *mixed* version has two sets of valid
inputs, one per mixing group: an output position of group g is computed from the
group-g inputs of its window only, rescaled by the fraction of the window they fill.
Zero padding counts as valid (it carries no image content), so with a single group
every operator here computes exactly what the plain one does.

Each swapped forward calls the module's own forward on a batch of two masked copies
(one per group), so weight standardisation, "same" padding and grouped/depthwise
convolution all keep working; the other group's outputs are discarded per position.

- convolution with a kernel larger than 1 whose windows overlap or are not aligned
  (kernel != stride or padding > 0): mixed convolution, bias kept out of the rescaling;
- max pooling: the other group's inputs are -inf;
- average pooling (fixed or adaptive): mean over the own group, renormalised;
- GroupNorm (and timm's GroupNormAct): statistics per sample, channel group *and*
  mixing group, so normalisation does not pool the two images' statistics;
- constant padding: records the group map of its output (padding is valid for both).

BatchNorm is left alone: in eval mode it is per position; in training its batch
statistics are shared by both groups (and all images), as the brief allows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, pad_same
from timm.layers.norm_act import GroupNormAct
from torch import Tensor, nn

from .base import PAD, GroupContext, masked_mean_pool, swap_forward


def conv_needs_mixing(conv: nn.Conv2d) -> bool:
    """True when a window of the convolution can hold inputs from two mask cells.

    1x1 kernels never can; a kernel equal to its stride with no padding tiles the map in
    aligned patches that never straddle a cell (cells are multiples of every stride).
    """
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    if k == (1, 1):
        return False
    aligned = k == s and d == (1, 1) and not isinstance(p, str) and tuple(p) == (0, 0) \
        and not _dynamic_same(conv)
    return not aligned


def _dynamic_same(conv: nn.Conv2d) -> bool:
    return isinstance(conv, Conv2dSame) or bool(getattr(conv, "same_pad", False))


def _select(groups: Tensor, outputs: tuple[Tensor, Tensor]) -> Tensor:
    """Per position, the output of the position's own group (padding positions: group 0)."""
    return torch.where(groups == 1, outputs[1], outputs[0])


def _invalid_fraction(conv: nn.Conv2d, invalid: Tensor) -> Tensor:
    """Fraction of each window's taps that are invalid, with the convolution's geometry."""
    kh, kw = conv.kernel_size
    ones = invalid.new_ones(1, 1, kh, kw)
    if _dynamic_same(conv):
        invalid = pad_same(invalid, conv.kernel_size, conv.stride, conv.dilation, value=0.0)
        padding = 0
    else:
        padding = conv.padding
    return F.conv2d(invalid, ones, None, conv.stride, padding, conv.dilation) / (kh * kw)


def _mixed_conv_forward(original, conv: nn.Conv2d, ctx: GroupContext, x: Tensor) -> Tensor:
    if not ctx.active:
        return original(x)
    gin = ctx.groups(*x.shape[-2:])
    keeps = [ctx.keep(gin, g, x.dtype) for g in (0, 1)]
    y = original(torch.cat([x * keeps[0], x * keeps[1]], dim=0))
    gout = ctx.groups(*y.shape[-2:])
    bias = conv.bias.view(1, -1, 1, 1).to(y.dtype) if conv.bias is not None else 0.0
    outs = []
    for keep, yg in zip(keeps, y.chunk(2, dim=0)):
        valid = (1 - _invalid_fraction(conv, 1 - keep)).clamp(min=1e-6)
        outs.append(((yg - bias) / valid + bias).to(y.dtype))
    return _select(gout, outs)


def mixed_conv(conv: nn.Conv2d, ctx: GroupContext) -> None:
    """Mixed convolution: each output position from its own group's inputs, renormalised."""
    if conv.padding_mode != "zeros":
        raise NotImplementedError(f"mixed convolution supports zero padding only, not {conv.padding_mode!r}")
    swap_forward(conv, _mixed_conv_forward, conv, ctx)


def _mixed_max_pool_forward(original, ctx: GroupContext, x: Tensor) -> Tensor:
    if not ctx.active:
        return original(x)
    gin = ctx.groups(*x.shape[-2:])
    copies = [x.masked_fill(ctx.keep(gin, g, x.dtype) == 0, float("-inf")) for g in (0, 1)]
    y = original(torch.cat(copies, dim=0))
    return _select(ctx.groups(*y.shape[-2:]), y.chunk(2, dim=0))


def mixed_max_pool(pool: nn.Module, ctx: GroupContext) -> None:
    """Max pooling over the own group only (the other group's inputs are -inf)."""
    swap_forward(pool, _mixed_max_pool_forward, ctx)


def _mixed_avg_pool_forward(original, ctx: GroupContext, x: Tensor) -> Tensor:
    if not ctx.active:
        return original(x)
    gin = ctx.groups(*x.shape[-2:])
    outs = tuple(masked_mean_pool(original, x, ctx.keep(gin, g, x.dtype))[0] for g in (0, 1))
    return _select(ctx.groups(*outs[0].shape[-2:]), outs)


def mixed_avg_pool(pool: nn.Module, ctx: GroupContext) -> None:
    """Average pooling over the own group only, renormalised as partial convolution."""
    swap_forward(pool, _mixed_avg_pool_forward, ctx)


def group_norm_per_group(x: Tensor, norm: nn.GroupNorm, groups: Tensor) -> Tensor:
    """GroupNorm whose statistics are taken separately over each mixing group's positions."""
    b, c, h, w = x.shape
    xr = x.float().reshape(b, norm.num_groups, -1, h * w)
    out = torch.zeros_like(xr)
    per = xr.shape[2]
    for g in (0, 1):
        keep = (groups == g).reshape(1, 1, 1, h * w).to(xr.dtype)
        count = (keep.sum() * per).clamp(min=1.0)
        mean = (xr * keep).sum(dim=(2, 3), keepdim=True) / count
        var = (((xr - mean) * keep) ** 2).sum(dim=(2, 3), keepdim=True) / count
        out = out + keep * (xr - mean) * torch.rsqrt(var + norm.eps)
    out = out.reshape(b, c, h, w).to(x.dtype)
    if norm.affine:
        out = out * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    return out


def _mixed_group_norm_forward(original, norm: nn.GroupNorm, ctx: GroupContext, x: Tensor) -> Tensor:
    if not ctx.active:
        return original(x)
    out = group_norm_per_group(x, norm, ctx.groups(*x.shape[-2:]))
    if isinstance(norm, GroupNormAct):  # timm's fused norm + dropout + activation
        out = norm.act(norm.drop(out))
    return out


def mixed_group_norm(norm: nn.GroupNorm, ctx: GroupContext) -> None:
    """GroupNorm (or timm's GroupNormAct) with statistics per mixing group."""
    swap_forward(norm, _mixed_group_norm_forward, norm, ctx)


def _padding_forward(original, pad: nn.Module, ctx: GroupContext, x: Tensor) -> Tensor:
    y = original(x)
    if ctx.active:
        ctx.register(F.pad(ctx.groups(*x.shape[-2:]), pad.padding, value=PAD))
    return y


def padding_with_groups(pad: nn.Module, ctx: GroupContext) -> None:
    """Constant padding that records its output's group map (padding: valid for both groups)."""
    swap_forward(pad, _padding_forward, pad, ctx)


def make_mixed(module: nn.Module, ctx: GroupContext, skip: tuple[type, ...] = ()) -> list[str]:
    """Swap every spatial operator under ``module`` for its per-group version.

    Returns the names of the swapped modules. Submodules that are instances of ``skip``
    (and their children) are left to the caller.
    """
    swapped: list[str] = []
    skipped: set[str] = set()
    for name, mod in module.named_modules():
        if any(name.startswith(s + ".") for s in skipped):
            continue
        if skip and isinstance(mod, skip):
            skipped.add(name)
            continue
        if isinstance(mod, nn.Conv2d):
            if conv_needs_mixing(mod):
                mixed_conv(mod, ctx)
                swapped.append(name)
        elif isinstance(mod, nn.MaxPool2d | nn.AdaptiveMaxPool2d):
            mixed_max_pool(mod, ctx)
            swapped.append(name)
        elif isinstance(mod, nn.AvgPool2d | nn.AdaptiveAvgPool2d):
            mixed_avg_pool(mod, ctx)
            swapped.append(name)
        elif isinstance(mod, nn.GroupNorm):
            mixed_group_norm(mod, ctx)
            swapped.append(name)
        elif isinstance(mod, nn.ConstantPad2d | nn.ZeroPad2d):
            padding_with_groups(mod, ctx)
            swapped.append(name)
    return swapped


__all__ = [
    "conv_needs_mixing", "group_norm_per_group", "make_mixed", "mixed_avg_pool", "mixed_conv", "mixed_group_norm",
    "mixed_max_pool", "padding_with_groups",
]
