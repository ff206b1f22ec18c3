"""iNaturalist 2018/2019 (COCO-like JSON): the reader and the writer of the built-in stand-in.

Layout ``<root>/{train,val}<year>.json`` with image ``file_name`` paths relative to ``<root>``;
the stand-in puts its images under ``train_val<year>/<supercategory>/<category id>/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .classification import (
    ClassificationDataset,
    Sample,
    Transform,
    _check_split,
    _join_relative,
    _require_dir,
    _require_file,
)
from .draw import INAT_TEXTURE_PERIOD, render_texture_image, texture_class
from .standin import check_classes, hex_name, image_rng, save_jpeg, staged_dir, write_json, write_meta

_INAT_YEARS: tuple[int, ...] = (2018, 2019)


def inat_annotation_file(split: str, year: int) -> str:
    """Annotation file of one split, relative to the dataset root (``train2018.json``, ...)."""
    return f"{split}{year}.json"


# --------------------------------------------------------------------------- #
# iNaturalist 2018 / 2019: <root>/{train,val}<year>.json (COCO-like)
# --------------------------------------------------------------------------- #


def _inat_layout(year: int) -> str:
    return (
        f"expected iNaturalist {year} layout <root>/train{year}.json and <root>/val{year}.json, "
        "with image file_name paths relative to <root>"
    )


def _require_key(entry: Any, key: str, where: str, json_path: Path) -> Any:
    """Fetch ``entry[key]`` or raise naming the file, the entry and the key."""
    if not isinstance(entry, dict):
        raise ValueError(f"{json_path}: {where} must be a JSON object, got {type(entry).__name__}")
    if key not in entry:
        raise ValueError(f"{json_path}: {where} is missing key {key!r}")
    return entry[key]


def _require_list(data: dict[str, Any], key: str, json_path: Path) -> list[Any]:
    """Fetch a top-level list such as ``images``, rejecting other types."""
    value = _require_key(data, key, "top level", json_path)
    if not isinstance(value, list):
        raise ValueError(f"{json_path}: key {key!r} must be a list, got {type(value).__name__}")
    return value


def _read_json(json_path: Path) -> Any:
    """Load JSON, turning a syntax error into a ``ValueError`` naming the file."""
    try:
        with json_path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{json_path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc


def parse_inat_json(json_path: Path, image_root: Path) -> tuple[list[Sample], list[str]]:
    """Turn an iNaturalist annotation file into samples and class names.

    Category ids are mapped to ``0..K-1`` in sorted-id order, so the mapping
    is the same for train and val (both files list every category).  Every
    image must have exactly one annotation: these splits are single-label,
    and a missing label would silently shrink the dataset.
    """
    data = _read_json(json_path)
    if not isinstance(data, dict):
        raise ValueError(f"{json_path}: top level must be a JSON object with images/annotations/categories")
    images = _require_list(data, "images", json_path)
    annotations = _require_list(data, "annotations", json_path)
    categories = _require_list(data, "categories", json_path)

    category_ids: list[Any] = []
    names: dict[Any, str] = {}
    for i, cat in enumerate(categories):
        cid = _require_key(cat, "id", f"categories[{i}]", json_path)
        category_ids.append(cid)
        names[cid] = str(cat.get("name", cid))
    sorted_ids = sorted(set(category_ids))
    if len(sorted_ids) != len(category_ids):
        raise ValueError(f"{json_path}: duplicate ids in 'categories'")
    label_of = {cid: i for i, cid in enumerate(sorted_ids)}

    label_of_image: dict[Any, int] = {}
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        image_id = _require_key(ann, "image_id", where, json_path)
        category_id = _require_key(ann, "category_id", where, json_path)
        if category_id not in label_of:
            raise ValueError(f"{json_path}: {where} has category_id {category_id!r} not listed in 'categories'")
        if image_id in label_of_image:
            raise ValueError(f"{json_path}: {where} is a second annotation for image_id {image_id!r}")
        label_of_image[image_id] = label_of[category_id]

    samples: list[Sample] = []
    for i, img in enumerate(images):
        where = f"images[{i}]"
        image_id = _require_key(img, "id", where, json_path)
        file_name = _require_key(img, "file_name", where, json_path)
        if image_id not in label_of_image:
            raise ValueError(f"{json_path}: {where} (id {image_id!r}) has no entry in 'annotations'")
        samples.append((_join_relative(image_root, str(file_name)), label_of_image[image_id]))
    return samples, [names[cid] for cid in sorted_ids]


class INaturalistDataset(ClassificationDataset):
    """iNaturalist 2018 or 2019 from the official ``{train,val}<year>.json``."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        year: int,
        transform: Transform | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        if year not in _INAT_YEARS:
            raise ValueError(f"unsupported iNaturalist year {year}; expected one of {_INAT_YEARS}")
        _check_split(split)
        root = Path(root)
        layout = _inat_layout(year)
        _require_dir(root, layout)
        json_path = root / inat_annotation_file(split, year)
        _require_file(json_path, layout)
        samples, classes = parse_inat_json(json_path, root)
        super().__init__(
            samples,
            len(classes),
            classes=classes,
            transform=transform,
            skip_bad_images=skip_bad_images,
            source=str(json_path),
        )
        self.year = year


