"""Dense-transfer training engines: Mask R-CNN on COCO and UperNet on ADE20K (Table 4, section 8).

The same skeleton as :mod:`mixmim.engine.engine_pretrain` and :mod:`mixmim.engine.engine_finetune`
(:mod:`mixmim.engine.runner`): set-up through :func:`~mixmim.engine.runner.engine_run` (one
process or many under torchrun, output folder, seeded model build, MLflow run), seeded data
(every item drawn under RNGs seeded by (seed, epoch, index)), a resumable sampler, the loop of
:func:`~mixmim.engine.runner.build_loop` (precision, accumulation, clipping, atomic
checkpoints, exact resume), periodic evaluation through :func:`~mixmim.engine.runner.periodic`,
final weights and the run reference through :func:`~mixmim.engine.runner.save_final`;
collectives from :mod:`mixmim.engine.distributed`.

What is specific to dense transfer:

* **Optimiser.** AdamW over the layer-decay groups of
  :func:`mixmim.transfer.backbone.param_groups_layer_decay` (neck and heads at the
  full lr; the same depth rule as classification finetuning). Each group carries
  ``lr_scale``; timm's scheduler (:func:`mixmim.engine.optim.build_schedule`: warmup,
  then step / poly / cosine) sets every group's lr to ``schedule(t) * lr_scale`` at
  each optimiser step.
* **ADE20K runs in iterations.** The training split is viewed as a
  :class:`RepeatDataset` of ``iters_per_epoch * batch_size`` items, so one loop
  "epoch" is exactly ``iters_per_epoch`` optimiser steps and ``max_iters /
  iters_per_epoch`` of them make the run (mmseg's iteration-based runner, with
  checkpoints and plot rows at every period).
* **Evaluation is sharded.** Every rank predicts its share of the validation images
  (rank r takes images r, r + W, ...); COCO results are gathered to rank 0 for
  COCOeval, ADE20K confusion matrices are summed. All ranks get the same metrics.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from timm.scheduler.scheduler import Scheduler

from ..engine.config import ConfigError
from ..engine.distributed import (
    DistInfo, all_gather_object, all_reduce_sum, broadcast_object,
)
from ..engine.loop import autocast_dtype
from ..engine.optim import adamw, build_schedule
from ..engine.runner import (
    TrainData, build_loop, close_last_epoch, engine_run, init_tags, periodic, save_final, train_data, wrap_model,
)
from ..models.registry import MODEL_SIZES
from ..io import write_text_atomic
from ..tracking import Tracker
from .backbone import MixMIMBackbone, build_backbone, detection_window_sizes, param_groups_layer_decay
from .dense_config import DenseConfig, DetectionConfig, SegmentationConfig, check_config
from ..data.ade20k import ADE20K_DIR, ADE20K_NUM_CLASSES, IGNORE_INDEX, ADE20KDataset, reduce_zero_label
from ..data.coco import CocoInstanceDataset
from .dense_transforms import LargeScaleJitter, SegmentationTrainTransform, keep_ratio_size
from .detection import (
    DETECTION_BACKBONE_PREFIX,
    build_mask_rcnn,
    coco_evaluate_results,
    detections_to_coco,
    mask_rcnn_complexity,
)
from .metrics import DenseComplexity, confusion_matrix, segmentation_scores
from .segmentation import (
    SEGMENTATION_BACKBONE_PREFIX,
    UperNetSegmentor,
    build_upernet,
    slide_inference,
    upernet_complexity,
)

__all__ = [
    "DETECTOR_WEIGHTS", "SEGMENTOR_WEIGHTS", "PER_CLASS_FILE", "RepeatDataset", "build_dense_schedule",
    "ade20k_class_names", "build_dense_backbone", "build_detector", "build_segmentor", "collate_detection_batch",
    "collate_segmentation_batch", "evaluate_detection", "evaluate_ade20k", "majority_class_baseline",
    "train_detection", "train_segmentation",
]

logger = logging.getLogger("mixmim.transfer")

DETECTOR_WEIGHTS = "detector.pt"
SEGMENTOR_WEIGHTS = "segmentor.pt"
PER_CLASS_FILE = "per_class_iou.json"
BUILTIN_META = "builtin_meta.json"  # written by mixmim.data.builtin beside a stand-in dataset

#: COCO metrics of the history and the final result: suite name -> key of coco_evaluate_results.
COCO_KEYS = {"ap_box": "AP_box", "ap50_box": "AP50_box", "ap75_box": "AP75_box", "ap_mask": "AP_mask",
             "ap50_mask": "AP50_mask", "ap75_mask": "AP75_mask", "aps_box": "APs_box", "apm_box": "APm_box",
             "apl_box": "APl_box"}


# --------------------------------------------------------------------------- #
# Schedule
# --------------------------------------------------------------------------- #
def build_dense_schedule(optimizer: torch.optim.Optimizer, cfg: DenseConfig, total_steps: int,
                         warmup_steps: int) -> Scheduler:
    """timm's schedule of ``cfg.schedule`` over ``total_steps`` optimiser steps: a linear warmup
    from ``warmup_factor * lr``, step milestones at the ``lr_steps`` fractions of the run
    (ViTDet's 10x drops), poly to ``min_lr`` with ``poly_power`` (BEiT's mmcv policy), or cosine."""
    return build_schedule(optimizer, cfg.schedule, total_steps, warmup_steps, cfg.warmup_factor * cfg.lr,
                          lr_milestones(cfg, total_steps), power=cfg.poly_power, min_lr=cfg.min_lr)


def lr_milestones(cfg: DenseConfig, total_steps: int) -> list[int]:
    """The optimiser steps at which a step schedule drops the lr (``lr_steps`` fractions of the run)."""
    return [round(f * total_steps) for f in cfg.lr_steps]


def build_optimizer(model: nn.Module, cfg: DenseConfig, prefix: str) -> torch.optim.AdamW:
    """AdamW over the layer-decay groups; every group holds the base lr, because timm's
    scheduler multiplies it by the group's ``lr_scale`` at each step (as for finetuning)."""
    groups = param_groups_layer_decay(model, cfg.lr, cfg.weight_decay, cfg.layer_decay, backbone_prefix=prefix)
    for group in groups:
        group["lr"] = cfg.lr
    return adamw(groups, cfg.lr, cfg.betas, cfg.adamw_kernel)


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
class RepeatDataset(Dataset):
    """``length`` items cycling over ``dataset`` (iteration-based training over a short split)."""

    def __init__(self, dataset: Dataset, length: int) -> None:
        self.dataset, self.length = dataset, int(length)
        self.size = len(dataset)  # type: ignore[arg-type]
        if self.size == 0:
            raise ValueError("cannot repeat an empty dataset")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index % self.size]


