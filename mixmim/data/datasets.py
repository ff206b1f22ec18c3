"""Classification datasets read from their official on-disk formats.

MixMIM is pre-trained on ImageNet-1K and transferred to iNaturalist 2018/2019
and Places205/365.  Each of those datasets ships in a different layout (class
folders, COCO-like JSON, plain list files).  This module parses each layout
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

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image
from torch.utils.data import Dataset

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

logger = logging.getLogger("mixmim.data")

Sample = tuple[str, int]
Transform = Callable[[Image.Image], Any]

#: File suffixes accepted as images in ImageNet class folders (compared
#: case-insensitively, so ``.JPEG`` from the official tarballs matches).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpeg", ".jpg", ".png")

#: Splits every dataset here supports (the test splits have no public labels).
SPLITS: tuple[str, ...] = ("train", "val")

#: Places365-Standard list files, relative to the dataset root.
PLACES365_LIST_FILES: dict[str, str] = {
    "train": "places365_train_standard.txt",
    "val": "places365_val.txt",
}
#: Image directories the Places365 list paths are relative to.  These are the
#: folders the official ``places365standard_easyformat`` / 256x256 tarballs
#: (``train_256_places365standard.tar``, ``val_256.tar``) extract to.
PLACES365_IMAGE_DIRS: dict[str, str] = {
    "train": "data_256",
    "val": "val_256",
}
PLACES365_NUM_CLASSES = 365

#: Places205 list files, relative to the dataset root (the layout of the
#: official ``trainvalsplit_places205.tar.gz``).  Despite the ``.csv`` suffix,
#: lines are ``<path> <label>`` separated by whitespace.
PLACES205_LIST_FILES: dict[str, str] = {
    "train": "trainvalsplit_places205/train_places205.csv",
    "val": "trainvalsplit_places205/val_places205.csv",
}
#: Both Places205 splits index into the single image tree extracted from the
#: official ``imagesPlaces205_resize.tar.gz``.
_PLACES205_IMAGES = "data/vision/torralba/deeplearning/images256"
PLACES205_IMAGE_DIRS: dict[str, str] = {
    "train": _PLACES205_IMAGES,
    "val": _PLACES205_IMAGES,
}
PLACES205_NUM_CLASSES = 205

#: Names accepted by :func:`build_classification_dataset`.
DATASET_NAMES: tuple[str, ...] = ("imagenet", "inat2018", "inat2019", "places205", "places365")

_INAT_YEARS: tuple[int, ...] = (2018, 2019)

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
# --------------------------------------------------------------------------- #

_IMAGENET_LAYOUT = "expected ImageNet layout <root>/{train,val}/<class>/<image>"


def _imagenet_classes(train_dir: Path) -> list[str]:
    """Class names (wnids) in sorted order, taken from the train split."""
    _require_dir(train_dir, f"{_IMAGENET_LAYOUT}; class indices come from the train folders")
    classes = [p.name for p in _visible_subdirs(train_dir)]
    if not classes:
        raise ValueError(f"no class folders in {train_dir} ({_IMAGENET_LAYOUT})")
    return classes


def _class_images(class_dir: Path) -> list[Path]:
    """All image files under one class folder, sorted for reproducibility."""
    images = sorted(p for p in class_dir.rglob("*") if _is_image_file(p))
    if not images:
        raise ValueError(
            f"class folder {class_dir} contains no images "
            f"(accepted extensions: {', '.join(IMAGE_EXTENSIONS)}, any case)"
        )
    return images


def read_class_list(path: str | Path) -> list[str]:
    """A class-list file: one class folder name (wnid) per line; blank lines and ``#`` comments ignored."""
    path = Path(path)
    _require_file(path, "expected a class list: one class folder name (e.g. an ImageNet wnid) per line")
    names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"class list {path} names no classes")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"class list {path} names {repeated[0]!r} more than once")
    return names


def scan_imagenet_split(root: Path, split: str, class_list: str | Path | None = None) -> tuple[list[Sample], list[str]]:
    """List the samples of one ImageNet split.

    Class indices are the sorted train folder names for *both* splits, so a
    model trained on ``train`` is evaluated with the same label mapping on
    ``val`` even if val lacks some classes.  A val class that train does not
    have cannot be labelled, so it is an error.

    With ``class_list`` (a file, see :func:`read_class_list`) only those classes are
    read, in place (nothing is copied), and indexed 0..K-1 in sorted order: e.g.
    ImageNet-100 from an ImageNet-1K root. A listed class the train split lacks is an error.
    """
    _check_split(split)
    _require_dir(root, _IMAGENET_LAYOUT)
    classes = _imagenet_classes(root / "train")
    if class_list is not None:
        wanted = read_class_list(class_list)
        missing = sorted(set(wanted) - set(classes))
        if missing:
            raise ValueError(f"class list {class_list}: {len(missing)} classes are not folders of {root / 'train'}, "
                             f"e.g. {missing[0]!r}; expected an ImageNet root holding every listed class")
        classes = sorted(wanted)
    split_dir = root / split
    _require_dir(split_dir, _IMAGENET_LAYOUT)
    class_dirs = _visible_subdirs(split_dir)
    if not class_dirs and any(_is_image_file(p) for p in split_dir.iterdir()):
        raise ValueError(
            f"{split_dir} holds images directly but no class folders; {_IMAGENET_LAYOUT} "
            "(the raw ILSVRC2012 val archive must first be sorted into class folders)"
        )
    index_of = {name: i for i, name in enumerate(classes)}
    if class_list is not None:
        class_dirs = [d for d in class_dirs if d.name in index_of]
    samples: list[Sample] = []
    for class_dir in class_dirs:
        if class_dir.name not in index_of:
            raise ValueError(
                f"class folder {class_dir} is not a train class; "
                f"expected one of the {len(classes)} folders in {root / 'train'}"
            )
        label = index_of[class_dir.name]
        samples.extend((str(p), label) for p in _class_images(class_dir))
    if not samples:
        raise ValueError(f"{split_dir}: empty dataset, no images found ({_IMAGENET_LAYOUT})")
    return samples, classes


