"""The paper's dense-transfer augmentations (LSJ for COCO, the BEiT/mmseg ADE20K pipeline).

The COCO and ADE20K readers live in :mod:`mixmim.data.coco` and :mod:`mixmim.data.ade20k`.  Images are returned as float tensors in [0, 1]; normalisation with the ImageNet mean
and std happens inside the models (torchvision's detection transform, the segmentor's
own buffers), so padding a [0, 1] image with the mean pixel is padding with zero after
normalisation -- the padding the reference implementations use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..data.ade20k import IGNORE_INDEX
from ..data.coco import DetectionTarget

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LargeScaleJitter",
    "SegmentationTrainTransform",
    "collate_detection",
    "keep_ratio_size",
    "photometric_distortion",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def collate_detection(batch: Sequence[tuple[Tensor, DetectionTarget]]) -> tuple[list[Tensor], list[DetectionTarget]]:
    """Lists of images and targets: torchvision's detectors take variable-sized images."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class LargeScaleJitter:
    """Large-scale jitter (Ghiasi et al.; ViTDet/MAE detection recipe) with transforms.v2.

    Resize to fit ``size x size`` times a random scale in ``scale_range``, randomly crop
    what exceeds the square, pad right/bottom to the square with the mean pixel (zero
    after normalisation), flip horizontally, and drop boxes (and their masks/labels)
    that the crop made empty.
    """

    def __init__(self, size: int = 1024, scale_range: tuple[float, float] = (0.1, 2.0), flip_prob: float = 0.5,
                 fill: Sequence[float] = IMAGENET_MEAN) -> None:
        self.size = int(size)
        self.jitter = v2.ScaleJitter((self.size, self.size), scale_range=scale_range)
        self.flip = v2.RandomHorizontalFlip(flip_prob)
        self.fill = {tv_tensors.Image: [float(v) for v in fill], tv_tensors.Mask: 0, "others": 0}
        self.sanitize = v2.Compose([v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1)])

    def __call__(self, image: Tensor, target: DetectionTarget) -> tuple[Tensor, DetectionTarget]:
        image, target = self.jitter(image, target)
        h, w = image.shape[-2:]
        if h > self.size or w > self.size:
            image, target = v2.RandomCrop((min(h, self.size), min(w, self.size)))(image, target)
            h, w = image.shape[-2:]
        if (h, w) != (self.size, self.size):
            image, target = v2.Pad([0, 0, self.size - w, self.size - h], fill=self.fill)(image, target)
        image, target = self.flip(image, target)
        return self.sanitize(image, target)




def keep_ratio_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmseg's keep-ratio rescale: the largest size within ``scale`` = (long, short) edges."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _uniform(low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand(()))


def photometric_distortion(image: Tensor, brightness: float = 32 / 255, contrast: tuple[float, float] = (0.5, 1.5),
                           saturation: tuple[float, float] = (0.5, 1.5), hue: float = 18 / 360) -> Tensor:
    """mmseg's PhotoMetricDistortion on a [0, 1] image: each step with probability 1/2.

    Additive brightness, multiplicative contrast (before or after the colour steps, at
    random), saturation and hue (torchvision's kernels); values are clipped to [0, 1].
    """
    def coin() -> bool:
        return bool(torch.rand(()) < 0.5)

    def contrast_step(img: Tensor) -> Tensor:
        return (img * _uniform(*contrast)).clamp(0, 1) if coin() else img

    if coin():
        image = (image + _uniform(-brightness, brightness)).clamp(0, 1)
    contrast_first = coin()
    if contrast_first:
        image = contrast_step(image)
    if coin():
        image = TF.adjust_saturation(image, _uniform(*saturation)).clamp(0, 1)
    if coin():
        image = TF.adjust_hue(image, _uniform(-hue, hue))
    if not contrast_first:
        image = contrast_step(image)
    return image


class SegmentationTrainTransform:
    """BEiT/mmseg ADE20K training pipeline: resize (ratio 0.5-2.0 of ``scale``), random crop
    with optional ``cat_max_ratio``, flip, photometric distortion, pad to the crop size."""

    def __init__(self, crop_size: int | tuple[int, int] = 512, scale: tuple[int, int] = (2048, 512),
                 ratio_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 flip_prob: float = 0.5, photometric: bool = True, ignore_index: int = IGNORE_INDEX,
                 fill: Sequence[float] = IMAGENET_MEAN) -> None:
        self.crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.scale = scale
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = photometric
        self.ignore_index = ignore_index
        self.fill = torch.tensor(fill, dtype=torch.float32).view(3, 1, 1)

    def resize(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        ratio = _uniform(*self.ratio_range)
        size = keep_ratio_size(*image.shape[-2:], (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        image = TF.resize(image, list(size), antialias=True)
        label = TF.resize(tv_tensors.Mask(label[None].to(torch.uint8)), list(size))[0]
        return image, label.as_subclass(Tensor).to(torch.int64)

    def crop_box(self, label: Tensor) -> tuple[int, int, int, int]:
        """Random crop window; retried up to 10 times while one class exceeds ``cat_max_ratio``."""
        h, w = label.shape
        ch, cw = min(self.crop[0], h), min(self.crop[1], w)
        box = (0, 0, ch, cw)
        for _ in range(10):
            top = int(torch.randint(h - ch + 1, ()))
            left = int(torch.randint(w - cw + 1, ()))
            box = (top, left, ch, cw)
            if self.cat_max_ratio >= 1:
                break
            patch = label[top:top + ch, left:left + cw]
            _, counts = patch[patch != self.ignore_index].unique(return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return box

    def pad(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        h, w = label.shape
        out_img = self.fill.expand(3, *self.crop).clone()
        out_lbl = torch.full(self.crop, self.ignore_index, dtype=label.dtype)
        out_img[:, :h, :w] = image
        out_lbl[:h, :w] = label
        return out_img, out_lbl

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        image, label = self.resize(image, label)
        top, left, ch, cw = self.crop_box(label)
        image, label = image[:, top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]
        if torch.rand(()) < self.flip_prob:
            image, label = image.flip(-1), label.flip(-1)
        if self.photometric:
            image = photometric_distortion(image)
        return self.pad(image, label)

