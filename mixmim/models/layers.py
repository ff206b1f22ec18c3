"""Small building blocks of the MixMIM encoder: patch embedding, patch merging,
fixed position embeddings, windowing helpers and the window-attention block.

Speed notes (the numerics are those of the plain formulation):

- On AMD CPUs, linear layers run their three products (forward, input and weight
  gradients) through oneDNN in fp32, which is faster there than the default BLAS (MKL);
  on Intel CPUs MKL is the faster of the two and they stay ``F.linear``
  (:data:`CPU_LINEAR_BACKEND`, ``$MIXMIM_CPU_LINEAR`` to choose by hand). Anywhere else
  (CUDA, autocast, other dtypes, FLOP counting, compilation) they are ``F.linear``.
- The encoder hands every block its tokens already in attention order (see
  :class:`AttentionPlan`), so blocks never partition or reverse windows.
- Group-restricted attention is computed per group of each window: the tokens are
  sorted by window and by group inside each window once per stage, and each such
  segment attends only to itself, which skips the masked part of the scores instead of
  computing and masking it (off the CPU, windows smaller than the map keep one additive
  bias per block: relative position + group, -inf across groups).
- Training on the CPU writes the attention out (scores, in-place bias, softmax), for
  the segments of group-restricted attention as one autograd node with the softmax and
  its gradient in place (:class:`_SegmentAttention`); elsewhere it goes through
  ``F.scaled_dot_product_attention``.
- Training on the CPU in fp32 with the oneDNN backend, the MLP (fc1, GELU, fc2) is one
  oneDNN node whose GELU gradient overwrites the buffer it is computed from
  (:class:`_OneDNNMlp`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

Size2 = tuple[int, int]


def to_2tuple(value: int | Size2 | list[int]) -> Size2:
    """Accept ``n`` or ``(h, w)`` and always hand back ``(h, w)``."""
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


# --------------------------------------------------------------------------- #
# Linear layers through oneDNN on the CPU
# --------------------------------------------------------------------------- #
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None

CPU_LINEAR_ENV = "MIXMIM_CPU_LINEAR"
CPU_LINEAR_CHOICES = ("auto", "onednn", "blas")


def cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's ``vendor_id`` (``AuthenticAMD``, ``GenuineIntel``), or ``""`` where the
    system does not say (no ``/proc/cpuinfo``: not Linux)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip()
    return ""


def resolve_cpu_linear_backend(choice: str, vendor: str) -> str:
    """``"onednn"`` or ``"blas"`` for the fp32 CPU products of linear layers.

    ``auto`` picks by vendor, after what benchmarks/README.md measured: on an AMD EPYC
    (Zen 4) oneDNN's fp32 GEMM was 1.15-1.4x MKL's, while on an Intel Xeon the MixMIM-B
    pretraining step took 1.076x as long with oneDNN as with MKL (95% CI 1.034-1.103).
    Other or unknown vendors keep the BLAS, the PyTorch default.
    """
    if choice not in CPU_LINEAR_CHOICES:
        raise ValueError(f"{CPU_LINEAR_ENV}={choice!r}: expected one of {', '.join(CPU_LINEAR_CHOICES)}")
    if choice != "auto":
        return choice
    return "onednn" if vendor == "AuthenticAMD" else "blas"


# Which library computes large fp32 linear products on the CPU; tests and benchmarks may
# set it, everything else reads it at call time.
CPU_LINEAR_BACKEND = resolve_cpu_linear_backend(os.environ.get(CPU_LINEAR_ENV, "auto"), cpu_vendor())


def _onednn_mm(a: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a @ w.T + bias`` for 2-D ``a`` and ``w`` (either may be a transposed view) by oneDNN."""
    return _ONEDNN_LINEAR(a, w, bias, "none", [], "")


# Below this many multiply-adds per product the default BLAS call is cheaper (oneDNN's
# per-call overhead dominates); above it oneDNN was 1.15-1.4x faster on the AMD development
# machine (benchmarks/README.md).
ONEDNN_MIN_MACS = 2**25


