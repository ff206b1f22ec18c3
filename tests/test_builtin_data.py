"""Tests of the built-in stand-in datasets: official layouts, consistency, determinism,
atomic replacement and learnability (the reason the stand-ins exist at all)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mixmim.data import builtin, draw, imagenet, places
from mixmim.data.builtin import (
    DATASETS,
    DEFAULT_ROOTS,
    BuiltinSizes,
    generate_all,
    write_imagenet,
    write_inat2018,
    write_places365,
    write_unlabeled,
)
from mixmim.data.draw import ADE_CLASSES

REPO = Path(__file__).resolve().parents[1]
TINY = BuiltinSizes(image_size=32, num_classes=3, train_per_class=2, val_per_class=2,
                    dense_image_size=64, dense_train=4, dense_val=2, unlabeled_images=10)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("builtin")
    generate_all(out, seed=0, sizes=TINY)
    return out


def _files(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def test_every_dataset_written_under_default_root(root: Path) -> None:
    assert set(DEFAULT_ROOTS) == set(DATASETS)
    for name in DATASETS:
        assert (root / DEFAULT_ROOTS[name] / builtin.META_FILE).is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_imagenet_layout(root: Path) -> None:
    base = root / "imagenet"
    for split, per_class in (("train", TINY.train_per_class), ("val", TINY.val_per_class)):
        classes = sorted(p.name for p in (base / split).iterdir())
        assert classes == [f"n{k:08d}" for k in range(TINY.num_classes)]
        for wnid in classes:
            files = sorted((base / split / wnid).iterdir())
            assert len(files) == per_class and all(f.suffix == ".JPEG" for f in files)
            with Image.open(files[0]) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (TINY.image_size,) * 2)
    assert re.fullmatch(r"ILSVRC2012_val_\d{8}\.JPEG", next((base / "val" / "n00000000").iterdir()).name)


@pytest.mark.parametrize("year", [2018, 2019])
def test_inat_json_consistent(root: Path, year: int) -> None:
    base = root / f"inat{year}"
    seen: set[str] = set()
    for split, per_class in (("train", TINY.train_per_class), ("val", TINY.val_per_class)):
        data = json.loads((base / f"{split}{year}.json").read_text())
        cats = {c["id"]: c for c in data["categories"]}
        assert set(cats) != set(range(len(cats))), "category ids should not be 0..n-1"
        assert all(set(c) >= {"id", "name", "supercategory"} for c in cats.values())
        images = {im["id"]: im for im in data["images"]}
        assert len(images) == TINY.num_classes * per_class
        assert sorted(a["image_id"] for a in data["annotations"]) == sorted(images)
        for ann in data["annotations"]:
            im, cat = images[ann["image_id"]], cats[ann["category_id"]]
            assert im["file_name"].startswith(f"train_val{year}/{cat['supercategory']}/{cat['id']}/")
            assert (base / im["file_name"]).is_file()
            with Image.open(base / im["file_name"]) as pic:
                assert pic.size == (im["width"], im["height"])
        seen_now = {im["file_name"] for im in images.values()}
        assert not seen & seen_now, "train and val share files"
        seen |= seen_now


def test_places365_lists(root: Path) -> None:
    base = root / "places365"
    train = (base / "places365_train_standard.txt").read_text().splitlines()
    val = (base / "places365_val.txt").read_text().splitlines()
    assert len(train) == TINY.num_classes * TINY.train_per_class
    assert len(val) == TINY.num_classes * TINY.val_per_class
    for line in train:
        m = re.fullmatch(r"(/([a-z])/(\2[a-z_]*)/\d{8}\.jpg) (\d+)", line)
        assert m, line
        assert (base / "data_256" / m.group(1).lstrip("/")).is_file()
        assert int(m.group(4)) < TINY.num_classes
    for line in val:
        m = re.fullmatch(r"(Places365_val_\d{8}\.jpg) (\d+)", line)
        assert m, line
        assert (base / "val_256" / m.group(1)).is_file()


def test_places205_lists(root: Path) -> None:
    base = root / "places205"
    for split, per_class in (("train", TINY.train_per_class), ("val", TINY.val_per_class)):
        lines = (base / "trainvalsplit_places205" / f"{split}_places205.csv").read_text().splitlines()
        assert len(lines) == TINY.num_classes * per_class
        for line in lines:
            m = re.fullmatch(r"(([a-z])/\2[a-z_]*/gsun_[0-9a-f]{32}\.jpg) (\d+)", line)
            assert m, line
            assert (base / places.PLACES205_IMAGE_DIR / m.group(1)).is_file()
            assert int(m.group(3)) < TINY.num_classes


def _shoelace(flat: list[float]) -> float:
    xy = np.array(flat).reshape(-1, 2)
    return float(abs(np.dot(xy[:, 0], np.roll(xy[:, 1], -1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], -1))) / 2)


def _pil_mask(flat: list[float], size: tuple[int, int]) -> np.ndarray:
    """Independent rasterisation (PIL) of a COCO polygon.

    COCO pixel (i, j) covers [j, j+1) x [i, i+1); PIL puts pixel centres on integers,
    hence the half-pixel shift.
    """
    canvas = Image.new("L", size, 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in np.array(flat).reshape(-1, 2) - 0.5], fill=1)
    return np.asarray(canvas, dtype=bool)


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_annotations_consistent(root: Path, split: str) -> None:
    base = root / "coco"
    data = json.loads((base / "annotations" / f"instances_{split}2017.json").read_text())
    cat_ids = [c["id"] for c in data["categories"]]
    assert cat_ids != list(range(1, len(cat_ids) + 1)), "category ids should have gaps like COCO's"
    images = {im["id"]: im for im in data["images"]}
    assert len(images) == (TINY.dense_train if split == "train" else TINY.dense_val)
    for im in images.values():
        assert im["file_name"] == f"{im['id']:012d}.jpg"
        with Image.open(base / f"{split}2017" / im["file_name"]) as pic:
            assert pic.size == (im["width"], im["height"])
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    per_image: dict[int, list[np.ndarray]] = {}
    for ann in data["annotations"]:
        assert ann["category_id"] in cat_ids and ann["iscrowd"] == 0
        im = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0
        assert x + w <= im["width"] and y + h <= im["height"]
        (poly,) = ann["segmentation"]
        xy = np.array(poly).reshape(-1, 2)
        assert np.allclose([xy[:, 0].min(), xy[:, 1].min(), np.ptp(xy[:, 0]), np.ptp(xy[:, 1])], [x, y, w, h], atol=0.02)
        assert abs(_shoelace(poly) - ann["area"]) < 0.05
        mask = _pil_mask(poly, (im["width"], im["height"]))
        perimeter = float(np.hypot(*np.diff(np.vstack([xy, xy[:1]]), axis=0).T).sum())
        # PIL rounds vertices and fills boundary pixels, so it only roughly agrees; the
        # pixel-centre rasteriser used for drawing must match the area tightly.
        assert -4 <= mask.sum() - ann["area"] <= perimeter + 4
        drawn = draw.polygon_mask(xy, im["height"], im["width"])
        assert abs(drawn.sum() - ann["area"]) <= 0.25 * perimeter + 2
        assert (drawn & mask).sum() >= 0.6 * (drawn | mask).sum()
        per_image.setdefault(im["id"], []).append(mask)
    for masks in per_image.values():  # objects are placed without overlap
        assert (np.sum(masks, axis=0) <= 1).all()


def test_coco_masks_with_pycocotools(root: Path) -> None:
    """Optional cross-check with the official API, where it is installed."""
    coco_api = pytest.importorskip("pycocotools.coco")
    coco = coco_api.COCO(str(root / "coco" / "annotations" / "instances_train2017.json"))
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns
    for ann in anns:
        mask = coco.annToMask(ann)
        x, y, w, h = ann["bbox"]
        assert abs(int(mask.sum()) - ann["area"]) <= (w + h) + 4


def test_coco_polygons_trace_drawn_objects(tmp_path: Path) -> None:
    """Inside each polygon the image is one flat colour; just outside it is not."""
    base = builtin.write_coco(tmp_path / "coco", seed=3, image_size=128, num_train=6, num_val=1)
    data = json.loads((base / "annotations" / "instances_train2017.json").read_text())
    names = {im["id"]: im["file_name"] for im in data["images"]}
    checked = 0
    for ann in data["annotations"]:
        img = _rgb(base / "train2017" / names[ann["image_id"]])
        mask = _pil_mask(ann["segmentation"][0], img.shape[1::-1])
        core = draw.erode(mask, 2)
        if core.sum() < 20:
            continue
        ring = draw.erode(~mask, 1) & ~draw.erode(~mask, 4)
        inside, outside = img[core].mean(0), img[ring].mean(0)
        assert img[core].std(0).max() < 0.06
        assert np.abs(inside - outside).max() > 0.1
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("split,folder,prefix", [("train", "training", "ADE_train"), ("val", "validation", "ADE_val")])
def test_ade20k_label_maps(root: Path, split: str, folder: str, prefix: str) -> None:
    base = root / "ade20k" / "ADEChallengeData2016"
    images = sorted((base / "images" / folder).iterdir())
    assert len(images) == (TINY.dense_train if split == "train" else TINY.dense_val)
    for path in images:
        assert re.fullmatch(rf"{prefix}_\d{{8}}\.jpg", path.name)
        label_path = base / "annotations" / folder / (path.stem + ".png")
        with Image.open(label_path) as lab, Image.open(path) as pic:
            assert lab.format == "PNG" and lab.mode == "L" and lab.size == pic.size
            labels = np.asarray(lab)
        assert labels.dtype == np.uint8 and labels.ndim == 2
        assert set(np.unique(labels)) <= set(ADE_CLASSES)
        assert (labels == 1).any() and (labels == 4).any(), "every scene has sky and grass"


def test_ade20k_labels_follow_painted_regions(tmp_path: Path) -> None:
    """Each class's pixels have that class's look: after the random hue rotation colour no
    longer names the class, but sky stays bright and smooth and grass darker and noisy."""
    base = builtin.write_ade20k(tmp_path / "ade", seed=1, image_size=96, num_train=8, num_val=1)
    root = base / "ADEChallengeData2016"
    pixels: dict[int, list[np.ndarray]] = {}
    roughness: dict[int, list[float]] = {}
    hues = []
    for path in sorted((root / "images" / "training").iterdir()):
        img = _rgb(path)
        labels = np.asarray(Image.open(root / "annotations" / "training" / (path.stem + ".png")))
        step = np.abs(np.diff(img, axis=1)).mean(-1)  # horizontal pixel-to-pixel change
        for cls in np.unique(labels):
            inner = draw.erode(labels == cls, 1)
            pixels.setdefault(int(cls), []).append(img[inner])
            roughness.setdefault(int(cls), []).append(float(step[inner[:, 1:] & inner[:, :-1]].mean()))
        hues.append(img[labels == 1].mean(0).argmax())
    sky, grass = np.concatenate(pixels[1]).mean(), np.concatenate(pixels[4]).mean()
    assert sky > grass + 0.1  # brightness survives the hue rotation
    assert np.mean(roughness[4]) > 1.5 * np.mean(roughness[1])  # grass is textured, sky smooth
    assert len(set(hues)) > 1  # the sky is not always the same colour


def test_rotate_hue_keeps_grey_and_brightness() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((4, 4, 3))
    out = draw.rotate_hue(img, 2.0)
    assert np.allclose(out.mean(-1), img.mean(-1))
    assert np.allclose(draw.rotate_hue(np.full((2, 2, 3), 0.4), 1.0), 0.4)
    assert np.allclose(draw.rotate_hue(img, 2 * np.pi), img)
    assert not np.allclose(out, img)


def test_same_seed_same_bytes_different_seed_different_images(root: Path, tmp_path: Path) -> None:
    generate_all(tmp_path / "again", seed=0, sizes=TINY)
    generate_all(tmp_path / "other", seed=1, sizes=TINY)
    for name in DATASETS:
        first, again = _files(root / name), _files(tmp_path / "again" / name)
        assert first == again, name
        other = _files(tmp_path / "other" / name)
        images = [k for k in first if k.lower().endswith((".jpeg", ".jpg"))]
        assert images
        assert sum(first[k] != other.get(k) for k in images) >= 0.9 * len(images), name


def test_existing_dataset_replaced_and_failure_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "imagenet"
    (dest / "train" / "stale").mkdir(parents=True)
    write_imagenet(dest, seed=0, image_size=16, num_classes=2, train_per_class=1, val_per_class=1)
    assert not (dest / "train" / "stale").exists()
    before = _files(dest)

    calls = {"n": 0}
    real_save = imagenet.save_jpeg

    def failing_save(path: Path, pixels: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # like a run killed midway
        real_save(path, pixels)

    monkeypatch.setattr(imagenet, "save_jpeg", failing_save)
    with pytest.raises(KeyboardInterrupt):
        write_imagenet(dest, seed=5, image_size=16, num_classes=2, train_per_class=3, val_per_class=1)
    assert _files(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagenet"]


def test_class_count_limits(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_imagenet(tmp_path / "x", num_classes=draw.max_classes("imagenet") + 1)
    with pytest.raises(ValueError):
        generate_all(tmp_path, datasets=["mnist"])
    assert draw.shape_class(0) != draw.shape_class(len(draw.SHAPE_NAMES))
    with pytest.raises(ValueError):
        BuiltinSizes(image_size=4)
    with pytest.raises(ValueError):
        write_imagenet(tmp_path / "y", seed=-1, num_classes=2, train_per_class=1, val_per_class=0)
    assert list(tmp_path.iterdir()) == [], "failed runs must leave nothing behind"


def test_places_sizes_override_only_the_places_standins(tmp_path: Path) -> None:
    sizes = BuiltinSizes(image_size=16, num_classes=2, train_per_class=1, val_per_class=1, dense_train=0,
                         dense_val=0, unlabeled_images=0, places_num_classes=3, places_train_per_class=2)
    generate_all(tmp_path, sizes=sizes, datasets=["imagenet", "places205", "places365"])
    for name in ("places205", "places365"):
        meta = json.loads((tmp_path / name / builtin.META_FILE).read_text())
        assert (meta["num_classes"], meta["train_per_class"], meta["val_per_class"]) == (3, 2, 1), name
    assert [len(list(d.iterdir())) for d in sorted((tmp_path / "imagenet" / "train").iterdir())] == [1, 1]
    train = (tmp_path / "places365" / places.PLACES365_LIST_FILES["train"]).read_text().split()
    assert sorted(set(train[1::2])) == ["0", "1", "2"] and len(train) == 2 * 6
    with pytest.raises(ValueError, match="places_num_classes"):
        BuiltinSizes(places_num_classes=1)
    with pytest.raises(ValueError, match="non-negative"):
        BuiltinSizes(places_train_per_class=-1)


def test_inat_markings_span_several_mixing_cells() -> None:
    """Class 0 (vertical stripes): the dominant horizontal period of the iNat stand-in's markings
    covers at least two 8-px mixing cells at 64 px; the unlabeled set's textures keep their finer scale."""
    def period(fraction: float) -> float:
        found = []
        for seed in range(8):
            grey = draw.render_texture_image(np.random.default_rng(seed), 0, 64, fraction).astype(float).mean(-1)
            profile = grey[24:40].mean(0) - grey[24:40].mean()
            found.append(64 / (1 + np.abs(np.fft.rfft(profile))[1:].argmax()))
        return float(np.median(found))

    assert period(draw.INAT_TEXTURE_PERIOD) >= 16
    assert period(draw.UNLABELED_TEXTURE_PERIOD) < 12
    with pytest.raises(ValueError, match="period"):
        draw.render_texture_image(np.random.default_rng(0), 0, 64, 0.0)


