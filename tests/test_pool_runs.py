"""benchmarks/pool_runs.py: reading saved vs_original.py outputs and pooling their rounds."""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


pool_runs = _load("pool_runs")

MACHINE = "machine: AMD EPYC (avx512f), 2 torch threads, default malloc settings"
STEADY = ("mixmim_base, batch 4, 224 px, fp32, {n} rounds (+1 warm-up), wall time, each timed step after an "
          "untimed one of the same side (--steady)")


def _log(path: Path, ours: list[float], original: list[float], machine: str = MACHINE, settings: str = STEADY,
         before: str = "") -> Path:
    path.write_text(f"{before}{machine}\n{settings.format(n=len(ours))}\n"
                    f"step seconds: {{'ours': {ours}, 'original': {original}}}\n"
                    "images/s: ours 1.0, original 0.8; speed-up 1.25x\n")
    return path


def test_a_run_is_read_with_its_ratios_and_other_text_is_ignored(tmp_path):
    run = pool_runs.parse_run(_log(tmp_path / "a.txt", [2.0, 4.0], [3.0, 5.0], before="Tue Dec 1\n{'ours': [9]}\n"))
    assert run.ours == (2.0, 4.0) and run.original == (3.0, 5.0)
    assert run.ratios == [1.5, 1.25]
    assert run.protocol == STEADY.format(n=2).replace(", 2 rounds", "")


def test_pooling_takes_every_round_of_every_run(tmp_path, capsys, monkeypatch):
    a = _log(tmp_path / "x-s1-a.txt", [1.0, 1.0, 1.0], [1.2, 1.4, 1.5])
    b = _log(tmp_path / "x-s2-b.txt", [2.0] * 5, [2.4, 2.5, 2.6, 2.8, 3.0])  # another round count pools too
    monkeypatch.setattr("sys.argv", ["pool_runs.py", str(a), str(b), "--by-session"])
    pool_runs.main()
    out = capsys.readouterr().out.splitlines()
    ratios = [1.2, 1.4, 1.5, 1.2, 1.25, 1.3, 1.4, 1.5]
    pooled = out[-2]
    assert pooled.startswith(f"pooled, 2 runs: {statistics.median(ratios):.3f}x")
    assert "n = 8 rounds" in pooled and "5 of 8 at or above 1.3x" in pooled
    assert out[-1].startswith(f"by run, 2 runs (each its median ratio): geometric mean {math.sqrt(1.4 * 1.3):.3f}x")
    assert any(ln.startswith("pooled x-s1: 1.400x") and "n = 3 rounds" in ln for ln in out)
    assert any(ln.startswith("x-s2-b.txt: 1.300x") and ln.endswith("ours 2.00 s, original 2.60 s") for ln in out)


def test_summary_interval_holds_the_median_and_the_test_reads_the_threshold():
    ratios = [1.35, 1.4, 1.32, 1.45, 1.38, 1.36, 1.41, 1.33, 1.39, 1.37]
    high = pool_runs.summarise(ratios, 1.3)
    assert high.ci[0] <= high.median <= high.ci[1]
    assert high.at_or_above == 10 and high.p_above < 0.01  # every round above: resolved
    low = pool_runs.summarise(ratios, 1.5)
    assert low.at_or_above == 0 and low.p_above > 0.99
    assert math.isclose(high.median, statistics.median(ratios))


@pytest.mark.parametrize("change,what", [
    ({"machine": MACHINE.replace("default malloc settings", "GLIBC_TUNABLES=x")}, "machine"),
    ({"settings": STEADY.replace("--steady", "interleaved")}, "settings"),
    ({"settings": STEADY.replace("fp32", "bf16")}, "settings"),
])
def test_runs_that_measured_different_things_are_refused(tmp_path, change, what):
    a = pool_runs.parse_run(_log(tmp_path / "a.txt", [1.0], [1.3]))
    b = pool_runs.parse_run(_log(tmp_path / "b.txt", [1.0], [1.3], **change))
    with pytest.raises(ValueError, match=f"b.txt is not the same measurement as .*a.txt: {what}"):
        pool_runs.check_poolable([a, b])


