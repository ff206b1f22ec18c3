"""Does a process setting change the speed-up? Each side's step under two environments, A and B.

Settings such as ``OMP_WAIT_POLICY`` (how OpenMP's idle threads wait) or glibc's malloc tunables
act on a whole process, so they can only be compared between processes. Every round runs four
fresh processes, one per (side, environment), each as ``vs_original.py --processes`` runs a side
(``--warmup`` untimed steps, then ``--steps`` timed ones; the round's figure is the process's
median step). The four start in an order rotated from round to round, so each takes every place
equally often in four rounds.

An environment is a list of ``NAME=VALUE`` (set in the child) and ``NAME`` (removed from the
child's environment, so the library's own default applies). Printed, each with its median over
rounds and a 95% bootstrap interval: each side's step under B relative to A; the speed-up
(original / ours) under A, under B, and with each side under the other environment; and the
change of the speed-up from A to B, with a Wilcoxon signed-rank test against no change.

Why ``OMP_WAIT_POLICY``: until the thirteenth session ``import mixmim`` set it to PASSIVE (idle
OpenMP threads sleep at once) before torch loaded, so the stage scripts, which import mixmim first,
trained under it (so did ``pretrain_processes.py``, which runs them), while the other benchmark
scripts, which import torch first and start their child processes before importing mixmim, and the
original's own training ran under libgomp's default (spin a while, then sleep). This script
measured what the difference cost.

    python benchmarks/env_ab.py /tmp/mixmim-original --env-a OMP_WAIT_POLICY=PASSIVE --env-b OMP_WAIT_POLICY \\
        --rounds 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_original import (SIDES, add_step_options, bootstrap_median_ci, check_counts, load_original,  # noqa: E402
                         machine, run_alone)

CONFIGS = [(side, env) for env in ("A", "B") for side in SIDES]


def parse_env(items: list[str], option: str) -> dict[str, str | None]:
    """``NAME=VALUE`` sets NAME, a bare ``NAME`` removes it (value None); anything else is refused."""
    env: dict[str, str | None] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not name or not name.replace("_", "a").isalnum() or name[0].isdigit():
            raise ValueError(f"{option} {item!r}: expected NAME=VALUE (set) or NAME (removed), "
                             "NAME letters, digits and '_'")
        env[name] = value if eq else None
    if not env:
        raise ValueError(f"{option} is empty; expected at least one NAME=VALUE or NAME")
    return env


def child_env(base: dict[str, str], change: dict[str, str | None]) -> dict[str, str]:
    """``base`` with ``change`` applied: a value sets its name, None removes it."""
    out = dict(base)
    for name, value in change.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def describe(change: dict[str, str | None]) -> str:
    return ", ".join(f"{k}={v}" if v is not None else f"{k} unset" for k, v in change.items())


def round_order(r: int) -> list[tuple[str, str]]:
    """The four (side, environment) processes of round ``r``, rotated by ``r``."""
    k = r % len(CONFIGS)
    return CONFIGS[k:] + CONFIGS[:k]


def ratio_line(label: str, ratios: list[float]) -> str:
    lo, hi = bootstrap_median_ci(ratios)
    return f"{label}: {statistics.median(ratios):.3f} (95% CI {lo:.3f}-{hi:.3f}, n = {len(ratios)} rounds)"


def summary(times: dict[tuple[str, str], list[float]]) -> list[str]:
    """The printed comparisons from each (side, env)'s per-round median steps."""
    from scipy.stats import wilcoxon  # noqa: PLC0415  (scipy only where the test is made)

    def per_round(f) -> list[float]:
        return [f(*row) for row in zip(*(times[c] for c in CONFIGS), strict=True)]

    # rows hold ours A, original A, ours B, original B (CONFIGS' order)
    lines = [ratio_line("ours: step under A / under B", per_round(lambda ua, oa, ub, ob: ua / ub)),
             ratio_line("original: step under A / under B", per_round(lambda ua, oa, ub, ob: oa / ob)),
             ratio_line("speed-up (original / ours), both under A", per_round(lambda ua, oa, ub, ob: oa / ua)),
             ratio_line("speed-up, both under B", per_round(lambda ua, oa, ub, ob: ob / ub)),
             ratio_line("speed-up, ours under A, original under B", per_round(lambda ua, oa, ub, ob: ob / ua)),
             ratio_line("speed-up, ours under B, original under A", per_round(lambda ua, oa, ub, ob: oa / ub))]
    change = per_round(lambda ua, oa, ub, ob: (ob / ub) / (oa / ua))
    line = ratio_line("speed-up under B / under A", change)
    if len(change) >= 6 and any(c != 1 for c in change):
        line += f"; Wilcoxon signed-rank against 1: p = {wilcoxon([c - 1 for c in change]).pvalue:.3g}"
    return lines + [line]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_options(parser, rounds=8)
    parser.add_argument("--env-a", nargs="+", required=True, metavar="NAME[=VALUE]")
    parser.add_argument("--env-b", nargs="+", required=True, metavar="NAME[=VALUE]")
    args = parser.parse_args(argv)
    check_counts(args)
    envs = {"A": parse_env(args.env_a, "--env-a"), "B": parse_env(args.env_b, "--env-b")}
    if envs["A"] == envs["B"]:
        raise ValueError(f"--env-a and --env-b are the same ({describe(envs['A'])}); nothing would be compared")
    load_original(args.original)  # a clear error before any process starts
    base = dict(os.environ)
    times: dict[tuple[str, str], list[float]] = {c: [] for c in CONFIGS}
    for r in range(args.rounds):
        for side, env in round_order(r):
            report = run_alone(args.original, side, args, args.warmup, args.steps,
                               env=child_env(base, envs[env]))
            times[(side, env)].append(statistics.median(report["step_s"]))
    print(f"machine (this process): {machine()}")
    print(f"env A: {describe(envs['A'])}; env B: {describe(envs['B'])}")
    print(f"{args.model}, batch {args.batch}, {args.img_size} px, {args.precision}, {args.rounds} rounds of four fresh "
          f"processes (side x env, order rotated each round), {args.warmup} untimed + {args.steps} timed steps each, "
          "wall time, the process's median step")
    print("step seconds:", {f"{side} {env}": [round(t, 3) for t in v] for (side, env), v in times.items()})
    print("median step:", ", ".join(f"{side} {env} {statistics.median(v):.3f} s" for (side, env), v in times.items()))
    for line in summary(times):
        print(line)


if __name__ == "__main__":
    main()
