"""Places365-Standard and Places205 list files: the readers and the writers of the built-in stand-ins.

Both list ``<relative path> <label>`` lines; the file and image folder names below are
shared by the readers and the writers.
"""

from __future__ import annotations

from pathlib import Path

from .classification import (
    ClassificationDataset,
    Sample,
    Transform,
    _check_split,
    _join_relative,
    _require_dir,
    _require_file,
)
from .draw import render_scene_image
from .standin import check_classes, hex_name, image_rng, save_jpeg, staged_dir, write_meta

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
PLACES205_IMAGE_DIR = "data/vision/torralba/deeplearning/images256"
PLACES205_IMAGE_DIRS: dict[str, str] = {
    "train": PLACES205_IMAGE_DIR,
    "val": PLACES205_IMAGE_DIR,
}
PLACES205_NUM_CLASSES = 205


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
# Built-in stand-in writers
# --------------------------------------------------------------------------- #



PLACES365_NAMES = (
    "airfield", "alley", "beach", "canyon", "coast", "desert_road", "field_road", "forest_path",
    "harbor", "highway", "lagoon", "mountain", "pasture", "skyscraper", "village", "wheat_field",
)
PLACES205_NAMES = (
    "abbey", "badlands", "boardwalk", "butte", "cottage_garden", "dock", "fairway", "golf_course",
    "lighthouse", "marsh", "ocean", "orchard", "pagoda", "rice_paddy", "tower", "valley",
)


def _scene_names(names: tuple[str, ...], num_classes: int) -> list[str]:
    """Real-looking scene names, with numbered fallbacks past the list."""
    return [names[k] if k < len(names) else f"scene_{k:03d}" for k in range(num_classes)]


def write_places365(
    dest: Path,
    *,
    seed: int = 0,
    image_size: int = 64,
    num_classes: int = 10,
    train_per_class: int = 40,
    val_per_class: int = 10,
) -> Path:
    """Places365 layout: ``places365_train_standard.txt`` over ``data_256/`` and
    ``places365_val.txt`` over ``val_256/``."""
    check_classes("places365", num_classes)
    dest = Path(dest)
    names = _scene_names(PLACES365_NAMES, num_classes)
    with staged_dir(dest) as root:
        train_lines, val_lines = [], []
        for label, scene in enumerate(names):
            for i in range(train_per_class):
                rng = image_rng(seed, "places365", "train", label * train_per_class + i)
                rel = f"/{scene[0]}/{scene}/{i + 1:08d}.jpg"
                save_jpeg(root / PLACES365_IMAGE_DIRS["train"] / rel.lstrip("/"), render_scene_image(rng, label, image_size, 29, 0))
                train_lines.append(f"{rel} {label}")
        for label in range(num_classes):
            for i in range(val_per_class):
                rng = image_rng(seed, "places365", "val", label * val_per_class + i)
                rel = f"Places365_val_{len(val_lines) + 1:08d}.jpg"
                save_jpeg(root / PLACES365_IMAGE_DIRS["val"] / rel, render_scene_image(rng, label, image_size, 29, 0))
                val_lines.append(f"{rel} {label}")
        (root / PLACES365_LIST_FILES["train"]).write_text("\n".join(train_lines) + "\n")
        (root / PLACES365_LIST_FILES["val"]).write_text("\n".join(val_lines) + "\n")
        (root / "categories_places365.txt").write_text(
            "".join(f"/{s[0]}/{s} {k}\n" for k, s in enumerate(names)))
        write_meta(root, "places365", seed, image_size=image_size, num_classes=num_classes,
                   train_per_class=train_per_class, val_per_class=val_per_class)
    return dest


def write_places205(
    dest: Path,
    *,
    seed: int = 0,
    image_size: int = 64,
    num_classes: int = 10,
    train_per_class: int = 40,
    val_per_class: int = 10,
) -> Path:
    """Places205 layout: ``trainvalsplit_places205/{train,val}_places205.csv`` with lines
    ``a/abbey/gsun_<hash>.jpg <label>`` over ``data/vision/torralba/deeplearning/images256/``."""
    check_classes("places205", num_classes)
    dest = Path(dest)
    names = _scene_names(PLACES205_NAMES, num_classes)
    with staged_dir(dest) as root:
        for split, per_class in (("train", train_per_class), ("val", val_per_class)):
            lines = []
            for label, scene in enumerate(names):
                for i in range(per_class):
                    index = label * per_class + i
                    rng = image_rng(seed, "places205", split, index)
                    rel = f"{scene[0]}/{scene}/gsun_{hex_name('places205', split, index)}.jpg"
                    save_jpeg(root / PLACES205_IMAGE_DIRS[split] / rel, render_scene_image(rng, label, image_size, 34, 5))
                    lines.append(f"{rel} {label}")
            out = root / PLACES205_LIST_FILES[split]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("\n".join(lines) + "\n")
        write_meta(root, "places205", seed, image_size=image_size, num_classes=num_classes,
                   train_per_class=train_per_class, val_per_class=val_per_class)
    return dest
