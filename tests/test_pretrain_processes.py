"""benchmarks/pretrain_processes.py: a pipeline's pretraining in threads, processes or side-by-side runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from mixmim.data.builtin import write_imagenet

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
_spec = importlib.util.spec_from_file_location("pretrain_processes", BENCHMARKS / "pretrain_processes.py")
pretrain_processes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pretrain_processes)


def _params(folder: Path) -> Path:
    """A pipeline folder with a variants section, roots relative to it (as in pipelines/ablations)."""
    write_imagenet(folder / "data" / "imagenet", seed=0, image_size=64, num_classes=2, train_per_class=48,
                   val_per_class=1)
    pipe = folder / "pipe"
    pipe.mkdir()
    path = pipe / "params.yaml"
    path.write_text(yaml.safe_dump({
        "roots": {"imagenet": "../data/imagenet"},
        "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "x", "pipeline": "x"},
        "pretrain": {"model": "mixmim_nano", "dataset": "imagenet", "epochs": 3, "num_workers": 0},
        "variants": {"default": {}, "longer": {"epochs": 9}},
    }))
    return path


def test_the_short_run_overrides_go_to_the_last_section_and_roots_become_absolute(tmp_path):
    params = _params(tmp_path)
    script, store, metrics = pretrain_processes.stage_command(params, ["pretrain", "variants.longer"], 7, 4,
                                                              tmp_path, "t")
    copy = yaml.safe_load((tmp_path / "params_t.yaml").read_text())
    assert copy["variants"]["longer"]["epochs"] == 1 and copy["variants"]["longer"]["max_steps_per_epoch"] == 7
    assert copy["variants"]["longer"]["batch_size"] == 4 and copy["pretrain"]["epochs"] == 3
    assert copy["roots"]["imagenet"] == str((tmp_path / "data" / "imagenet").resolve())
    assert store == f"sqlite:///{tmp_path / 't.db'}" and copy["tracking"]["uri"] == store
    assert script[script.index("--sections") + 1:script.index("--seed")] == ["pretrain", "variants.longer"]
    for dotted in ("variants.longer.epochs", "variants.shorter"):
        with pytest.raises(SystemExit, match=f"--sections {dotted}: not a mapping"):
            pretrain_processes.section(copy, dotted)


@pytest.mark.parametrize("argv, match", [
    (["--rounds", "1"], "--rounds 1: must be at least 2"),
    (["--layouts", "threads", "threads"], "name at least two different layouts"),
    (["--layouts", "threads", "--adamw-kernels", "fused", "fused"], "or two --adamw-kernels, to compare"),
    (["--batch", "15"], "--batch 15 is not divisible by --procs 2"),
    (["--params", "nowhere.yaml"], "--params nowhere.yaml: no such file"),
])
def test_bad_arguments_are_refused_by_name(argv, match):
    with pytest.raises(SystemExit, match=match):
        pretrain_processes.main(argv)


def test_threads_against_streams_prints_both_rates_and_a_ratio(tmp_path, capsys):
    params = _params(tmp_path)
    pretrain_processes.main(["--params", str(params), "--sections", "pretrain", "variants.default",
                             "--layouts", "threads", "streams", "--batch", "4", "--steps", "20", "--rounds", "2"])
    out = capsys.readouterr().out
    assert "round 1 streams: median" in out and "round 1 threads: median" in out
    assert "2 one-thread runs side by side / 1 process x 2 threads, per round" in out
    assert "95% CI" in out


def test_one_layout_under_two_adamw_kernels(tmp_path, capsys):
    params = _params(tmp_path)
    pretrain_processes.stage_command(params, ["pretrain"], 7, 4, tmp_path, "k", "fused")
    assert yaml.safe_load((tmp_path / "params_k.yaml").read_text())["pretrain"]["adamw_kernel"] == "fused"
    pretrain_processes.stage_command(params, ["pretrain"], 7, 4, tmp_path, "own")  # the params file's choice
    assert "adamw_kernel" not in yaml.safe_load((tmp_path / "params_own.yaml").read_text())["pretrain"]
    pretrain_processes.main(["--params", str(params), "--layouts", "threads", "--adamw-kernels", "default", "fused",
                             "--batch", "4", "--steps", "20", "--rounds", "2"])
    out = capsys.readouterr().out
    assert "round 1 threads fused: median" in out and "round 1 threads default: median" in out
    assert "1 process x 2 threads, AdamW fused / 1 process x 2 threads, AdamW default, per round" in out
