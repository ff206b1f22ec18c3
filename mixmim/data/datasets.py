"""Classification datasets read from their official on-disk formats: one factory over the format modules.

MixMIM is pre-trained on ImageNet-1K and transferred to iNaturalist 2018/2019
and Places205/365.  Each of those datasets ships in a different layout (class
folders, COCO-like JSON, plain list files).  The format modules (:mod:`.imagenet`, :mod:`.inat`, :mod:`.places`) parse each layout
into one common representation -- a list of ``(path, label)`` samples plus a
class count -- so that the training engine never needs to know which dataset
it is reading.

Design points:

* Parsing is done by small pure functions (``scan_imagenet_split``,
  ``parse_inat_json``, ``parse_places_list``) that only read metadata, so they
  are cheap to test and their errors point at the exact file, line or key.
* Paths are stored as ``str`` rather than ``Path``: Places365 has 1.8M
  samples and the list is pickled into every DataLoader worker.
* Image files are only opened in ``__getitem__``; list-file datasets do not
  ``stat`` each of their millions of files up front.  A missing or corrupt
  image therefore surfaces at load time as ``BadImageError`` (or is skipped
  and counted with ``skip_bad_images=True``).
"""

from __future__ import annotations

from pathlib import Path

from .classification import (
    IMAGE_EXTENSIONS,
    SPLITS,
    BadImageError,
    ClassificationDataset,
    Transform,
    _check_split,
    load_rgb_image,
)
from .imagenet import ImageNetDataset, scan_imagenet_split
from .inat import INaturalistDataset, parse_inat_json
from .places import (
    PLACES205_IMAGE_DIRS,
    PLACES205_LIST_FILES,
    PLACES205_NUM_CLASSES,
    PLACES365_IMAGE_DIRS,
    PLACES365_LIST_FILES,
    PLACES365_NUM_CLASSES,
    Places205Dataset,
    Places365Dataset,
    parse_places_list,
)

__all__ = [
    "BadImageError",
    "ClassificationDataset",
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "ImageNetDataset",
    "INaturalistDataset",
    "PLACES205_IMAGE_DIRS",
    "PLACES205_LIST_FILES",
    "PLACES205_NUM_CLASSES",
    "PLACES365_IMAGE_DIRS",
    "PLACES365_LIST_FILES",
    "PLACES365_NUM_CLASSES",
    "Places205Dataset",
    "Places365Dataset",
    "SPLITS",
    "build_classification_dataset",
    "load_rgb_image",
    "parse_inat_json",
    "parse_places_list",
    "scan_imagenet_split",
]

#: Names accepted by :func:`build_classification_dataset`.
DATASET_NAMES: tuple[str, ...] = ("imagenet", "inat2018", "inat2019", "places205", "places365")


# --------------------------------------------------------------------------- #
# Factory
# --------------------------------------------------------------------------- #


def build_classification_dataset(
    name: str,
    root: str | Path,
    split: str,
    transform: Transform | None = None,
    skip_bad_images: bool = False,
    class_list: str | Path | None = None,
) -> ClassificationDataset:
    """Build one of :data:`DATASET_NAMES` for ``split`` (``train`` or ``val``).

    A single entry point lets configs name a dataset by string; validation of
    ``name`` and ``split`` happens before touching the filesystem so a typo
    in a config fails with a message listing the valid choices.
    """
    _check_split(split)
    if class_list is not None and name != "imagenet":
        raise ValueError(f"class_list={str(class_list)!r} with dataset {name!r}: a class list selects ImageNet "
                         "classes only; expected dataset 'imagenet' or no class_list")
    if name == "imagenet":
        return ImageNetDataset(root, split, transform, skip_bad_images, class_list)
    if name in ("inat2018", "inat2019"):
        return INaturalistDataset(root, split, int(name[-4:]), transform, skip_bad_images)
    if name == "places205":
        return Places205Dataset(root, split, transform, skip_bad_images)
    if name == "places365":
        return Places365Dataset(root, split, transform, skip_bad_images)
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
