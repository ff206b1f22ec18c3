"""ADE20K SceneParsing: the reader and the writer of the built-in stand-in.

Layout ``ADEChallengeData2016/{images,annotations}/{training,validation}``, JPEG images and
PNG label maps of the same stem.  Label 0 ("other") is ignored and labels shift down by one,
as mmseg's ``reduce_zero_label``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .dense import load_image, require_path
from .draw import ADE_CLASSES, render_ade_image
from .standin import image_rng, save_jpeg, save_label_png, staged_dir, write_meta

IGNORE_INDEX = 255
ADE20K_NUM_CLASSES = 150
ADE20K_DIR = "ADEChallengeData2016"
ADE20K_SPLITS = {"train": "training", "val": "validation"}
_ADE_PREFIXES = {"train": "ADE_train", "val": "ADE_val"}


def reduce_zero_label(label: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """ADE20K labels 1..150 -> 0..149 and 0 ("other") -> ignore, as mmseg does."""
    label = label.to(torch.int64)
    return torch.where(label == 0, torch.full_like(label, ignore_index), label - 1)


class ADE20KDataset(Dataset):
    """ADE20K SceneParsing: ``(image, label)`` with label (H, W) int64, 255 = ignore.

    ``root`` is the folder holding ``ADEChallengeData2016`` or that folder itself.
    ``transform(image, label)`` returns the pair transformed (e.g.
    :class:`SegmentationTrainTransform`).
    """

    def __init__(self, root: str | Path, split: str = "train",
                 transform: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
                 num_classes: int = ADE20K_NUM_CLASSES) -> None:
        if split not in ADE20K_SPLITS:
            raise ValueError(f"split {split!r} is not one of {tuple(ADE20K_SPLITS)}")
        root = Path(root)
        base = root / ADE20K_DIR if (root / ADE20K_DIR).is_dir() else root
        folder = ADE20K_SPLITS[split]
        self.image_dir = require_path(base / "images" / folder, "directory",
                                  f"ADE20K images, expected {ADE20K_DIR}/images/{folder}")
        self.label_dir = require_path(base / "annotations" / folder, "directory",
                                  f"ADE20K label PNGs, expected {ADE20K_DIR}/annotations/{folder}")
        self.images = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not self.images:
            raise FileNotFoundError(f"no images in {self.image_dir}")
        self.labels = [self.label_dir / f"{p.stem}.png" for p in self.images]
        for label in self.labels:
            require_path(label, "file", "the label PNG of the image with the same name")
        self.transform = transform
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = load_image(self.images[index])
        with Image.open(self.labels[index]) as png:
            label = reduce_zero_label(torch.from_numpy(np.array(png, dtype=np.uint8)))
        if label.shape != image.shape[-2:]:
            raise ValueError(f"{self.labels[index]} is {tuple(label.shape)}, its image {tuple(image.shape[-2:])}")
        if self.transform is not None:
            image, label = self.transform(image, label)
        return image, label


# --------------------------------------------------------------------------- #
# Built-in stand-in writer
# --------------------------------------------------------------------------- #


def write_ade20k(dest: Path, *, seed: int = 0, image_size: int = 128, num_train: int = 80, num_val: int = 20) -> Path:
    """ADE20K (SceneParsing) layout under ``ADEChallengeData2016/{images,annotations}/{training,validation}``."""
    dest = Path(dest)
    with staged_dir(dest) as root:
        for split, count in (("train", num_train), ("val", num_val)):
            folder = ADE20K_SPLITS[split]
            for i in range(count):
                pixels, labels = render_ade_image(image_rng(seed, "ade20k", split, i), image_size)
                stem = f"{_ADE_PREFIXES[split]}_{i + 1:08d}"
                save_jpeg(root / ADE20K_DIR / "images" / folder / f"{stem}.jpg", pixels)
                save_label_png(root / ADE20K_DIR / "annotations" / folder / f"{stem}.png", labels)
        write_meta(root, "ade20k", seed, image_size=image_size, num_train=num_train, num_val=num_val,
                   classes={str(k): v for k, v in ADE_CLASSES.items()})
    return dest
