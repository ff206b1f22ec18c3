"""The MixMIM encoder: a Swin-like hierarchy without shifted windows (section 2.2).

It is shared by the pretraining model (which mixes inputs and restricts attention to
groups), the classifier and the dense-prediction backbone (which use it plainly).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .layers import (
    AttentionPlan,
    MixMIMBlock,
    PatchEmbed,
    PatchMerging,
    Size2,
    attention_plan,
    init_transformer_weights,
    reorder_tokens,
    sincos_pos_embed_2d,
    to_2tuple,
    xavier_init_conv_as_linear,
)


def _per_stage(value, num_stages: int, name: str) -> list:
    """Broadcast a scalar to every stage, or check that a list has one entry per stage."""
    if isinstance(value, int):
        return [value] * num_stages
    values = list(value)
    if len(values) != num_stages:
        raise ValueError(f"{name}={list(value)} has {len(values)} entries; expected one per stage ({num_stages})")
    return values


def _per_block(window: int | Sequence[int], depth: int, stage: int) -> list[int]:
    """A stage's window: one size for all its blocks, or a list with one size per block."""
    if isinstance(window, int):
        return [window] * depth
    sizes = [int(w) for w in window]
    if len(sizes) != depth:
        raise ValueError(f"window_size of stage {stage + 1} lists {len(sizes)} sizes; expected one per block ({depth})")
    return sizes


def encoder_layer_id(name: str, depths: Sequence[int]) -> int | None:
    """Layer-decay depth of an encoder parameter (``name`` relative to the encoder), the one
    rule of this suite for classification finetuning and for the dense backbones.

    The patch embedding is depth 0 and block ``k`` of the flattened block list is depth
    ``k + 1``; a patch merging has the depth of the block it feeds (the first block of its
    stage). Anything else (the final norm) returns None: the caller puts it after the
    deepest block.

    Why the merging joins the block it feeds: the authors' ``util/lr_decay.py``
    (``get_layer_id_for_mixmim``, used by their classification finetuning) gives the
    ``downsample`` of stage ``i``, which sits at the end of stage ``i`` in their model and
    feeds stage ``i + 1``, the id ``sum(depths[:i + 1]) + 1``, which is the id of the first
    block of stage ``i + 1``. Here the merging sits at the start of the stage it feeds, so
    the same parameters get the same depth. The paper (sections 4 and 8) only says it
    follows BEiT's layer-wise decay and sweeps the rate; it fixes no merging rule.
    One known difference, kept on purpose: the authors' table gives the final norm and
    head the depth of the deepest block (scale ``decay ** 1``), whereas here (as in BEiT
    and MAE) they come after it and train at the full rate.
    """
    parts = name.split(".")
    if parts[0] == "patch_embed":
        return 0
    if parts[0] == "stages" and len(parts) > 2:
        stage = int(parts[1])
        first = sum(int(d) for d in depths[:stage]) + 1
        if parts[2] == "blocks":
            return first + int(parts[3])
        if parts[2] == "merge":
            return first
    return None


def upsample_mask(mask: Tensor, grid: Size2, factor: int) -> Tensor:
    """Nearest upsampling of a (1, H*W) row-major mask by an integer factor, to (1, H*f*W*f)."""
    h, w = grid
    m = mask.reshape(1, h, w)
    m = m.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    return m.reshape(1, -1)


class MixMIMStage(nn.Module):
    """Optional patch merging from the previous stage, then ``depth`` window-attention blocks."""

    def __init__(self, in_dim: int | None, dim: int, depth: int, num_heads: int, grid: Size2,
                 windows: Sequence[int], mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: Sequence[float]) -> None:
        super().__init__()
        self.grid = grid
        self.merge = PatchMerging(in_dim, dim) if in_dim is not None else None
        self.blocks = nn.ModuleList(
            MixMIMBlock(dim, num_heads, grid, window, mlp_ratio, qkv_bias, drop, attn_drop, dp)
            for window, dp in zip(windows, drop_path, strict=True)
        )
        assert len(self.blocks) == depth


