"""Pool the per-round times of several saved ``vs_original.py`` runs into one speed-up figure.

A single 30-round run of ``vs_original.py --steady`` gives a 95% interval about 0.1 wide on this
kind of machine, too wide to tell 1.31x from 1.29x. Runs of the same measurement on the same
machine can be pooled round by round: each round is one paired comparison (one step of each
side). This script reads the printed output of such runs (the files under ``benchmarks/logs/``
are kept for that), checks that they measured the same thing (the same machine line, model,
batch, size, precision, clock and protocol), and prints for each run and for all of them
together the median per-round ratio (original step / ours) with a 95% bootstrap interval, as
``vs_original.py`` does (with each run's median step times, which show how fast the machine was),
how many rounds reached ``--threshold``, and a one-sided Wilcoxon
signed-rank test of whether the ratio's median exceeds the threshold (on log ratios, so that a
round twice as fast weighs as one twice as slow).

    python benchmarks/pool_runs.py benchmarks/logs/amd-s10-steady-*.txt benchmarks/logs/amd-s11-steady-*.txt

Pooling assumes the rounds of all runs come from one distribution: runs on a machine that was
faster or slower on one day than on another can differ in their ratio too, so the per-run
lines are printed beside the pooled one, and ``--by-session`` prints the pool of each session
prefix apart. With two runs or more the last line treats each run as one observation (its
median ratio): their geometric mean with a Student t 95% interval and a one-sided t-test of a
mean above the threshold, on log ratios. Rounds within a run are not independent of each other
when runs differ (on the development machine two runs started 45 minutes apart gave 1.17x and
1.32x), so where the two disagree the run-level line is the one to read.

``--against LOG...`` compares the pooled runs with a second set measured on the same machine
under another setting (for instance ``vs_original.py --ours-adamw fused`` against the default):
the ratio of the two pooled median speed-ups with a 95% bootstrap interval (each set resampled
apart), a two-sided Mann-Whitney U test on the rounds' log ratios, and the same for each side's
step time. A setting that changes our side only should leave the original's step times alone,
so that line is the control.

    python benchmarks/pool_runs.py benchmarks/logs/intel-s18-processes-fused-*.txt \
        --against benchmarks/logs/intel-s18-processes-loop-*.txt
"""

from __future__ import annotations

import argparse
import ast
import math
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_original import bootstrap_median_ci  # noqa: E402  (sibling benchmark script)


@dataclass(frozen=True)
class Run:
    """One ``vs_original.py`` run as printed: its settings lines and per-round step times."""

    path: Path
    machine: str
    settings: str  # model, batch, size, precision, rounds, clock, protocol
    ours: tuple[float, ...]
    original: tuple[float, ...]

    @property
    def protocol(self) -> str:
        """The settings without the round count, which runs may differ in and still be pooled."""
        head, _, tail = self.settings.partition(" rounds")
        return head.rsplit(",", 1)[0] + tail

    @property
    def ratios(self) -> list[float]:
        return [o / u for o, u in zip(self.original, self.ours, strict=True)]


def parse_run(path: Path) -> Run:
    """The one ``vs_original.py`` run printed in ``path`` (other text in the file is ignored)."""
    lines = path.read_text(errors="replace").splitlines()
    machine = [ln for ln in lines if ln.startswith("machine: ")]
    times = [ln for ln in lines if ln.startswith("step seconds: ")]
    if len(machine) != 1 or len(times) != 1:
        raise ValueError(f"{path}: expected the output of one vs_original.py run (one 'machine:' and one "
                         f"'step seconds:' line), found {len(machine)} and {len(times)}")
    at = lines.index(machine[0])
    settings = lines[at + 1] if at + 1 < len(lines) else ""
    if " rounds " not in settings:
        raise ValueError(f"{path}: expected the settings line after 'machine:', found {settings!r}")
    try:
        per_side = ast.literal_eval(times[0].removeprefix("step seconds: "))
        ours, original = tuple(map(float, per_side["ours"])), tuple(map(float, per_side["original"]))
    except (ValueError, SyntaxError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: unreadable 'step seconds:' line ({err}); expected "
                         "{'ours': [...], 'original': [...]}") from err
    if not ours or len(ours) != len(original) or min(ours + original) <= 0:
        raise ValueError(f"{path}: expected as many positive step times for each side, got {len(ours)} and "
                         f"{len(original)}")
    return Run(path, machine[0].removeprefix("machine: "), settings, ours, original)