def test_a_file_without_one_run_is_refused_by_name(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("speedup 1.4x\n")
    with pytest.raises(ValueError, match="empty.txt: expected the output of one vs_original.py run"):
        pool_runs.parse_run(empty)
    uneven = _log(tmp_path / "uneven.txt", [1.0, 2.0], [1.3])
    with pytest.raises(ValueError, match="uneven.txt: expected as many positive step times"):
        pool_runs.parse_run(uneven)


def test_the_committed_steady_logs_are_one_poolable_measurement():
    logs = sorted((BENCHMARKS / "logs").glob("amd-*-steady-*.txt"))
    assert len(logs) >= 6
    runs = [pool_runs.parse_run(p) for p in logs]
    pool_runs.check_poolable(runs)
    assert all(len(r.ours) >= 16 for r in runs)


def test_the_run_level_interval_counts_the_spread_between_runs():
    # Five runs whose rounds agree closely inside each run but whose medians spread: the pooled
    # rounds resolve the median below 1.3x, the runs as observations do not.
    medians = [1.257, 1.295, 1.270, 1.165, 1.315]
    level = pool_runs.by_run(medians, 1.3)
    assert level.runs == 5
    assert math.isclose(level.mean, math.exp(statistics.fmean(math.log(m) for m in medians)))
    assert level.ci[0] < level.mean < level.ci[1] and level.ci[1] > 1.3
    assert 0.5 < level.p_above < 1  # a mean above 1.3x is not supported; neither is it excluded at 5%
    rounds = [m * f for m in medians for f in (0.998, 0.999, 1.0, 1.001, 1.002)]
    assert pool_runs.summarise(rounds, 1.3).ci[1] < 1.3
    tight = pool_runs.by_run([1.4, 1.41, 1.39, 1.4], 1.3)
    assert tight.ci[0] > 1.3 and tight.p_above < 0.01


def test_one_run_has_no_run_level_interval():
    with pytest.raises(ValueError, match="1 run\\(s\\): a run-level interval needs at least 2"):
        pool_runs.by_run([1.3], 1.3)


def test_a_contrast_reads_which_set_is_faster_and_resolves_only_a_real_shift():
    slow, fast = [1.20, 1.18, 1.22, 1.19, 1.21, 1.17], [1.30, 1.31, 1.29, 1.32, 1.28, 1.30]
    c = pool_runs.contrast(fast, slow)
    assert c.ratio == pytest.approx(statistics.median(fast) / statistics.median(slow))
    assert 1 < c.ci[0] <= c.ratio <= c.ci[1] and c.p < 0.01 and c.n == (6, 6)
    same = pool_runs.contrast(slow, list(reversed(slow)))
    assert same.ratio == 1.0 and same.ci[0] < 1 < same.ci[1] and same.p > 0.5
    with pytest.raises(ValueError, match="at least 2 in each set"):
        pool_runs.contrast([1.2], slow)


def test_against_compares_two_pools_and_keeps_the_original_as_control(tmp_path, capsys, monkeypatch):
    what_if = STEADY + ", ours with PyTorch's fused AdamW (what-if)"
    a = [_log(tmp_path / f"f{i}.txt", [2.0, 2.1, 1.9], [2.6, 2.7, 2.6], settings=what_if) for i in range(2)]
    b = [_log(tmp_path / f"l{i}.txt", [2.2, 2.3, 2.2], [2.6, 2.6, 2.7]) for i in range(2)]
    monkeypatch.setattr("sys.argv", ["pool_runs.py", *map(str, a), "--against", *map(str, b)])
    pool_runs.main()
    out = capsys.readouterr().out
    assert "against: 2 runs, settings: mixmim_base" in out and "fused" not in out.split("against:")[1].splitlines()[0]
    lines = {ln.split(":")[0]: ln for ln in out.splitlines()}
    assert lines["our step, these / those"].split(": ")[1].startswith(f"{2.0 / 2.2:.3f} (95% CI")
    assert lines["the original's step, these / those"].split(": ")[1].startswith("1.000 (95% CI")
    other = _log(tmp_path / "m.txt", [2.2, 2.3], [2.6, 2.6], machine="machine: Intel Xeon")
    with pytest.raises(ValueError, match="ran on another machine"):
        pool_runs.against_lines([pool_runs.parse_run(a[0])], [pool_runs.parse_run(other)])
