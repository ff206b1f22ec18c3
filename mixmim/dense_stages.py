"""The stage layer's dense-transfer stages: COCO Mask R-CNN and ADE20K UperNet (Table 4).

Like :func:`mixmim.pipeline.finetune_stage` (same checked config, seeds, tracking layout and
one-line errors), kept apart from :mod:`mixmim.pipeline` so that the classification stages do
not depend on :mod:`mixmim.transfer`: DVC reruns pretraining when the code it runs changes,
not when the detector does. Each stage writes its metrics JSON (with the per-image records
beside it) and a plot CSV, one row per loop epoch (evaluated rows carry validation scores).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .engine.config import ConfigError
from .params import Params, merged
from .pipeline import (
    drop_resume_state, is_main_process, stage_config, summarize_seeds, write_metrics, write_plot_csv,
)
from .transfer.dense_config import DetectionConfig, SegmentationConfig, check_config

__all__ = ["ADE20K_METRICS", "COCO_METRICS", "ade20k_stage", "coco_stage"]

COCO_METRICS = ("ap_box", "ap_mask", "ap50_box", "ap75_box", "ap50_mask", "ap75_mask")
ADE20K_METRICS = ("miou", "pixel_acc", "macc", "baseline_miou", "baseline_pixel_acc")


def _number(value: Any) -> Any:
    """Metrics JSON holds numbers or null (a NaN score means "no ground truth")."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _dense_config(cls: type, params: Params, sections: Sequence[str], stage: str, variant: str,
                  init: str | None, run_dir: str, seed: int | None) -> Any:
    """A dense-transfer config: ``init`` from the command line, else the section's (resolved), else none."""
    chosen = init or merged(params, sections).get("init")
    if chosen is not None and not isinstance(chosen, str):
        raise ConfigError(f"{params.path}: init={chosen!r}: expected the path of a checkpoint")
    owned = {"init": params.resolve_path(chosen) if chosen else None}
    return stage_config(cls, params, sections, stage, variant, stage, run_dir, seed, owned, from_section=("init",),
                        check=check_config)


def _plot_rows(history: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    return [{k: h[k] for k in ("epoch", "step", "train_loss", "lr", *keys) if k in h} for h in history]


def coco_stage(params: Params, sections: Sequence[str], variant: str, init: str | None, run_dir: str,
               metrics_path: str, plots_path: str, seed: int | None = None) -> dict[str, Any]:
    """Mask R-CNN on the ``coco`` root from ``init`` (None: the section's init, else random) and its metrics."""
    from .records import records_path, write_detection_records
    from .transfer.train import train_detection

    cfg = _dense_config(DetectionConfig, params, sections, "coco", variant, init, run_dir, seed)
    result = train_detection(cfg)
    if not is_main_process():
        return result
    summarize_seeds(cfg)
    write_plot_csv(plots_path, _plot_rows(result["history"], COCO_METRICS))
    per_image = result["records"]  # the last epoch's per-image match records: the report's bootstrap
    write_detection_records(records_path(metrics_path), per_image["box"], per_image["mask"])
    write_metrics(metrics_path, {**{k: _number(result[k]) for k in COCO_METRICS},
                                 "init": "pretrained" if cfg.init else "scratch", "run_id": result["run_id"],
                                 "n_val": result["n_val"], "model": cfg.model, "epochs": cfg.epochs,
                                 "img_size": cfg.img_size, "seed": cfg.seed, "model_kwargs": dict(cfg.model_kwargs),
                                 "model_gflops": result["model_gflops"], "model_params_m": result["model_params_m"]})
    drop_resume_state(cfg.output_dir)
    return result


def ade20k_stage(params: Params, sections: Sequence[str], variant: str, init: str | None, run_dir: str,
                 metrics_path: str, plots_path: str, seed: int | None = None) -> dict[str, Any]:
    """UperNet on the ``ade20k`` root from ``init`` and its metrics, with the majority-class baseline."""
    from .records import records_path, write_segmentation_records
    from .transfer.train import train_segmentation

    cfg = _dense_config(SegmentationConfig, params, sections, "ade20k", variant, init, run_dir, seed)
    result = train_segmentation(cfg)
    if not is_main_process():
        return result
    summarize_seeds(cfg)
    write_plot_csv(plots_path, _plot_rows(result["history"], ("miou", "pixel_acc", "macc")))
    per_image = result["records"]  # the last iteration's per-image intersection/union counts
    write_segmentation_records(records_path(metrics_path), per_image["intersection"], per_image["union"],
                               per_image["classes"])
    write_metrics(metrics_path, {**{k: _number(result[k]) for k in ADE20K_METRICS},
                                 "per_class_iou": {k: _number(v) for k, v in result["per_class_iou"].items()},
                                 "init": "pretrained" if cfg.init else "scratch", "run_id": result["run_id"],
                                 "n_val": result["n_val"], "model": cfg.model, "max_iters": cfg.max_iters,
                                 "img_size": cfg.img_size, "seed": cfg.seed, "model_kwargs": dict(cfg.model_kwargs),
                                 "model_gflops": result["model_gflops"], "model_params_m": result["model_params_m"]})
    drop_resume_state(cfg.output_dir)
    return result
