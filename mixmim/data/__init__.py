"""Data for MixMIM, one module per on-disk format.

* :mod:`.imagenet`, :mod:`.inat`, :mod:`.places` -- the classification formats (on the base in
  :mod:`.classification`; :mod:`.datasets` builds one by name), :mod:`.coco` and
  :mod:`.ade20k` -- the dense formats.  Each holds its layout constants, its reader and the
  writer of its built-in stand-in.
* :mod:`.draw` -- the procedural drawing of the stand-ins' pixels; :mod:`.standin` -- the
  writing helpers they share; :mod:`.builtin` -- which stand-ins to write, at which sizes.

The classification readers are re-exported here; the dense readers (torch, pycocotools) and
the stand-in writers are imported from their modules directly.
"""

from mixmim.data.datasets import (
    DATASET_NAMES,
    SPLITS,
    BadImageError,
    ClassificationDataset,
    ImageNetDataset,
    INaturalistDataset,
    Places205Dataset,
    Places365Dataset,
    build_classification_dataset,
)

__all__ = [
    "DATASET_NAMES",
    "SPLITS",
    "BadImageError",
    "ClassificationDataset",
    "ImageNetDataset",
    "INaturalistDataset",
    "Places205Dataset",
    "Places365Dataset",
    "build_classification_dataset",
]