def onednn_linear_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`fast_linear` takes the oneDNN route for these operands.

    Only with the oneDNN backend (:data:`CPU_LINEAR_BACKEND`), for large enough fp32
    products on the CPU outside autocast, compilation and dispatch modes (so that FLOP
    counters, meta tensors and torch.compile see an ordinary ``F.linear``).
    """
    return (
        CPU_LINEAR_BACKEND == "onednn" and _ONEDNN_LINEAR is not None
        and x.device.type == "cpu" and weight.device.type == "cpu"
        and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.ndim >= 2
        and x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS
        and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
        and _get_current_dispatch_mode() is None
    )


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` whose forward and both gradient products are oneDNN matmuls."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        out = _onednn_mm(x2, weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x2, weight = ctx.saved_tensors
        gx, gw, gb = _onednn_linear_grads(grad.reshape(-1, grad.shape[-1]), x2, weight, ctx.needs_input_grad[0],
                                          ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        return (gx.view(ctx.x_shape) if gx is not None else None), gw, gb


def _onednn_linear_grads(g2: Tensor, x2: Tensor, weight: Tensor, need_x: bool, need_w: bool,
                         need_b: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Input (2-D), weight and bias gradients of ``x2 @ weight.T + bias`` for the output gradient ``g2``."""
    gx = gw = gb = None
    if need_x:
        gx = _onednn_mm(g2, weight.t())  # oneDNN reads the strided weight as it is
    if need_w:
        gw = _weight_grad(g2, x2)
    if need_b:
        gb = g2.sum(0)
    return gx, gw, gb


def _weight_grad(g2: Tensor, x2: Tensor) -> Tensor:
    """``g2.T @ x2``. oneDNN's entry point copies the transposed first operand; with few
    channels per token that copy costs more than its faster product saves."""
    cin, cout = x2.shape[1], g2.shape[1]
    return _onednn_mm(g2.t(), x2.t()) if cin * cout >= 128 * (cin + cout) else g2.t().mm(x2)


_GELU_BACKWARD_INTO = torch.ops.aten.gelu_backward.grad_input


