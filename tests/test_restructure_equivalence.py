"""The comparison behind benchmarks/restructure_equivalence.py: exact equality of metrics, records and weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SPEC = importlib.util.spec_from_file_location(
    "restructure_equivalence", Path(__file__).parents[1] / "benchmarks" / "restructure_equivalence.py")
eq = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(eq)


def test_flat_and_exact_comparison():
    a = eq.flat({"model": {"w": torch.ones(2)}, "hist": [1.0, float("nan")], "n": 3})
    assert set(a) == {"model.w", "hist.0", "hist.1", "n"}
    b = dict(a, **{"model.w": torch.tensor([1.0, 1.0 + 2**-20]), "extra": 1})
    c = eq.compare_leaves(a, b)
    assert (c["compared"], c["differ"], c["only_after"]) == (4, 1, ["extra"])  # NaN equals NaN
    assert c["largest"][0]["key"] == "model.w" and c["largest"][0]["max_abs"] == 2**-20
    assert not eq.same(torch.ones(2), torch.ones(2, dtype=torch.float64))  # dtype counts
    assert not eq.same(1, 1.0)  # so does int vs float
    assert eq.compare_leaves({"run_id": "a", "x": 1}, {"run_id": "b", "x": 1}, skip=("run_id",))["differ"] == 0


def test_compare_job_reads_every_file_a_job_leaves(tmp_path):
    for side, w in (("before", 1.0), ("after", 1.5)):
        folder = tmp_path / side
        (folder / "metrics").mkdir(parents=True)
        (folder / "plots").mkdir()
        (folder / "runs" / "pretrain").mkdir(parents=True)
        (folder / "metrics" / "pretrain.json").write_text(json.dumps({"train_loss": 0.5, "run_id": side}))
        (folder / "plots" / "pretrain.csv").write_text("epoch,train_loss\n1,0.5\n")
        torch.save({"model": {"w": torch.tensor([w])}, "config": {"output_dir": str(folder), "lr": 0.1}},
                   folder / "runs" / "pretrain" / "pretrain.pt")
    result = eq.compare_job(tmp_path / "before", tmp_path / "after", "pretrain")
    assert result["files"]["json:pretrain.json"]["differ"] == 0  # run ids are not compared
    assert result["files"]["csv:pretrain.csv"]["differ"] == 0
    assert result["files"]["pt:pretrain.pt"]["differ"] == 1
    assert result["config"]["differ"] == {}  # output_dir is a path: left out
    assert not eq.identical(result)
    assert eq.summary_lines("pretrain", result)[0] == "pretrain: DIFFERENT"
