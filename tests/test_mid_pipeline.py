"""pipelines/mid: ImageNet-100 read in place from an ImageNet root by a class list, and its params.

The class-list filter is the dataset option the mid pipeline relies on; the params checks
pin the pipeline to 224 px, MixMIM-B plus a smaller size, the ablation matrix and seeds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mixmim.data import build_classification_dataset
from mixmim.data.builtin import write_imagenet
from mixmim.data.imagenet import read_class_list
from mixmim.engine.config import FinetuneConfig, PretrainConfig, from_mapping
from mixmim.pipeline import load_params, merged

REPO = Path(__file__).resolve().parents[1]
MID = REPO / "pipelines" / "mid"


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "imagenet"
    write_imagenet(root, seed=0, image_size=16, num_classes=5, train_per_class=3, val_per_class=2)
    return root


def test_class_list_selects_and_reindexes_classes_in_place(imagenet, tmp_path):
    listing = tmp_path / "classes.txt"
    listing.write_text("# three of five\nn00000004\nn00000001\n\nn00000003  # trailing comment\n")
    full = build_classification_dataset("imagenet", imagenet, "train")
    for split, per_class in (("train", 3), ("val", 2)):
        subset = build_classification_dataset("imagenet", imagenet, split, class_list=listing)
        assert subset.num_classes == 3 and len(subset) == 3 * per_class
        assert subset.classes == ["n00000001", "n00000003", "n00000004"]  # sorted, labels 0..2
        assert sorted(set(subset.targets)) == [0, 1, 2]
        for path, label in subset.samples:  # the original files, each under its own class folder
            assert Path(path).is_file() and Path(path).parent.name == subset.classes[label]
    assert full.num_classes == 5


def test_class_list_errors_name_the_problem(imagenet, tmp_path):
    missing = tmp_path / "missing.txt"
    missing.write_text("n00000001\nn09999999\n")
    with pytest.raises(ValueError, match="n09999999"):
        build_classification_dataset("imagenet", imagenet, "train", class_list=missing)
    twice = tmp_path / "twice.txt"
    twice.write_text("n00000001\nn00000001\n")
    with pytest.raises(ValueError, match="more than once"):
        read_class_list(twice)
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        build_classification_dataset("imagenet", imagenet, "train", class_list=tmp_path / "absent.txt")
    with pytest.raises(ValueError, match="selects ImageNet classes only"):
        build_classification_dataset("places365", imagenet, "train", class_list=missing)


def test_imagenet100_list_is_the_standard_100_wnids():
    wnids = read_class_list(MID / "imagenet100.txt")
    assert len(wnids) == 100 and all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids[:3] == ["n02869837", "n01749939", "n02488291"]  # CMC's order, kept as published


def test_stage_config_resolves_the_class_list_beside_the_params_file(tmp_path, imagenet):
    from mixmim.pipeline import stage_config

    (tmp_path / "classes.txt").write_text("n00000000\nn00000002\n")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "roots": {"imagenet": str(imagenet)}, "tracking": {"uri": f"sqlite:///{tmp_path / 'm.db'}"},
        "finetune": {"model": "mixmim_nano", "class_list": "classes.txt"}}))
    cfg = stage_config(FinetuneConfig, load_params(params), ["finetune"], "finetune", "default", "imagenet",
                       "runs/x", None, {"dataset": "imagenet"})
    assert cfg.class_list == str(tmp_path / "classes.txt")


@pytest.fixture(scope="module")
def mid():
    return load_params(MID / "params.yaml")


def _sections(stage: str, key: str) -> list[str]:
    dvc = yaml.safe_load((MID / "dvc.yaml").read_text())["stages"][stage]
    cmd = dvc["do"]["cmd"] if "do" in dvc else dvc["cmd"]
    cmd = cmd.replace("${key}", key).replace("${item}", key)
    return re.search(r"--sections (.*?) --", cmd)[1].split()


def test_mid_params_are_imagenet100_at_224_with_two_sizes(mid):
    sizes = mid.section("sizes")
    models = set()
    for size in sizes:
        pre = from_mapping(PretrainConfig, merged(mid, _sections("pretrain", size)))
        ft = from_mapping(FinetuneConfig, merged(mid, _sections("finetune", size)))
        assert pre.class_list == ft.class_list == "imagenet100.txt" and pre.dataset == "imagenet"
        assert pre.model == ft.model and pre.model_kwargs == {k: v for k, v in ft.model_kwargs.items()}
        assert (pre.img_size or 224) == (ft.img_size or 224) == 224
        models.add(pre.model if pre.model != "mixmim_base" or not pre.model_kwargs else "custom")
    assert "mixmim_base" in models and len(sizes) >= 2


def test_mid_ablation_matrix_has_every_variant_and_several_seeds(mid):
    ablations = yaml.safe_load((REPO / "pipelines" / "ablations" / "params.yaml").read_text())
    assert set(mid.section("ablations.variants")) >= {v for v in ablations["variants"] if not v.startswith("epochs")}
    assert len(mid.get("seeds")) >= 2
    for variant in mid.section("ablations.variants"):
        from_mapping(PretrainConfig, merged(mid, ["pretrain", "ablations.pretrain", f"ablations.variants.{variant}"]))
