"""What the pretrained model sees and what it reconstructs (the pictures of the paper's Figures 1 and 3).

The pretrainer predicts, for every mask cell, pixels normalised by that cell's own mean
and standard deviation (``norm_pix_loss``): its output carries no cell mean or contrast.
To show a reconstruction as an image, each predicted cell is rescaled with the mean and
standard deviation of the cells of the same image that the model was given (its visible
cells), never with the hidden target cell's own statistics; so every structure inside a
predicted cell is model output, and the predicted cells share one brightness and contrast
taken from the model's input. As in MAE's visualisations only the cells a branch predicts
are pasted; the visible cells are the input itself.

Cell bookkeeping (see :func:`mixmim.models.pretrainer.reconstruction_loss`): the mixed
input ``i`` holds image ``i`` where ``mask == 0`` and its partner ``B-1-i`` where
``mask == 1``. Branch 1 (``pred[i]``) predicts image ``i`` on the ``mask == 1`` cells;
branch 2 (``pred[B + i]``) predicts the partner on the ``mask == 0`` cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..models import patchify, unpatchify
from ..reconstruction_error import MEAN, STD, find_sample_images, fixed_mask, load_images, load_pretrainer

__all__ = ["PairView", "find_sample_images", "fixed_mask", "load_images", "load_pretrainer", "reconstruct_pairs"]



@dataclass(frozen=True)
class PairView:
    """One row of the figure: two originals, the mixed input, and each image's reconstruction.

    Arrays are (H, W, 3) floats in [0, 1]. ``recon_b`` is None without dual reconstruction,
    and ``original_b`` is None when the fill is not another image (zero, learnable, ...).
    """

    original_a: np.ndarray
    original_b: np.ndarray | None
    mixed: np.ndarray
    recon_a: np.ndarray
    recon_b: np.ndarray | None


def to_display(img: Tensor) -> np.ndarray:
    """A normalised (3, H, W) tensor as an (H, W, 3) picture in [0, 1]."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (img.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def cell_mask_pixels(mask: Tensor, grid: tuple[int, int], cell: int) -> Tensor:
    """The (1, L) cell mask as a (1, H, W) pixel mask."""
    m = mask.reshape(grid).float()
    return m.repeat_interleave(cell, 0).repeat_interleave(cell, 1).unsqueeze(0)


def unnormalise_cells(pred: Tensor, target: Tensor, cell: int, norm_pix: bool,
                      visible: Tensor | None = None) -> Tensor:
    """Predicted cells (L, cell*cell*3) in the image's (normalised-input) pixel space.

    Without ``visible`` each cell is rescaled with the target cell's own statistics (those
    of :func:`mixmim.models.pretrainer.pixel_targets`: mean and unbiased variance + 1e-6), so
    a perfect prediction returns the target exactly; that uses the answer and is for
    checks only. With ``visible`` ((L,) 1 = a cell the model was given) every cell is
    rescaled with the mean and spread of the visible cells' pixels pooled: only what the
    model saw of this image.
    """
    if not norm_pix:
        return pred
    cells = patchify(target.unsqueeze(0), cell)[0]
    if visible is not None:
        seen = cells[visible.reshape(-1) > 0]
        if seen.numel() == 0:
            raise ValueError("unnormalise_cells: no visible cell to take statistics from")
        return pred * seen.std() + seen.mean()
    mean = cells.mean(dim=-1, keepdim=True)
    var = cells.var(dim=-1, keepdim=True)
    return pred * (var + 1.0e-6) ** 0.5 + mean


def paste(target: Tensor, pred_cells: Tensor, predicted: Tensor, cell: int, grid: tuple[int, int]) -> Tensor:
    """``target`` (3, H, W) with the cells where ``predicted`` (L,) is 1 replaced by ``pred_cells``."""
    cells = patchify(target.unsqueeze(0), cell)[0]
    keep = predicted.reshape(-1, 1).to(cells.dtype)
    mixed = cells * (1 - keep) + pred_cells * keep
    return unpatchify(mixed.unsqueeze(0), cell, grid)[0]


@torch.no_grad()
def reconstruct_pairs(model: torch.nn.Module, imgs: Tensor, mask: Tensor) -> list[PairView]:
    """Run the pretrainer once on ``imgs`` (B, 3, H, W; B even) with ``mask`` and build one view per pair."""
    b = imgs.shape[0]
    if b < 2 or b % 2:
        raise ValueError(f"{b} images; the mixing figure needs an even number, at least 2")
    out = model(imgs, mask)
    cell, grid = model.stride, tuple(model.encoder.mask_grid)
    m = out.mask.reshape(-1).float().cpu()
    pix = cell_mask_pixels(m, grid, cell)
    pred = out.pred.float().cpu()
    imgs = imgs.float().cpu()
    norm_pix = bool(getattr(model, "norm_pix_loss", True))
    mixes = getattr(model, "fill", "mix") == "mix"
    views = []
    for i in range(b // 2):
        j = b - 1 - i
        a_cells = unnormalise_cells(pred[i], imgs[i], cell, norm_pix, visible=1 - m)
        recon_a = paste(imgs[i], a_cells, m, cell, grid)
        recon_b = None
        if pred.shape[0] == 2 * b:
            b_cells = unnormalise_cells(pred[b + i], imgs[j], cell, norm_pix, visible=m)
            recon_b = to_display(paste(imgs[j], b_cells, 1 - m, cell, grid))
        filler = imgs[j] if mixes else torch.zeros_like(imgs[i])  # zero in normalised space: mean grey
        mixed = imgs[i] * (1 - pix) + filler * pix
        views.append(PairView(to_display(imgs[i]), to_display(imgs[j]) if mixes else None, to_display(mixed),
                              to_display(recon_a), recon_b))
    return views
