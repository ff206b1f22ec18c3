"""Common base of the classification readers (:mod:`.imagenet`, :mod:`.inat`, :mod:`.places`).

Every format reduces to ``(path, label)`` samples plus a class count, held by
:class:`ClassificationDataset`, which opens an image only when it is indexed (so a corrupt
file surfaces as :class:`BadImageError`, or is skipped and counted).  The small path and
layout checks here are shared by the format modules.  See :mod:`.datasets` for the design.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger("mixmim.data")

Sample = tuple[str, int]
Transform = Callable[[Image.Image], Any]

#: File suffixes accepted as images in ImageNet class folders (compared
#: case-insensitively, so ``.JPEG`` from the official tarballs matches).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpeg", ".jpg", ".png")

#: Splits every dataset here supports (the test splits have no public labels).
SPLITS: tuple[str, ...] = ("train", "val")


# Exceptions PIL raises for unreadable files: missing/permission (OSError),
# unknown format (UnidentifiedImageError, an OSError), truncated data
# (OSError), some malformed headers (ValueError, SyntaxError), and oversized
# images (DecompressionBombError).
_IMAGE_LOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
)


class BadImageError(ValueError):
    """An image file could not be opened or decoded.

    Kept distinct from generic ``ValueError`` so callers (and
    ``skip_bad_images``) can tell a broken file apart from a broken list file.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = path


# --------------------------------------------------------------------------- #
# Small pure helpers
# --------------------------------------------------------------------------- #


def _check_split(split: str) -> None:
    """Reject unknown splits early, before any filesystem access."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _require_dir(path: Path, expected: str) -> None:
    """Raise ``FileNotFoundError`` naming ``path`` and the expected layout."""
    if not path.is_dir():
        raise FileNotFoundError(f"directory not found: {path} ({expected})")


def _require_file(path: Path, expected: str) -> None:
    """Raise ``FileNotFoundError`` naming ``path`` and the expected layout."""
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path} ({expected})")


def _is_image_file(path: Path) -> bool:
    """True for regular files with an accepted image suffix (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _visible_subdirs(directory: Path) -> list[Path]:
    """Sorted sub-directories, ignoring hidden ones such as ``.ipynb_checkpoints``."""
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _join_relative(base: Path, relative: str) -> str:
    """Join a list-file path onto ``base``.

    Places365 train paths start with ``/`` (``/a/airfield/00000001.jpg``);
    ``Path`` would treat them as absolute and drop ``base``, so the leading
    slash is stripped.
    """
    return str(base / relative.lstrip("/"))


def load_rgb_image(path: str) -> Image.Image:
    """Open ``path`` and fully decode it as RGB.

    ``convert`` forces decoding, so a truncated file fails here rather than
    later inside a transform, where the error would not name the file.
    """
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except _IMAGE_LOAD_ERRORS as exc:
        raise BadImageError(path, f"{type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- #
# Base dataset
# --------------------------------------------------------------------------- #


class ClassificationDataset(Dataset):
    """A list of ``(path, label)`` samples loaded lazily as RGB PIL images.

    Args:
        samples: ``(image path, class index)`` pairs.
        num_classes: size of the label space; every label must be in
            ``[0, num_classes)``.
        classes: optional human-readable class names, index-aligned.
        transform: applied to the PIL image; if ``None`` the image is returned.
        skip_bad_images: if ``False`` (default) an unreadable image raises
            :class:`BadImageError`.  If ``True`` it is logged on logger
            ``mixmim.data``, recorded in :attr:`bad_images`, and the next
            readable sample (wrapping around) is returned instead.
        source: description of where the samples came from, used in errors.

    Attributes:
        bad_images: paths of distinct unreadable images met so far, in
            encounter order.  **Per process**: with DataLoader workers each
            worker holds its own copy of the dataset and the main process's
            list stays empty; the warnings logged by each worker are the
            reliable record in that case.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        *,
        classes: Sequence[str] | None = None,
        transform: Transform | None = None,
        skip_bad_images: bool = False,
        source: str = "dataset",
    ) -> None:
        if not samples:
            raise ValueError(f"{source}: empty dataset, no samples found")
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes} for {source}")
        for path, label in samples:
            if not 0 <= label < num_classes:
                raise ValueError(
                    f"label {label} for {path} in {source} is out of range; "
                    f"expected 0 <= label < {num_classes}"
                )
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"{len(classes)} class names for {num_classes} classes in {source}")
        self.samples: list[Sample] = list(samples)
        self.num_classes = num_classes
        self.classes: list[str] | None = list(classes) if classes is not None else None
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.source = source
        self.bad_images: list[str] = []
        # Indices known to be bad, so later epochs skip them without
        # re-reading the file and without re-logging.
        self._bad_indices: set[int] = set()

    @property
    def targets(self) -> list[int]:
        """Labels in sample order (what class-balanced samplers expect)."""
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _record_bad(self, index: int, error: BadImageError) -> None:
        """Log and count an unreadable image once per process."""
        self._bad_indices.add(index)
        self.bad_images.append(error.path)
        logger.warning("skip_bad_images: %s", error)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for dataset of size {n}")
        index %= n
        for offset in range(n):
            i = (index + offset) % n
            if i in self._bad_indices:
                continue
            path, label = self.samples[i]
            try:
                img = load_rgb_image(path)
            except BadImageError as err:
                if not self.skip_bad_images:
                    raise
                self._record_bad(i, err)
                continue
            return (self.transform(img) if self.transform is not None else img), label
        raise ValueError(
            f"every image in {self.source} is unreadable ({n} samples); "
            "see the warnings on logger 'mixmim.data'"
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.source!r}, samples={len(self)}, "
            f"num_classes={self.num_classes})"
        )


# --------------------------------------------------------------------------- #
# ImageNet-1K: <root>/<split>/<wnid>/<image>
