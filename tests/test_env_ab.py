"""benchmarks/env_ab.py: a process setting A/B for both sides, in the parts that run without the authors' code."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
_spec = importlib.util.spec_from_file_location("env_ab", BENCHMARKS / "env_ab.py")
env_ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(env_ab)


def test_an_environment_sets_names_with_values_and_removes_bare_names():
    change = env_ab.parse_env(["OMP_WAIT_POLICY=PASSIVE", "GLIBC_TUNABLES"], "--env-a")
    assert change == {"OMP_WAIT_POLICY": "PASSIVE", "GLIBC_TUNABLES": None}
    base = {"PATH": "/bin", "GLIBC_TUNABLES": "x", "OMP_WAIT_POLICY": "ACTIVE"}
    assert env_ab.child_env(base, change) == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    assert base["GLIBC_TUNABLES"] == "x"  # this process's environment is left alone
    assert env_ab.describe(change) == "OMP_WAIT_POLICY=PASSIVE, GLIBC_TUNABLES unset"


@pytest.mark.parametrize("item", ["=PASSIVE", "OMP WAIT=1", "1ABC=2"])
def test_a_malformed_setting_is_refused_by_name(item):
    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        env_ab.parse_env([item], "--env-b")


def test_the_same_environment_twice_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="the same"):
        env_ab.main(["/nowhere", "--env-a", "X=1", "--env-b", "X=1"])


def test_each_process_takes_every_place_once_in_four_rounds():
    orders = [env_ab.round_order(r) for r in range(4)]
    assert all(sorted(o) == sorted(env_ab.CONFIGS) for o in orders)
    for place in range(4):
        assert sorted(o[place] for o in orders) == sorted(env_ab.CONFIGS)


def test_summary_reads_each_comparison_off_the_right_processes():
    n = 6
    times = {("ours", "A"): [3.0] * n, ("original", "A"): [3.9] * n,
             ("ours", "B"): [2.5] * n, ("original", "B"): [3.5] * n}
    lines = env_ab.summary(times)
    assert lines[0].startswith("ours: step under A / under B: 1.200")
    assert lines[1].startswith("original: step under A / under B: 1.114")
    assert lines[2].startswith("speed-up (original / ours), both under A: 1.300")
    assert lines[3].startswith("speed-up, both under B: 1.400")
    assert lines[4].startswith("speed-up, ours under A, original under B: 1.167")
    assert lines[5].startswith("speed-up, ours under B, original under A: 1.560")
    assert lines[6].startswith("speed-up under B / under A: 1.077") and "Wilcoxon" in lines[6]


def test_rounds_run_every_side_under_both_environments(monkeypatch, capsys, tmp_path):
    (tmp_path / "models_mixmim.py").write_text("")
    calls = []

    def fake(folder, side, args, warmup, steps, env):
        calls.append((side, env.get("OMP_WAIT_POLICY", "unset")))
        step = {"ours": 3.0, "original": 4.0}[side] * (0.9 if env.get("OMP_WAIT_POLICY") is None else 1.0)
        return {"step_s": [step, step + 0.1, step - 0.1]}

    monkeypatch.setattr(env_ab, "run_alone", fake)
    monkeypatch.setattr(env_ab, "machine", lambda: "test machine")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    env_ab.main([str(tmp_path), "--env-a", "OMP_WAIT_POLICY=PASSIVE", "--env-b", "OMP_WAIT_POLICY", "--rounds", "2"])
    assert sorted(calls) == sorted([("ours", "PASSIVE"), ("original", "PASSIVE"), ("ours", "unset"),
                                    ("original", "unset")] * 2)
    out = capsys.readouterr().out
    assert "env A: OMP_WAIT_POLICY=PASSIVE; env B: OMP_WAIT_POLICY unset" in out
    assert "ours: step under A / under B: 1.111" in out
