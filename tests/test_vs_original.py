"""benchmarks/vs_original.py: the parts that run without the authors' code (its --processes protocol)."""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


vs_original = _load("vs_original")
pool_runs = _load("pool_runs")


def test_process_rounds_alternate_which_side_runs_first():
    calls = []

    def run_side(side):
        calls.append(side)
        return {"side": side, "n": len(calls)}

    out = vs_original.rounds_in_processes(run_side, 3)
    assert calls == ["ours", "original", "original", "ours", "ours", "original"]
    assert [rep["n"] for rep in out["ours"]] == [1, 4, 5]
    assert [rep["n"] for rep in out["original"]] == [2, 3, 6]


def _fake_reports(monkeypatch, per_process: dict[str, list[list[float]]]):
    """Make run_alone hand out the given timed steps, process after process, for each side."""
    queues = {side: list(v) for side, v in per_process.items()}
    rss = {"ours": 3400.0, "original": 3700.0}

    def fake(folder, side, args, warmup, steps):
        assert (warmup, steps) == (args.warmup, args.steps)
        return {"side": side, "step_s": queues[side].pop(0), "faults": [100, 300], "peak_rss_mib": rss[side]}

    monkeypatch.setattr(vs_original, "run_alone", fake)
    monkeypatch.setattr(vs_original, "machine", lambda: "AMD EPYC (avx512f), 2 torch threads, default malloc settings")


def _args(rounds: int) -> argparse.Namespace:
    return argparse.Namespace(original=Path("/nowhere"), model="mixmim_base", batch=4, img_size=224, precision="fp32",
                              rounds=rounds, warmup=2, steps=3)


def test_process_protocol_output_pools_with_each_process_median(monkeypatch, capsys, tmp_path):
    ours = [[3.0, 3.2, 9.0], [3.1, 3.3, 3.2], [2.9, 3.0, 3.1], [3.0, 3.0, 3.0]]
    original = [[4.0, 4.4, 4.2], [4.2, 4.1, 9.9], [4.0, 4.0, 4.3], [4.5, 4.4, 4.6]]
    _fake_reports(monkeypatch, {"ours": ours, "original": original})
    vs_original.main_processes(_args(4))
    printed = capsys.readouterr().out
    log = tmp_path / "amd-s12-processes-1.txt"
    log.write_text(printed)
    run = pool_runs.parse_run(log)
    assert run.ours == tuple(statistics.median(p) for p in ours)  # the 9.0 outlier step does not count
    assert run.original == tuple(statistics.median(p) for p in original)
    assert "(--processes)" in run.protocol and " 4 rounds" not in run.protocol
    assert "ours / original 0.919" in printed and "n = 4 rounds" in printed
    assert "ours 200 (1 MiB)" in printed  # faults per step: the median over every timed step

    steady = tmp_path / "amd-s12-steady-1.txt"
    steady.write_text(f"machine: {run.machine}\nmixmim_base, batch 4, 224 px, fp32, 2 rounds (+1 warm-up), wall time, "
                      "each timed step after an untimed one of the same side (--steady)\n"
                      "step seconds: {'ours': [3.0, 3.1], 'original': [4.0, 4.1]}\n")
    with pytest.raises(ValueError, match="not the same measurement"):
        pool_runs.check_poolable([run, pool_runs.parse_run(steady)])


def test_fused_adamw_what_if_is_ours_only_and_never_pools_with_the_comparison(monkeypatch, capsys, tmp_path):
    fused = argparse.Namespace(**vars(_args(2)), ours_adamw="fused")
    assert vs_original.fused_adamw_for("ours", fused) and not vs_original.fused_adamw_for("original", fused)
    assert not vs_original.fused_adamw_for("ours", _args(2))  # env_ab's arguments have no such option
    commands = []

    def child(cmd, capture_output, text, env):
        commands.append(cmd)
        return argparse.Namespace(returncode=0, stdout='{"step_s": [1.0]}', stderr="")

    monkeypatch.setattr(vs_original.subprocess, "run", child)
    vs_original.run_alone(Path("/nowhere"), "ours", fused, warmup=1, steps=1)
    vs_original.run_alone(Path("/nowhere"), "ours", _args(2), warmup=1, steps=1)
    assert [c[c.index("--ours-adamw") + 1] for c in commands] == ["fused", "loop"]

    runs = []
    for name, args in (("loop", _args(2)), ("fused", fused)):
        _fake_reports(monkeypatch, {"ours": [[3.0], [3.1]], "original": [[4.0], [4.1]]})
        vs_original.main_processes(args)
        log = tmp_path / f"{name}.txt"
        log.write_text(capsys.readouterr().out)
        runs.append(pool_runs.parse_run(log))
    assert "fused AdamW (what-if)" in runs[1].protocol and "fused" not in runs[0].protocol
    with pytest.raises(ValueError, match="not the same measurement"):
        pool_runs.check_poolable(runs)


def test_make_step_uses_the_fused_kernel_only_when_asked(monkeypatch):
    built = []
    real = vs_original.torch.optim.AdamW

    def recording(params, **kw):
        built.append(kw.get("fused"))
        return real(params, **kw)

    monkeypatch.setattr(vs_original.torch.optim, "AdamW", recording)
    model = vs_original.torch.nn.Linear(3, 2)
    for fused in (False, True):
        step = vs_original.make_step(model, lambda m, x: m(x).sum(), vs_original.torch.randn(4, 3), "fp32",
                                     fused_adamw=fused)
        step()
    assert built == [None, True]


@pytest.mark.parametrize("flag", ["--steady", "--cpu-time", "--memory"])
def test_process_protocol_refuses_other_protocols(monkeypatch, flag):
    monkeypatch.setattr("sys.argv", ["vs_original.py", "/nowhere", "--processes", flag])
    with pytest.raises(ValueError, match="--processes is a protocol of its own"):
        vs_original.main()


def test_counts_are_checked_before_anything_runs(monkeypatch):
    monkeypatch.setattr("sys.argv", ["vs_original.py", "/nowhere", "--processes", "--steps", "0"])
    with pytest.raises(ValueError, match="--steps 0"):
        vs_original.main()


def test_a_process_timing_one_side_builds_only_that_side():
    class NoOriginal:
        def __getattr__(self, name):
            raise AssertionError(f"the original's {name} was built in a process timing ours only")

    sides = vs_original.build_sides(NoOriginal(), "mixmim_base", ("ours",))
    assert list(sides) == ["ours"]
    model, _ = sides["ours"]
    assert sum(p.numel() for p in model.parameters()) > 50_000_000


def test_a_failed_child_process_is_reported_with_its_output(monkeypatch):
    def failed(cmd, capture_output, text, env):
        assert "--only" in cmd and cmd[cmd.index("--only") + 1] == "original"
        assert env == {"OMP_WAIT_POLICY": "ACTIVE"}  # the child's environment as given
        return argparse.Namespace(returncode=1, stdout="", stderr="Traceback ...\nMemoryError")

    monkeypatch.setattr(vs_original.subprocess, "run", failed)
    with pytest.raises(RuntimeError, match="the original process exited with 1(.|\n)*MemoryError"):
        vs_original.run_alone(Path("/nowhere"), "original", _args(1), warmup=1, steps=1,
                              env={"OMP_WAIT_POLICY": "ACTIVE"})


def test_order_line_splits_the_rounds_by_who_ran_first():
    line = vs_original.order_line([1.2, 1.4, 1.2, 1.4, 1.2, 1.4])
    assert line.startswith("by order: ours first 1.20x (n = 3), original first 1.40x (n = 3)")
