"""mixmim.budget: GPU-hours from counted FLOPs, per stage of a pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mixmim.budget import TRAIN_IMAGES, VAL_IMAGES, estimate, gpu_hours, stage_budget
from mixmim.engine.config import ConfigError
from mixmim.flops import model_info

REPO = Path(__file__).resolve().parents[1]


def test_gpu_hours_is_six_flops_per_multiply_add_and_image():
    # 1 G multiply-adds x 1e6 images = 6e15 FLOPs; at 1 TFLOP/s that is 6000 s
    assert gpu_hours(1.0, 1e6, 1.0) == pytest.approx(6000 / 3600)
    assert gpu_hours(2.0, 1e6, 2.0) == pytest.approx(gpu_hours(1.0, 1e6, 1.0))


def test_stage_budget_counts_the_stage_config(tmp_path):
    (tmp_path / "classes.txt").write_text("".join(f"n{i:08d}\n" for i in range(100)))
    params = {"roots": {"imagenet": "/nowhere"},
              "pretrain": {"model": "mixmim_nano", "epochs": 3, "class_list": "classes.txt"},
              "finetune": {"model": "mixmim_nano", "epochs": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    pre = stage_budget("pretrain", "torchrun --nproc-per-node 8 stages/pretrain.py --params params.yaml "
                       "--sections pretrain --run-dir r", tmp_path, 100.0)
    assert pre.kind == "pretrain" and pre.images == pytest.approx(3 * TRAIN_IMAGES["imagenet"] / 10)
    assert pre.gmacs_per_image > model_info("mixmim_nano").gflops  # the encoder plus the decoder
    ft = stage_budget("finetune", "python stages/finetune.py --params params.yaml --sections finetune "
                      "--dataset inat2018 --run-dir r", tmp_path, 100.0)
    assert ft.gmacs_per_image == pytest.approx(model_info("mixmim_nano").gflops, rel=1e-3)
    assert ft.images == pytest.approx(2 * (TRAIN_IMAGES["inat2018"] + VAL_IMAGES["inat2018"] / 3))
    assert ft.gpu_hours == pytest.approx(gpu_hours(ft.gmacs_per_image, ft.images, 100.0))
    assert stage_budget("report", "python stages/report.py --params params.yaml", tmp_path, 100.0) is None


def test_estimate_refuses_a_missing_file_or_a_bad_throughput(tmp_path):
    with pytest.raises(ConfigError, match="dvc.yaml"):
        estimate(tmp_path / "dvc.yaml", 100.0)
    with pytest.raises(ConfigError, match="tflops=0"):
        estimate(REPO / "pipelines" / "mid" / "dvc.yaml", 0)