def _plain(value: Any) -> Any:
    """tv_tensors as plain tensors (what checkpoints, pinning and device moves expect)."""
    return value.as_subclass(Tensor) if isinstance(value, Tensor) else value


def collate_detection_batch(batch: Sequence[tuple[Tensor, dict[str, Any], int]]
                            ) -> tuple[Tensor | list[Tensor], list[dict[str, Any]], int]:
    """SeededDataset items -> (images, targets, bad images); equal-sized images are stacked."""
    images = [_plain(b[0]) for b in batch]
    same = all(img.shape == images[0].shape for img in images)
    targets = [{k: _plain(v) for k, v in b[1].items()} for b in batch]
    return (torch.stack(images) if same else images), targets, sum(int(b[2]) for b in batch)


def collate_segmentation_batch(batch: Sequence[tuple[Tensor, Tensor, int]]) -> tuple[Tensor, Tensor, int]:
    """SeededDataset items -> (images (B, 3, H, W), labels (B, H, W) int64, bad images)."""
    images = torch.stack([_plain(b[0]) for b in batch])
    labels = torch.stack([_plain(b[1]).to(torch.int64) for b in batch])
    return images, labels, sum(int(b[2]) for b in batch)


def per_process_batch(cfg: DenseConfig, info: DistInfo) -> int:
    share = info.world_size * cfg.accum_iter
    if cfg.batch_size % share:
        raise ConfigError(f"batch_size={cfg.batch_size} is the total batch; it must divide over {info.world_size} "
                          f"process(es) x accum_iter={cfg.accum_iter}")
    return cfg.batch_size // share


