"""The CPU-runnable parts of benchmarks/gpu_check.py: SDPA backend parity of the model's
masked window attention on the CPU backends, and the FLOP accounting behind the MFU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend

from mixmim.models import build_classifier

SPEC = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu_check)

TINY = dict(img_size=64, patch_size=4, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
            window_size=(8, 8, 4, 2))


def test_masked_window_inputs_hold_the_group_restriction():
    q, k, v, bias = gpu_check.masked_window_inputs(batch=1, heads=2, grid=28, window=14)
    assert q.shape == (1, 4 * 2, 196, 32) and bias.shape == (1, 8, 196, 196)
    masked = torch.isinf(bias)
    assert masked.any() and not masked.all(dim=-1).any()  # every token keeps its own group
    assert not torch.isinf(bias.diagonal(dim1=-2, dim2=-1)).any()


@pytest.mark.parametrize("backend,dtype,bias_grad", [
    (SDPBackend.MATH, torch.float32, True), (SDPBackend.MATH, torch.bfloat16, True),
    (SDPBackend.FLASH_ATTENTION, torch.float32, False), (SDPBackend.FLASH_ATTENTION, torch.bfloat16, False),
])
def test_cpu_backends_agree_with_fp64(backend, dtype, bias_grad):
    row = gpu_check.backend_parity(backend, dtype, "cpu", bias_grad=bias_grad)
    assert row["ok"] is True, row
    assert set(row["errors"]) == {"out", "dq", "dk", "dv"} | ({"dbias"} if bias_grad else set())


def test_parity_flags_an_error_beyond_tolerance(monkeypatch):
    """A wrong reference (scale dropped) must make the check fail, not pass silently."""
    monkeypatch.setattr(gpu_check, "attention_reference",
                        lambda q, k, v, b: (q @ k.transpose(-2, -1) + b).softmax(-1) @ v)
    assert gpu_check.backend_parity(SDPBackend.MATH, torch.float32, "cpu")["ok"] is False


def test_mfu_arithmetic():
    assert gpu_check.mfu(2e9, 100.0, 1.2e12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="peak_flops"):
        gpu_check.mfu(1e9, 1.0, 0.0)


def test_peak_lookup_prefers_the_longest_name():
    assert gpu_check.peak_bf16_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert gpu_check.peak_bf16_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert gpu_check.peak_bf16_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert gpu_check.peak_bf16_flops("Some GPU") is None
    assert gpu_check.peak_bf16_flops("Some GPU", 100.0) == pytest.approx(1e14)


def analytic_classifier_flops(cfg: dict, num_classes: int) -> int:
    """Forward FLOPs (multiply-add = 2) of the classifier, counted by hand from its shapes."""
    p, c, size = cfg["patch_size"], cfg["embed_dim"], cfg["img_size"]
    grid = size // p
    total = 2 * grid * grid * 3 * p * p * c  # patch embedding
    for i, depth in enumerate(cfg["depths"]):
        if i:
            total += 2 * grid * grid // 4 * 4 * c * 2 * c  # patch merging
            grid, c = grid // 2, 2 * c
        n = min(cfg["window_size"][i], grid) ** 2
        tokens = grid * grid
        per_block = 2 * tokens * c * (3 * c + c + 8 * c) + 2 * 2 * tokens * n * c
        total += depth * per_block
    return total + 2 * c * num_classes


def test_flop_count_matches_the_hand_count():
    torch.manual_seed(0)
    model = build_classifier(num_classes=7, **TINY).train()
    counted = gpu_check.forward_flops_per_image(model, 64, "finetune")
    assert counted == analytic_classifier_flops(TINY, 7)


def test_cpu_run_writes_its_report(tmp_path):
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["cuda"] is False and len(saved["parity"]) == 4
    assert all(row["ok"] for row in saved["parity"])
    assert saved["flops_tiny_pretrain_fwd_per_image"] == report["flops_tiny_pretrain_fwd_per_image"] > 0
    assert not list(tmp_path.glob(".gpu_check.json.*"))  # no temporary left behind


def test_report_keeps_the_finished_parts_when_a_later_one_fails(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("stopped after the parity part")

    monkeypatch.setattr(gpu_check, "forward_flops_per_image", broken)
    out = tmp_path / "gpu_check.json"
    with pytest.raises(RuntimeError, match="stopped"):
        gpu_check.main(["--out", str(out)])
    saved = json.loads(out.read_text())
    assert len(saved["parity"]) == 4 and "flops_tiny_pretrain_fwd_per_image" not in saved


def test_unknown_part_is_refused():
    with pytest.raises(ValueError, match="bogus"):
        gpu_check.main(["--parts", "parity,bogus"])


@pytest.mark.parametrize("modes", ["", "eager,jit"])
def test_unknown_mode_is_refused(modes):
    with pytest.raises(ValueError, match="--modes"):
        gpu_check.main(["--modes", modes])


def test_timed_steps_report_the_median_step_and_its_spread():
    row = gpu_check.time_steps("pretrain", "mixmim_tiny", batch=2, img_size=64, compile_model=False, steps=3,
                               warmup=1, device="cpu", peak=1e12)
    low, high = row["s_per_step_min_max"]
    assert low <= row["s_per_step"] <= high
    assert row["images_per_s"] == pytest.approx(2 / row["s_per_step"], rel=1e-2)
    assert row["mfu"] == pytest.approx(gpu_check.mfu(row["fwd_flops_per_image"], 2 / row["s_per_step"], 1e12),
                                       abs=1e-4)  # the report rounds MFU to 4 places
    assert row["graphs_compiled_while_timed"] == 0  # eager: nothing compiled
    assert "peak_mem_gib" not in row  # a CUDA figure only


def test_compiled_graphs_counts_what_torch_compile_makes():
    before = gpu_check.compiled_graphs()
    torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))
    assert gpu_check.compiled_graphs() == before + 1


def test_ddp_workers_agree_only_when_their_gradients_are_all_reduced():
    # part (d) through torchrun, over gloo on the CPU: two ranks with different images and masks
    synced = gpu_check.run_ddp("mixmim_tiny", batch=2, img_size=64, steps=1, nproc=2, backend="gloo",
                               timeout_s=300)
    assert synced["ddp_ok"] is True, synced
    assert synced["ddp_backend"] == "gloo" and synced["ddp_world_size"] == 2
    assert synced["params_agree"] is True and synced["params_max_gap"] == 0.0
    alone = gpu_check.run_ddp("mixmim_tiny", batch=2, img_size=64, steps=1, nproc=2, backend="gloo",
                              sync=False, timeout_s=300)
    assert alone["ddp_ok"] is True, alone
    assert alone["params_agree"] is False and alone["params_max_gap"] > 0


def test_ddp_that_outlasts_its_limit_is_reported_not_raised(monkeypatch):
    import subprocess

    def hang(cmd, capture_output, text, timeout):
        raise subprocess.TimeoutExpired(cmd, timeout, output="rank 0 started\n")

    monkeypatch.setattr(gpu_check.subprocess, "run", hang)
    out = gpu_check.run_ddp("mixmim_tiny", batch=2, img_size=64, steps=1, nproc=2, backend="gloo", timeout_s=5)
    assert out == {"ddp_ok": False, "timed_out_s": 5, "tail": "rank 0 started\n"}


def test_ddp_without_a_rank_is_refused():
    with pytest.raises(ValueError, match="nproc=0"):
        gpu_check.run_ddp("mixmim_tiny", batch=2, img_size=64, steps=1, nproc=0, backend="gloo")


def test_the_prepared_device_script_runs_and_leaves_its_eight_files(tmp_path):
    # Without CUDA each gpu_check.py call runs the CPU parts; what is checked here is the script itself:
    # its environment report, the three parts' reports and logs, and the status line of each.
    import subprocess
    import sys

    repo = Path(__file__).parents[1]
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh", str(tmp_path)], cwd=repo, capture_output=True,
                          text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["env.txt", "status.txt"] + [f"{n}.{e}" for n in ("eager", "ddp", "compiled")
                                                           for e in ("json", "log")])
    status = (tmp_path / "status.txt").read_text().splitlines()
    assert [ln.split(":")[0] for ln in status] == ["eager", "ddp", "compiled"]
    assert all(": exit 0 after" in ln for ln in status), status
    assert "torch" in (tmp_path / "env.txt").read_text()
    assert json.loads((tmp_path / "eager.json").read_text())["cuda"] is False
