"""Small built-in stand-in datasets, written in the real datasets' on-disk formats.

Why this exists: the suite must run its whole pipeline (pretraining, fine-tuning, linear
probing, detection and segmentation transfer) on a fresh machine with no datasets, on a
CPU, in minutes.  Instead of special "toy" loaders, this module writes tiny datasets in
exactly the official layouts (ImageNet folders, iNaturalist/COCO JSON, Places list files,
ADE20K PNG label maps), so the very same loaders serve both the stand-ins and the real
data.

Every image carries learnable structure and nuisance variation:

* ImageNet stand-in -- the class is a *shape* (circle, star, ring, ...; past ten classes
  also a fill style).  Position, scale, rotation, background texture and noise vary.  The
  foreground hue is drawn from a class-specific window that overlaps its neighbours, so
  colour is a weak cue and shape is needed for high accuracy.
* iNaturalist stand-ins -- the class is a *texture* (stripe orientation, checks, dots,
  rings, ...) filling a randomly placed "organism" ellipse.  As in the ImageNet stand-in the
  markings' hue comes from a class-specific window that overlaps its neighbours (colour
  hints, texture decides); they may take their own validation size (``inat_val_per_class``).  Its period
  (about 19 px at 64 px) spans several 8-px mixing cells, so a masked cell's markings follow
  from the visible ones; the unlabeled set's textures domain keeps a finer period (10 px).
* Places stand-ins -- the class is a *scene layout*: horizon height, sky palette, ground
  type and skyline structure (none / buildings / trees), with jittered colours.  They may take
  their own class count and shots (``places_num_classes``, ``places_train_per_class``).
* COCO stand-in -- 1-4 shapes in random colours (category = shape only) on a
  textured background.  Objects never overlap (placement rejects overlapping bounding
  circles), so each polygon is fully visible and boxes/masks are exact.
* ADE20K stand-in -- street/landscape scenes painted class by class (sky, building, tree,
  grass, road, water, car, person; 0 = "other" clutter), then hue-rotated at random so that
  texture, layout and shape rather than colour identify the classes.  The label map is
  painted with the very masks used for the image, so it is exact; labels are PNG, images JPEG.
* Unlabeled pretraining set -- the field's regime is pretraining on a large unlabeled
  collection (ImageNet-1K without its labels) and transferring to smaller labeled sets.
  This set is many times larger than any labeled stand-in and mixes every domain above
  (shapes, textures, landscapes, object and street scenes), drawn from its own random
  streams, so no labeled training or validation image appears in it.  It is written in the
  ImageNet folder layout, one folder per domain (the folder names are never used as labels).

The drawing lives in :mod:`.draw`; each format module (:mod:`.imagenet`, :mod:`.inat`,
:mod:`.places`, :mod:`.coco`, :mod:`.ade20k`) holds its layout constants, its reader and
the writer of its stand-in; this module chooses which stand-ins to write, and at which sizes.

Everything is a pure function of the seed: each image draws from its own
``numpy.random.Generator`` keyed by (seed, dataset, split, index), so the same seed gives
byte-identical files regardless of generation order.  Each dataset is generated into a
hidden temporary sibling directory and renamed into place, so a killed run never leaves a
partial dataset under the final name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .ade20k import write_ade20k
from .coco import write_coco
from .imagenet import write_imagenet, write_unlabeled
from .inat import write_inat2018, write_inat2019
from .places import write_places205, write_places365
from .standin import GENERATOR_VERSION, META_FILE, staged_dir

__all__ = ["DATASETS", "DEFAULT_ROOTS", "DEFAULT_SIZES", "GENERATOR_VERSION", "META_FILE", "WRITERS", "BuiltinSizes",
           "generate_all", "sizes_dict", "staged_dir", "write_ade20k", "write_coco", "write_imagenet",
           "write_inat2018", "write_inat2019", "write_places205", "write_places365", "write_unlabeled"]

DEFAULT_ROOTS: dict[str, str] = {
    "imagenet": "imagenet",
    "inat2018": "inat2018",
    "inat2019": "inat2019",
    "places365": "places365",
    "places205": "places205",
    "coco": "coco",
    "ade20k": "ade20k",
    "unlabeled": "unlabeled",
}
"""Dataset name -> directory (relative to the output root) that ``generate_all`` writes."""

DATASETS: tuple[str, ...] = tuple(DEFAULT_ROOTS)


@dataclass(frozen=True)
class BuiltinSizes:
    """Sizes of the generated stand-ins; the defaults generate in seconds on two cores."""

    image_size: int = 64
    num_classes: int = 10
    train_per_class: int = 40
    val_per_class: int = 10
    dense_image_size: int = 128
    dense_train: int = 80
    dense_val: int = 20
    unlabeled_images: int = 2000
    # The two Places stand-ins may take their own class count and shots (0: num_classes /
    # train_per_class): scene layouts are easy at 10 classes, so the default pipeline asks
    # for more classes and fewer shots there to keep them off the ceiling for either init.
    places_num_classes: int = 0
    places_train_per_class: int = 0
    # The iNat stand-ins may take a larger validation set (0: val_per_class): evaluating them is
    # cheap, and three times the images let a paired test resolve a 3-4 point difference.
    inat_val_per_class: int = 0

    def __post_init__(self) -> None:
        """Reject sizes the renderers cannot honour, before any file is written."""
        if min(self.image_size, self.dense_image_size) < 8:
            raise ValueError(f"image sizes must be at least 8 pixels: {self}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2: {self}")
        if min(self.train_per_class, self.val_per_class, self.dense_train, self.dense_val,
               self.unlabeled_images, self.places_num_classes, self.places_train_per_class,
               self.inat_val_per_class) < 0:
            raise ValueError(f"image counts must be non-negative: {self}")
        if self.places_num_classes == 1:
            raise ValueError(f"places_num_classes must be 0 (same as num_classes) or at least 2: {self}")


DEFAULT_SIZES = BuiltinSizes()


# --------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------


def _writer_args(name: str, seed: int, sizes: BuiltinSizes) -> dict[str, Any]:
    """Keyword arguments of each writer derived from the shared size settings."""
    if name in ("coco", "ade20k"):
        return {"seed": seed, "image_size": sizes.dense_image_size, "num_train": sizes.dense_train,
                "num_val": sizes.dense_val}
    if name == "unlabeled":
        return {"seed": seed, "image_size": sizes.image_size, "num_images": sizes.unlabeled_images}
    places = name in ("places205", "places365")
    inat = name in ("inat2018", "inat2019")
    return {"seed": seed, "image_size": sizes.image_size,
            "num_classes": (places and sizes.places_num_classes) or sizes.num_classes,
            "train_per_class": (places and sizes.places_train_per_class) or sizes.train_per_class,
            "val_per_class": (inat and sizes.inat_val_per_class) or sizes.val_per_class}


WRITERS: dict[str, Callable[..., Path]] = {
    "imagenet": write_imagenet,
    "inat2018": write_inat2018,
    "inat2019": write_inat2019,
    "places365": write_places365,
    "places205": write_places205,
    "coco": write_coco,
    "ade20k": write_ade20k,
    "unlabeled": write_unlabeled,
}


def generate_all(
    root: Path | str,
    seed: int = 0,
    sizes: BuiltinSizes = DEFAULT_SIZES,
    datasets: Iterable[str] | None = None,
    on_done: Callable[[str, Path], None] | None = None,
) -> dict[str, Path]:
    """Write the chosen stand-ins (default: all) under ``root/<DEFAULT_ROOTS[name]>``.

    Each dataset is replaced atomically on its own, so an interrupted call keeps every
    dataset finished before the interruption.  ``on_done`` is called after each one.
    """
    names = list(DATASETS if datasets is None else datasets)
    unknown = sorted(set(names) - set(WRITERS))
    if unknown:
        raise ValueError(f"unknown datasets {unknown}; choose from {list(WRITERS)}")
    root = Path(root)
    written: dict[str, Path] = {}
    for name in names:
        written[name] = WRITERS[name](root / DEFAULT_ROOTS[name], **_writer_args(name, seed, sizes))
        if on_done is not None:
            on_done(name, written[name])
    return written


def sizes_dict(sizes: BuiltinSizes) -> dict[str, int]:
    """Plain dict of the size settings (for logging and stage parameters)."""
    return asdict(sizes)
