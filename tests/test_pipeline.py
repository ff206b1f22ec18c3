"""DVC stage glue: params validation before any work, stage outputs, tracking layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from mixmim.data.builtin import write_imagenet
from mixmim.engine.config import ConfigError
from mixmim.checkpoint import load_file
from mixmim.engine.loop import KILL_AT_STEP_ENV, RUN_ID_KEY
from mixmim.pipeline import (
    GROUP_STAGE, PARENT_RUN_ENV, drop_resume_state, finetune_stage, load_params, pretrain_stage,
)

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
                        "runs/ft", str(folder / "m" / "ft.json"), str(folder / "p" / "ft.csv"), seed=3)
    metrics = json.loads((folder / "m" / "ft.json").read_text())
    assert set(metrics) >= {"top1", "top5", "best_top1", "init", "run_id"} and metrics["init"] == "pretrained"
    records = json.loads((folder / "m" / "ft_preds.json").read_text())  # per-image records of the last epoch
    assert metrics["n_val"] == records["n_val"] == len(records["label"]) == 9
    hits = sum(p == y for p, y in zip(records["pred"], records["label"]))
    assert 100.0 * hits / records["n_val"] == pytest.approx(metrics["top1"])
    assert (folder / "p" / "pre.csv").read_text().splitlines()[0] == "epoch,train_loss"
    # a finished stage keeps its weights and run reference and deletes its resume state
    assert sorted(p.name for p in (folder / "runs" / "pre").iterdir()) == ["mlflow_run.json", "pretrain.pt"]
    assert sorted(p.name for p in (folder / "runs" / "ft").iterdir()) == ["finetune.pt", "mlflow_run.json"]
    assert (folder / "p" / "ft.csv").read_text().startswith("epoch,train_loss,val_top1")

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    run = client.get_run(ft["run_id"])
    assert run.info.run_name == "finetune/imagenet/s3"
    tags = run.data.tags
    assert tags["mixmim.pipeline"] == "tests" and tags["mixmim.stage"] == "finetune"
    assert tags["mixmim.parent_pretrain_run"] == pre["run_id"]
    assert json.loads(tags["mixmim.dvc_params"])["epochs"] == 1
    assert tags["mixmim.seed"] == "3" and metrics["seed"] == 3 and client.get_run(ft["run_id"]).data.params["seed"] == "3"
    group = client.get_run(tags["mlflow.parentRunId"])  # the seeds of one variant share a group run
    assert group.info.run_name == "finetune/imagenet" and group.data.tags["mixmim.stage"] == GROUP_STAGE
    pre_run = client.get_run(pre["run_id"])
    assert pre_run.info.run_name == "pretrain/default/s0" and pre_run.data.tags["mixmim.seed"] == "0"
    assert client.get_run(pre_run.data.tags["mlflow.parentRunId"]).info.run_name == "pretrain/default"
    assert client.get_run(pre["run_id"]).info.status == "FINISHED"

    # a second seed of the same variant files under the same group run
    again = finetune_stage(params, ["finetune"], "finetune", "imagenet", "imagenet", None, "runs/ft4",
                           str(folder / "m" / "ft4.json"), str(folder / "p" / "ft4.csv"), seed=4)
    assert client.get_run(again["run_id"]).data.tags["mlflow.parentRunId"] == group.info.run_id
    summary = client.get_run(group.info.run_id).data.metrics  # the group compares its seeds at a glance
    tops = [client.get_run(r).data.metrics["final/top1"] for r in (ft["run_id"], again["run_id"])]
    assert summary["seeds/n"] == 2 and summary["seeds/top1"] == pytest.approx(sum(tops) / 2)
    experiment = client.get_experiment_by_name("pipeline-tests")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


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


def test_a_key_the_stage_sets_is_refused_in_a_section(tmp_path):
    params = load_params(write_params(tmp_path, pretrain={"model": "mixmim_nano", "output_dir": "elsewhere"}))
    with pytest.raises(ConfigError, match="'output_dir' is set by the stage"):
        pretrain_stage(params, ["pretrain"], "default", "runs/pre", str(tmp_path / "m.json"), str(tmp_path / "p.csv"))
    params = load_params(write_params(tmp_path, pretrain={"model": "mixmim_nano", "seed": 1}))
    with pytest.raises(ConfigError, match="seed=1 in the section, but the pipeline runs seed 2"):
        pretrain_stage(params, ["pretrain"], "default", "runs/pre", str(tmp_path / "m.json"), str(tmp_path / "p.csv"),
                       seed=2)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def _stage(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "stages" / script), *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "MIXMIM_PARENT_RUN_ID": ""})


PRETRAIN_ARGS = ("--params", "params.yaml", "--run-dir", "runs/pre", "--metrics", "m.json", "--plots", "p.csv")


@pytest.mark.parametrize("change, expected", [
    ({"pretrain": {"model": "mixmim_nano", "epochss": 1}}, "unknown key 'epochss'"),
    ({"roots": {"imagenet": "nowhere/imagenet"}}, "nowhere/imagenet"),
])
def test_user_mistakes_end_a_stage_with_one_line(tmp_path, change, expected):
    """An unknown key or a missing root: one line naming the value on stderr, exit status 2, no traceback."""
    write_params(tmp_path, **change)
    run = _stage("pretrain.py", *PRETRAIN_ARGS, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and lines[0].startswith("stages/pretrain.py: error:")
    assert "Traceback" not in run.stderr and not (tmp_path / "m.json").exists()


def test_a_corrupt_image_ends_the_stage_with_one_line(tmp_path):
    write_imagenet(tmp_path / "data" / "imagenet", seed=0, image_size=64, num_classes=2, train_per_class=4,
                   val_per_class=1)
    bad = sorted((tmp_path / "data" / "imagenet" / "train").rglob("*.JPEG"))[0]
    bad.write_bytes(b"not a jpeg")
    write_params(tmp_path)
    run = _stage("pretrain.py", *PRETRAIN_ARGS, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.strip().splitlines() if line.startswith("stages/pretrain.py")]
    assert len(lines) == 1 and bad.name in lines[0] and "Traceback" not in run.stderr
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("pipeline-tests").experiment_id],
        "attributes.run_name = 'pretrain/default/s0'")[0]
    assert run.info.status == "FAILED"


def test_a_killed_stage_keeps_its_resume_state_and_deletes_it_when_done(tmp_path):
    """Killed mid-run, the stage leaves its checkpoint (and no metrics); run again, it resumes from
    it, finishes, and only then deletes it."""
    write_imagenet(tmp_path / "data" / "imagenet", seed=0, image_size=64, num_classes=2, train_per_class=8,
                   val_per_class=1)
    write_params(tmp_path, pretrain={"model": "mixmim_nano", "dataset": "imagenet", "epochs": 2, "warmup_epochs": 0,
                                     "batch_size": 8, "num_workers": 0, "progress": False})
    killed = subprocess.run([sys.executable, str(REPO / "stages" / "pretrain.py"), *PRETRAIN_ARGS],
                            capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "MIXMIM_PARENT_RUN_ID": "", KILL_AT_STEP_ENV: "3"})
    assert killed.returncode == -9, killed.stderr  # SIGKILLed after step 3, in the second of 2 epochs of 2 steps
    checkpoint = tmp_path / "runs" / "pre" / "checkpoint-last.pt"
    assert checkpoint.is_file() and not (tmp_path / "m.json").exists()
    saved = load_file(checkpoint)
    assert saved["position"]["epoch"] == 1  # the first epoch's end
    done = _stage("pretrain.py", *PRETRAIN_ARGS, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["steps"] == 4 and metrics["run_id"] == saved["extra"][RUN_ID_KEY]  # resumed: the same MLflow run
    assert (tmp_path / "runs" / "pre" / "pretrain.pt").is_file() and not checkpoint.exists()


def test_drop_resume_state(tmp_path):
    assert drop_resume_state(tmp_path) is False  # nothing to delete: no error
    (tmp_path / "checkpoint-last.pt").write_bytes(b"state")
    (tmp_path / "pretrain.pt").write_bytes(b"weights")
    assert drop_resume_state(tmp_path) is True
    assert [p.name for p in tmp_path.iterdir()] == ["pretrain.pt"]


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
    from mixmim.transfer.dense_config import DetectionConfig, SegmentationConfig, check_config

    sections = {"params.yaml": ("coco", "ade20k"), "pipelines/paper/params.yaml": ("coco", "ade20k"),
                "pipelines/ablations/params.yaml": ("ade20k",)}
    classes = {"coco": DetectionConfig, "ade20k": SegmentationConfig}
    for path, keys in sections.items():
        params = load_params(REPO / path)
        for key in keys:
            check_config(from_mapping(classes[key], params.section(key), where=f"{path}: {key}"))


def test_the_command_line_reports_a_config_mistake_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mixmim", "pretrain", "epochss=3"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and "unknown key 'epochss'" in run.stderr
