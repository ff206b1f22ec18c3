"""How well a pretrained model reconstructs images it never trained on, and what of them.

The pretraining loss mixes two errors. A hidden cell's per-channel means (its colour) must be
inferred from the visible cells, and what varies inside the cell (stripes, edges, shading) on
top. The predict-the-mean reference (each hidden cell drawn flat in its own true mean colour;
``mean_loss_baseline`` of the pretraining metrics) is handed the colour for free, so a model
can lose to it on the total while predicting structure, or beat it with colours alone.
:func:`split_reconstruction_error` separates the two exactly, and the stage
(``stages/reconstruction.py``) measures both on held-out images of every domain, so
"reconstructs beyond the cell mean" becomes a paired test per image: the model's structure
error against the flat reference's.

Also here: loading a pretraining checkpoint with its own config, and reading sample images
as the pretraining input expects them (shared with the report's mixing figure).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checkpoint import load_file
from .engine.config import RuntimeConfig

__all__ = ["ErrorSplit", "ReconstructionConfig", "find_images", "find_sample_images", "fixed_mask", "load_images",
           "load_pretrainer", "reconstruction_stage", "split_folder", "split_reconstruction_error"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# The normalisation of the pretraining transform (timm's ImageNet defaults).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
BATCH = 16  # images per forward pass; each batch draws its own mask (fill=mix pairs image i with B-1-i)
POOLED = "all"  # the metrics key of the values pooled over every domain


def load_pretrainer(path: str | os.PathLike[str]) -> tuple[torch.nn.Module, dict]:
    """Rebuild a pretraining checkpoint's model from its own config and load its weights.

    The config travels in the checkpoint (``{"model": state_dict, "config": PretrainConfig
    fields}``), so the figure and the reconstruction stage always see the model that was trained,
    ablation switches included; a config key this code does not know is an error rather than a
    silent default.
    """
    from .engine.config import PretrainConfig, from_mapping
    from .engine.engine_pretrain import build_model

    checkpoint = load_file(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise ValueError(f"{path}: expected a pretraining checkpoint with 'model' and 'config' entries")
    cfg = from_mapping(PretrainConfig, checkpoint["config"], where=f"{path} config")
    model = build_model(cfg)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint["config"]


def find_sample_images(folder: str | os.PathLike[str], count: int = 4) -> list[Path]:
    """Up to ``count`` images (an even number, at least 2), one class folder after another.

    Taking the first image of each class folder in turn pairs images of different classes
    (as ImageNet's ``val/<wnid>/`` layout allows), which makes the mixing visible. An
    ImageNet root is accepted too: its ``val`` split is used.
    """
    root = Path(folder)
    if (root / "val").is_dir():
        root = root / "val"
    if not root.is_dir():
        raise FileNotFoundError(f"sample image folder {root} does not exist")
    by_folder: dict[Path, list[Path]] = {}
    for path in find_images(root):
        by_folder.setdefault(path.parent, []).append(path)
    queues = list(by_folder.values())
    picked: list[Path] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    picked = picked[: len(picked) - len(picked) % 2]
    if len(picked) < 2:
        raise ValueError(f"{root} holds fewer than 2 images; the mixing figure needs a pair")
    return picked


def load_images(paths: list[Path], img_size: int) -> Tensor:
    """Resize (shorter side), centre-crop and normalise images as the pretraining input expects."""
    from PIL import Image
    from torchvision import transforms as T

    transform = T.Compose([
        T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size),
        T.ToTensor(), T.Normalize(MEAN, STD),
    ])
    images = []
    for path in paths:
        with Image.open(path) as img:
            images.append(transform(img.convert("RGB")))
    return torch.stack(images)


def fixed_mask(model: torch.nn.Module, seed: int = 0) -> Tensor:
    """A reproducible mask of the model's own type and ratio, so reruns draw the same figure."""
    from .models.masking import sample_mask

    generator = torch.Generator().manual_seed(seed)
    return sample_mask(tuple(model.encoder.mask_grid), model.mask_type, model.mask_ratio, 0.0, generator=generator)


def find_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Every image file under ``folder`` (any depth), in sorted path order."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


# --------------------------------------------------------------------------- the error split
@dataclass(frozen=True)
class ErrorSplit:
    """Per-image reconstruction error of the predicted cells, split in two, with the flat-cell reference.

    Arrays are (B,). ``colour + structure`` is the image's reconstruction loss (in the units of
    :func:`mixmim.models.pretrainer.reconstruction_loss`, over the cells the model predicted);
    ``colour`` is the error of the predicted cells' per-channel means, ``structure`` that of
    what varies inside a cell once those means are removed. ``flat`` is the loss of drawing
    each of those cells flat in its own true per-channel mean (the predict-the-mean reference):
    its colour error is zero and its structure error is everything inside the cell. A model
    reconstructs beyond the cell mean where ``structure < flat``, whatever its colours.
    """

    colour: np.ndarray
    structure: np.ndarray
    flat: np.ndarray

    @property
    def loss(self) -> np.ndarray:
        return self.colour + self.structure

    @staticmethod
    def concat(parts: Sequence[ErrorSplit]) -> ErrorSplit:
        return ErrorSplit(*(np.concatenate([getattr(p, name) for p in parts]) for name in ("colour", "structure", "flat")))


@torch.no_grad()
def split_reconstruction_error(model: torch.nn.Module, imgs: Tensor, mask: Tensor) -> ErrorSplit:
    """Run the pretrainer on ``imgs`` (B, 3, H, W) with ``mask`` and split each image's error.

    The split is exact: the squared error averaged over a cell's pixels and channels equals
    the squared error of its per-channel means plus that of the deviations from them (the
    cross term sums to zero), so the mean of ``loss`` over the batch is the model's loss.
    Needs ``norm_pix_loss`` (per-cell normalised targets), the setting of the paper and of
    every pretraining in this suite.
    """
    from .models.pretrainer import pixel_targets

    if not bool(getattr(model, "norm_pix_loss", True)):
        raise ValueError("split_reconstruction_error needs a model trained with norm_pix_loss=True")
    b = imgs.shape[0]
    out = model(imgs, mask)
    cell = model.stride
    m = out.mask.reshape(1, -1).float().cpu()
    pred = out.pred.float().cpu()
    if pred.shape[0] == 2 * b:  # dual: every cell of image i is predicted by one of the two branches
        mm = m.unsqueeze(-1)
        pred = pred[:b] * mm + pred[b:].flip(0) * (1 - mm)
        weight = torch.ones_like(m)
    else:  # one branch: image i's masked cells only
        pred, weight = pred[:b], m
    channels = imgs.shape[1]
    target = pixel_targets(imgs.float().cpu(), cell, True)
    p = pred.reshape(b, -1, cell * cell, channels)
    t = target.reshape(b, -1, cell * cell, channels)
    p_mean, t_mean = p.mean(dim=2, keepdim=True), t.mean(dim=2, keepdim=True)
    cells = weight.sum().clamp(min=1.0)

    def over_predicted(err: Tensor) -> np.ndarray:  # (B, L) per-cell error -> (B,) mean over predicted cells
        return ((err * weight).sum(dim=1) / cells).double().numpy()

    return ErrorSplit(colour=over_predicted(((p_mean - t_mean) ** 2).mean(dim=(2, 3))),
                      structure=over_predicted((((p - p_mean) - (t - t_mean)) ** 2).mean(dim=(2, 3))),
                      flat=over_predicted(((t - t_mean) ** 2).mean(dim=(2, 3))))


def split_folder(model: torch.nn.Module, paths: Sequence[Path], seed: int = 0) -> ErrorSplit:
    """The error split of ``paths`` (an even number; centre crops at the model's input size).

    Every batch of :data:`BATCH` images gets its own reproducible mask of the model's type and
    ratio (seeds ``seed``, ``seed + 1``, ...), so the values average over masks as the
    pretraining loss does.
    """
    if len(paths) < 2 or len(paths) % 2:
        raise ValueError(f"{len(paths)} images; expected an even number, at least 2 (fill=mix pairs them)")
    img_size = model.encoder.img_size[0]
    parts = [split_reconstruction_error(model, load_images(list(paths[start:start + BATCH]), img_size),
                                        fixed_mask(model, seed + k))
             for k, start in enumerate(range(0, len(paths), BATCH))]
    return ErrorSplit.concat(parts)


def summary(split: ErrorSplit) -> dict[str, float]:
    """Means over images (``structure_explained_pct``: mean over images of 1 - structure / flat, in %)."""
    return {"n": int(len(split.flat)), "loss": float(split.loss.mean()), "colour": float(split.colour.mean()),
            "structure": float(split.structure.mean()), "flat": float(split.flat.mean()),
            "structure_explained_pct": float(100.0 * (1.0 - split.structure / split.flat).mean())}


# --------------------------------------------------------------------------- the stage
@dataclass
class ReconstructionConfig(RuntimeConfig):
    """The held-out reconstruction measurement of one pretraining checkpoint (``init``).

    ``images`` maps a domain to ``<roots key>/<folder under that root>`` (images the pretraining
    never read); the stage resolves them into ``folders``.
    """

    init: str = ""
    images: dict[str, str] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)
    limit: int = 128  # images per domain (a seeded subset)
    dataset: str = "heldout"
    data_root: str = ""


