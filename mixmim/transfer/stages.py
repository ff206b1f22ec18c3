"""DVC stages of the dense transfers (Table 4): COCO Mask R-CNN and ADE20K UperNet.

Like :func:`mixmim.pipeline.finetune_stage`: the named params sections (later ones
override) become a checked engine config, the dataset root comes from ``roots``, the
tracking layout from ``tracking`` (run ``coco/<variant>`` or ``ade20k/<variant>``), and
the stage writes its metrics JSON and a plot CSV (one row per loop epoch; evaluated
rows carry the validation scores) atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..engine.config import from_mapping
from ..pipeline import Params, merged, tracking_fields, write_metrics, write_plot_csv
from ..records import records_path, write_detection_records, write_segmentation_records
from .config import DenseConfig, DetectionConfig, SegmentationConfig, check_config

__all__ = ["coco_stage", "ade20k_stage", "COCO_METRICS", "ADE20K_METRICS"]

COCO_METRICS = ("ap_box", "ap_mask", "ap50_box", "ap75_box", "ap50_mask", "ap75_mask")
ADE20K_METRICS = ("miou", "pixel_acc", "macc", "baseline_miou", "baseline_pixel_acc")


def _number(value: Any) -> Any:
    """Metrics JSON holds numbers or null (a NaN score means "no ground truth")."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _config(cls: type[DenseConfig], params: Params, sections: Sequence[str], stage: str, variant: str,
            dataset: str, init: str | None, run_dir: str) -> Any:
    stage_params = merged(params, sections)
    where = f"{params.path}: {' + '.join(sections)}"
    cfg = from_mapping(cls, stage_params, where=where)
    cfg.data_root = params.dataset_root(dataset)
    if init:
        cfg.init = params.resolve_path(init)
    elif cfg.init:
        cfg.init = params.resolve_path(cfg.init)
    cfg.output_dir = params.resolve_path(run_dir)
    for key, value in tracking_fields(params, stage, variant, dataset, cfg.model, stage_params).items():
        setattr(cfg, key, value)
    check_config(cfg, where)
    return cfg


def _plot_rows(history: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    return [{k: h[k] for k in ("epoch", "step", "train_loss", "lr", *keys) if k in h} for h in history]


def coco_stage(params: Params, sections: Sequence[str], variant: str, init: str | None, run_dir: str,
               metrics_path: str, plots_path: str) -> dict[str, Any]:
    """Mask R-CNN on the ``coco`` root from ``init`` (None: the section's init, else random) and its metrics."""
    from .train import train_detection

    cfg = _config(DetectionConfig, params, sections, "coco", variant, "coco", init, run_dir)
    result = train_detection(cfg)
    write_plot_csv(plots_path, _plot_rows(result["history"], COCO_METRICS))
    per_image = result["records"]  # the last epoch's per-image match records: the report's bootstrap
    write_detection_records(records_path(metrics_path), per_image["box"], per_image["mask"])
    write_metrics(metrics_path, {**{k: _number(result[k]) for k in COCO_METRICS},
                                 "init": "pretrained" if cfg.init else "scratch", "run_id": result["run_id"],
                                 "n_val": result["n_val"], "model": cfg.model, "epochs": cfg.epochs,
                                 "img_size": cfg.img_size, "seed": cfg.seed})
    return result


def ade20k_stage(params: Params, sections: Sequence[str], variant: str, init: str | None, run_dir: str,
                 metrics_path: str, plots_path: str) -> dict[str, Any]:
    """UperNet on the ``ade20k`` root from ``init`` and its metrics, with the majority-class baseline."""
    from .train import train_segmentation

    cfg = _config(SegmentationConfig, params, sections, "ade20k", variant, "ade20k", init, run_dir)
    result = train_segmentation(cfg)
    write_plot_csv(plots_path, _plot_rows(result["history"], ("miou", "pixel_acc", "macc")))
    per_image = result["records"]  # the last iteration's per-image intersection/union counts
    write_segmentation_records(records_path(metrics_path), per_image["intersection"], per_image["union"],
                               per_image["classes"])
    write_metrics(metrics_path, {**{k: _number(result[k]) for k in ADE20K_METRICS},
                                 "per_class_iou": {k: _number(v) for k, v in result["per_class_iou"].items()},
                                 "init": "pretrained" if cfg.init else "scratch", "run_id": result["run_id"],
                                 "n_val": result["n_val"], "model": cfg.model, "max_iters": cfg.max_iters,
                                 "img_size": cfg.img_size, "seed": cfg.seed})
    return result