class ImageNetDataset(ClassificationDataset):
    """ImageNet-1K from ``<root>/{train,val}/<wnid>/*.JPEG`` class folders."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Transform | None = None,
        skip_bad_images: bool = False,
        class_list: str | Path | None = None,
    ) -> None:
        root = Path(root)
        samples, classes = scan_imagenet_split(root, split, class_list)
        super().__init__(
            samples,
            len(classes),
            classes=classes,
            transform=transform,
            skip_bad_images=skip_bad_images,
            source=str(root / split),
        )


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
        json_path = root / f"{split}{year}.json"
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
# Places205 / Places365: list files of "<relative path> <label>"
# --------------------------------------------------------------------------- #


def _parse_list_line(line: str, list_path: Path, line_no: int) -> tuple[str, int]:
    """Split one ``<path> <label>`` line, naming the file and line on error."""
    parts = line.rsplit(maxsplit=1)
    if len(parts) != 2:
        raise ValueError(f"{list_path}:{line_no}: expected '<relative path> <label>', got {line!r}")
    rel_path, label_text = parts
    try:
        label = int(label_text)
    except ValueError:
        raise ValueError(
            f"{list_path}:{line_no}: label {label_text!r} is not an integer (line {line!r})"
        ) from None
    return rel_path, label


def parse_places_list(list_path: Path, image_dir: Path, num_classes: int) -> list[Sample]:
    """Read a Places list file into samples rooted at ``image_dir``.

    Labels are checked here (not only in the dataset) so the error can name
    the line number.  Blank lines, e.g. a trailing newline, are ignored.
    """
    samples: list[Sample] = []
    with list_path.open(encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            rel_path, label = _parse_list_line(line, list_path, line_no)
            if not 0 <= label < num_classes:
                raise ValueError(
                    f"{list_path}:{line_no}: label {label} out of range; "
                    f"expected 0 <= label < {num_classes}"
                )
            samples.append((_join_relative(image_dir, rel_path), label))
    if not samples:
        raise ValueError(f"{list_path}: empty dataset, the list has no image lines")
    return samples


class _PlacesDataset(ClassificationDataset):
    """Shared loader for the two Places list-file layouts."""

    #: Set by subclasses.
    NAME: str
    LIST_FILES: dict[str, str]
    IMAGE_DIRS: dict[str, str]
    NUM_CLASSES: int

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Transform | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        _check_split(split)
        root = Path(root)
        layout = (
            f"expected {self.NAME} layout <root>/{self.LIST_FILES[split]} "
            f"with images under <root>/{self.IMAGE_DIRS[split]}/"
        )
        _require_dir(root, layout)
        list_path = root / self.LIST_FILES[split]
        _require_file(list_path, layout)
        image_dir = root / self.IMAGE_DIRS[split]
        _require_dir(image_dir, layout)
        samples = parse_places_list(list_path, image_dir, self.NUM_CLASSES)
        super().__init__(
            samples,
            self.NUM_CLASSES,
            transform=transform,
            skip_bad_images=skip_bad_images,
            source=str(list_path),
        )


class Places365Dataset(_PlacesDataset):
    """Places365-Standard from ``places365_{train_standard,val}.txt``.

    Train paths are relative to ``<root>/data_256``, val paths to
    ``<root>/val_256`` (see :data:`PLACES365_IMAGE_DIRS`).
    """

    NAME = "Places365"
    LIST_FILES = PLACES365_LIST_FILES
    IMAGE_DIRS = PLACES365_IMAGE_DIRS
    NUM_CLASSES = PLACES365_NUM_CLASSES


class Places205Dataset(_PlacesDataset):
    """Places205 from ``trainvalsplit_places205/{train,val}_places205.csv``.

    Both splits' paths are relative to
    ``<root>/data/vision/torralba/deeplearning/images256`` (see
    :data:`PLACES205_IMAGE_DIRS`).
    """

    NAME = "Places205"
    LIST_FILES = PLACES205_LIST_FILES
    IMAGE_DIRS = PLACES205_IMAGE_DIRS
    NUM_CLASSES = PLACES205_NUM_CLASSES


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
