"""Run configurations of the dense-transfer engines (section 8: COCO Mask R-CNN, ADE20K UperNet).

The defaults are the paper's setting for MixMIM-B; the built-in pipeline overrides them
in params.yaml. Build a config with :func:`mixmim.engine.config.from_mapping` (unknown
keys and wrong types fail naming the key) and check the values with :func:`check_config`,
which the engines call before any work.

Recipe sources (the paper reuses them and states only what differs):

* COCO (section 8, "we follow the training setting in [25, 19]", i.e. MAE/ViTDet):
  large-scale jitter at 1024 with scale range [0.1, 2.0], batch 64, AdamW
  (0.9, 0.999), lr 1e-4, weight decay 0.1, 55 epochs (B), a linear warmup of 0.25
  epoch from 0.001 x lr, then a step schedule dropping the lr by 10x at 88.9% and
  96.3% of training -- the milestones of ViTDet's LSJ configs (163889 and 177546 of
  184375 iterations, kept as fractions when the schedule is shortened); layer decay
  0.85 (B) / 0.9 (L); drop path: the registered size's value (0.1 for B).
* ADE20K (section 8, 16K iterations at batch 16, "others settings from BEiT"): 512
  crops, AdamW (0.9, 0.999), weight decay 0.05, a linear warmup of 1500 iterations
  from 1e-6 x lr and a poly decay (power 1, to 0) over the whole run -- BEiT's mmcv
  schedule; layer decay 0.85 / 0.9; sliding-window evaluation with 512 crops and
  stride 341 after a keep-ratio resize to (2048, 512). The peak lr is not stated by
  the paper; 1e-4 (MAE's ViT-B value in the same BEiT code base) is the default.

``batch_size`` is the *total* over processes and accumulation steps (the number the
recipes quote); the lr is absolute, i.e. no linear scaling rule is applied -- change
both together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mixmim.engine.config import AdamWKernel, ConfigError, RuntimeConfig
from mixmim.models.registry import MODEL_SIZES

__all__ = ["DenseConfig", "DetectionConfig", "SegmentationConfig", "SCHEDULES", "check_config"]

SCHEDULES = ("step", "poly", "cosine")


@dataclass
class DenseConfig(RuntimeConfig):
    """Fields shared by the COCO and ADE20K engines."""

    model: str = "mixmim_base"  # a registered MixMIM size
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # encoder overrides, e.g. window_size
    init: str | None = None  # pretraining / finetuning checkpoint (this suite's or an original release); None: random
    data_root: str = ""
    img_size: int = 1024  # LSJ canvas (COCO) / training crop (ADE20K); also the backbone's build size
    # True: the paper's dense windows (16x16, and 32x32 in blocks 6/12/18 of stage 3; a window larger than a
    # feature map becomes global attention). False: model_kwargs' window_size, else the registered one.
    detection_windows: bool = True
    batch_size: int = 64  # total over processes x accum_iter
    lr: float = 1e-4  # peak lr of the head (backbone layers get lr * layer_decay ** depth-from-top)
    min_lr: float = 0.0  # poly / cosine floor
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    adamw_kernel: AdamWKernel = "default"  # default | fused (mixmim.engine.optim.ADAMW_KERNELS)
    layer_decay: float = 0.85  # 0.85 (B) / 0.9 (L)
    drop_path: float | None = None  # default: the registered size's value
    schedule: str = "step"  # step | poly | cosine, after a linear warmup
    warmup_factor: float = 0.001  # the warmup starts at warmup_factor * lr
    lr_steps: tuple[float, float] = (0.889, 0.963)  # step schedule: fractions of training where lr *= 0.1
    poly_power: float = 1.0
    eval_every: int = 0  # evaluate every N loop epochs during training (0: only the final evaluation)
    eval_batch_size: int = 1
    eval_max_images: int | None = None  # evaluate on the first N validation images (None: all)


@dataclass
class DetectionConfig(DenseConfig):
    """COCO Mask R-CNN (Table 4, section 8)."""

    epochs: int = 55  # 55 (B) / 80 (L)
    warmup_epochs: float = 0.25
    lsj_scale: tuple[float, float] = (0.1, 2.0)
    fpn_channels: int = 256
    representation_size: int = 1024  # box head fc width
    # one anchor size per FPN map ("0".."3", "pool"), in input pixels; None: torchvision's 32..512, which
    # suits objects of 32 px and more (the built-in stand-in's objects are 10-28 px at 64 px input)
    anchor_sizes: tuple[int, int, int, int, int] | None = None
    # torchvision MaskRCNN options (e.g. rpn_post_nms_top_n_train, box_batch_size_per_image)
    detector_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SegmentationConfig(DenseConfig):
    """ADE20K UperNet (Table 4, section 8)."""

    img_size: int = 512
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.05
    schedule: str = "poly"
    warmup_factor: float = 1e-6
    max_iters: int = 16000
    warmup_iters: int = 1500
    iters_per_epoch: int = 1000  # a loop "epoch": checkpoint, plot row, evaluation when eval_every says so
    num_classes: int | None = None  # None: 150, or the built-in stand-in's class count from its meta file
    train_scale: tuple[int, int] = (2048, 512)  # keep-ratio resize target (long, short) before the ratio jitter
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    photometric: bool = True
    test_scale: tuple[int, int] | None = (2048, 512)  # keep-ratio resize before sliding windows (None: none)
    eval_crop: int | None = None  # sliding-window crop (None: img_size)
    eval_stride: int = 341
    head_channels: int = 512  # UperNet decode head width
    aux_channels: int = 256  # auxiliary FCN head width
    aux_weight: float = 0.4


def check_config(cfg: DenseConfig, where: str | None = None) -> None:
    """Value checks ``from_mapping`` cannot do (types are already checked); errors name the key."""
    prefix = f"{where or type(cfg).__name__}."

    def _fail(key: str, value: Any, expected: str) -> None:
        raise ConfigError(f"{prefix}{key}={value!r}: {expected}")

    if cfg.model not in MODEL_SIZES:
        _fail("model", cfg.model, f"expected a registered size, one of {sorted(MODEL_SIZES)}")
    if "img_size" in cfg.model_kwargs:
        _fail("model_kwargs.img_size", cfg.model_kwargs["img_size"], "set img_size instead")
    if cfg.detection_windows and "window_size" in cfg.model_kwargs:
        _fail("model_kwargs.window_size", cfg.model_kwargs["window_size"],
              "conflicts with detection_windows=true; set detection_windows: false to use it")
    if cfg.img_size < 32 or cfg.img_size % 32:
        _fail("img_size", cfg.img_size, "expected a positive multiple of 32 (the encoder stride)")
    if cfg.batch_size < 1:
        _fail("batch_size", cfg.batch_size, "expected a positive integer")
    for key in ("lr", "layer_decay", "warmup_factor", "poly_power"):
        if getattr(cfg, key) <= 0:
            _fail(key, getattr(cfg, key), "expected a positive number")
    for key in ("min_lr", "weight_decay"):
        if getattr(cfg, key) < 0:
            _fail(key, getattr(cfg, key), "expected a non-negative number")
    if cfg.layer_decay > 1:
        _fail("layer_decay", cfg.layer_decay, "expected a value in (0, 1]")
    if cfg.drop_path is not None and not 0 <= cfg.drop_path < 1:
        _fail("drop_path", cfg.drop_path, "expected a value in [0, 1)")
    if cfg.schedule not in SCHEDULES:
        _fail("schedule", cfg.schedule, f"expected one of {list(SCHEDULES)}")
    if not 0 < cfg.lr_steps[0] <= cfg.lr_steps[1]:
        _fail("lr_steps", list(cfg.lr_steps), "expected two increasing fractions of training, e.g. [0.889, 0.963]")
    if cfg.eval_every < 0:
        _fail("eval_every", cfg.eval_every, "expected 0 (final evaluation only) or a positive number of epochs")
    if cfg.eval_batch_size < 1:
        _fail("eval_batch_size", cfg.eval_batch_size, "expected a positive integer")
    if cfg.eval_max_images is not None and cfg.eval_max_images < 1:
        _fail("eval_max_images", cfg.eval_max_images, "expected a positive integer or null")
    if isinstance(cfg, DetectionConfig):
        if cfg.epochs < 1:
            _fail("epochs", cfg.epochs, "expected a positive integer")
        if cfg.warmup_epochs < 0:
            _fail("warmup_epochs", cfg.warmup_epochs, "expected a non-negative number")
        if not 0 < cfg.lsj_scale[0] <= cfg.lsj_scale[1]:
            _fail("lsj_scale", list(cfg.lsj_scale), "expected [min, max] with 0 < min <= max, e.g. [0.1, 2.0]")
        for key in ("fpn_channels", "representation_size"):
            if getattr(cfg, key) < 1:
                _fail(key, getattr(cfg, key), "expected a positive integer")
        sizes = cfg.anchor_sizes
        if sizes is not None and (min(sizes) < 1 or list(sizes) != sorted(sizes)):
            _fail("anchor_sizes", list(sizes), "expected five increasing positive sizes in pixels (one per FPN map), "
                  "e.g. [8, 16, 32, 64, 128], or null for torchvision's [32, 64, 128, 256, 512]")
    if isinstance(cfg, SegmentationConfig):
        if cfg.max_iters < 1:
            _fail("max_iters", cfg.max_iters, "expected a positive integer")
        if cfg.iters_per_epoch < 1 or cfg.max_iters % cfg.iters_per_epoch:
            _fail("iters_per_epoch", cfg.iters_per_epoch, f"expected a positive divisor of max_iters={cfg.max_iters}")
        if cfg.warmup_iters < 0:
            _fail("warmup_iters", cfg.warmup_iters, "expected a non-negative integer")
        if cfg.num_classes is not None and cfg.num_classes < 2:
            _fail("num_classes", cfg.num_classes, "expected at least 2 classes, or null")
        if not 0 < cfg.ratio_range[0] <= cfg.ratio_range[1]:
            _fail("ratio_range", list(cfg.ratio_range), "expected [min, max] with 0 < min <= max")
        if min(cfg.train_scale) < 1:
            _fail("train_scale", list(cfg.train_scale), "expected two positive edge lengths")
        if cfg.test_scale is not None and min(cfg.test_scale) < 1:
            _fail("test_scale", list(cfg.test_scale), "expected two positive edge lengths or null")
        crop = cfg.eval_crop or cfg.img_size
        if crop > cfg.img_size or crop < 1:
            _fail("eval_crop", cfg.eval_crop, f"expected at most img_size={cfg.img_size} (the backbone's build size)")
        if not 1 <= cfg.eval_stride:
            _fail("eval_stride", cfg.eval_stride, "expected a positive integer")
        for key in ("head_channels", "aux_channels"):
            if getattr(cfg, key) < 1:
                _fail(key, getattr(cfg, key), "expected a positive integer")
        if cfg.aux_weight < 0:
            _fail("aux_weight", cfg.aux_weight, "expected a non-negative number")