def resolve_images(params: Any, images: Mapping[str, Any]) -> dict[str, str]:
    """``{domain: "<roots key>/<sub folder>"}`` -> ``{domain: absolute folder}``; every folder must exist."""
    where = f"{params.path}: reconstruction.images"
    if not isinstance(images, Mapping) or not images:
        raise ValueError(f"{where}={images!r}: expected a mapping of domain -> <roots key>/<folder>")
    folders = {}
    for domain, spec in images.items():
        if str(domain) == POOLED:
            raise ValueError(f"{where}: the domain name {POOLED!r} is taken by the pooled values; rename it")
        if not isinstance(spec, str) or not spec.strip("/"):
            raise ValueError(f"{where}.{domain}={spec!r}: expected '<roots key>/<folder under that root>'")
        key, _, rest = spec.strip("/").partition("/")
        folder = Path(params.dataset_root(key, must_exist=True)) / rest
        if not folder.is_dir():
            raise FileNotFoundError(f"{where}.{domain}={spec!r}: {folder} is not a folder")
        folders[str(domain)] = str(folder)
    return folders


def reconstruction_stage(params: Any, sections: Sequence[str], checkpoint: str, metrics_path: str,
                         seed: int | None = None, variant: str = "default") -> dict[str, Any]:
    """DVC stage: split the reconstruction error of ``checkpoint`` on every domain's held-out images.

    Writes the metrics JSON (per domain and pooled: loss, colour, structure, flat and the
    share of the flat error the structure removes) and, beside it, ``<stem>_preds.json`` with
    the per-image values the report's intervals and paired tests are computed from.
    """
    from .engine.runner import engine_run, init_tags
    from .io import write_json_atomic
    from .pipeline import is_main_process, merged, stage_config, write_metrics
    from .probes import subset_indices
    from .records import records_path

    section = merged(params, sections)
    folders = resolve_images(params, section.get("images"))
    first_root = str(section["images"][next(iter(section["images"]))]).strip("/").partition("/")[0]
    owned = {"init": params.resolve_path(checkpoint), "folders": folders}

    def check(cfg: ReconstructionConfig, where: str) -> None:  # before the MLflow group run is created
        if cfg.limit < 2:
            raise ValueError(f"{where}: limit={cfg.limit}; expected at least 2 images per domain")

    cfg = stage_config(ReconstructionConfig, params, sections, "reconstruction", variant, "heldout",
                       "runs/reconstruction", seed, owned, root=first_root, check=check)
    model, config = load_pretrainer(cfg.init)
    splits, names = {}, {}
    for domain, folder in cfg.folders.items():
        paths = find_images(folder)
        picked = [paths[i] for i in subset_indices(len(paths), cfg.limit, cfg.seed)]
        picked = picked[: len(picked) - len(picked) % 2]
        if len(picked) < 2:
            raise ValueError(f"reconstruction.images.{domain}: {folder} holds {len(paths)} image(s); expected at "
                             "least 2")
        splits[domain] = split_folder(model, picked, cfg.seed)
        names[domain] = [str(p.relative_to(folder)) for p in picked]
    pooled = ErrorSplit.concat(list(splits.values()))
    result = {POOLED: summary(pooled), **{domain: summary(split) for domain, split in splits.items()}}
    with engine_run(cfg, distributed=False, outputs=False) as run:
        tags = {**init_tags(cfg, "reconstruction", "heldout"), "mixmim.model": str(config.get("model", ""))}
        with run.tracking("reconstruction/heldout", tags, {"domains": ",".join(splits)}) as tracker:
            tracker.log_metrics({f"final/{domain}/{k}": v for domain, values in result.items()
                                 for k, v in values.items()}, step=0)
    if is_main_process():
        write_json_atomic(records_path(metrics_path), {
            domain: {"images": names[domain], **{k: getattr(split, k).tolist() for k in ("colour", "structure", "flat")}}
            for domain, split in splits.items()})
        write_metrics(metrics_path, {**result, "model": config.get("model"), "mask_ratio": model.mask_ratio,
                                     "mask_type": model.mask_type, "fill": model.fill, "seed": cfg.seed,
                                     "run_id": tracker.run_id})
    return {**result, "splits": splits, "run_id": tracker.run_id}