def dense_train_data(dataset: Dataset, cfg: DenseConfig, info: DistInfo,
                     collate: Callable[[list[Any]], Any]) -> TrainData:
    """The engine's seeded dataset, resumable sampler and epoch length, with a dense collate."""
    return train_data(dataset, cfg, per_process_batch(cfg, info), info, collate_fn=collate)


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #
def build_dense_backbone(cfg: DenseConfig) -> MixMIMBackbone:
    """The encoder as a backbone at ``img_size`` with the configured windows and drop path, from ``init``."""
    size = MODEL_SIZES[cfg.model]
    kwargs = dict(cfg.model_kwargs)
    drop_path = cfg.drop_path if cfg.drop_path is not None else size.drop_path_rate
    kwargs.setdefault("drop_path_rate", drop_path)
    if cfg.detection_windows:
        windows: Any = detection_window_sizes(kwargs.get("depths", size.depths))
    else:
        windows = kwargs.pop("window_size", size.window_size)
    kwargs.pop("window_size", None)
    try:
        return build_backbone(cfg.model, cfg.img_size, window_size=windows, checkpoint=cfg.init, **kwargs)
    except ValueError as err:
        if "does not tile" in str(err):
            raise ConfigError(f"windows {windows} do not fit the feature maps of a {cfg.img_size} input "
                              f"(detection_windows={cfg.detection_windows}, model_kwargs.window_size): {err}") from err
        raise


def build_detector(cfg: DetectionConfig, num_classes: int) -> nn.Module:
    return build_mask_rcnn(build_dense_backbone(cfg), num_classes, size=cfg.img_size,
                           fpn_channels=cfg.fpn_channels, representation_size=cfg.representation_size,
                           anchor_sizes=cfg.anchor_sizes, **cfg.detector_kwargs)


def build_segmentor(cfg: SegmentationConfig, num_classes: int) -> UperNetSegmentor:
    return build_upernet(build_dense_backbone(cfg), num_classes, channels=cfg.head_channels,
                         aux_channels=cfg.aux_channels, aux_weight=cfg.aux_weight)


def dense_complexity(cfg: DetectionConfig | SegmentationConfig, num_classes: int) -> DenseComplexity:
    """Size and test-time GFLOPs of the model a run trains, counted on a meta-device twin.

    The twin is built from the same config (heads, windows, FPN width, RoI counts) without
    its initialisation, so counting costs neither memory nor compute at any input size.
    Logged on every dense run as ``model/params_m`` and ``model/gflops``; Table 4 reads them.
    """
    twin_cfg = replace(cfg, init=None)
    with torch.device("meta"):
        if isinstance(cfg, DetectionConfig):
            return mask_rcnn_complexity(build_detector(twin_cfg, num_classes).eval(), cfg.img_size, cfg.model)
        return upernet_complexity(build_segmentor(twin_cfg, num_classes).eval(), cfg.img_size, cfg.model)


def log_complexity(tracker: Tracker, complexity: DenseComplexity) -> None:
    tracker.log_metrics({"model/params_m": complexity.params_m, "model/gflops": complexity.gflops}, step=0)


class _SegmentationLoss(nn.Module):
    """Training forward of a segmentor (DDP synchronises through ``forward``): the summed loss."""

    def __init__(self, segmentor: UperNetSegmentor) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        return self.segmentor.losses(images, labels)["loss"]


# --------------------------------------------------------------------------- #
# Evaluation
# --------------------------------------------------------------------------- #
def _shard(count: int, info: DistInfo) -> range:
    return range(info.rank, count, info.world_size)


def _autocast(precision: str, device: torch.device) -> Any:
    dtype = autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.no_grad()
