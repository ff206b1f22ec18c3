"""A pipeline's pretraining on the CPU: one process with N threads, N one-thread processes, or N runs?

Runs the pretraining stage of a params file (default ``params.yaml``: the built-in unlabeled
set, the default model and decoder) for a few optimiser steps in the chosen layouts, alternating
their order from round to round, and prints the images/s the engine measured over each logging
window (the first window, warm-up, left out):

- ``threads``: one process with N torch threads, ``--batch`` images per step;
- ``processes``: one run split over N one-thread processes under ``torchrun --nproc-per-node N``
  (gloo), ``--batch / N`` images per process and step, the same global batch;
- ``streams``: N independent one-thread runs side by side, ``--batch`` images per step each, as
  the ablations' seeds were run; their rate is the sum of the runs' rates.

``--adamw-kernels default fused`` runs each layout with each of PyTorch's AdamW kernels (the engine
configs' ``adamw_kernel``, ``mixmim.engine.optim.ADAMW_KERNELS``), so one layout can be compared
under both; every arm is compared with the first (first layout, first kernel). Without it, each run
keeps the kernel its params file chooses.

Each run has its own MLflow store. Needs the built-in data (``dvc repro prepare_data``).

    python benchmarks/pretrain_processes.py --rounds 2 --steps 60
    python benchmarks/pretrain_processes.py --params pipelines/ablations/params.yaml \
        --sections pretrain variants.default --layouts threads streams --rounds 4 --steps 60
    python benchmarks/pretrain_processes.py --layouts threads --adamw-kernels default fused --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from train_throughput import window_rates  # this folder is on sys.path when the script runs

from mixmim.engine.optim import ADAMW_KERNELS
from mixmim.stats import t_interval

REPO = Path(__file__).resolve().parents[1]


LAYOUTS = ("threads", "processes", "streams")


def section(params: dict, dotted: str) -> dict:
    """The mapping at a dotted section path of a params file (``variants.default``)."""
    node = params
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        raise SystemExit(f"--sections {dotted}: not a mapping in the params file")
    return node


def stage_command(params_file: Path, sections: list[str], steps: int, batch: int, tmp: Path, tag: str,
                  adamw_kernel: str | None = None) -> tuple[list[str], str, Path]:
    """The pretraining stage over a copy of ``params_file`` (roots absolute, its own store, a short run;
    ``adamw_kernel`` replaces the params' choice unless None)."""
    params = yaml.safe_load(params_file.read_text())
    store = f"sqlite:///{tmp / f'{tag}.db'}"
    params["tracking"] = {**params["tracking"], "uri": store, "experiment": "bench"}
    # roots are relative to the params file's folder; the copy lives in the temporary folder
    params["roots"] = {k: str((params_file.parent / v).resolve()) for k, v in params["roots"].items()}
    # the last section wins when the stage merges them, so the short-run overrides go there
    overrides = dict(epochs=1, warmup_epochs=0, knn_every=0, batch_size=batch, max_steps_per_epoch=steps,
                     log_every_steps=10, progress=False)
    if adamw_kernel is not None:
        overrides["adamw_kernel"] = adamw_kernel
    section(params, sections[-1]).update(overrides)
    pfile = tmp / f"params_{tag}.yaml"
    pfile.write_text(yaml.safe_dump(params))
    metrics = tmp / f"{tag}.json"
    script = [str(REPO / "stages" / "pretrain.py"), "--params", str(pfile), "--sections", *sections, "--seed", "0",
              "--run-dir", str(tmp / tag), "--metrics", str(metrics), "--plots", str(tmp / f"{tag}.csv"),
              "--variant", tag]
    return script, store, metrics


def run(layout: str, procs: int, batch: int, steps: int, tmp: Path, tag: str, params_file: Path,
        sections: list[str], adamw_kernel: str | None = None) -> list[float]:
    """The window rates of one run of ``layout`` (``streams``: the sum of the side-by-side runs' rates)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    jobs = []
    if layout == "threads":
        script, store, metrics = stage_command(params_file, sections, steps, batch, tmp, tag, adamw_kernel)
        jobs.append(([sys.executable, *script], store, metrics))
        env["OMP_NUM_THREADS"] = str(procs)
    elif layout == "processes":
        script, store, metrics = stage_command(params_file, sections, steps, batch // procs, tmp, tag, adamw_kernel)
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
        jobs.append(([torchrun, "--nproc-per-node", str(procs), *script], store, metrics))
    else:
        for i in range(procs):
            script, store, metrics = stage_command(params_file, sections, steps, batch, tmp, f"{tag}-{i}", adamw_kernel)
            jobs.append(([sys.executable, *script], store, metrics))
    running = [subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for cmd, _, _ in jobs]
    codes = [proc.wait() for proc in running]  # all of them, so none outlives the temporary folder
    for code, (cmd, _, _) in zip(codes, jobs):
        if code != 0:
            raise SystemExit(f"{' '.join(cmd)} exited with status {code}")
    rates = [window_rates(store, json.loads(metrics.read_text())["run_id"]) for _, store, metrics in jobs]
    if len(rates) == 1:
        return rates[0]
    # side by side, window i of each run covers about the same time; the machine's rate is their sum
    return [sum(window) for window in zip(*rates)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=Path, default=REPO / "params.yaml", help="the pipeline's params file")
    p.add_argument("--sections", nargs="+", default=["pretrain"], help="its pretraining sections, as the stage takes them")
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=["threads", "processes"],
                   help="the first is the baseline the others are compared with")
    p.add_argument("--procs", type=int, default=2, help="threads of the one process / number of processes or runs")
    p.add_argument("--batch", type=int, default=16, help="images per optimiser step (of each run, for streams)")
    p.add_argument("--steps", type=int, default=60, help="optimiser steps per run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--adamw-kernels", nargs="+", choices=ADAMW_KERNELS, default=[None],
                   help="run every layout with each of these AdamW kernels (the engine's adamw_kernel; "
                        "default: the params file's)")
    a = p.parse_args(argv)
    if "processes" in a.layouts and a.batch % a.procs:
        raise SystemExit(f"--batch {a.batch} is not divisible by --procs {a.procs} (the processes layout splits it)")
    if a.rounds < 2:
        raise SystemExit(f"--rounds {a.rounds}: must be at least 2 (the interval is over rounds)")
    layouts, kernels = list(dict.fromkeys(a.layouts)), list(dict.fromkeys(a.adamw_kernels))
    arms = [(layout, kernel) for layout in layouts for kernel in kernels]
    if len(arms) < 2:
        raise SystemExit(f"--layouts {' '.join(a.layouts)}: name at least two different layouts, or two "
                         "--adamw-kernels, to compare")
    if not a.params.is_file():
        raise SystemExit(f"--params {a.params}: no such file")
    base = arms[0]
    rates: dict[tuple[str, str], list[float]] = {arm: [] for arm in arms}
    ratios: dict[tuple[str, str], list[float]] = {arm: [] for arm in arms[1:]}
    layout_names = {"threads": f"1 process x {a.procs} threads",
                    "processes": f"{a.procs} processes x 1 thread (one run)",
                    "streams": f"{a.procs} one-thread runs side by side"}

    def name(arm: tuple[str, str]) -> str:
        return layout_names[arm[0]] + (f", AdamW {arm[1]}" if len(kernels) > 1 else "")

    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = arms if r % 2 == 0 else arms[::-1]
            medians = {}
            for arm in order:
                layout, kernel = arm
                tag = f"{layout}{r}" if len(kernels) == 1 else f"{layout}-{kernel}{r}"
                got = run(layout, a.procs, a.batch, a.steps, Path(tmp), tag, a.params.resolve(), a.sections, kernel)
                rates[arm] += got
                medians[arm] = statistics.median(got)
                print(f"round {r} {' '.join(arm) if len(kernels) > 1 else layout}: median {medians[arm]:.1f} img/s "
                      f"over {len(got)} windows", flush=True)
            for arm in arms[1:]:
                ratios[arm].append(medians[arm] / medians[base])
    print(f"{a.params} {' + '.join(a.sections)}, {a.steps} steps per run, {a.batch} images per step"
          f"{' of each run' if 'streams' in layouts else ''}, windows of 10 steps:")
    for arm in arms:
        print(f"  {name(arm)}: {statistics.median(rates[arm]):.1f} img/s (median of {len(rates[arm])} windows)")
    for arm, values in ratios.items():
        ratio = t_interval(values, unit="rounds")
        print(f"{name(arm)} / {name(base)}, per round {', '.join(f'{x:.2f}' for x in values)}: mean "
              f"{ratio.value:.3f}x (95% CI {ratio.low:.3f}-{ratio.high:.3f}, {ratio.method})")


if __name__ == "__main__":
    main()
