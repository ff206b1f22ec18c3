"""DVC stage glue: params validation before any work, stage outputs, tracking layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from mixmim.data.builtin import write_imagenet
from mixmim.engine.config import ConfigError
from mixmim.pipeline import PARENT_RUN_ENV, finetune_stage, load_params, pretrain_stage

REPO = Path(__file__).resolve().parents[1]


def write_params(folder: Path, **sections) -> Path:
    base = {
        "roots": {"imagenet": "data/imagenet"},
        "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "pipeline-tests", "pipeline": "tests"},
        "pretrain": {"model": "mixmim_nano", "dataset": "imagenet", "epochs": 1, "warmup_epochs": 0,
                     "batch_size": 8, "num_workers": 0, "progress": False},
        "finetune": {"model": "mixmim_nano", "epochs": 1, "warmup_epochs": 0, "batch_size": 8, "num_workers": 0,
                     "progress": False, "mixup": 0.0, "cutmix": 0.0},
    }
    base.update(sections)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipe")
    write_imagenet(root / "data" / "imagenet", seed=0, image_size=64, num_classes=3, train_per_class=8,
                   val_per_class=3)
    return root


def test_stages_write_metrics_plots_and_lineage(folder, monkeypatch):
    monkeypatch.setenv(PARENT_RUN_ENV, "")
    params = load_params(write_params(folder))
    pre = pretrain_stage(params, ["pretrain"], "default", "runs/pre", str(folder / "m" / "pre.json"),
                         str(folder / "p" / "pre.csv"))
    ft = finetune_stage(params, ["finetune"], "finetune", "imagenet", "imagenet", "runs/pre/pretrain.pt",
                        "runs/ft", str(folder / "m" / "ft.json"), str(folder / "p" / "ft.csv"))
    metrics = json.loads((folder / "m" / "ft.json").read_text())
    assert set(metrics) >= {"top1", "top5", "best_top1", "init", "run_id"} and metrics["init"] == "pretrained"
    records = json.loads((folder / "m" / "ft_preds.json").read_text())  # per-image records of the last epoch
    assert metrics["n_val"] == records["n_val"] == len(records["label"]) == 9
    hits = sum(p == y for p, y in zip(records["pred"], records["label"]))
    assert 100.0 * hits / records["n_val"] == pytest.approx(metrics["top1"])
    assert (folder / "p" / "pre.csv").read_text().splitlines()[0] == "epoch,train_loss"
    assert (folder / "p" / "ft.csv").read_text().startswith("epoch,train_loss,val_top1")

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    run = client.get_run(ft["run_id"])
    assert run.info.run_name == "finetune/imagenet"
    tags = run.data.tags
    assert tags["mixmim.pipeline"] == "tests" and tags["mixmim.stage"] == "finetune"
    assert tags["mixmim.parent_pretrain_run"] == pre["run_id"]
    assert json.loads(tags["mixmim.dvc_params"])["epochs"] == 1
    assert client.get_run(pre["run_id"]).info.run_name == "pretrain/default"


@pytest.mark.parametrize("section, match", [
    ({"pretrain": {"model": "mixmim_nano", "epochss": 1}}, r"pretrain: unknown key 'epochss'"),
    ({"pretrain": {"model": "mixmim_nano", "batch_size": "eight"}}, r"pretrain\.batch_size='eight'"),
    ({"roots": {}}, r"missing key 'roots\.imagenet'"),
    ({"tracking": {"uri": "sqlite:///mlflow.db", "experimnt": "x"}}, r"tracking: unknown key 'experimnt'"),
])
def test_malformed_params_fail_before_any_work(tmp_path, section, match):
    params = load_params(write_params(tmp_path, **section))
    with pytest.raises(ConfigError, match=match):
        pretrain_stage(params, ["pretrain"], "default", "runs/pre", str(tmp_path / "m.json"), str(tmp_path / "p.csv"))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.json").exists()


def test_missing_dataset_root_is_named(tmp_path):
    params = load_params(write_params(tmp_path, roots={"imagenet": "nowhere/imagenet"}))
    with pytest.raises(FileNotFoundError, match="nowhere/imagenet"):
        pretrain_stage(params, ["pretrain"], "default", "runs/pre", str(tmp_path / "m.json"), str(tmp_path / "p.csv"))
    assert not (tmp_path / "m.json").exists()


def test_params_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "none.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("pretrain: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_prepare_data_reads_and_checks_its_section(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"root": "out", "seed": 1, "image_size": 32, "num_classes": 2,
                                               "train_per_class": 1, "val_per_class": 1, "dense_train": 1,
                                               "dense_val": 1, "dense_image_size": 64}}))
    run = subprocess.run([sys.executable, str(REPO / "stages" / "prepare_data.py"), "--params", str(params)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "imagenet" / "train").is_dir() and (tmp_path / "out" / "coco").is_dir()
    params.write_text(yaml.safe_dump({"data": {"root": "out", "image_sise": 32}}))
    run = subprocess.run([sys.executable, str(REPO / "stages" / "prepare_data.py"), "--params", str(params)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode != 0 and "unknown key 'image_sise'" in run.stderr


def test_repository_pipelines_parse():
    """The shipped params files hold only keys the engines accept."""
    from mixmim.engine.config import FinetuneConfig, PretrainConfig, from_mapping
    from mixmim.pipeline import merged

    for path in (REPO / "params.yaml", REPO / "pipelines" / "ablations" / "params.yaml",
                 REPO / "pipelines" / "paper" / "params.yaml"):
        params = load_params(path)
        params.tracking()
        ft = params.section("finetune")
        if "common" in ft:
            for name in ft["datasets"]:
                from_mapping(FinetuneConfig, merged(params, ["finetune.common", f"finetune.datasets.{name}"]))
        else:
            from_mapping(FinetuneConfig, ft)
        variants = params.section("variants") if "variants" in params.data else {"default": {}}
        for name in variants:
            sections = ["pretrain"] + ([f"variants.{name}"] if "variants" in params.data else [])
            from_mapping(PretrainConfig, merged(params, sections))


def test_dense_sections_of_the_shipped_pipelines_parse():
    from mixmim.engine.config import from_mapping
    from mixmim.transfer.config import DetectionConfig, SegmentationConfig, check_config

    sections = {"params.yaml": ("coco", "ade20k"), "pipelines/paper/params.yaml": ("coco", "ade20k"),
                "pipelines/ablations/params.yaml": ("ade20k",)}
    classes = {"coco": DetectionConfig, "ade20k": SegmentationConfig}
    for path, keys in sections.items():
        params = load_params(REPO / path)
        for key in keys:
            check_config(from_mapping(classes[key], params.section(key), where=f"{path}: {key}"))