def evaluate_detection(model: nn.Module, dataset: CocoInstanceDataset, info: DistInfo, precision: str = "fp32",
                       batch_size: int = 1, max_images: int | None = None, records: bool = False) -> dict[str, Any]:
    """COCO box / mask AP of ``model`` on ``dataset`` (untransformed), as fractions; every rank gets them.

    With ``records`` the result also holds ``records``: per-image match records for box and
    mask (:func:`mixmim.records.coco_match_records`), images in ascending id order.
    """
    was_training = model.training
    model.eval()
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    indices = list(_shard(count, info))
    bbox: list[dict[str, Any]] = []
    segm: list[dict[str, Any]] = []
    ids: list[int] = []
    for start in range(0, len(indices), batch_size):
        samples = [dataset[i] for i in indices[start:start + batch_size]]
        images = [s[0].to(info.device) for s in samples]
        with _autocast(precision, info.device):
            predictions = model(images)
        for (_, target), prediction in zip(samples, predictions):
            prediction = {k: v.float() if v.is_floating_point() else v for k, v in prediction.items()}
            b, s = detections_to_coco(target["image_id"], prediction, dataset.label_to_cat)
            bbox += b
            segm += s
            ids.append(target["image_id"])
    gathered = all_gather_object((bbox, segm, ids), info)
    metrics = None
    if info.is_main:
        all_bbox = [r for part in gathered for r in part[0]]
        all_segm = [r for part in gathered for r in part[1]]
        all_ids = [i for part in gathered for i in part[2]]
        per_image: dict[str, Any] | None = {} if records else None
        raw = coco_evaluate_results(dataset.coco, all_bbox, all_segm, all_ids, records=per_image)
        metrics = {name: raw[key] for name, key in COCO_KEYS.items()}
        if per_image is not None:
            metrics["records"] = per_image
    model.train(was_training)
    return broadcast_object(metrics, info)


def _predict_segmentation(model: nn.Module, image: Tensor, size: tuple[int, int], cfg: SegmentationConfig,
                          num_classes: int, device: torch.device) -> Tensor:
    """mmseg's ADE20K test: keep-ratio resize to test_scale, slide windows, logits back to the label size."""
    x = image.unsqueeze(0).to(device)
    if cfg.test_scale is not None:
        x = F.interpolate(x, size=keep_ratio_size(*size, cfg.test_scale), mode="bilinear", align_corners=False)
    with _autocast(cfg.precision, device):
        logits = slide_inference(model, x, cfg.eval_crop or cfg.img_size, cfg.eval_stride, num_classes)
    logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].cpu()


@torch.no_grad()
def evaluate_ade20k(model: UperNetSegmentor, dataset: ADE20KDataset, cfg: SegmentationConfig, info: DistInfo,
                    class_names: Sequence[str] | None = None, records: bool = False) -> dict[str, Any]:
    """mIoU, pixel accuracy, mean class accuracy and per-class IoU over the split (one confusion matrix).

    With ``records`` the result also holds ``intersection`` and ``union``: per image (split
    order) and class, the pixel counts whose sums over the split give the IoUs.
    """
    from ..records import segmentation_counts

    was_training = model.training
    model.eval()
    k = model.num_classes
    count = len(dataset) if cfg.eval_max_images is None else min(cfg.eval_max_images, len(dataset))
    confusion = torch.zeros(k, k, dtype=torch.int64)
    counts: dict[int, tuple[list[int], list[int]]] = {}
    for i in _shard(count, info):
        image, label = dataset[i]
        pred = _predict_segmentation(model, image, tuple(label.shape), cfg, k, info.device)
        confusion += confusion_matrix(pred, label, k, model.ignore_index)
        if records:
            counts[i] = segmentation_counts(pred.numpy(), label.numpy(), k, model.ignore_index)
    confusion = all_reduce_sum(confusion, info).cpu()
    model.train(was_training)
    scores = segmentation_scores(confusion, class_names)
    scores["num_images"] = count
    if records:
        merged = {i: c for part in all_gather_object(counts, info) for i, c in part.items()}
        scores["intersection"] = [merged[i][0] for i in range(count)]
        scores["union"] = [merged[i][1] for i in range(count)]
    return scores


