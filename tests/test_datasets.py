"""Tests for mixmim.data.datasets on tiny fake datasets in each official layout."""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from mixmim.data import (
    BadImageError,
    ImageNetDataset,
    INaturalistDataset,
    Places205Dataset,
    Places365Dataset,
    build_classification_dataset,
)
from mixmim.data.datasets import (
    PLACES205_IMAGE_DIRS,
    PLACES205_LIST_FILES,
    PLACES365_IMAGE_DIRS,
    PLACES365_LIST_FILES,
)

SIZE = (12, 8)  # (width, height); non-square so a transposed load would show


def write_image(path: Path, mode: str = "RGB", color: int | tuple[int, ...] = 128) -> Path:
    """Write a tiny real image; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new(mode, SIZE, color).save(path, format=fmt)
    return path


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(range(256)) * 2)
    return path


def esc(path: Path | str) -> str:
    return re.escape(str(path))


# --------------------------------------------------------------------------- #
# Fake dataset builders
# --------------------------------------------------------------------------- #


def make_imagenet(root: Path) -> Path:
    """train: 3 classes (2+1+1 images, mixed suffixes); val: 2 classes."""
    write_image(root / "train" / "n02" / "a.JPEG")
    write_image(root / "train" / "n02" / "b.jpg", mode="L")  # grayscale -> RGB
    write_image(root / "train" / "n01" / "c.PNG", mode="RGBA", color=(1, 2, 3, 4))
    write_image(root / "train" / "n03" / "d.jpeg")
    (root / "train" / "n03" / "notes.txt").write_text("not an image")
    write_image(root / "val" / "n03" / "v1.JPEG")
    write_image(root / "val" / "n01" / "v2.JPEG")
    return root


INAT_CATEGORY_IDS = [7, 3, 42]  # unsorted, non-contiguous on purpose


def inat_json(year: int, split: str) -> dict:
    images = [
        {"id": 10 + i, "file_name": f"train_val{year}/Plantae/{cid}/{split}_{i}.jpg"}
        for i, cid in enumerate(INAT_CATEGORY_IDS)
    ]
    annotations = [
        {"id": i, "image_id": 10 + i, "category_id": cid} for i, cid in enumerate(INAT_CATEGORY_IDS)
    ]
    categories = [{"id": cid, "name": f"species_{cid}"} for cid in INAT_CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}


def make_inat(root: Path, year: int, data: dict | None = None, split: str = "train") -> Path:
    data = data if data is not None else inat_json(year, split)
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}{year}.json").write_text(json.dumps(data))
    for img in data["images"]:
        write_image(root / img["file_name"])
    return root


def make_places365(root: Path) -> Path:
    train_dir = root / PLACES365_IMAGE_DIRS["train"]
    val_dir = root / PLACES365_IMAGE_DIRS["val"]
    write_image(train_dir / "a/airfield/00000001.jpg")
    write_image(train_dir / "z/zen_garden/00000001.jpg")
    write_image(val_dir / "Places365_val_00000001.jpg")
    (root / PLACES365_LIST_FILES["train"]).write_text(
        "/a/airfield/00000001.jpg 0\n/z/zen_garden/00000001.jpg 364\n"
    )
    (root / PLACES365_LIST_FILES["val"]).write_text("Places365_val_00000001.jpg 5\n\n")
    return root


def make_places205(root: Path) -> Path:
    images = root / PLACES205_IMAGE_DIRS["train"]
    write_image(images / "a/abbey/gsun_1.jpg")
    write_image(images / "y/youth_hostel/gsun_2.jpg")
    write_image(images / "a/abbey/gsun_3.jpg")
    lists = root / "trainvalsplit_places205"
    lists.mkdir(parents=True)
    (root / PLACES205_LIST_FILES["train"]).write_text(
        "a/abbey/gsun_1.jpg 0\ny/youth_hostel/gsun_2.jpg 204\n"
    )
    (root / PLACES205_LIST_FILES["val"]).write_text("a/abbey/gsun_3.jpg 0\n")
    return root


def assert_rgb_images(ds) -> None:
    for i in range(len(ds)):
        img, label = ds[i]
        assert isinstance(img, Image.Image)
        assert img.mode == "RGB"
        assert img.size == SIZE
        assert isinstance(label, int)


# --------------------------------------------------------------------------- #
# ImageNet
# --------------------------------------------------------------------------- #


def test_imagenet_train(tmp_path: Path) -> None:
    root = make_imagenet(tmp_path)
    ds = ImageNetDataset(root, "train")
    assert len(ds) == 4  # notes.txt ignored
    assert ds.num_classes == 3
    assert ds.classes == ["n01", "n02", "n03"]
    labels = {Path(p).name: label for p, label in ds.samples}
    assert labels == {"c.PNG": 0, "a.JPEG": 1, "b.jpg": 1, "d.jpeg": 2}
    assert ds.targets == [label for _, label in ds.samples]
    assert_rgb_images(ds)


def test_imagenet_val_uses_train_class_indices(tmp_path: Path) -> None:
    root = make_imagenet(tmp_path)
    ds = build_classification_dataset("imagenet", str(root), "val")
    assert isinstance(ds, ImageNetDataset)
    assert ds.num_classes == 3  # from train, although val only has 2 classes
    assert sorted((Path(p).name, label) for p, label in ds.samples) == [("v1.JPEG", 2), ("v2.JPEG", 0)]
    assert_rgb_images(ds)


def test_imagenet_transform_applied(tmp_path: Path) -> None:
    root = make_imagenet(tmp_path)
    ds = ImageNetDataset(root, "val", transform=lambda img: torch.zeros(3, img.height, img.width))
    x, _ = ds[0]
    assert x.shape == (3, SIZE[1], SIZE[0])


def test_imagenet_val_class_not_in_train(tmp_path: Path) -> None:
    root = make_imagenet(tmp_path)
    write_image(root / "val" / "n99" / "x.JPEG")
    with pytest.raises(ValueError, match=esc(root / "val" / "n99")):
        ImageNetDataset(root, "val")


@pytest.mark.parametrize("missing", ["", "train", "val"])
def test_imagenet_missing_dirs(tmp_path: Path, missing: str) -> None:
    if missing == "":
        root = tmp_path / "nope"
        expected = root
    else:
        root = make_imagenet(tmp_path / "in1k")
        for p in sorted((root / missing).rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (root / missing).rmdir()
        expected = root / missing
    with pytest.raises(FileNotFoundError, match=esc(expected)) as info:
        ImageNetDataset(root, "val")
    assert "expected ImageNet layout" in str(info.value)


def test_imagenet_empty_class_and_flat_val(tmp_path: Path) -> None:
    root = make_imagenet(tmp_path)
    (root / "train" / "n04").mkdir()
    with pytest.raises(ValueError, match=esc(root / "train" / "n04") + ".*no images"):
        ImageNetDataset(root, "train")
    (root / "train" / "n04").rmdir()

    flat = tmp_path / "flat"
    write_image(flat / "train" / "n01" / "a.JPEG")
    write_image(flat / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(ValueError, match=esc(flat / "val") + ".*no class folders"):
        ImageNetDataset(flat, "val")

    (flat / "val" / "ILSVRC2012_val_00000001.JPEG").unlink()
    with pytest.raises(ValueError, match=esc(flat / "val") + ": empty dataset"):
        ImageNetDataset(flat, "val")


# --------------------------------------------------------------------------- #
# iNaturalist
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("year", [2018, 2019])
def test_inat(tmp_path: Path, year: int) -> None:
    root = make_inat(tmp_path, year, split="val")
    ds = build_classification_dataset(f"inat{year}", root, "val")
    assert isinstance(ds, INaturalistDataset)
    assert len(ds) == 3
    assert ds.num_classes == 3
    # category ids 3, 7, 42 -> 0, 1, 2
    assert ds.classes == ["species_3", "species_7", "species_42"]
    assert [label for _, label in ds.samples] == [1, 0, 2]
    assert ds.samples[0][0] == str(root / f"train_val{year}/Plantae/7/val_0.jpg")
    assert_rgb_images(ds)


def test_inat_missing_json(tmp_path: Path) -> None:
    make_inat(tmp_path, 2018, split="train")
    with pytest.raises(FileNotFoundError, match=esc(tmp_path / "val2018.json")):
        INaturalistDataset(tmp_path, "val", 2018)
    with pytest.raises(FileNotFoundError, match=esc(tmp_path / "missing")):
        build_classification_dataset("inat2019", tmp_path / "missing", "train")


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda d: d.pop("categories"), "missing key 'categories'"),
        (lambda d: d["images"][1].pop("file_name"), r"images\[1\] is missing key 'file_name'"),
        (lambda d: d["annotations"][0].pop("category_id"), r"annotations\[0\] is missing key 'category_id'"),
        (lambda d: d["annotations"][2].update(category_id=999), "category_id 999"),
        (lambda d: d["annotations"].pop(), r"images\[2\] \(id 12\) has no entry"),
        (lambda d: d.update(images=[]), "empty dataset"),
    ],
)
def test_inat_malformed_json(tmp_path: Path, mutate, pattern: str) -> None:
    data = inat_json(2018, "train")
    make_inat(tmp_path, 2018, data=data)
    mutate(data)
    json_path = tmp_path / "train2018.json"
    json_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=esc(json_path) + ".*" + pattern):
        INaturalistDataset(tmp_path, "train", 2018)


def test_inat_invalid_json_syntax(tmp_path: Path) -> None:
    (tmp_path / "train2019.json").write_text('{"images": [\n')
    with pytest.raises(ValueError, match=esc(tmp_path / "train2019.json") + ".*invalid JSON at line"):
        INaturalistDataset(tmp_path, "train", 2019)


# --------------------------------------------------------------------------- #
# Places
# --------------------------------------------------------------------------- #


def test_places365(tmp_path: Path) -> None:
    root = make_places365(tmp_path)
    train = build_classification_dataset("places365", root, "train")
    assert isinstance(train, Places365Dataset)
    assert len(train) == 2 and train.num_classes == 365
    assert train.samples[0] == (str(root / "data_256/a/airfield/00000001.jpg"), 0)
    assert train.samples[1][1] == 364
    assert_rgb_images(train)
    val = build_classification_dataset("places365", root, "val")
    assert val.samples == [(str(root / "val_256/Places365_val_00000001.jpg"), 5)]
    assert_rgb_images(val)


def test_places205(tmp_path: Path) -> None:
    root = make_places205(tmp_path)
    train = build_classification_dataset("places205", root, "train")
    assert isinstance(train, Places205Dataset)
    assert len(train) == 2 and train.num_classes == 205
    images = root / "data/vision/torralba/deeplearning/images256"
    assert train.samples == [
        (str(images / "a/abbey/gsun_1.jpg"), 0),
        (str(images / "y/youth_hostel/gsun_2.jpg"), 204),
    ]
    assert_rgb_images(train)
    val = build_classification_dataset("places205", root, "val")
    assert len(val) == 1
    assert_rgb_images(val)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("a/abbey/gsun_1.jpg 0\na/abbey/gsun_3.jpg\n", r":2: expected '<relative path> <label>'"),
        ("a/abbey/gsun_1.jpg zero\n", r":1: label 'zero' is not an integer"),
        ("a/abbey/gsun_1.jpg 0\n\na/abbey/gsun_3.jpg 205\n", r":3: label 205 out of range"),
        ("a/abbey/gsun_1.jpg -1\n", r":1: label -1 out of range"),
        ("\n\n", ": empty dataset"),
    ],
)
def test_places_malformed_list(tmp_path: Path, content: str, pattern: str) -> None:
    root = make_places205(tmp_path)
    list_path = root / PLACES205_LIST_FILES["train"]
    list_path.write_text(content)
    with pytest.raises(ValueError, match=esc(list_path) + pattern):
        Places205Dataset(root, "train")


def test_places_missing_files(tmp_path: Path) -> None:
    root = make_places365(tmp_path)
    (root / PLACES365_LIST_FILES["val"]).unlink()
    with pytest.raises(FileNotFoundError, match=esc(root / "places365_val.txt")) as info:
        Places365Dataset(root, "val")
    assert "expected Places365 layout" in str(info.value)
    (root / "data_256").rename(root / "elsewhere")
    with pytest.raises(FileNotFoundError, match=esc(root / "data_256")):
        Places365Dataset(root, "train")


def test_places_missing_image_file_is_bad_image(tmp_path: Path) -> None:
    root = make_places205(tmp_path)
    (root / PLACES205_IMAGE_DIRS["val"] / "a/abbey/gsun_3.jpg").unlink()
    ds = Places205Dataset(root, "val")
    with pytest.raises(BadImageError, match=esc(root / PLACES205_IMAGE_DIRS["val"] / "a/abbey/gsun_3.jpg")):
        ds[0]


# --------------------------------------------------------------------------- #
# Factory and bad images
# --------------------------------------------------------------------------- #


def test_factory_rejects_unknown_name_and_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'.*imagenet"):
        build_classification_dataset("cifar10", tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split 'test'.*train, val"):
        build_classification_dataset("imagenet", tmp_path, "test")


def test_corrupt_image_raises_by_default(tmp_path: Path) -> None:
    root = make_imagenet(tmp_path)
    bad = write_corrupt(root / "val" / "n01" / "broken.jpg")
    ds = ImageNetDataset(root, "val")
    bad_index = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(BadImageError, match=esc(bad)) as info:
        ds[bad_index]
    assert info.value.path == str(bad)
    assert ds.bad_images == []


def test_corrupt_image_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_imagenet(tmp_path)
    bad = write_corrupt(root / "val" / "n01" / "broken.jpg")
    truncated = root / "val" / "n01" / "truncated.jpg"
    write_image(truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    ds = build_classification_dataset("imagenet", root, "val", skip_bad_images=True)
    paths = [p for p, _ in ds.samples]
    assert paths[:3] == [str(bad), str(truncated), str(root / "val/n01/v2.JPEG")]

    with caplog.at_level(logging.WARNING, logger="mixmim.data"):
        img, label = ds[0]  # broken -> truncated -> v2 (next index)
    assert img.mode == "RGB" and label == 0
    assert ds.bad_images == [str(bad), str(truncated)]
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "mixmim.data")
    assert str(bad) in logged and str(truncated) in logged

    # A known-bad index is skipped without being recounted.
    ds[1]
    assert ds.bad_images == [str(bad), str(truncated)]
    # Every good sample is still reachable exactly once per epoch.
    assert len(list(ds)) == len(ds)


def test_skip_wraps_around_and_fails_when_all_bad(tmp_path: Path) -> None:
    root = make_places205(tmp_path)
    images = root / PLACES205_IMAGE_DIRS["train"]
    write_corrupt(images / "y/youth_hostel/gsun_2.jpg")
    ds = Places205Dataset(root, "train", skip_bad_images=True)
    _, label = ds[1]  # last index is bad -> wraps to index 0
    assert label == 0
    assert ds.bad_images == [str(images / "y/youth_hostel/gsun_2.jpg")]

    write_corrupt(images / "a/abbey/gsun_1.jpg")
    all_bad = Places205Dataset(root, "train", skip_bad_images=True)
    with pytest.raises(ValueError, match="every image in " + esc(root / PLACES205_LIST_FILES["train"])):
        all_bad[0]
    assert len(all_bad.bad_images) == 2


def test_dataset_pickles_for_dataloader_workers(tmp_path: Path) -> None:
    ds = ImageNetDataset(make_imagenet(tmp_path), "train", skip_bad_images=True)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.samples == ds.samples and clone.num_classes == ds.num_classes
    img, _ = clone[0]
    assert img.size == SIZE