# --------------------------------------------------------------------------- #


# --------------------------------------------------------------------------- #
# Built-in stand-in writers
# --------------------------------------------------------------------------- #


INAT_SUPERCATEGORIES = {
    2018: ("Plantae", "Insecta", "Aves", "Fungi", "Reptilia", "Amphibia", "Mammalia", "Mollusca"),
    2019: ("Plants", "Insects", "Birds", "Fungi", "Reptiles", "Amphibians"),
}


def inat_category_id(year: int, label: int) -> int:
    """Non-contiguous category ids, so loaders must map ids to labels explicitly."""
    return (7 + 5 * label) if year == 2018 else (100 + 13 * label)


def write_inat(
    dest: Path,
    year: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    num_classes: int = 10,
    train_per_class: int = 40,
    val_per_class: int = 10,
) -> Path:
    """iNaturalist layout: ``train<year>.json``, ``val<year>.json`` and
    ``train_val<year>/<supercategory>/<category_id>/<hash>.jpg``."""
    name = f"inat{year}"
    check_classes(name, num_classes)
    dest = Path(dest)
    supers = INAT_SUPERCATEGORIES[year]
    categories = [
        {"id": inat_category_id(year, k), "name": "_".join(texture_class(k)), "supercategory": supers[k % len(supers)]}
        for k in range(num_classes)
    ]
    with staged_dir(dest) as root:
        image_id = 0
        for split, per_class in (("train", train_per_class), ("val", val_per_class)):
            images, annotations = [], []
            for label, cat in enumerate(categories):
                for i in range(per_class):
                    index = label * per_class + i
                    rng = image_rng(seed, name, split, index)
                    rel = f"train_val{year}/{cat['supercategory']}/{cat['id']}/{hex_name(name, split, index)}.jpg"
                    pixels = render_texture_image(rng, label, image_size, INAT_TEXTURE_PERIOD, hue_classes=num_classes)
                    save_jpeg(root / rel, pixels)
                    images.append({"id": image_id, "file_name": rel, "width": image_size, "height": image_size})
                    annotations.append({"id": image_id, "image_id": image_id, "category_id": cat["id"]})
                    image_id += 1
            info = {"description": f"mixmim built-in iNaturalist {year} stand-in", "year": year}
            write_json(root / inat_annotation_file(split, year),
                       {"info": info, "images": images, "annotations": annotations, "categories": categories})
        write_meta(root, name, seed, image_size=image_size, num_classes=num_classes,
                   train_per_class=train_per_class, val_per_class=val_per_class,
                   hue="window of two class-widths around label / num_classes")
    return dest


def write_inat2018(dest: Path, **kwargs: Any) -> Path:
    """iNaturalist 2018 stand-in (see ``write_inat``)."""
    return write_inat(dest, 2018, **kwargs)


def write_inat2019(dest: Path, **kwargs: Any) -> Path:
    """iNaturalist 2019 stand-in (see ``write_inat``)."""
    return write_inat(dest, 2019, **kwargs)
