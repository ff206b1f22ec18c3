"""MixMIM on timm's plain ViT (``timm.models.vision_transformer.VisionTransformer``).

The mask lives on the patch grid (output stride = patch size, 16 for ViT-B/16). The
patch embedding is a non-overlapping convolution, so mixing pixels is mixing tokens.

Group restriction: global attention gets one additive (1, 1, N, N) bias, 0 within a
group and -inf across, which timm's ``Attention`` hands to
``F.scaled_dot_product_attention`` (its blocks take ``attn_mask``).

Class token (and any register tokens): each group gets its own copy of the prefix
tokens, placed after the originals, with the same learned values and position
embedding. Copy g belongs to group g: it attends to group g's patches and its own
prefix copy, and only group g's patches attend to it. So each group computes exactly
what the plain ViT computes on that group's image alone (its class token included),
no information crosses groups through the class token, and with an all-zero mask the
patch tokens are those of the plain model. The copies are dropped from the latent,
which holds the patch tokens only.
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .base import TimmMixMIMAdapter, additive_bias


class ViTAdapter(TimmMixMIMAdapter):
    family = "vit"
    checkpoint_safe = True

    def __init__(self, encoder: VisionTransformer, timm_name: str, **options) -> None:
        pe = encoder.patch_embed
        if type(pe) is not PatchEmbed:
            raise NotImplementedError(
                f"{timm_name}: the ViT adapter needs timm's plain PatchEmbed (one non-overlapping patch "
                f"convolution); {type(pe).__name__} (e.g. a hybrid CNN stem) would mix pixels across cells"
            )
        if pe.proj.kernel_size != pe.proj.stride or pe.patch_size[0] != pe.patch_size[1]:
            raise NotImplementedError(f"{timm_name}: square, non-overlapping patches only")
        if not isinstance(encoder.patch_drop, nn.Identity):
            raise ValueError(f"{timm_name}: patch dropout drops tokens of the mask grid; build it with "
                             "patch_drop_rate=0")
        if pe.img_size is None:
            raise ValueError(f"{timm_name}: built without a fixed img_size; pass img_size to the builder")
        super().__init__(encoder, timm_name, stride=pe.patch_size[0], num_features=encoder.num_features,
                         img_size=pe.img_size, in_chans=pe.proj.in_channels, **options)
        self.num_prefix = encoder.num_prefix_tokens

    def attention_bias(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        """(1, 1, N, N) bias over [prefix copy 0, prefix copy 1, patches]: -inf across groups."""
        p = self.num_prefix
        prefix = torch.cat([mask.new_zeros(p), mask.new_ones(p)])
        g = torch.cat([prefix, mask.reshape(-1)])
        return additive_bias(g[:, None] == g[None, :], dtype)[None, None]

    def _encode(self, x: Tensor, restrict: bool) -> Tensor:
        enc = self.encoder
        t = enc.norm_pre(enc.patch_drop(enc._pos_embed(enc.patch_embed(x))))
        p = self.num_prefix
        if restrict:
            t = torch.cat([t[:, :p], t], dim=1)  # prefix copy 0 | prefix copy 1 | patches
            bias = self.attention_bias(self.ctx.mask, t.dtype)
            for blk in enc.blocks:  # the restriction is an argument: checkpointing recomputes it as is
                if enc.grad_checkpointing and torch.is_grad_enabled():
                    t = checkpoint(blk, t, attn_mask=bias, use_reentrant=False)
                else:
                    t = blk(t, attn_mask=bias)
            p *= 2
        else:
            t = enc.blocks(t)
        return enc.norm(t)[:, p:]
