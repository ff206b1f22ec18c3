"""Mixing masks at the encoder-stride grid (sections 2.2 and 5, Table 8).

A mask is a (1, L) float tensor of 0/1, row-major over the grid; 1 marks a cell whose
tokens come from the partner image (the convention of the original implementation).
One mask is shared by the whole batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MASK_TYPES = ("random", "block")


def mask_count(num_cells: int, ratio: float) -> int:
    """Number of masked cells for a ratio, truncated as the original implementation does."""
    return int(num_cells * ratio)


def random_mask(grid: tuple[int, int], ratio: float, device: torch.device | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Uniformly random cells, exactly ``int(L * ratio)`` of them."""
    num = grid[0] * grid[1]
    noise = torch.rand(num, device=device, generator=generator)
    mask = torch.zeros(num, device=device)
    mask[noise.argsort()[: mask_count(num, ratio)]] = 1.0
    return mask.unsqueeze(0)


def block_mask(grid: tuple[int, int], ratio: float, device: torch.device | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """One axis-aligned rectangle covering about ``ratio`` of the grid (CutMix-style block).

    The aspect ratio is log-uniform in [1/3, 3]; the side lengths are rounded and
    clipped to the grid, and the position is uniform over the valid placements.
    """
    h, w = grid
    target = max(1.0, ratio * h * w)
    u = torch.rand(3, generator=generator).tolist()
    aspect = math.exp(math.log(1 / 3) + u[0] * (math.log(3) - math.log(1 / 3)))
    bh = min(h, max(1, round(math.sqrt(target * aspect))))
    bw = min(w, max(1, round(target / bh)))
    top = min(h - bh, int(u[1] * (h - bh + 1)))
    left = min(w - bw, int(u[2] * (w - bw + 1)))
    mask = torch.zeros(h, w, device=device)
    mask[top:top + bh, left:left + bw] = 1.0
    return mask.reshape(1, -1)


def sample_mask(grid: tuple[int, int], mask_type: str, ratio: float, range_ratio: float = 0.0,
                device: torch.device | None = None, generator: torch.Generator | None = None) -> Tensor:
    """A batch's mask; the ratio is ``ratio + U(0, range_ratio)`` drawn once per batch (Table 8)."""
    if range_ratio > 0:
        ratio = ratio + float(torch.rand(1, generator=generator)) * range_ratio
    if mask_type == "random":
        return random_mask(grid, ratio, device, generator)
    if mask_type == "block":
        return block_mask(grid, ratio, device, generator)
    raise ValueError(f"mask_type={mask_type!r}; expected one of {MASK_TYPES}")


def check_mask_settings(mask_type: str, ratio: float, range_ratio: float) -> None:
    """Refuse a mask type or ratio the samplers cannot honour, naming the value."""
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type={mask_type!r}; expected one of {MASK_TYPES}")
    if not 0.0 < ratio < 1.0 or range_ratio < 0 or ratio + range_ratio >= 1.0:
        raise ValueError(
            f"mask_ratio={ratio}, range_mask_ratio={range_ratio}; expected "
            "0 < mask_ratio and mask_ratio + range_mask_ratio < 1"
        )


def check_mask(mask: Tensor, num_cells: int) -> Tensor:
    """Validate a user-given mask: shape (1, L) and values in {0, 1}; returns it as float."""
    if mask.ndim != 2 or mask.shape[0] != 1 or mask.shape[1] != num_cells:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)}; expected (1, {num_cells}), one entry per encoder-stride cell"
        )
    m = mask.float()
    if not torch.all((m == 0) | (m == 1)):
        bad = m[(m != 0) & (m != 1)].flatten()[0].item()
        raise ValueError(f"mask holds the value {bad}; expected a binary mask of 0 and 1")
    return m