class _Labels(Dataset):
    """The label maps of an ADE20K split alone (no image decoding), ignore = 255."""

    def __init__(self, dataset: ADE20KDataset) -> None:
        self.paths = list(dataset.labels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        with Image.open(self.paths[index]) as png:
            return reduce_zero_label(torch.from_numpy(np.array(png, dtype=np.uint8)))


def label_histogram(dataset: ADE20KDataset, num_classes: int, num_workers: int = 0) -> Tensor:
    """Pixel count of every class over a split's (untransformed) labels, ignore pixels excluded."""
    hist = torch.zeros(num_classes, dtype=torch.int64)
    for label in DataLoader(_Labels(dataset), batch_size=None, num_workers=num_workers):
        valid = label[label != IGNORE_INDEX]
        hist += torch.bincount(valid.flatten(), minlength=num_classes)[:num_classes]
    return hist


def majority_class_baseline(train_hist: Tensor, val_hist: Tensor) -> dict[str, Any]:
    """Scores of predicting the most frequent training class at every pixel of the validation split.

    Only the predicted class's column of the confusion matrix is non-zero, so the
    matrix follows from the validation class histogram alone.
    """
    k = len(train_hist)
    majority = int(train_hist.argmax())
    confusion = torch.zeros(k, k, dtype=torch.int64)
    confusion[:, majority] = val_hist
    scores = segmentation_scores(confusion)
    return {"class": majority, "miou": scores["mIoU"], "pixel_acc": scores["aAcc"]}


def ade20k_class_names(root: str | Path, num_classes: int) -> list[str]:
    """Class names: ADE20K's objectInfo150.txt, a built-in stand-in's meta file, else "0".."K-1"."""
    root = Path(root)
    base = root / ADE20K_DIR if (root / ADE20K_DIR).is_dir() else root
    for info in (base / "objectInfo150.txt", base / "objectInfo150.csv", root / "objectInfo150.csv"):
        if info.is_file():
            with info.open(newline="") as fh:
                rows = [r for r in csv.reader(fh, delimiter="\t" if info.suffix == ".txt" else ",") if r]
            names = [r[-1].split(";")[0].strip() for r in rows[1:]]
            if len(names) == num_classes:
                return names
    meta = root / BUILTIN_META
    if meta.is_file():
        classes = json.loads(meta.read_text()).get("classes", {})
        names = [classes.get(str(i + 1)) for i in range(num_classes)]
        if all(names):
            return names  # type: ignore[return-value]
    return [str(i) for i in range(num_classes)]


def ade20k_num_classes(root: str | Path) -> int:
    """150, or the class count a built-in stand-in records (its label 0 is ignored)."""
    meta = Path(root) / BUILTIN_META
    if meta.is_file():
        classes = json.loads(meta.read_text()).get("classes")
        if classes:
            return len(classes) - 1
    return ADE20K_NUM_CLASSES


# --------------------------------------------------------------------------- #
# Shared engine pieces
# --------------------------------------------------------------------------- #
def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Only finite numbers (NaN marks 'no ground truth' and is not a score to log)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _make_loop(cfg: DenseConfig, model: nn.Module, train_model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Scheduler, data: TrainData, loss_fn: Callable[[nn.Module, Any], Tensor], epochs: int,
               info: DistInfo, out: Path, tracker: Any, evaluate: Callable[[nn.Module], dict[str, float]]) -> Any:
    """The engines' loop, evaluating every ``eval_every``-th epoch but the last."""
    loop = build_loop(cfg, model=model, train_model=train_model, optimizer=optimizer, scheduler=scheduler,
                      data=data, info=info, out=out, tracker=tracker, loss_fn=loss_fn, epochs=epochs,
                      evaluate=periodic(evaluate, cfg.eval_every, epochs, lambda: loop))
    return loop


# --------------------------------------------------------------------------- #
# COCO
# --------------------------------------------------------------------------- #
def train_detection(cfg: DetectionConfig) -> dict[str, Any]:
    """Train (or resume) Mask R-CNN on COCO and evaluate; returns the history, final metrics and run id."""
    check_config(cfg)
    if not cfg.data_root:
        raise ConfigError("DetectionConfig.data_root is empty; expected the COCO folder (annotations/, train2017/)")
    with engine_run(cfg) as run:
        info, out = run.info, run.out
        train_set = CocoInstanceDataset(cfg.data_root, "train", transform=LargeScaleJitter(cfg.img_size, cfg.lsj_scale))
        val_set = CocoInstanceDataset(cfg.data_root, "val")
        model = run.build(lambda: build_detector(cfg, train_set.num_classes))
        data = dense_train_data(train_set, cfg, info, collate_detection_batch)
        optimizer = build_optimizer(model, cfg, DETECTION_BACKBONE_PREFIX)
        total = data.steps_per_epoch * cfg.epochs
        warmup = round(cfg.warmup_epochs * data.steps_per_epoch)
        milestones = lr_milestones(cfg, total)
        scheduler = build_dense_schedule(optimizer, cfg, total, warmup)
        train_model = wrap_model(model, cfg, info)

        def loss_fn(m: nn.Module, batch: list[Any]) -> Tensor:
            images, targets = batch
            losses = m(list(images), targets)
            return sum(losses.values())  # type: ignore[return-value]

        def evaluate(m: nn.Module) -> dict[str, float]:
            return evaluate_detection(m, val_set, info, cfg.precision, cfg.eval_batch_size, cfg.eval_max_images)

        def evaluate_record(m: nn.Module) -> dict[str, float]:
            return _finite(evaluate(m))  # history rows: scores only (NaN = no ground truth in that range)

        derived = {"lr": cfg.lr, "per_process_batch": per_process_batch(cfg, info), "world_size": info.world_size,
                   "steps_per_epoch": data.steps_per_epoch, "total_steps": total, "warmup_steps": warmup,
                   "lr_milestones": milestones, "num_classes": train_set.num_classes,
                   "train_images": len(train_set), "val_images": len(val_set)}
        with run.tracking("coco", init_tags(cfg, "coco", "coco"), derived) as tracker:
            complexity = dense_complexity(cfg, train_set.num_classes)
            log_complexity(tracker, complexity)
            loop = _make_loop(cfg, model, train_model, optimizer, scheduler, data, loss_fn, cfg.epochs, info, out,
                              tracker, evaluate_record)
            history = loop.run()
            final = evaluate_detection(model, val_set, info, cfg.precision, cfg.eval_batch_size, cfg.eval_max_images,
                                       records=True)
            per_image = final.pop("records", None)  # the last epoch's per-image match records (main rank)
            step = history[-1]["step"] if history else 0
            tracker.log_metrics({f"final/{k}": v for k, v in _finite(final).items()}, step=step)
            close_last_epoch(history, _finite(final), tracker)
            save_final(model, cfg, out / DETECTOR_WEIGHTS, "mixmim_coco_mask_rcnn", tracker, info,
                       num_classes=train_set.num_classes)
            return {"history": history, **final, "run_id": tracker.run_id, "weights": str(out / DETECTOR_WEIGHTS),
                    "records": per_image, "n_val": len(per_image["box"]) if per_image else None,
                    "model_params_m": complexity.params_m, "model_gflops": complexity.gflops}


# --------------------------------------------------------------------------- #
# ADE20K
# --------------------------------------------------------------------------- #
def train_segmentation(cfg: SegmentationConfig) -> dict[str, Any]:
    """Train (or resume) UperNet on ADE20K for ``max_iters`` and evaluate; also scores the majority baseline."""
    check_config(cfg)
    if not cfg.data_root:
        raise ConfigError("SegmentationConfig.data_root is empty; expected the ADE20K folder (ADEChallengeData2016/)")
    with engine_run(cfg) as run:
        info, out = run.info, run.out
        num_classes = cfg.num_classes or ade20k_num_classes(cfg.data_root)
        transform = SegmentationTrainTransform(cfg.img_size, cfg.train_scale, cfg.ratio_range, cfg.cat_max_ratio,
                                               photometric=cfg.photometric)
        train_set = ADE20KDataset(cfg.data_root, "train", transform=transform, num_classes=num_classes)
        val_set = ADE20KDataset(cfg.data_root, "val", num_classes=num_classes)
        class_names = ade20k_class_names(cfg.data_root, num_classes)
        model = run.build(lambda: build_segmentor(cfg, num_classes))
        if info.distributed and info.device.type == "cuda":  # mmseg's SyncBN (torch's is CUDA-only)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        epochs = cfg.max_iters // cfg.iters_per_epoch
        period = RepeatDataset(train_set, cfg.iters_per_epoch * cfg.batch_size)
        data = dense_train_data(period, cfg, info, collate_segmentation_batch)
        optimizer = build_optimizer(model, cfg, SEGMENTATION_BACKBONE_PREFIX)
        total = data.steps_per_epoch * epochs
        scheduler = build_dense_schedule(optimizer, cfg, total, cfg.warmup_iters)
        train_model = wrap_model(_SegmentationLoss(model), cfg, info)

        def loss_fn(m: nn.Module, batch: list[Tensor]) -> Tensor:
            return m(*batch)

        def evaluate(m: nn.Module) -> dict[str, float]:
            scores = evaluate_ade20k(m, val_set, cfg, info)  # type: ignore[arg-type]
            return {"miou": scores["mIoU"], "pixel_acc": scores["aAcc"], "macc": scores["mAcc"]}

        derived = {"lr": cfg.lr, "per_process_batch": per_process_batch(cfg, info), "world_size": info.world_size,
                   "epochs": epochs, "steps_per_epoch": data.steps_per_epoch, "total_steps": total,
                   "num_classes": num_classes, "train_images": len(train_set), "val_images": len(val_set)}
        with run.tracking("ade20k", init_tags(cfg, "ade20k", "ade20k"), derived, epochs=epochs) as tracker:
            complexity = dense_complexity(cfg, num_classes)
            log_complexity(tracker, complexity)
            loop = _make_loop(cfg, model, train_model, optimizer, scheduler, data, loss_fn, epochs, info, out,
                              tracker, evaluate)
            history = loop.run()
            scores = evaluate_ade20k(model, val_set, cfg, info, class_names, records=True)
            baseline = None
            if info.is_main:
                baseline = majority_class_baseline(label_histogram(train_set, num_classes, cfg.num_workers),
                                                   label_histogram(val_set, num_classes, cfg.num_workers))
            baseline = broadcast_object(baseline, info)
            final = {"miou": scores["mIoU"], "pixel_acc": scores["aAcc"], "macc": scores["mAcc"],
                     "baseline_miou": baseline["miou"], "baseline_pixel_acc": baseline["pixel_acc"]}
            per_class = {"iou": scores["IoU"], "acc": scores["Acc"], "majority_class": class_names[baseline["class"]],
                         "num_images": scores["num_images"]}
            step = history[-1]["step"] if history else 0
            tracker.log_metrics({f"final/{k}": v for k, v in _finite(final).items()}, step=step)
            tracker.log_dict(_json_safe(per_class), PER_CLASS_FILE)
            close_last_epoch(history, {k: final[k] for k in ("miou", "pixel_acc", "macc")}, tracker)
            if info.is_main:
                write_text_atomic(out / PER_CLASS_FILE, json.dumps(_json_safe(per_class), indent=2) + "\n")
            save_final(model, cfg, out / SEGMENTOR_WEIGHTS, "mixmim_ade20k_upernet", tracker, info,
                       num_classes=num_classes, class_names=class_names)
            return {"history": history, **final, "per_class_iou": scores["IoU"], "majority_class": baseline["class"],
                    "run_id": tracker.run_id, "weights": str(out / SEGMENTOR_WEIGHTS), "n_val": scores["num_images"],
                    "model_params_m": complexity.params_m, "model_gflops": complexity.gflops,
                    "records": {"intersection": scores["intersection"], "union": scores["union"],
                                "classes": list(class_names)}}
