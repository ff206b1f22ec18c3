"""COCO 2017 instances: the reader and the writer of the built-in stand-in.

Layout ``annotations/instances_{train,val}2017.json`` + ``{train,val}2017/``.  Polygons
and RLEs become masks with pycocotools; category ids map to contiguous labels 1..K (0 is
torchvision's background) and back for evaluation.  Crowd regions are left out of training
targets (torchvision's Mask R-CNN cannot ignore them) but stay in the ground truth that
COCOeval reads.  Images are float tensors in [0, 1].
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .dense import load_image, require_path
from .draw import COCO_CATEGORIES, DrawnObject, polygon_area, render_coco_image
from .standin import image_rng, save_jpeg, staged_dir, write_json, write_meta

COCO_SPLITS: tuple[str, ...] = ("train", "val")


def coco_annotation_file(split: str) -> str:
    """Instances JSON of one split, relative to the dataset root."""
    return f"annotations/instances_{split}2017.json"


def coco_image_dir(split: str) -> str:
    """Image folder of one split, relative to the dataset root."""
    return f"{split}2017"


DetectionTarget = dict[str, Any]


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
        if split not in COCO_SPLITS:
            raise ValueError(f"split {split!r} is not one of {COCO_SPLITS}")
        root = Path(root)
        ann = Path(annotation_file) if annotation_file else root / coco_annotation_file(split)
        self.annotation_file = require_path(ann, "file", "COCO instances JSON, e.g. annotations/instances_val2017.json")
        self.image_dir = require_path(Path(image_dir) if image_dir else root / coco_image_dir(split), "directory",
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


# --------------------------------------------------------------------------- #
# Built-in stand-in writer
# --------------------------------------------------------------------------- #


def coco_annotation(ann_id: int, image_id: int, obj: DrawnObject) -> dict[str, Any]:
    """COCO instance annotation whose box, area and polygon all come from the drawn outline."""
    poly = obj.polygon
    x0, y0 = poly.min(axis=0)
    x1, y1 = poly.max(axis=0)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj.category_id,
        "segmentation": [[round(float(v), 2) for v in poly.reshape(-1)]],
        "area": round(polygon_area(poly), 2),
        "bbox": [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
        "iscrowd": 0,
    }


COCO_VAL_FIRST_ID = 500_000


def write_coco(dest: Path, *, seed: int = 0, image_size: int = 128, num_train: int = 80, num_val: int = 20) -> Path:
    """COCO 2017 layout: ``annotations/instances_{train,val}2017.json``, ``{train,val}2017/%012d.jpg``."""
    dest = Path(dest)
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _, _ in COCO_CATEGORIES]
    with staged_dir(dest) as root:
        ann_id = 1
        for split, count, first_id in (("train", num_train, 1), ("val", num_val, COCO_VAL_FIRST_ID)):
            images, annotations = [], []
            for i in range(count):
                image_id = first_id + i
                pixels, objects = render_coco_image(image_rng(seed, "coco", split, i), image_size)
                file_name = f"{image_id:012d}.jpg"
                save_jpeg(root / coco_image_dir(split) / file_name, pixels)
                images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
                for obj in objects:
                    annotations.append(coco_annotation(ann_id, image_id, obj))
                    ann_id += 1
            info = {"description": "mixmim built-in COCO stand-in", "version": "1.0", "year": 2017}
            write_json(root / coco_annotation_file(split),
                       {"info": info, "licenses": [], "images": images, "annotations": annotations,
                        "categories": categories})
        write_meta(root, "coco", seed, image_size=image_size, num_train=num_train, num_val=num_val)
    return dest