def check_poolable(runs: list[Run]) -> None:
    """Refuse runs that measured different things (another machine, model, precision or protocol)."""
    first = runs[0]
    for run in runs[1:]:
        for what, a, b in (("machine", first.machine, run.machine), ("settings", first.protocol, run.protocol)):
            if a != b:
                raise ValueError(f"{run.path} is not the same measurement as {first.path}: {what} {b!r}; "
                                 f"expected {a!r}")


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    ci: tuple[float, float]
    at_or_above: int
    p_above: float  # one-sided Wilcoxon signed-rank p that the median ratio exceeds the threshold


def summarise(ratios: list[float], threshold: float) -> Summary:
    from scipy.stats import wilcoxon  # noqa: PLC0415  (scipy only where a summary is made)

    shifted = [math.log(r / threshold) for r in ratios]
    p = float(wilcoxon(shifted, alternative="greater").pvalue) if any(shifted) else 1.0
    return Summary(len(ratios), statistics.median(ratios), bootstrap_median_ci(ratios),
                   sum(r >= threshold for r in ratios), p)


@dataclass(frozen=True)
class RunLevel:
    runs: int
    mean: float  # geometric mean of the runs' median ratios
    ci: tuple[float, float]
    p_above: float  # one-sided t-test p that the mean (log) ratio exceeds the threshold


def by_run(run_medians: list[float], threshold: float) -> RunLevel:
    """Each run as one observation: the geometric mean of the runs' median ratios, a Student t 95%
    interval and a one-sided t-test against ``threshold``, all on log ratios (needs two runs or more)."""
    from scipy import stats  # noqa: PLC0415

    from mixmim.stats import t_interval  # noqa: PLC0415

    if len(run_medians) < 2:
        raise ValueError(f"{len(run_medians)} run(s): a run-level interval needs at least 2")
    logs = [math.log(r) for r in run_medians]
    ci = t_interval(logs, unit="runs")
    if ci.low == ci.high:  # identical runs: the t statistic is undefined
        p = 0.0 if ci.value > math.log(threshold) else 1.0
    else:
        p = float(stats.ttest_1samp(logs, math.log(threshold), alternative="greater").pvalue)
    return RunLevel(len(logs), math.exp(ci.value), (math.exp(ci.low), math.exp(ci.high)), p)


def run_level_line(r: RunLevel, threshold: float) -> str:
    return (f"by run, {r.runs} runs (each its median ratio): geometric mean {r.mean:.3f}x (Student t 95% CI "
            f"{r.ci[0]:.3f}-{r.ci[1]:.3f}, n = {r.runs} runs); mean > {threshold}x: t-test p = {r.p_above:.3g}")


def line(label: str, s: Summary, threshold: float) -> str:
    return (f"{label}: {s.median:.3f}x (95% CI {s.ci[0]:.3f}-{s.ci[1]:.3f}, n = {s.n} rounds), "
            f"{s.at_or_above} of {s.n} at or above {threshold}x; median > {threshold}x: Wilcoxon p = {s.p_above:.3g}")


@dataclass(frozen=True)
class Contrast:
    ratio: float  # median of the first set over the median of the second
    ci: tuple[float, float]
    p: float  # two-sided Mann-Whitney U p, on logs
    n: tuple[int, int]


