"""MixMIM on timm's Swin Transformer (``timm.models.swin_transformer.SwinTransformer``).

Output stride 32 (patch 4, three 2x2 patch mergings). The patch embedding and the
mergings work on aligned 4x4 / 2x2 patches, so only window attention can cross groups.

Group restriction: each block's ``WindowAttention.forward`` is swapped for one that
adds a group bias to the mask timm passes in. The bias is built in the block's own
frame: the group map at the block's resolution is rolled by the block's cyclic shift
(as timm rolls the features), padded to whole windows (padding, which holds no image
content, stays visible to both groups, as in the plain model) and cut into windows;
tokens of different groups get -inf. Added to timm's shifted-window mask (-100 across
sub-windows), a token attends only to its own group inside its own (shifted) window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from torch import Tensor

from .base import PAD, GroupContext, TimmMixMIMAdapter, additive_bias, swap_forward


def window_group_bias(ctx: GroupContext, blk: SwinTransformerBlock, h: int, w: int, dtype: torch.dtype) -> Tensor:
    """(nW, N, N) bias of one block: -inf between tokens of different groups in a window."""
    key = ("swin", h, w, tuple(blk.window_size), tuple(blk.shift_size), dtype)
    if key not in ctx.cache:
        g = ctx.groups(h, w)[0, 0]
        if any(blk.shift_size):
            g = torch.roll(g, shifts=(-blk.shift_size[0], -blk.shift_size[1]), dims=(0, 1))
        wh, ww = blk.window_size
        g = F.pad(g, (0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh), value=PAD)
        hp, wp = g.shape
        win = g.reshape(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
        a, b = win[:, :, None], win[:, None, :]
        ctx.cache[key] = additive_bias((a == b) | (a == PAD) | (b == PAD), dtype)
    return ctx.cache[key]


def _block_forward(original, ctx: GroupContext, x: Tensor) -> Tensor:
    ctx.current_hw = (x.shape[1], x.shape[2])  # blocks take (B, H, W, C)
    return original(x)


def _window_attention_forward(original, blk: SwinTransformerBlock, ctx: GroupContext, x: Tensor,
                              mask: Tensor | None = None) -> Tensor:
    if not ctx.active:
        return original(x, mask=mask)
    bias = window_group_bias(ctx, blk, *ctx.current_hw, x.dtype)
    return original(x, mask=bias if mask is None else mask.to(bias.dtype) + bias)


class SwinAdapter(TimmMixMIMAdapter):
    family = "swin"

    def __init__(self, encoder: SwinTransformer, timm_name: str, **options) -> None:
        info = encoder.feature_info[-1]
        super().__init__(encoder, timm_name, stride=info["reduction"], num_features=encoder.num_features,
                         img_size=encoder.patch_embed.img_size, in_chans=encoder.patch_embed.proj.in_channels,
                         **options)
        self.restricted_blocks = 0
        for blk in encoder.modules():
            if isinstance(blk, SwinTransformerBlock):
                swap_forward(blk, _block_forward, self.ctx)
                swap_forward(blk.attn, _window_attention_forward, blk, self.ctx)
                self.restricted_blocks += 1

    def _encode(self, x: Tensor, restrict: bool) -> Tensor:
        f = self.encoder.forward_features(x)  # (B, H, W, C) after the final norm
        return f.reshape(f.shape[0], -1, f.shape[-1])
