"""Data for the training loops: transforms, reproducible sampling and loaders.

Two properties make a killed run resumable to the same weights and make N processes
see the same global batches as one:

- every sample's augmentation draws from random generators seeded by
  (seed, epoch, sample index), not from whatever state a process happens to be in;
- the sampler's order is a function of (seed, epoch) alone, rank r takes every
  world_size-th index, and it can start part-way into an epoch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from ..data import build_classification_dataset


def pretrain_transform(img_size: int, crop_scale: tuple[float, float] = (0.2, 1.0)) -> T.Compose:
    """Table 11: RandomResizedCrop (bicubic) + horizontal flip + ImageNet normalisation."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def finetune_transform(img_size: int, training: bool, randaug: str | None, reprob: float,
                       crop_pct: float) -> Any:
    """Table 12 augmentation through timm: RandAug, random erasing; resize + centre crop for eval."""
    if training:
        return create_transform(img_size, is_training=True, auto_augment=randaug, interpolation="bicubic",
                                re_prob=reprob, re_mode="pixel", re_count=1)
    return create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct)


def linear_probe_transform(img_size: int) -> T.Compose:
    """MAE's linear-probe augmentation: RandomResizedCrop + flip, nothing stronger."""
    return T.Compose([
        T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % 2**64
    x ^= x >> 31
    return x % 2**63


class SeededDataset(Dataset):
    """Each item is produced under RNGs seeded by (seed, epoch, index).

    Items are ``(image, label, bad)`` where ``bad`` counts unreadable files skipped
    while producing this item, so the count survives DataLoader worker processes.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        s = sample_seed(self.seed, self.epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        before = len(getattr(self.dataset, "bad_images", ()))
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                np.random.seed(s % 2**32)
                img, label = self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return img, label, len(getattr(self.dataset, "bad_images", ())) - before


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch permutation, sharded over ranks, able to start mid-epoch.

    The order is padded (by wrapping) to a multiple of world_size * batch_size so
    every rank runs the same number of full batches: rank r's k-th batch and the
    other ranks' k-th batches together are exactly the k-th global batch.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        if size < batch_size * world_size:
            raise ValueError(f"dataset of {size} samples is smaller than one global batch "
                             f"({batch_size} x {world_size} processes); lower batch_size")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def global_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        per_step = self.batch_size * self.world_size
        order = self.global_order()[: self.batches_per_epoch * per_step]
        for step in range(self.start_batch, self.batches_per_epoch):
            chunk = order[step * per_step:(step + 1) * per_step]
            yield from chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class ShardSampler(Sampler[int]):
    """Evaluation: rank r takes indices r, r+W, ...; nothing is duplicated or dropped."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate(batch: list[tuple[Any, int, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    imgs = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    return imgs, labels, sum(b[2] for b in batch)


def make_loader(dataset: Dataset, sampler: Sampler[int], batch_size: int, num_workers: int,
                pin_memory: bool, drop_last: bool, collate_fn: Any = None) -> DataLoader:
    """A loader whose worker seeding never touches the global RNG (own generator); ``collate_fn``
    replaces the classification collate (dense tasks)."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_fn or collate,
        pin_memory=pin_memory, drop_last=drop_last, generator=torch.Generator().manual_seed(0),
        persistent_workers=False,
    )


def classification_split(name: str, root: str, split: str, transform: Any, skip_bad_images: bool,
                         class_list: str | None = None) -> Dataset:
    if not root:
        raise ValueError(f"no data root given for dataset {name!r}; set data_root to the dataset's folder")
    return build_classification_dataset(name, root, split, transform=transform, skip_bad_images=skip_bad_images,
                                        class_list=class_list)
