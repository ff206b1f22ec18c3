"""Metrics and model-complexity counting shared by the detection and segmentation transfers.

All scores are fractions in [0, 1] (multiply by 100 for the paper's tables). Classes
or area ranges without ground truth get NaN rather than pycocotools' -1, so averages
and logs do not mistake "undefined" for a score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from mixmim.flops import CUSTOM_FLOPS

__all__ = [
    "COCO_STAT_NAMES",
    "DenseComplexity",
    "coco_stats_dict",
    "confusion_matrix",
    "count_macs",
    "count_trainable",
    "segmentation_scores",
]

COCO_STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""Names of the first six entries of ``COCOeval.stats`` (AP over IoU 0.5:0.95, at 0.5, ...)."""


# --------------------------------------------------------------------------- #
# Semantic segmentation
# --------------------------------------------------------------------------- #
def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ignored pixels skipped.

    Accumulating one matrix over the whole split (instead of averaging per-image
    scores) is how mmseg and the ADE20K benchmark define mIoU.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    valid = label != ignore_index
    gt, pr = label[valid].to(torch.int64), pred[valid].to(torch.int64)
    if gt.numel() and (int(gt.min()) < 0 or int(gt.max()) >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1} (ignore {ignore_index}): {gt.unique().tolist()[:10]}")
    counts = torch.bincount(gt * num_classes + pr.clamp(0, num_classes - 1), minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes).cpu()


def segmentation_scores(confusion: Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, mean class accuracy, pixel accuracy and per-class IoU/accuracy from a confusion matrix.

    A class absent from both ground truth and prediction has IoU NaN and is left out of
    the mean (mmseg's ``nanmean``); a class only predicted has IoU 0 and counts.
    """
    conf = confusion.to(torch.float64)
    tp = conf.diag()
    gt, pr = conf.sum(1), conf.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    total = conf.sum()
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    return {
        "mIoU": float(iou.nanmean()) if (union > 0).any() else float("nan"),
        "mAcc": float(acc.nanmean()) if (gt > 0).any() else float("nan"),
        "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
        "IoU": dict(zip(names, iou.tolist())),
        "Acc": dict(zip(names, acc.tolist())),
    }


# --------------------------------------------------------------------------- #
# COCO
# --------------------------------------------------------------------------- #
def coco_stats_dict(stats: Sequence[float], suffix: str) -> dict[str, float]:
    """``COCOeval.stats`` -> {"AP_box": ..., "AP50_box": ...}; -1 (no ground truth) -> NaN."""
    return {f"{name}_{suffix}": (float("nan") if v < 0 else float(v)) for name, v in zip(COCO_STAT_NAMES, stats)}


# --------------------------------------------------------------------------- #
# Complexity (Table 4)
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class DenseComplexity:
    """Parameters and multiply-adds of a dense model, with the parts the total is made of."""

    model: str
    task: str
    img_size: int
    params_m: float
    gflops: float
    parts_gflops: dict[str, float] = field(default_factory=dict)
    parts_params_m: dict[str, float] = field(default_factory=dict)
    convention: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "task": self.task, "img_size": self.img_size,
            "params_m": round(self.params_m, 2), "gflops": round(self.gflops, 2),
            "parts_gflops": {k: round(v, 2) for k, v in self.parts_gflops.items()},
            "parts_params_m": {k: round(v, 2) for k, v in self.parts_params_m.items()},
            "convention": self.convention,
        }


def count_trainable(module: nn.Module) -> int:
    """Learnable parameters. Unlike :func:`mixmim.flops.count_params` the fixed position
    table is left out: at dense resolutions it is large (8.4M entries at 1024 for
    MixMIM-B) and Table 4's parameter counts do not include it."""
    return sum(p.numel() for p in module.parameters())


def count_macs(fn: Callable[[], Any]) -> int:
    """Multiply-adds of ``fn()`` (FlopCounterMode's count halved, LayerNorm and CPU attention
    registered as in :mod:`mixmim.flops`), without autograd."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        fn()
    return counter.get_total_flops() // 2
