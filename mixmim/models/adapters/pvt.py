"""MixMIM on timm's PVT v2 (``timm.models.pvt_v2.PyramidVisionTransformerV2``).

Output stride 32. timm ships PVT v2 only (``pvt_v2_b0`` .. ``pvt_v2_b5``, ``pvt_v2_b2_li``);
the paper's PVT-L (Table 3) is PVT v1, which timm does not have.

Three operators of PVT v2 cross positions:

- the overlapping patch embeddings (7x7 stride 4, then 3x3 stride 2) and the 3x3
  depthwise convolution inside every MLP: mixed convolutions (see ``mixed_ops``);
- spatial-reduction attention: keys and values come from a reduced map (a stride-``sr``
  convolution, or in the ``linear`` variant an adaptive 7x7 average pool), whose
  windows may pool tokens of both groups. The attention forward is swapped for one
  that computes the reduction once per group, on that group's tokens with the other
  group zeroed and the result renormalised by the fraction of the window the group
  fills (partial-convolution style; the convolution bias is kept out of the rescaling);
  a reduced token with no input of its group is dropped. Queries of group g attend to
  group g's reduced keys only (an additive -inf bias to ``F.scaled_dot_product_attention``
  over the concatenated keys of both groups). Without reduction (sr = 1) it is plain
  attention with the group bias. With one group this is exactly the plain attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.pvt_v2 import Attention as PvtAttention
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from torch import Tensor

from .base import GroupContext, TimmMixMIMAdapter, additive_bias, masked_mean_pool, swap_forward, to_tokens
from .mixed_ops import make_mixed


def _reduced_keys(attn: PvtAttention, fmap: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """One group's reduced tokens (B, M, C), after the reduction's norm, and their validity (M,)."""
    if attn.pool is not None:  # linear variant: adaptive average pool, 1x1 conv, norm, GELU
        pooled, frac = masked_mean_pool(attn.pool, fmap, keep)
        red = to_tokens(attn.sr(pooled))
        red = attn.act(attn.norm(red))
    else:  # stride-sr convolution over sr x sr windows, norm
        conv = attn.sr
        frac = F.avg_pool2d(keep, conv.kernel_size, conv.stride)
        bias = conv.bias.view(1, -1, 1, 1) if conv.bias is not None else 0.0
        red = (conv(fmap * keep) - bias) / frac.clamp(min=1e-6) + bias
        red = attn.norm(to_tokens(red))
    return red, frac.reshape(-1) > 0


def group_sra(attn: PvtAttention, groups: Tensor, x: Tensor, feat_size) -> Tensor:
    """Spatial-reduction attention of PVT v2 with the two groups kept apart."""
    b, n, c = x.shape
    h, w = feat_size
    heads, d = attn.num_heads, attn.head_dim
    q = attn.q(x).reshape(b, n, heads, d).transpose(1, 2)
    gq = groups.reshape(-1)
    if attn.sr is None and attn.pool is None:
        kv = attn.kv(x)
        allowed = gq[:, None] == gq[None, :]
    else:
        fmap = x.transpose(1, 2).reshape(b, c, h, w)
        kvs, key_group, key_valid = [], [], []
        for g in (0, 1):
            red, valid = _reduced_keys(attn, fmap, (groups == g).to(x.dtype))
            kvs.append(attn.kv(red))
            key_group.append(torch.full_like(valid, g, dtype=gq.dtype))
            key_valid.append(valid)
        kv = torch.cat(kvs, dim=1)
        kg, kval = torch.cat(key_group), torch.cat(key_valid)
        allowed = (gq[:, None] == kg[None, :]) & kval[None, :]
    k, v = kv.reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    bias = additive_bias(allowed, q.dtype)[None, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(b, n, c)))


def _sra_forward(original, attn: PvtAttention, ctx: GroupContext, x: Tensor, feat_size) -> Tensor:
    if not ctx.active:
        return original(x, feat_size)
    return group_sra(attn, ctx.groups(*feat_size), x, feat_size)


class PVTv2Adapter(TimmMixMIMAdapter):
    family = "pvt_v2"

    def __init__(self, encoder: PyramidVisionTransformerV2, timm_name: str, img_size: int = 224,
                 **options) -> None:
        info = encoder.feature_info[-1]
        super().__init__(encoder, timm_name, stride=info["reduction"], num_features=encoder.num_features,
                         img_size=img_size, in_chans=encoder.in_chans, **options)
        self.restricted_attention = 0
        for mod in encoder.modules():
            if isinstance(mod, PvtAttention):
                swap_forward(mod, _sra_forward, mod, self.ctx)
                self.restricted_attention += 1
        # patch embeddings and depthwise MLP convolutions; the reductions are handled above
        self.mixed_modules = make_mixed(encoder, self.ctx, skip=(PvtAttention,))

    def _encode(self, x: Tensor, restrict: bool) -> Tensor:
        return to_tokens(self.encoder.forward_features(x))  # (B, C, H, W) after the last stage's norm