class _OneDNNMlp(torch.autograd.Function):
    """fc1, exact GELU, fc2 as one node: the three products of each linear by oneDNN (as
    :class:`_OneDNNLinear`) and the GELU gradient written over the gradient it is computed
    from, which no one else holds, instead of into a new buffer."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        h = _onednn_mm(x2, w1, b1)
        a = F.gelu(h)
        ctx.save_for_backward(x2, w1, h, a, w2)
        ctx.x_shape = x.shape
        ctx.has_bias = (b1 is not None, b2 is not None)
        return _onednn_mm(a, w2, b2).view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x2, w1, h, a, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        ga, gw2, gb2 = _onednn_linear_grads(grad.reshape(-1, grad.shape[-1]), a, w2, True, need[3],
                                            ctx.has_bias[1] and need[4])
        gh = _GELU_BACKWARD_INTO(ga, h, grad_input=ga)
        gx, gw1, gb1 = _onednn_linear_grads(gh, x2, w1, need[0], need[1], ctx.has_bias[0] and need[2])
        return (gx.view(ctx.x_shape) if gx is not None else None), gw1, gb1, gw2, gb2


def fast_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where :func:`onednn_linear_applies`."""
    if not onednn_linear_applies(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn_mm(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) computed by :func:`fast_linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return fast_linear(x, self.weight, self.bias)


def use_fast_linears(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Linear`` inside ``module`` a :class:`Linear` (in place)."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
    return module


class Mlp(nn.Module):
    """fc1, exact GELU, fc2 (the parameter names of timm's ``Mlp``)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        w1, w2 = self.fc1.weight, self.fc2.weight
        if (isinstance(self.drop, nn.Identity) and self.act.approximate == "none" and onednn_linear_applies(x, w1)
                and torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w2.requires_grad)):
            return _OneDNNMlp.apply(x, w1, self.fc1.bias, w2, self.fc2.bias)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


# --------------------------------------------------------------------------- #
# Fixed position embeddings
# --------------------------------------------------------------------------- #
def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """Sin-cos features of ``positions`` (float64) with ``dim`` channels: sin half, cos half."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even channel count, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.reshape(-1, 1).double() * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid: Size2) -> Tensor:
    """Fixed 2-D sin-cos position embedding of shape (1, H*W, dim), row-major tokens.

    The first half of the channels encodes the column index and the second half the
    row index, which is the layout of the original MixMIM/MAE embedding, so that
    released checkpoints and this module agree without storing the table.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a channel count divisible by 4, got {dim}")
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    return emb.float().unsqueeze(0)


# --------------------------------------------------------------------------- #
# Patch embedding and merging
# --------------------------------------------------------------------------- #
class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution followed by LayerNorm, to (B, L, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, imgs: Tensor) -> Tensor:
        x = self.proj(imgs)
        return self.norm(x.flatten(2).transpose(1, 2))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concatenation, LayerNorm, linear 4C -> 2C (halves the grid).

    The four neighbours are concatenated in the order (top-left, bottom-left,
    top-right, bottom-right), the order the released weights were trained with.
    """

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.proj = Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: Tensor, grid: Size2) -> Tensor:
        b, _, c = x.shape
        h, w = grid
        x = x.view(b, h, w, c)
        x = torch.cat(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1
        )
        return self.proj(self.norm(x.reshape(b, -1, 4 * c)))


# --------------------------------------------------------------------------- #
# Windows
# --------------------------------------------------------------------------- #
def effective_window(window: int | Size2, grid: Size2) -> Size2:
    """The window actually used on a feature map of size ``grid``.

    A window not smaller than the feature map along an axis covers that axis
    whole, so a large window on a small map is global attention. The result must
    tile the map exactly; anything else is a configuration error.
    """
    wh, ww = to_2tuple(window)
    h, w = grid
    eff = (min(wh, h), min(ww, w))
    if h % eff[0] or w % eff[1]:
        raise ValueError(
            f"window {to_2tuple(window)} does not tile the {h}x{w} feature map "
            f"(effective window {eff[0]}x{eff[1]}); expected a window size that divides "
            "the feature map or is at least as large"
        )
    return eff


def window_partition(x: Tensor, grid: Size2, window: Size2) -> Tensor:
    """(B, H*W, C) row-major tokens -> (B, nW, wh*ww, C) tokens grouped by window."""
    b, _, c = x.shape
    h, w = grid
    wh, ww = window
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(x: Tensor, grid: Size2, window: Size2) -> Tensor:
    """Inverse of :func:`window_partition`."""
    b, _, _, c = x.shape
    h, w = grid
    wh, ww = window
    x = x.view(b, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * w, c)


def relative_position_index(window: Size2) -> Tensor:
    """(N, N) index into a ((2wh-1)*(2ww-1), heads) table for every token pair of a window."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def group_attention_bias(groups: Tensor, grid: Size2, window: Size2, dtype: torch.dtype) -> Tensor:
    """Additive bias (nW, 1, N, N): 0 within a group, -inf across groups.

    ``groups`` is the mixing mask at this stage's resolution, shape (1, H*W). It is
    shared by the whole batch, so the bias is built once per stage and forward pass.
    """
    g = window_partition(groups.reshape(1, -1, 1).to(dtype), grid, window)[0, :, :, 0]
    same = g[:, :, None] == g[:, None, :]
    bias = torch.zeros(same.shape, dtype=dtype, device=groups.device)
    bias.masked_fill_(~same, float("-inf"))
    return bias.unsqueeze(1)


# --------------------------------------------------------------------------- #
# Attention plans and the window-attention block
# --------------------------------------------------------------------------- #
@dataclass
class AttentionPlan:
    """How the blocks of one stage (with one window size) see their tokens.

    ``order`` lists row-major token positions in the order the blocks receive them
    (None: row-major). With ``segments`` (group-restricted attention) the tokens are
    sorted by window and, inside each window, by group, and each ``(start, end)`` range
    (one group of one window) attends only to itself; ``segment_index`` holds each range's
    flattened relative-position indices. Otherwise the tokens are grouped by window
    (``num_windows`` consecutive runs of ``window`` area) and ``group_bias``
    (nW, 1, N, N), when given, is added to the scores: 0 within a group, -inf across.
    """

    window: Size2
    num_windows: int
    order: Tensor | None = None
    group_bias: Tensor | None = None
    segments: list[tuple[int, int]] | None = None
    segment_index: list[Tensor] | None = None

    @property
    def inverse(self) -> Tensor | None:
        if self.order is None:
            return None
        inv = torch.empty_like(self.order)
        inv[self.order] = torch.arange(self.order.numel(), device=self.order.device)
        return inv


def attention_plan(grid: Size2, window: Size2, groups: Tensor | None = None,
                   dtype: torch.dtype = torch.float32, split_windows: bool = True) -> AttentionPlan:
    """The plan for blocks with ``window`` on a ``grid`` map; ``groups`` (1, H*W) restricts
    attention to tokens of the same group (the mixing mask at this resolution).

    With ``groups``, a window that covers the whole map is always split into one segment per
    group. Smaller windows are split into one segment per (window, group) when
    ``split_windows`` (tokens sorted by window, then by group inside it), otherwise they
    keep one additive -inf bias per window (one fused kernel for all windows, for devices
    where many small segments cost more than the masked scores)."""
    h, w = grid
    nw = (h // window[0]) * (w // window[1])
    device = groups.device if groups is not None else None
    order = None
    if nw > 1:
        order = window_partition(torch.arange(h * w, device=device).view(1, -1, 1), grid, window).reshape(-1)
    if groups is None or (nw > 1 and not split_windows):
        bias = group_attention_bias(groups, grid, window, dtype) if groups is not None else None
        return AttentionPlan(window, nw, order, group_bias=bias)
    n = window[0] * window[1]
    values, rank = torch.unique(groups.reshape(-1), sorted=True, return_inverse=True)
    if order is not None:
        rank = rank[order]  # group rank of each token in window order
    key = torch.arange(nw, device=device).repeat_interleave(n) * len(values) + rank
    perm = torch.argsort(key, stable=True)  # window order -> (window, group) order
    counts = torch.bincount(key, minlength=nw * len(values)).tolist()
    local = (perm % n).tolist()  # each sorted token's position inside its window
    rel = relative_position_index(window).to(device)
    segments, index, start = [], [], 0
    for size in counts:
        if size == 0:
            continue
        pos = torch.tensor(local[start:start + size], device=device)
        segments.append((start, start + size))
        index.append(rel[pos][:, pos].reshape(-1))
        start += size
    return AttentionPlan(window, nw, perm if order is None else order[perm], segments=segments, segment_index=index)


class _ReorderTokens(torch.autograd.Function):
    """``x[:, index]`` for a permutation ``index``; the gradient is gathered back by ``inverse``."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def reorder_tokens(x: Tensor, current: Tensor | None, target: Tensor | None) -> Tensor:
    """(B, L, C) tokens held in order ``current`` rearranged into order ``target``
    (orders list row-major positions; None is row-major)."""
    if current is None and target is None:
        return x
    if current is not None and target is not None and not current.is_meta and torch.equal(current, target):
        return x
    n = x.shape[1]
    ar = torch.arange(n, device=x.device)
    pos = ar if current is None else torch.empty_like(current).scatter_(0, current, ar)  # position of each token
    index = pos if target is None else pos[target]
    inverse = torch.empty_like(index).scatter_(0, index, ar)
    return _ReorderTokens.apply(x, index, inverse)


def _explicit_attention_applies(x: Tensor, weight: Tensor) -> bool:
    """Training on the CPU: write the attention out. The fused CPU kernel cannot give the
    gradient of an additive bias, and PyTorch's fallback for that case costs more."""
    return (x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and not torch.compiler.is_compiling())


_SOFTMAX_OUT = torch.ops.aten._softmax.out
_SOFTMAX_BACKWARD_OUT = torch.ops.aten._softmax_backward_data.out


class _SegmentAttention(torch.autograd.Function):
    """Attention of every segment to itself (group-restricted attention, see
    :class:`AttentionPlan`) as one autograd node, written out as the plain formulation
    computes it (``softmax((q * scale) @ k^T + bias) @ v``, same operations in the same
    order), with the softmax and its gradient in place and the outputs and gradients
    written straight into whole-block buffers instead of being concatenated.

    qkv: (B, L, 3C) in segment order; table: (T, heads) relative position table;
    index: one flattened (n*n,) table index per segment. Returns (B, L, C).
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, table: Tensor, heads: int, segments: list[tuple[int, int]],
                index: list[Tensor]) -> Tensor:
        b, length, c3 = qkv.shape
        d = c3 // 3 // heads
        scale = d**-0.5
        t = qkv.view(b, length, 3, heads, d)
        out = qkv.new_empty(b, length, heads, d)
        table_t = table.t()  # (heads, T)
        saved = []
        for (start, end), idx in zip(segments, index, strict=True):
            n = end - start
            part = t[:, start:end].permute(2, 0, 3, 1, 4)  # (3, B, heads, n, d) view
            q = (part[0] * scale).reshape(b * heads, n, d)
            k = part[1].reshape(b * heads, n, d)
            v = part[2].reshape(b * heads, n, d)
            scores = torch.bmm(q, k.transpose(1, 2)).view(b, heads, n, n)
            scores += table_t.index_select(1, idx).view(heads, n, n).to(scores.dtype)
            attn = _SOFTMAX_OUT(scores, -1, False, out=scores).view(b * heads, n, n)
            out[:, start:end].copy_(torch.bmm(attn, v).view(b, heads, n, d).transpose(1, 2))
            saved += [q, k, v, attn]
        ctx.save_for_backward(*saved, *index)
        ctx.meta = (b, length, heads, d, scale, table.shape, table.dtype, segments)
        return out.view(b, length, heads * d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        b, length, heads, d, scale, table_shape, table_dtype, segments = ctx.meta
        tensors = ctx.saved_tensors
        num = len(segments)
        index = tensors[4 * num:]
        g = grad.reshape(b, length, heads, d)
        gqkv = grad.new_empty(b, length, 3, heads, d)
        gtable_t = grad.new_zeros(table_shape[1], table_shape[0], dtype=table_dtype)  # (heads, T)
        for i, ((start, end), idx) in enumerate(zip(segments, index, strict=True)):
            n = end - start
            q, k, v, attn = tensors[4 * i:4 * i + 4]
            go = g[:, start:end].transpose(1, 2).reshape(b * heads, n, d)
            gattn = torch.bmm(go, v.transpose(1, 2))
            gv = torch.bmm(attn.transpose(1, 2), go)
            gs = _SOFTMAX_BACKWARD_OUT(gattn, attn, -1, attn.dtype, grad_input=gattn)
            gtable_t.index_add_(1, idx, gs.view(b, heads, n * n).sum(0).to(table_dtype))
            gq = torch.bmm(gs, k).mul_(scale)
            gk = torch.bmm(gs.transpose(1, 2), q)
            dst = gqkv[:, start:end]
            for j, part in enumerate((gq, gk, gv)):
                dst[:, :, j].copy_(part.view(b, heads, n, d).transpose(1, 2))
        return gqkv.view(b, length, 3 * heads * d), gtable_t.t(), None, None, None


def _segment_attention_applies(x: Tensor, weight: Tensor, attn_drop: float) -> bool:
    """Segmented attention as one node (:class:`_SegmentAttention`) where the attention is
    written out anyway (training on the CPU) and there is no attention dropout."""
    return _explicit_attention_applies(x, weight) and attn_drop == 0


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: Size2, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the width {dim}; expected a divisor of {dim}")
        self.num_heads = num_heads
        self.window = window
        self.attn_drop = attn_drop
        self.rel_pos_table = nn.Parameter(torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), num_heads))
        self.register_buffer("rel_pos_index", relative_position_index(window), persistent=False)
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        nn.init.trunc_normal_(self.rel_pos_table, std=0.02)

    def gather_bias(self, index: Tensor) -> Tensor:
        """(heads, n, n) relative position bias for the flattened (n*n,) table indices."""
        n = int(round(index.numel() ** 0.5))
        table = self.rel_pos_table.t()  # (heads, T): one gather along T gives the (heads, n*n) layout
        return table.gather(1, index.view(1, -1).expand(self.num_heads, -1)).view(self.num_heads, n, n)

    def relative_bias(self) -> Tensor:
        """(heads, N, N) relative position bias of this block."""
        return self.gather_bias(self.rel_pos_index.reshape(-1))

    def _attend(self, qkv: Tensor, bias: Tensor, nw: int) -> Tensor:
        """qkv: (B, nW*n, 3C) of consecutive windows; bias broadcasts to (nW, heads, n, n)."""
        b, length, c3 = qkv.shape
        h = self.num_heads
        c = c3 // 3
        n = length // nw
        t = qkv.view(b, nw, n, 3, h, c // h).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, h, n, d)
        drop = self.attn_drop if self.training else 0.0
        q, k, v = t.unbind(0)  # one gradient buffer for the three (unbind, not indexing)
        if _explicit_attention_applies(qkv, self.rel_pos_table):
            scores = (q * (c // h) ** -0.5) @ k.transpose(-2, -1)  # (B, nW, h, n, n)
            scores += bias.to(scores.dtype)
            attn = scores.softmax(dim=-1)
            if drop > 0:
                attn = F.dropout(attn, drop)
            out = attn @ v  # (B, nW, h, n, d)
        else:
            # Windows and heads share one axis so that a single (1, nW*h, n, n) bias
            # broadcasts over the batch in the 4-D layout the fused kernels expect.
            q, k, v = (x.reshape(b, nw * h, n, c // h) for x in (q, k, v))
            mask = bias.to(q.dtype).expand(nw, h, n, n).reshape(1, nw * h, n, n)
            if mask.is_cuda and n % 8:  # the memory-efficient kernel wants 8-aligned rows
                padded = mask.new_zeros(1, nw * h, n, -(-n // 8) * 8)
                padded[..., :n] = mask
                mask = padded[..., :n]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
            out = out.view(b, nw, h, n, c // h)
        return out.transpose(2, 3).reshape(b, length, c)

    def forward(self, x: Tensor, plan: AttentionPlan) -> Tensor:
        """x: (B, L, C) tokens in the plan's order."""
        qkv = self.qkv(x)
        drop = self.attn_drop if self.training else 0.0
        if plan.segments is not None and _segment_attention_applies(qkv, self.rel_pos_table, drop):
            out = _SegmentAttention.apply(qkv, self.rel_pos_table, self.num_heads, plan.segments, plan.segment_index)
        elif plan.segments is not None:
            pieces = qkv.split([e - s for s, e in plan.segments], dim=1)  # split, not slicing: one gradient buffer
            parts = [self._attend(piece, self.gather_bias(index), 1)
                     for piece, index in zip(pieces, plan.segment_index, strict=True)]
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        else:
            bias = self.relative_bias()
            if plan.group_bias is not None:
                bias = bias + plan.group_bias.to(bias.dtype)  # (nW, h, N, N), built once per block
            out = self._attend(qkv, bias, plan.num_windows)
        return self.proj_drop(self.proj(out))


class MixMIMBlock(nn.Module):
    """Pre-norm transformer block with (non-shifted) window attention."""

    def __init__(self, dim: int, num_heads: int, grid: Size2, window: int | Size2,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.grid = grid
        self.window = effective_window(window, grid)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, self.window, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor, plan: AttentionPlan | None = None) -> Tensor:
        """x: (B, L, C) in ``plan.order``; without a plan, row-major tokens and plain windows."""
        if plan is None:
            plan = attention_plan(self.grid, self.window)
            return reorder_tokens(self(reorder_tokens(x, None, plan.order), plan), plan.order, None)
        x = x + self.drop_path(self.attn(self.norm1(x), plan))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_transformer_weights(module: nn.Module) -> None:
    """xavier_uniform for linear layers and zero biases, unit LayerNorms (section 8)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def xavier_init_conv_as_linear(conv: nn.Conv2d) -> None:
    """Initialise a patch-embedding convolution as the linear map it is."""
    w = conv.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


__all__ = [
    "AttentionPlan", "Linear", "MixMIMBlock", "Mlp", "PatchEmbed", "PatchMerging", "WindowAttention",
    "attention_plan", "effective_window", "fast_linear", "group_attention_bias", "init_transformer_weights",
    "onednn_linear_applies", "relative_position_index", "reorder_tokens", "sincos_pos_embed_2d", "to_2tuple",
    "use_fast_linears", "window_partition", "window_reverse", "xavier_init_conv_as_linear",
]
