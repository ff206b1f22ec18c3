"""benchmarks/optimizer_step.py: the engine's AdamW against the multi-tensor and fused kernels."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
_spec = importlib.util.spec_from_file_location("optimizer_step", BENCHMARKS / "optimizer_step.py")
optimizer_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(optimizer_step)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def test_the_groups_are_the_engines_with_no_decay_on_biases_and_norms():
    groups = optimizer_step.engine_groups(_model(), 1e-3, 0.05, (0.9, 0.95))
    decay = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in groups}
    assert decay == {0.05: 8 * 16 + 16 * 4, 0.0: 16 + 16 + 16 + 4}
    assert all(g["lr"] == 1e-3 for g in groups)


def test_clones_hold_the_same_values_in_separate_tensors():
    groups = optimizer_step.engine_groups(_model(), 1e-3, 0.05, (0.9, 0.95))
    copies = optimizer_step.clone_groups(groups)
    assert optimizer_step.compare(groups, copies) == (True, 0.0)
    copies[0]["params"][0].data.add_(1.0)
    same, diff = optimizer_step.compare(groups, copies)
    assert not same and diff == pytest.approx(1.0)


def _three_updates(base: list[dict], runs: dict[str, list[dict]], opts: dict[str, torch.optim.Optimizer]) -> None:
    """Three updates of every run, each with the same gradients."""
    for step in range(3):
        grads = optimizer_step.gradients(base, seed=step)
        for v in runs:
            optimizer_step.set_grads(runs[v], grads)
            opts[v].step()


def test_the_multi_tensor_kernel_matches_the_default_bit_for_bit_and_the_check_can_fail():
    base = optimizer_step.engine_groups(_model(), 1e-3, 0.05, (0.9, 0.95))
    runs = {v: optimizer_step.clone_groups(base) for v in ("default", "foreach")}
    opts = {v: optimizer_step.make_optimizer(g, (0.9, 0.95), v) for v, g in runs.items()}
    _three_updates(base, runs, opts)
    assert optimizer_step.compare(runs["default"], runs["foreach"])[0]
    assert not optimizer_step.compare(base, runs["default"])[0]  # the updates did move the parameters


def test_the_chunked_update_matches_the_default_bit_for_bit_across_slice_boundaries():
    base = optimizer_step.engine_groups(_model(), 1e-3, 0.05, (0.9, 0.95))
    runs = {v: optimizer_step.clone_groups(base) for v in ("default", "chunked")}
    opts = {"default": optimizer_step.make_optimizer(runs["default"], (0.9, 0.95), "default"),
            # 7 elements a slice: every weight (128 and 64 elements) and most vectors span several slices
            "chunked": optimizer_step.ChunkedAdamW(runs["chunked"], chunk=7, betas=(0.9, 0.95))}
    _three_updates(base, runs, opts)
    assert optimizer_step.compare(runs["default"], runs["chunked"])[0]
    assert not optimizer_step.compare(base, runs["chunked"])[0]
    first = [p for g in runs["chunked"] for p in g["params"]][0]
    assert opts["chunked"].state[first]["step"].item() == 3.0


def test_the_chunked_update_refuses_what_it_does_not_implement():
    params = [nn.Parameter(torch.zeros(4))]
    with pytest.raises(ValueError, match="amsgrad=True"):
        optimizer_step.ChunkedAdamW(params, amsgrad=True)
    with pytest.raises(ValueError, match="chunk=0"):
        optimizer_step.ChunkedAdamW(params, chunk=0)
    opt = optimizer_step.ChunkedAdamW([w := nn.Parameter(torch.zeros(3, 4))])
    w.grad = torch.ones(4, 3).t()
    with pytest.raises(ValueError, match=r"shape \(3, 4\).*not contiguous"):
        opt.step()


def test_an_unknown_variant_is_refused_by_name():
    with pytest.raises(ValueError, match="'sgd'"):
        optimizer_step.make_optimizer([{"params": [nn.Parameter(torch.zeros(2))]}], (0.9, 0.95), "sgd")


def test_counts_below_one_are_refused():
    with pytest.raises(SystemExit, match="--rounds=0"):
        optimizer_step.main(["--model", "mixmim_nano", "--rounds", "0"])
    with pytest.raises(SystemExit, match="--chunk=0"):
        optimizer_step.main(["--model", "mixmim_nano", "--chunk", "0"])


def test_a_run_prints_every_variant_and_the_bit_identity_check(capsys):
    optimizer_step.main(["--model", "mixmim_nano", "--rounds", "2", "--steps", "1", "--check-steps", "1",
                         "--chunk", "1000"])
    out = capsys.readouterr().out
    assert "chunked: 1000 elements per slice" in out
    assert "foreach after 1 updates: bit-identical to the default" in out
    assert "fused after 1 updates:" in out
    assert "chunked after 1 updates: bit-identical to the default" in out
    for variant in ("default", "foreach", "fused", "chunked"):
        assert f"{variant}: update " in out and "n = 2 rounds" in out
    assert "default / fused:" in out
