"""Small building blocks of the MixMIM encoder: patch embedding, patch merging,
fixed position embeddings, windowing helpers and the window-attention block.

Attention goes through ``F.scaled_dot_product_attention`` with one additive bias
per block that already holds the relative position bias and, during pretraining,
the group restriction (a token may attend only to tokens of its own group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

Size2 = tuple[int, int]


def to_2tuple(value: int | Size2 | list[int]) -> Size2:
    """Accept ``n`` or ``(h, w)`` and always hand back ``(h, w)``."""
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


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
        self.proj = nn.Linear(4 * dim, out_dim, bias=False)

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
# Window attention block
# --------------------------------------------------------------------------- #
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
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.rel_pos_table, std=0.02)

    def relative_bias(self) -> Tensor:
        """(heads, N, N) relative position bias of this block."""
        n = self.window[0] * self.window[1]
        bias = self.rel_pos_table[self.rel_pos_index.reshape(-1)].view(n, n, self.num_heads)
        return bias.permute(2, 0, 1)

    def forward(self, x: Tensor, group_bias: Tensor | None = None) -> Tensor:
        """x: (B, nW, N, C) windows; group_bias: (nW, 1, N, N) or None."""
        b, nw, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(b, nw, n, 3, h, c // h).permute(3, 0, 1, 4, 2, 5)
        # Windows and heads share one axis so that a single (1, nW*h, N, N) bias
        # broadcasts over the batch in the 4-D layout the fused kernels expect.
        q, k, v = (t.reshape(b, nw * h, n, c // h) for t in qkv.unbind(0))
        bias = self.relative_bias().to(q.dtype).unsqueeze(0)
        if group_bias is not None:
            bias = bias + group_bias.to(q.dtype)
        bias = bias.expand(nw, h, n, n).reshape(1, nw * h, n, n)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0
        )
        out = out.view(b, nw, h, n, c // h).transpose(2, 3).reshape(b, nw, n, c)
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
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: Tensor, group_bias: Tensor | None = None) -> Tensor:
        windows = window_partition(self.norm1(x), self.grid, self.window)
        attn = window_reverse(self.attn(windows, group_bias), self.grid, self.window)
        x = x + self.drop_path(attn)
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
    "MixMIMBlock", "PatchEmbed", "PatchMerging", "WindowAttention", "effective_window",
    "group_attention_bias", "init_transformer_weights", "relative_position_index",
    "sincos_pos_embed_2d", "to_2tuple", "window_partition", "window_reverse",
    "xavier_init_conv_as_linear",
]
