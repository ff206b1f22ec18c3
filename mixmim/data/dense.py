"""Helpers shared by the dense-task readers (:mod:`.coco`, :mod:`.ade20k`)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF


def require_path(path: Path, kind: str, expected: str) -> Path:
    """Raise FileNotFoundError naming ``path`` when it is not an existing file/directory."""
    ok = path.is_dir() if kind == "directory" else path.is_file()
    if not ok:
        raise FileNotFoundError(f"{kind} not found: {path} ({expected})")
    return path


def load_image(path: Path) -> Tensor:
    """RGB image as a (3, H, W) float tensor in [0, 1]."""
    with Image.open(path) as img:
        pixels = TF.pil_to_tensor(img.convert("RGB"))
    return TF.to_dtype(pixels, torch.float32, scale=True)
