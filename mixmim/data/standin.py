"""Writing helpers shared by the built-in stand-in writers of every format module.

Per-image random streams keyed by position, deterministic JPEG/PNG/JSON output, the
provenance file, and :func:`staged_dir`, which builds a directory under a hidden name and
renames it into place only on success.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .draw import max_classes

GENERATOR_VERSION = 3
"""Bumped whenever the pixels a seed produces change, so caches can be invalidated."""

META_FILE = "builtin_meta.json"
"""Provenance file written at each stand-in dataset's root (not part of the real format)."""

JPEG_QUALITY = 90

GENERATOR = "mixmim.data.builtin"
"""Recorded as ``generator`` in every provenance file: the package entry point that writes the
stand-ins (kept fixed so the files stay byte-identical whichever module does the writing)."""


# --------------------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------------------

_SPLIT_CODES = {"train": 0, "val": 1}


def image_rng(seed: int, dataset: str, split: str, index: int) -> np.random.Generator:
    """Generator for one image, keyed by position rather than draw order.

    Keying by (seed, dataset, split, index) keeps every file stable when sizes or the set
    of generated datasets change, and makes the output independent of generation order.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    key = [seed, zlib.crc32(dataset.encode()), _SPLIT_CODES[split], index]
    return np.random.default_rng(np.random.SeedSequence(key))


def hex_name(*parts: object) -> str:
    """Stable md5-looking file stem, like the hashed names of iNaturalist/Places205."""
    return hashlib.md5("/".join(map(str, parts)).encode()).hexdigest()


def save_jpeg(path: Path, pixels: np.ndarray) -> None:
    """Write an RGB JPEG with fixed settings (deterministic bytes for identical pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=JPEG_QUALITY)


def save_label_png(path: Path, labels: np.ndarray) -> None:
    """Write a single-channel uint8 label map (mode "L"), as ADE20K ships them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), "L").save(path, format="PNG")


def write_json(path: Path, obj: Any) -> None:
    """Compact JSON like the official annotation files; key order is insertion order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, separators=(",", ":")))


# --------------------------------------------------------------------------------------
# Atomic output
# --------------------------------------------------------------------------------------


def _replace_dir(staged: Path, dest: Path) -> None:
    """Move ``staged`` to ``dest``, replacing whatever is there with two renames."""
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    if dest.exists():
        old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dest, old)
        os.rename(staged, dest)
        shutil.rmtree(old)
    else:
        os.rename(staged, dest)


@contextmanager
def staged_dir(dest: Path) -> Iterator[Path]:
    """Yield a hidden sibling directory that becomes ``dest`` only on success.

    A run killed midway leaves only a ``.<name>.<pid>.tmp`` directory, never a partial
    dataset under the final name.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    try:
        yield staged
        _replace_dir(staged, dest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def write_meta(root: Path, dataset: str, seed: int, **info: Any) -> None:
    """Record provenance (no timestamps, so the bytes stay a function of the seed)."""
    meta = {"generator": GENERATOR, "version": GENERATOR_VERSION, "dataset": dataset, "seed": seed, **info}
    (root / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def check_classes(dataset: str, num_classes: int) -> None:
    if not 2 <= num_classes <= max_classes(dataset):
        raise ValueError(f"{dataset}: num_classes must be in [2, {max_classes(dataset)}], got {num_classes}")


