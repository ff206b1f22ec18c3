"""ImageNet-1K class folders: the reader and the writer of the built-in stand-in.

Layout ``<root>/{train,val}/<wnid>/<image>``; class indices are the sorted train folder
names.  The unlabeled pretraining stand-in is written in the same layout.
"""

from __future__ import annotations

from pathlib import Path

from .classification import (
    IMAGE_EXTENSIONS,
    ClassificationDataset,
    Sample,
    Transform,
    _check_split,
    _is_image_file,
    _require_dir,
    _require_file,
    _visible_subdirs,
)
from .draw import UNLABELED_DOMAINS, render_shape_image, render_unlabeled_image, shape_class
from .standin import check_classes, image_rng, save_jpeg, staged_dir, write_meta


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
# Built-in stand-in writers
# --------------------------------------------------------------------------- #


def imagenet_wnid(label: int) -> str:
    """WordNet-id-like folder name; zero padding keeps sorted order == label order."""
    return f"n{label:08d}"


def write_imagenet(
    dest: Path,
    *,
    seed: int = 0,
    image_size: int = 64,
    num_classes: int = 10,
    train_per_class: int = 40,
    val_per_class: int = 10,
) -> Path:
    """ImageNet layout: ``train/<wnid>/<wnid>_<n>.JPEG`` and ``val/<wnid>/ILSVRC2012_val_<n>.JPEG``."""
    check_classes("imagenet", num_classes)
    dest = Path(dest)
    with staged_dir(dest) as root:
        val_counter = 0
        for label in range(num_classes):
            wnid = imagenet_wnid(label)
            for i in range(train_per_class):
                rng = image_rng(seed, "imagenet", "train", label * train_per_class + i)
                pixels = render_shape_image(rng, label, num_classes, image_size)
                save_jpeg(root / "train" / wnid / f"{wnid}_{i + 1}.JPEG", pixels)
            for i in range(val_per_class):
                val_counter += 1
                rng = image_rng(seed, "imagenet", "val", label * val_per_class + i)
                pixels = render_shape_image(rng, label, num_classes, image_size)
                save_jpeg(root / "val" / wnid / f"ILSVRC2012_val_{val_counter:08d}.JPEG", pixels)
        classes = {imagenet_wnid(k): "_".join(shape_class(k)) for k in range(num_classes)}
        write_meta(root, "imagenet", seed, image_size=image_size, classes=classes,
                   train_per_class=train_per_class, val_per_class=val_per_class)
    return dest


def write_unlabeled(dest: Path, *, seed: int = 0, image_size: int = 64, num_images: int = 2000) -> Path:
    """Unlabeled pretraining set in the ImageNet layout: ``train/<domain>/<domain>_<n>.JPEG``."""
    if num_images < len(UNLABELED_DOMAINS):
        raise ValueError(f"unlabeled_images={num_images}; expected at least one image per domain "
                         f"({len(UNLABELED_DOMAINS)})")
    dest = Path(dest)
    with staged_dir(dest) as root:
        for i in range(num_images):
            domain = UNLABELED_DOMAINS[i % len(UNLABELED_DOMAINS)]
            pixels = render_unlabeled_image(image_rng(seed, "unlabeled", "train", i), domain, image_size)
            save_jpeg(root / "train" / domain / f"{domain}_{i // len(UNLABELED_DOMAINS) + 1}.JPEG", pixels)
        write_meta(root, "unlabeled", seed, image_size=image_size, num_images=num_images,
                   domains=list(UNLABELED_DOMAINS))
    return dest

