"""Data loading for MixMIM: classification datasets in their on-disk formats.

The synthetic data generator lives in :mod:`mixmim.data.builtin` and is
imported from there directly.
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
