"""This suite's MixMIM pretraining step against the authors' implementation, on the CPU.

The original (Sense-X/MixMIM at 2b2f5a9) is laid outside the project by
``../shared/bench-original/lay_original.sh`` and imported from the folder given here;
nothing of it is part of this project. A step is forward, backward and an AdamW step,
the same optimizer and inputs for both sides. The two sides alternate round by round in
one process so that machine noise hits both alike; the speed-up is the median over rounds
of (original's step time / ours), with a 95% bootstrap interval of that median.

``--cpu-time`` times steps by process CPU time instead of wall time: with one thread
(``OMP_NUM_THREADS=1``) that is the work each side does, unaffected by other jobs on a
shared machine. ``--precision bf16`` runs both sides under ``torch.autocast("cpu", torch.bfloat16)``.
``--memory`` also runs each side alone in a fresh process and reports its peak resident
memory (two steps), since one process cannot separate the two sides' peaks.

Every run also counts each side's minor page faults per step (``getrusage``): memory the
kernel had to hand over and zero because the allocator took it fresh from the system.
With glibc's default malloc, blocks above the mmap threshold (128 KiB at start, raised by
glibc up to 32 MiB as large blocks are freed) are mapped and unmapped on every use, so a
side that allocates more large temporaries pays more faults, and how many depends on the
process's allocation history: interleaved, a side's step that follows the other side's step
finds the heap as the other side left it. ``--steady`` runs one untimed step of the same side
before every timed one, so each timed step follows its own kind, as every step does in
training. ``--processes`` goes one step further: every round runs each side in a fresh
process of its own (``--warmup`` untimed steps, then ``--steps`` timed ones; the round's figure
is that process's median step), the two sides' processes alternating in order from round to
round. That is how training runs, one implementation per process, with nothing of the other
side in its heap or caches; it also gives each side's peak resident memory once per round.
Pinning the thresholds removes the faults for both sides:

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184 \
        python benchmarks/vs_original.py /tmp/mixmim-original --rounds 20

    python benchmarks/vs_original.py /tmp/mixmim-original --rounds 6 --precision fp32 --memory
    python benchmarks/vs_original.py /tmp/mixmim-original --rounds 12 --processes --warmup 2 --steps 5

``--ours-adamw fused`` is not the comparison: our side's optimizer becomes PyTorch's fused AdamW
kernel, which the engines build when a run sets ``adamw_kernel: fused`` (not bit-identical to
PyTorch's per-parameter loop, the engines' default, which the original's side keeps). It says
what training with that kernel does to the speed-up; the settings line names it, so
``pool_runs.py`` never pools such a run with the others.

    python benchmarks/vs_original.py /tmp/mixmim-original --rounds 12 --processes --ours-adamw fused
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch


def load_original(folder: Path):
    """The original ``models_mixmim`` module from a laid folder, or a clear error."""
    if not (folder / "models_mixmim.py").is_file():
        raise SystemExit(
            f"no original implementation at {folder} (models_mixmim.py not found): lay it first with\n"
            "  ../shared/bench-original/lay_original.sh PATH/TO/Sense-X-MixMIM-git-dir " + str(folder) + "\n"
            "nothing was measured"
        )
    sys.path.insert(0, str(folder))
    warnings.filterwarnings("ignore")
    import models_mixmim  # noqa: PLC0415  (the laid original, imported only here)

    return models_mixmim


SIDES = ("ours", "original")


def build_sides(original, name: str, which: tuple[str, ...] = SIDES):
    """Each side in ``which`` as (model, loss of model and images), each built right after ``manual_seed(0)``.

    A process that times one side builds only that side, so the other's parameters never pass
    through its heap."""
    from mixmim.models import build_pretrainer

    build = {"ours": (lambda: build_pretrainer(name), lambda m, x: m(x).loss),
             "original": (lambda: getattr(original, name)(norm_pix_loss=True), lambda m, x: m(x, mask_ratio=0.5)[0])}
    sides = {}
    for side in which:
        make, loss_of = build[side]
        torch.manual_seed(0)
        sides[side] = (make(), loss_of)
    return sides


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def make_step(model, loss_of, x, precision: str, clock=time.perf_counter, faults: list[int] | None = None,
              fused_adamw: bool = False):
    """One timed training step; appends the step's minor page faults to ``faults`` when given.
    ``fused_adamw``: PyTorch's fused AdamW kernel instead of its default (on the CPU, a loop over
    the parameters)."""
    if fused_adamw:  # ours only: the optimizer the engines build with adamw_kernel: fused
        from mixmim.engine.optim import adamw  # noqa: PLC0415  (the original's processes never import mixmim)

        opt = adamw(model.parameters(), 1e-4, (0.9, 0.999), "fused")
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step(record: bool = True) -> float:
        f0 = minor_faults()
        t = clock()
        with ctx:
            loss = loss_of(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = clock() - t
        if faults is not None and record:
            faults.append(minor_faults() - f0)
        return elapsed

    return step


def bootstrap_median_ci(values: list[float], reps: int = 4000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(reps))
    return meds[int(0.025 * reps)], meds[int(0.975 * reps) - 1]


def machine() -> str:
    model = platform.processor() or platform.machine()
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name"))
        cpu_flags = next(ln for ln in text.splitlines() if ln.startswith("flags")).split()
        flags = ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags)
    except (OSError, StopIteration):
        pass
    tunables = os.environ.get("GLIBC_TUNABLES")
    malloc = f"GLIBC_TUNABLES={tunables}" if tunables else "default malloc settings"
    from mixmim.models import layers

    return (f"{model} ({flags or 'no AVX-512'}), {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"{malloc}, our fp32 CPU linear products by {layers.CPU_LINEAR_BACKEND}")


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux's ``VmHWM`` belongs to the address space, which
    ``exec`` replaces; ``ru_maxrss`` survives ``exec`` and would report the parent's peak at fork
    when the parent was larger (as ``--memory``'s parent, holding both sides, is)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fused_adamw_for(side: str, args) -> bool:
    """Whether ``side`` steps with the fused AdamW kernel: ours under ``--ours-adamw fused`` only."""
    return side == "ours" and getattr(args, "ours_adamw", "loop") == "fused"


def adamw_note(args) -> str:
    """What the settings line adds when ours does not step with the default AdamW."""
    return ", ours with PyTorch's fused AdamW (what-if)" if fused_adamw_for("ours", args) else ""


def run_alone(folder: Path, side: str, args, warmup: int, steps: int, env: dict[str, str] | None = None) -> dict:
    """One side in a fresh process (environment ``env``, default this one's): ``warmup`` untimed
    steps, then ``steps`` timed ones.

    Returns what the child printed: its timed step seconds, minor faults per timed step and peak RSS (MiB)."""
    cmd = [sys.executable, __file__, str(folder), "--model", args.model, "--batch", str(args.batch),
           "--img-size", str(args.img_size), "--precision", args.precision, "--only", side,
           "--warmup", str(warmup), "--steps", str(steps), "--ours-adamw", getattr(args, "ours_adamw", "loop")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        raise RuntimeError(f"the {side} process exited with {done.returncode}; its last output:\n"
                           + (done.stdout + done.stderr)[-2000:])
    return json.loads(lines[-1])


def peak_memory_alone(folder: Path, side: str, args) -> float:
    """Peak RSS (MiB) of a fresh process running two steps of one side."""
    return run_alone(folder, side, args, warmup=1, steps=1)["peak_rss_mib"]


def rate_and_fault_lines(times: dict[str, list[float]], ratios: list[float], faults: dict[str, list[int]],
                         batch: int) -> str:
    """Each side's images/s at its median step, the median per-round speed-up with its 95% bootstrap
    interval, and each side's median minor page faults per step (in MiB of pages)."""
    med = {k: statistics.median(v) for k, v in times.items()}
    lo, hi = bootstrap_median_ci(ratios)
    page = resource.getpagesize()
    return (f"images/s: ours {batch / med['ours']:.3f}, original {batch / med['original']:.3f}; "
            f"speed-up (median of per-round ratios) {statistics.median(ratios):.2f}x, 95% CI [{lo:.2f}, {hi:.2f}]\n"
            "minor page faults per step (median): " + ", ".join(
                f"{k} {statistics.median(v):.0f} ({statistics.median(v) * page / 2**20:.0f} MiB)" for k, v in faults.items()))


def order_line(ratios: list[float]) -> str:
    """The per-round ratios split by which side ran first (ours in even rounds), with a two-sided
    Mann-Whitney U test of whether the order changes the ratio."""
    from scipy.stats import mannwhitneyu  # noqa: PLC0415  (scipy only where the test is made)

    first, second = ratios[0::2], ratios[1::2]
    test = mannwhitneyu(first, second, alternative="two-sided")
    return (f"by order: ours first {statistics.median(first):.2f}x (n = {len(first)}), original first "
            f"{statistics.median(second):.2f}x (n = {len(second)}); Mann-Whitney U p = {test.pvalue:.3g}")


def process_round_order(r: int) -> tuple[str, str]:
    """Which side's process runs first in round ``r``: ours in even rounds, the original in odd ones."""
    return SIDES if r % 2 == 0 else SIDES[::-1]


def rounds_in_processes(run_side, rounds: int) -> dict[str, list[dict]]:
    """``rounds`` rounds of one fresh process per side, ``run_side(side) -> child's report``, in alternating order."""
    out: dict[str, list[dict]] = {side: [] for side in SIDES}
    for r in range(rounds):
        for side in process_round_order(r):
            out[side].append(run_side(side))
    return out


def add_step_options(parser: argparse.ArgumentParser, rounds: int) -> None:
    """The original's folder and the options of every script that times one side per process:
    what a step is, how many rounds, and the untimed and timed steps of each process."""
    parser.add_argument("original", type=Path, help="folder laid by lay_original.sh")
    parser.add_argument("--model", default="mixmim_base", choices=["mixmim_base", "mixmim_large", "mixmim_huge"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per process (fresh-process protocols)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process (fresh-process protocols)")


def check_counts(args: argparse.Namespace) -> None:
    """Refuse counts that would measure nothing, before anything runs."""
    if args.rounds < 1 or args.batch < 1 or args.warmup < 0 or args.steps < 1:
        raise ValueError(f"--rounds {args.rounds} --batch {args.batch} --warmup {args.warmup} --steps {args.steps}; "
                         "expected positive counts (--warmup may be 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_options(parser, rounds=6)
    parser.add_argument("--memory", action="store_true", help="also peak RSS of each side alone")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time steps by the process's CPU time (meaningful with one thread: "
                             "OMP_NUM_THREADS=1), which other load on a shared machine does not inflate")
    parser.add_argument("--steady", action="store_true",
                        help="before each timed step run one untimed step of the same side, so that every "
                             "timed step follows one of its own, as in training, and not one of the other side")
    parser.add_argument("--processes", action="store_true",
                        help="each round, run each side in a fresh process of its own (--warmup untimed, then "
                             "--steps timed steps; the round's figure is the process's median step)")
    parser.add_argument("--ours-adamw", choices=["loop", "fused"], default="loop",
                        help="our side's AdamW as PyTorch's fused kernel, as the engines' adamw_kernel: fused "
                             "builds it (not bit-identical; the engines' default and the original's side use "
                             "the loop)")
    parser.add_argument("--only", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_counts(args)
    if args.processes and (args.steady or args.cpu_time or args.memory):
        raise ValueError("--processes is a protocol of its own: it cannot be combined with --steady, --cpu-time "
                         "or --memory (it reports each side's peak RSS itself)")
    original = load_original(args.original)
    if args.only:
        main_alone(original, args)
        return
    if args.processes:
        main_processes(args)
        return
    sides = build_sides(original, args.model)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    clock = time.process_time if args.cpu_time else time.perf_counter
    faults: dict[str, list[int]] = {k: [] for k in sides}
    steps = {k: make_step(m, f, x, args.precision, clock, faults[k], fused_adamw_for(k, args))
             for k, (m, f) in sides.items()}
    for s in steps.values():  # warm-up round, not timed
        s()
    for v in faults.values():
        v.clear()
    times = {k: [] for k in steps}
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for k in order:
            if args.steady:
                steps[k](record=False)
            times[k].append(steps[k]())
    ratios = [o / u for o, u in zip(times["original"], times["ours"], strict=True)]
    print(f"machine: {machine()}")
    print(f"{args.model}, batch {args.batch}, {args.img_size} px, {args.precision}, {args.rounds} rounds (+1 warm-up), "
          f"{'CPU' if args.cpu_time else 'wall'} time, "
          + ("each timed step after an untimed one of the same side (--steady)" if args.steady
             else "each side's step right after the other side's (interleaved)") + adamw_note(args))
    print("step seconds:", {k: [round(t, 2) for t in v] for k, v in times.items()})
    print(rate_and_fault_lines(times, ratios, faults, args.batch))
    if args.rounds >= 4:
        # The shared script always times ours first; rounds here alternate, so the two orders can be compared.
        # Interleaved, a side that runs second in a round follows the other side's step, while the side that
        # runs first follows its own step of the round before (the rounds alternate).
        print(order_line(ratios))
    if args.memory:
        del sides, steps
        mem = {side: peak_memory_alone(args.original, side, args) for side in ("ours", "original")}
        print(f"peak RSS alone (2 steps): ours {mem['ours']:.0f} MiB, original {mem['original']:.0f} MiB, "
              f"ratio {mem['ours'] / mem['original']:.3f}")


def main_alone(original, args) -> None:
    """The child of ``--processes`` and ``--memory``: one side only, its timed steps and peak RSS as JSON."""
    (model, loss_of), = build_sides(original, args.model, (args.only,)).values()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    faults: list[int] = []
    step = make_step(model, loss_of, x, args.precision, faults=faults, fused_adamw=fused_adamw_for(args.only, args))
    for _ in range(args.warmup):
        step(record=False)
    times = [step() for _ in range(args.steps)]
    print(json.dumps({"side": args.only, "step_s": times, "faults": faults, "peak_rss_mib": peak_rss_mib()}))


def main_processes(args) -> None:
    """``--processes``: the rounds of fresh one-side processes, and what they measured, printed as
    the in-process protocols print it (so that ``pool_runs.py`` reads both)."""
    reports = rounds_in_processes(lambda side: run_alone(args.original, side, args, args.warmup, args.steps),
                                  args.rounds)
    times = {side: [statistics.median(rep["step_s"]) for rep in reps] for side, reps in reports.items()}
    ratios = [o / u for o, u in zip(times["original"], times["ours"], strict=True)]
    print(f"machine: {machine()}")
    print(f"{args.model}, batch {args.batch}, {args.img_size} px, {args.precision}, {args.rounds} rounds "
          f"(each side a fresh process per round: {args.warmup} untimed + {args.steps} timed steps), wall time, "
          "the round's figure the process's median step (--processes)" + adamw_note(args))
    print("step seconds:", {k: [round(t, 3) for t in v] for k, v in times.items()})
    print("timed steps of each process:", {k: [[round(t, 2) for t in rep["step_s"]] for rep in reps]
                                           for k, reps in reports.items()})
    faults = {k: [f for rep in reps for f in rep["faults"]] for k, reps in reports.items()}
    print(rate_and_fault_lines(times, ratios, faults, args.batch))
    rss = {k: [rep["peak_rss_mib"] for rep in reps] for k, reps in reports.items()}
    rss_ratio = [u / o for u, o in zip(rss["ours"], rss["original"], strict=True)]
    print("peak RSS per process, MiB: " + ", ".join(f"{k} median {statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})"
                                                     for k, v in rss.items())
          + f"; ours / original {statistics.median(rss_ratio):.3f} ({min(rss_ratio):.3f}-{max(rss_ratio):.3f}, "
            f"n = {len(rss_ratio)} rounds)")
    if args.rounds >= 4:
        print(order_line(ratios))


if __name__ == "__main__":
    main()