class MixMIMEncoder(nn.Module):
    """Patch embedding, fixed sin-cos position embedding, stages, final LayerNorm.

    ``img_size`` fixes the token grids (and so the position embedding and each block's
    window); any size that the encoder stride ``patch_size * 2**(stages-1)`` divides is
    accepted.
    """

    def __init__(
        self,
        img_size: int | Size2 = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: int | Sequence[int | Sequence[int]] = (14, 14, 14, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        """``window_size``: one size for all stages, one per stage, or per stage a list with
        one size per block (the detection setting of section 3 uses 32 for some blocks)."""
        super().__init__()
        depths = [int(d) for d in depths]
        num_stages = len(depths)
        if num_stages < 1:
            raise ValueError("depths must list at least one stage")
        heads = [int(h) for h in _per_stage(num_heads, num_stages, "num_heads")]
        windows = _per_stage(window_size, num_stages, "window_size")
        self.img_size = to_2tuple(img_size)
        self.patch_size = int(patch_size)
        self.num_stages = num_stages
        self.stride = self.patch_size * 2 ** (num_stages - 1)
        if self.img_size[0] % self.stride or self.img_size[1] % self.stride:
            raise ValueError(
                f"image size {self.img_size[0]}x{self.img_size[1]} is not divisible by the encoder stride "
                f"{self.stride} (patch {self.patch_size} x 2^{num_stages - 1}); expected a multiple of {self.stride}"
            )
        self.dims = [int(embed_dim) * 2**i for i in range(num_stages)]
        self.num_features = self.dims[-1]
        self.grids: list[Size2] = [
            (self.img_size[0] // (self.patch_size * 2**i), self.img_size[1] // (self.patch_size * 2**i))
            for i in range(num_stages)
        ]
        self.use_checkpoint = use_checkpoint

        self.patch_embed = PatchEmbed(self.patch_size, in_chans, self.dims[0])
        self.register_buffer("pos_embed", sincos_pos_embed_2d(self.dims[0], self.grids[0]), persistent=False)
        self.pos_drop = nn.Dropout(drop_rate)
        total = sum(depths)  # stochastic depth grows linearly over all blocks
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.stages.append(
                MixMIMStage(
                    in_dim=self.dims[i - 1] if i else None, dim=self.dims[i], depth=depth,
                    num_heads=heads[i], grid=self.grids[i], windows=_per_block(windows[i], depth, i),
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                    drop_path=rates[start:start + depth],
                )
            )
        self.norm = nn.LayerNorm(self.num_features)
        self.apply(init_transformer_weights)
        xavier_init_conv_as_linear(self.patch_embed.proj)

    # ------------------------------------------------------------------ #
    @property
    def mask_grid(self) -> Size2:
        """Grid of mixing-mask cells: one cell per encoder-stride square."""
        return self.grids[-1]

    def check_images(self, imgs: Tensor) -> None:
        if imgs.ndim != 4 or tuple(imgs.shape[-2:]) != self.img_size:
            raise ValueError(
                f"input of shape {tuple(imgs.shape)} does not match the encoder, which was built for "
                f"(B, C, {self.img_size[0]}, {self.img_size[1]}) images; build it with img_size="
                f"{tuple(imgs.shape[-2:])} (a multiple of the stride {self.stride})"
            )

    def stage_masks(self, mask: Tensor) -> list[Tensor]:
        """The (1, L) mask at the stride grid, nearest-upsampled to every stage's grid."""
        return [
            upsample_mask(mask, self.mask_grid, 2 ** (self.num_stages - 1 - i)) for i in range(self.num_stages)
        ]

    def embed(self, imgs: Tensor) -> Tensor:
        """Patch tokens (B, L, C) before the position embedding."""
        self.check_images(imgs)
        return self.patch_embed(imgs)

    def forward_stages(
        self,
        tokens: Tensor,
        mask: Tensor | None = None,
        restrict_attention: bool = False,
        mix_embeds: Sequence[Tensor] | None = None,
    ) -> list[Tensor]:
        """Run all stages on embedded tokens; return each stage's output (B, L_s, C_s).

        With ``mask`` (1, L) at the stride grid: ``restrict_attention`` keeps attention
        inside each group, and ``mix_embeds`` (one (2, C_s) tensor per stage) adds the
        group's embedding at the start of each stage.
        """
        x = self.pos_drop(tokens + self.pos_embed.to(tokens.dtype))
        masks = self.stage_masks(mask) if mask is not None else [None] * self.num_stages
        outs = []
        for i, stage in enumerate(self.stages):
            if stage.merge is not None:
                x = stage.merge(x, self.grids[i - 1])
            m = masks[i]
            if mix_embeds is not None and m is not None:
                e = mix_embeds[i].to(x.dtype)
                x = x + e[0] + m.reshape(1, -1, 1).to(x.dtype) * (e[1] - e[0])
            # Tokens stay in attention order (windows, or groups for a whole-map window)
            # from block to block and return to row-major order at the end of the stage.
            restrict = restrict_attention and m is not None
            plans: dict[Size2, AttentionPlan] = {}  # one per window size, built once per stage
            order = None
            for blk in stage.blocks:
                if blk.window not in plans:
                    plans[blk.window] = attention_plan(stage.grid, blk.window, m if restrict else None, x.dtype,
                                                       split_windows=x.device.type == "cpu")
                plan = plans[blk.window]
                x = reorder_tokens(x, order, plan.order)
                order = plan.order
                if self.use_checkpoint and self.training and torch.is_grad_enabled():
                    x = torch.utils.checkpoint.checkpoint(blk, x, plan, use_reentrant=False)
                else:
                    x = blk(x, plan)
            x = reorder_tokens(x, order, None)
            outs.append(x)
        return outs

    def forward(self, imgs: Tensor) -> Tensor:
        """Final-norm tokens of the last stage, (B, L, C): the representation to pool."""
        return self.norm(self.forward_stages(self.embed(imgs))[-1])

    def forward_features(self, imgs: Tensor) -> list[Tensor]:
        """Every stage's output as a (B, C_s, H_s, W_s) map, for dense heads (strides 4..32)."""
        outs = self.forward_stages(self.embed(imgs))
        return [
            x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid) for x, grid in zip(outs, self.grids)
        ]

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay (relative position tables)."""
        return {n for n, _ in self.named_parameters() if n.endswith("rel_pos_table")}