# ---- learnability: cheap nearest-class-mean classifiers must beat chance clearly ----


def _ncm_accuracy(f_train: np.ndarray, y_train: np.ndarray, f_val: np.ndarray, y_val: np.ndarray) -> float:
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a, b = (f_train - mu) / sd, (f_val - mu) / sd
    centres = np.stack([a[y_train == k].mean(0) for k in range(int(y_train.max()) + 1)])
    pred = ((b[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    return float((pred == y_val).mean())


def _foreground_colour(img: np.ndarray) -> np.ndarray:
    """Mean colour of the most saturated fifth of the pixels (the drawn shape)."""
    sat = img.max(-1) - img.min(-1)
    return img[sat >= np.quantile(sat, 0.8)].mean(0)


def _shape_features(img: np.ndarray) -> np.ndarray:
    """Colour-free shape descriptor: normalised radial mass profile and elongation."""
    mask = np.abs(img - _foreground_colour(img)).max(-1) < 0.12
    ys, xs = np.nonzero(mask)
    if ys.size < 3:
        return np.zeros(9)
    d = np.hypot(ys - ys.mean(), xs - xs.mean()) / np.sqrt(ys.size)
    hist = np.histogram(d, bins=8, range=(0, 1.6))[0] / ys.size
    ev = np.linalg.eigvalsh(np.cov(np.stack([ys, xs])))
    return np.append(hist, ev[0] / (ev[1] + 1e-6))


GOLDEN_DIGESTS = {"unlabeled": "87e2db1126e2d01e", "imagenet": "8c9dee4a5c85a04e"}
"""sha256 prefixes of the files (path and bytes) written by the generator of d5a2604, the code that
ran the committed ablations and backbones results."""


def test_inat_colour_hints_at_the_class_only_in_the_labeled_standins() -> None:
    """The iNat stand-ins draw the markings' hue from a window around the class (colour hints,
    texture decides); the unlabeled set's textures keep a uniformly random hue."""
    classes = 5
    def colour_accuracy(hue_classes: int | None) -> float:
        feats, labels = [], []
        for label in range(classes):
            for i in range(36):
                rng = np.random.default_rng([label, i])
                img = draw.render_texture_image(rng, label, 32, draw.INAT_TEXTURE_PERIOD, hue_classes=hue_classes)
                feats.append(_foreground_colour(img.astype(float) / 255.0))
                labels.append(label)
        f, y = np.stack(feats), np.array(labels)
        train = np.arange(len(y)) % 3 != 0
        return _ncm_accuracy(f[train], y[train], f[~train], y[~train])

    assert colour_accuracy(classes) >= 2 * 0.2
    assert colour_accuracy(None) < 1.5 * 0.2
    with pytest.raises(ValueError, match="hue_classes"):
        draw.render_texture_image(np.random.default_rng(0), 5, 32, hue_classes=5)


def test_inat_validation_size_overrides_only_the_inat_standins(tmp_path: Path) -> None:
    sizes = BuiltinSizes(image_size=16, num_classes=2, train_per_class=1, val_per_class=1, dense_train=0,
                         dense_val=0, unlabeled_images=0, inat_val_per_class=3)
    generate_all(tmp_path, sizes=sizes, datasets=["imagenet", "inat2018", "inat2019"])
    for year in (2018, 2019):
        val = json.loads((tmp_path / f"inat{year}" / f"val{year}.json").read_text())
        train = json.loads((tmp_path / f"inat{year}" / f"train{year}.json").read_text())
        assert (len(val["images"]), len(train["images"])) == (6, 2), year
    assert sum(1 for _ in (tmp_path / "imagenet" / "val").rglob("*.JPEG")) == 2
    with pytest.raises(ValueError, match="non-negative"):
        BuiltinSizes(inat_val_per_class=-1)


def test_unlabeled_and_imagenet_bytes_unchanged(tmp_path: Path) -> None:
    """Golden digests of small unlabeled and ImageNet stand-ins. The ablations and backbones
    pipelines read only these two (and ADE20K): a change to their bytes makes every committed
    result of those pipelines stale, so it has to be deliberate (update the digests and rerun
    `make ablations backbones`)."""
    import hashlib
    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
        return h.hexdigest()[:16]
    got = {"unlabeled": digest(write_unlabeled(tmp_path / "u", seed=0, image_size=32, num_images=10)),
           "imagenet": digest(write_imagenet(tmp_path / "i", seed=0, image_size=32, num_classes=3,
                                             train_per_class=2, val_per_class=1))}
    assert got == GOLDEN_DIGESTS


def _imagenet_split(base: Path, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    pairs = [(_rgb(f), k) for k, d in enumerate(sorted((base / split).iterdir())) for f in sorted(d.iterdir())]
    return [p for p, _ in pairs], np.array([k for _, k in pairs])


def test_imagenet_standin_learnable_from_colour_and_from_shape(tmp_path: Path) -> None:
    classes = 5
    base = write_imagenet(tmp_path / "imagenet", seed=0, image_size=48, num_classes=classes,
                          train_per_class=24, val_per_class=12)
    x_tr, y_tr = _imagenet_split(base, "train")
    x_va, y_va = _imagenet_split(base, "val")
    chance = 1.0 / classes
    def accuracy(features) -> float:
        return _ncm_accuracy(np.stack([features(i) for i in x_tr]), y_tr, np.stack([features(i) for i in x_va]), y_va)

    colour, shape = accuracy(_foreground_colour), accuracy(_shape_features)
    assert colour >= 2 * chance, colour
    assert shape >= 1.5 * chance, shape


def _log_spectrum(images: np.ndarray) -> np.ndarray:
    """Translation-invariant texture descriptor."""
    grey = images.mean(-1)
    grey = grey - grey.mean((1, 2), keepdims=True)
    return np.log1p(np.abs(np.fft.fft2(grey))).reshape(len(images), -1)


def _pooled(images: np.ndarray, cells: int = 8) -> np.ndarray:
    n, h, w, c = images.shape
    return images.reshape(n, cells, h // cells, cells, w // cells, c).mean((2, 4)).reshape(n, -1)


def test_inat_and_places_standins_learnable(tmp_path: Path) -> None:
    classes, chance = 5, 0.2
    kw = dict(seed=0, image_size=32, num_classes=classes, train_per_class=12, val_per_class=6)
    inat = write_inat2018(tmp_path / "inat", **kw)
    places = write_places365(tmp_path / "places", **kw)

    def inat_split(split: str) -> tuple[np.ndarray, np.ndarray]:
        data = json.loads((inat / f"{split}2018.json").read_text())
        order = {cid: k for k, cid in enumerate(sorted(c["id"] for c in data["categories"]))}
        label = {a["image_id"]: order[a["category_id"]] for a in data["annotations"]}
        return (np.stack([_rgb(inat / im["file_name"]) for im in data["images"]]),
                np.array([label[im["id"]] for im in data["images"]]))

    def places_split(list_name: str, folder: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [line.split() for line in (places / list_name).read_text().splitlines()]
        return (np.stack([_rgb(places / folder / rel.lstrip("/")) for rel, _ in rows]),
                np.array([int(lab) for _, lab in rows]))

    (xt, yt), (xv, yv) = inat_split("train"), inat_split("val")
    assert _ncm_accuracy(_log_spectrum(xt), yt, _log_spectrum(xv), yv) >= 3 * chance
    (xt, yt), (xv, yv) = places_split("places365_train_standard.txt", "data_256"), places_split("places365_val.txt", "val_256")
    assert _ncm_accuracy(_pooled(xt), yt, _pooled(xv), yv) >= 3 * chance


def test_prepare_data_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "stages" / "prepare_data.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rc = module.main(["--out", str(tmp_path), "--seed", "2", "--image-size", "16", "--num-classes", "2",
                      "--train-per-class", "1", "--val-per-class", "1", "--dense-image-size", "32",
                      "--dense-train", "1", "--dense-val", "1", "--datasets", "imagenet", "ade20k"])
    out = capsys.readouterr().out
    assert rc == 0 and "imagenet" in out and "ade20k" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ade20k", "imagenet"]
    meta = json.loads((tmp_path / "imagenet" / builtin.META_FILE).read_text())
    assert meta["seed"] == 2 and meta["image_size"] == 16


def test_unlabeled_set_mixes_every_domain_in_imagenet_layout(root: Path) -> None:
    from mixmim.data import ImageNetDataset

    base = root / DEFAULT_ROOTS["unlabeled"]
    folders = sorted(p.name for p in (base / "train").iterdir())
    assert folders == sorted(draw.UNLABELED_DOMAINS)
    ds = ImageNetDataset(base, "train")
    assert len(ds) == TINY.unlabeled_images
    counts = [len(list((base / "train" / d).iterdir())) for d in folders]
    assert max(counts) - min(counts) <= 1  # domains interleaved, image i from domain i % 5
    with pytest.raises(ValueError, match="unlabeled_images=3"):
        builtin.write_unlabeled(root / "too_few", num_images=3)


def test_unlabeled_images_are_not_labeled_images(root: Path) -> None:
    """The unlabeled set draws from its own random streams: no pixel-identical overlap."""
    unl = {f.read_bytes() for f in (root / "unlabeled").rglob("*.JPEG")}
    labeled = {f.read_bytes() for name in ("imagenet", "inat2018", "places365")
               for f in (root / name).rglob("*") if f.suffix.lower() in (".jpeg", ".jpg")}
    assert unl and labeled and not unl & labeled


def _ablation_pretrain(variant: str) -> dict:
    import yaml

    params = yaml.safe_load((REPO / "pipelines" / "ablations" / "params.yaml").read_text())
    return {**params["pretrain"], **params["variants"][variant]}


def test_builtin_scale_has_paper_mask_grid() -> None:
    """The default and ablation pipelines pretrain with at least the paper's 7x7 = 49 mixing cells."""
    import yaml

    from mixmim.models import build_pretrainer

    default = yaml.safe_load((REPO / "params.yaml").read_text())["pretrain"]
    for cfg in (default, _ablation_pretrain("default")):
        model = build_pretrainer(cfg["model"], **cfg.get("model_kwargs", {}))
        assert model.num_cells >= 49, (cfg["model"], model.encoder.mask_grid)


def test_table8_variants_draw_different_mask_distributions() -> None:
    """Every Table 8 variant (and the default) masks a different distribution of cells at the
    ablation pipeline's scale: the masked-cell counts (and for block masks, the layouts) differ."""
    import torch

    from mixmim.models import build_pretrainer
    from mixmim.models.masking import sample_mask

    variants = ("default", "mask-block", "mask-range-40-20", "mask-range-30-40", "mask-range-20-60")
    stats = {}
    for name in variants:
        cfg = _ablation_pretrain(name)
        grid = build_pretrainer(cfg["model"], **cfg.get("model_kwargs", {})).encoder.mask_grid
        g = torch.Generator().manual_seed(0)
        masks = [sample_mask(grid, cfg.get("mask_type", "random"), cfg.get("mask_ratio", 0.5),
                             cfg.get("range_mask_ratio", 0.0), generator=g) for _ in range(400)]
        counts = sorted({int(m.sum()) for m in masks})
        # contiguity: masked cells with a masked right neighbour (high for one block, ~ratio for random cells)
        h, w = grid
        adj = float(np.mean([(m.reshape(h, w)[:, :-1] * m.reshape(h, w)[:, 1:]).sum().item() / max(m.sum().item(), 1)
                             for m in masks]))
        stats[name] = (tuple(counts), round(adj, 2))
    assert len(set(stats.values())) == len(variants), stats  # five different mask distributions
    spans = [max(stats[n][0]) - min(stats[n][0]) for n in ("mask-range-40-20", "mask-range-30-40", "mask-range-20-60")]
    assert 0 < spans[0] < spans[1] < spans[2], spans  # a wider ratio range spreads the counts wider
    assert len(stats["default"][0]) == 1  # a fixed ratio masks a fixed number of cells
    assert stats["mask-block"][1] > stats["default"][1] + 0.2  # one block is contiguous, random cells are not
