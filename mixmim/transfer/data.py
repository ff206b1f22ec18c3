"""COCO instances and ADE20K scene parsing in their official layouts, with the paper's augmentations.

Images are returned as float tensors in [0, 1]; normalisation with the ImageNet mean
and std happens inside the models (torchvision's detection transform, the segmentor's
own buffers), so padding a [0, 1] image with the mean pixel is padding with zero after
normalisation -- the padding the reference implementations use.

* COCO (``annotations/instances_{train,val}2017.json`` + ``{train,val}2017/``): polygons
  and RLEs become masks with pycocotools; category ids map to contiguous labels 1..K
  (0 is torchvision's background) and back for evaluation. Crowd regions are left out
  of training targets (torchvision's Mask R-CNN cannot ignore them) but stay in the
  ground truth that COCOeval reads.
* ADE20K (``ADEChallengeData2016/{images,annotations}/{training,validation}``): label 0
  ("other") is ignored and labels shift down by one, as mmseg's ``reduce_zero_label``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "ADE20K_NUM_CLASSES",
    "ADE20KDataset",
    "CocoInstanceDataset",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LargeScaleJitter",
    "SegmentationTrainTransform",
    "collate_detection",
    "keep_ratio_size",
    "load_coco_silently",
    "photometric_distortion",
    "reduce_zero_label",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255
ADE20K_NUM_CLASSES = 150
ADE20K_DIR = "ADEChallengeData2016"
_ADE_SPLITS = {"train": "training", "val": "validation"}
_COCO_SPLITS = ("train", "val")

DetectionTarget = dict[str, Any]


def _require(path: Path, kind: str, expected: str) -> Path:
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


# --------------------------------------------------------------------------- #
# COCO instances
# --------------------------------------------------------------------------- #
def load_coco_silently(annotation_file: Path) -> COCO:
    """pycocotools' COCO index without its progress prints (they flood training logs)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(annotation_file))


def _annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 mask of a polygon list, uncompressed RLE or compressed RLE."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


class CocoInstanceDataset(Dataset):
    """COCO-format instance segmentation: ``(image, target)`` in torchvision's detection format.

    ``target`` holds ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY pixels), ``masks``
    (``tv_tensors.Mask``, (N, H, W) uint8), ``labels`` (int64, 1..K) and ``image_id``.
    ``transform`` is called as ``transform(image, target)`` (v2 style), e.g.
    :class:`LargeScaleJitter` for training; evaluation uses no transform.
    """

    def __init__(
        self, root: str | Path, split: str = "train", transform: Callable[..., Any] | None = None,
        annotation_file: str | Path | None = None, image_dir: str | Path | None = None,
        remove_images_without_annotations: bool = False,
    ) -> None:
        if split not in _COCO_SPLITS:
            raise ValueError(f"split {split!r} is not one of {_COCO_SPLITS}")
        root = Path(root)
        ann = Path(annotation_file) if annotation_file else root / "annotations" / f"instances_{split}2017.json"
        self.annotation_file = _require(ann, "file", "COCO instances JSON, e.g. annotations/instances_val2017.json")
        self.image_dir = _require(Path(image_dir) if image_dir else root / f"{split}2017", "directory",
                                  f"COCO image folder, e.g. {split}2017/")
        self.coco = load_coco_silently(self.annotation_file)
        self.transform = transform
        self.cat_ids: list[int] = sorted(self.coco.getCatIds())
        self.cat_to_label: dict[int, int] = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat: dict[int, int] = {i: c for c, i in self.cat_to_label.items()}
        self.class_names: list[str] = [self.coco.cats[c]["name"] for c in self.cat_ids]
        ids = sorted(self.coco.imgs)
        if remove_images_without_annotations:
            ids = [i for i in ids if self._usable_annotations(i)]
        self.ids: list[int] = ids

    @property
    def num_classes(self) -> int:
        """Object categories, without background."""
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def _usable_annotations(self, image_id: int) -> list[dict[str, Any]]:
        """Non-crowd annotations with a box of positive size (what training can use)."""
        anns = self.coco.imgToAnns.get(image_id, [])
        return [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]

    def target(self, image_id: int, height: int, width: int) -> DetectionTarget:
        anns = self._usable_annotations(image_id)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = np.stack([_annotation_mask(a["segmentation"], height, width) for a in anns]) if anns else \
            np.zeros((0, height, width), dtype=np.uint8)
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": image_id,
        }

    def __getitem__(self, index: int) -> tuple[Tensor, DetectionTarget]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = tv_tensors.Image(load_image(self.image_dir / info["file_name"]))
        height, width = image.shape[-2:]
        if (height, width) != (info["height"], info["width"]):
            raise ValueError(f"{self.image_dir / info['file_name']} is {height}x{width} but "
                             f"{self.annotation_file} says {info['height']}x{info['width']}")
        target = self.target(image_id, height, width)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


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


# --------------------------------------------------------------------------- #
# ADE20K
# --------------------------------------------------------------------------- #
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
        if split not in _ADE_SPLITS:
            raise ValueError(f"split {split!r} is not one of {tuple(_ADE_SPLITS)}")
        root = Path(root)
        base = root / ADE20K_DIR if (root / ADE20K_DIR).is_dir() else root
        folder = _ADE_SPLITS[split]
        self.image_dir = _require(base / "images" / folder, "directory",
                                  f"ADE20K images, expected {ADE20K_DIR}/images/{folder}")
        self.label_dir = _require(base / "annotations" / folder, "directory",
                                  f"ADE20K label PNGs, expected {ADE20K_DIR}/annotations/{folder}")
        self.images = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not self.images:
            raise FileNotFoundError(f"no images in {self.image_dir}")
        self.labels = [self.label_dir / f"{p.stem}.png" for p in self.images]
        for label in self.labels:
            _require(label, "file", "the label PNG of the image with the same name")
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