def contrast(a: list[float], b: list[float], reps: int = 4000, seed: int = 0) -> Contrast:
    """Median of ``a`` over median of ``b``: a 95% bootstrap interval resampling each set apart, and
    a two-sided Mann-Whitney U test of the two sets (on logs, so ratios below and above 1 weigh alike)."""
    from scipy.stats import mannwhitneyu  # noqa: PLC0415

    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"{len(a)} and {len(b)} rounds; a contrast needs at least 2 in each set")
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b)))
                  for _ in range(reps))
    p = float(mannwhitneyu([math.log(v) for v in a], [math.log(v) for v in b], alternative="two-sided").pvalue)
    return Contrast(statistics.median(a) / statistics.median(b), (boot[int(0.025 * reps)], boot[int(0.975 * reps) - 1]),
                    p, (len(a), len(b)))


def contrast_line(label: str, c: Contrast) -> str:
    return (f"{label}: {c.ratio:.3f} (95% CI {c.ci[0]:.3f}-{c.ci[1]:.3f}, n = {c.n[0]} and {c.n[1]} rounds); "
            f"Mann-Whitney U p = {c.p:.3g}")


def session_of(path: Path) -> str:
    """The file name up to its second '-' (``amd-s10-steady-1.txt`` -> ``amd-s10``)."""
    return "-".join(path.name.split("-")[:2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", type=Path, nargs="+", help="saved outputs of vs_original.py, one run each")
    p.add_argument("--threshold", type=float, default=1.3)
    p.add_argument("--by-session", action="store_true", help="also pool the runs of each file-name prefix apart")
    p.add_argument("--against", type=Path, nargs="+", metavar="LOG",
                   help="a second set of runs, same machine, another setting: compare the two pools")
    args = p.parse_args()
    if args.threshold <= 0:
        raise ValueError(f"--threshold {args.threshold}; expected a positive speed-up")
    runs = [parse_run(path) for path in args.logs]
    check_poolable(runs)
    print(f"machine: {runs[0].machine}")
    print(f"settings: {runs[0].protocol}")
    for run in runs:
        print(line(run.path.name, summarise(run.ratios, args.threshold), args.threshold)
              + f"; median step: ours {statistics.median(run.ours):.2f} s, original {statistics.median(run.original):.2f} s")
    if args.by_session:
        sessions: dict[str, list[float]] = {}
        for run in runs:
            sessions.setdefault(session_of(run.path), []).extend(run.ratios)
        for name, ratios in sessions.items():
            print(line(f"pooled {name}", summarise(ratios, args.threshold), args.threshold))
    pooled = [r for run in runs for r in run.ratios]
    print(line(f"pooled, {len(runs)} runs", summarise(pooled, args.threshold), args.threshold))
    if len(runs) >= 2:
        print(run_level_line(by_run([statistics.median(run.ratios) for run in runs], args.threshold), args.threshold))
    if args.against:
        print(against_lines(runs, [parse_run(path) for path in args.against]))


def against_lines(runs: list[Run], others: list[Run]) -> str:
    """The pooled ``runs`` against the pooled ``others`` (same machine, each set poolable in itself):
    speed-up, then each side's step time, each as first set / second set."""
    check_poolable(others)
    if others[0].machine != runs[0].machine:
        raise ValueError(f"{others[0].path} ran on another machine: {others[0].machine!r}; expected {runs[0].machine!r}")

    def pool(group: list[Run]) -> dict[str, list[float]]:
        return {k: [v for run in group for v in getattr(run, k)] for k in ("ratios", "ours", "original")}

    first, second = pool(runs), pool(others)
    return "\n".join([
        f"against: {len(others)} runs, settings: {others[0].protocol}",
        contrast_line("speed-up, these runs / those", contrast(first["ratios"], second["ratios"])),
        contrast_line("our step, these / those", contrast(first["ours"], second["ours"])),
        contrast_line("the original's step, these / those", contrast(first["original"], second["original"])),
    ])


if __name__ == "__main__":
    main()
