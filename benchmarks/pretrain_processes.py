"""The default pipeline's pretraining on the CPU: one process with N threads, or N one-thread processes?

Runs the pretraining stage of ``params.yaml`` (the built-in unlabeled set, the default model and
decoder) for a few optimiser steps in both layouts, alternating, and prints the images/s the engine
measured over each logging window (the first window, warm-up, left out). The global batch is the
same in both: ``--batch`` images per step in the single process, ``--batch / N`` per process
under ``torchrun --nproc-per-node N`` (gloo). Needs the built-in data (``dvc repro prepare_data``).

    python benchmarks/pretrain_processes.py --rounds 2 --steps 60
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

from mixmim.stats import t_interval

REPO = Path(__file__).resolve().parents[1]


def run(layout: str, procs: int, batch: int, steps: int, tmp: Path, tag: str) -> list[float]:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    params["tracking"] = {**params["tracking"], "uri": store, "experiment": "bench"}
    params["roots"] = {k: str((REPO / v).resolve()) for k, v in params["roots"].items()}  # from the temp folder
    per_process = batch // procs if layout == "processes" else batch
    params["pretrain"].update(epochs=1, warmup_epochs=0, knn_every=0, batch_size=per_process,
                              max_steps_per_epoch=steps, log_every_steps=10, progress=False)
    pfile = tmp / f"params_{tag}.yaml"
    pfile.write_text(yaml.safe_dump(params))
    metrics = tmp / f"{tag}.json"
    script = [str(REPO / "stages" / "pretrain.py"), "--params", str(pfile), "--sections", "pretrain", "--seed", "0",
              "--run-dir", str(tmp / tag), "--metrics", str(metrics), "--plots", str(tmp / f"{tag}.csv"),
              "--variant", tag]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if layout == "processes":
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--nproc-per-node", str(procs), *script]
        env["OMP_NUM_THREADS"] = "1"
    else:
        cmd = [sys.executable, *script]
        env["OMP_NUM_THREADS"] = str(procs)
    subprocess.run(cmd, check=True, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return window_rates(store, json.loads(metrics.read_text())["run_id"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, default=2, help="threads of the one process / number of processes")
    p.add_argument("--batch", type=int, default=16, help="global batch (images per optimiser step)")
    p.add_argument("--steps", type=int, default=60, help="optimiser steps per run")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    if a.batch % a.procs:
        raise SystemExit(f"--batch {a.batch} is not divisible by --procs {a.procs}")
    if a.rounds < 2:
        raise SystemExit("--rounds must be at least 2 (the interval is over rounds)")
    rates: dict[str, list[float]] = {"threads": [], "processes": []}
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = ("threads", "processes") if r % 2 == 0 else ("processes", "threads")
            medians = {}
            for layout in order:
                got = run(layout, a.procs, a.batch, a.steps, Path(tmp), f"{layout}{r}")
                rates[layout] += got
                medians[layout] = statistics.median(got)
                print(f"round {r} {layout}: median {medians[layout]:.1f} img/s over {len(got)} windows", flush=True)
            ratios.append(medians["processes"] / medians["threads"])
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = t_interval(ratios, unit="rounds")
    print(f"1 process x {a.procs} threads: {med['threads']:.1f} img/s; {a.procs} processes x 1 thread: "
          f"{med['processes']:.1f} img/s (medians over {len(rates['threads'])} / {len(rates['processes'])} windows of "
          f"10 steps, global batch {a.batch}); per-round ratio {', '.join(f'{x:.2f}' for x in ratios)}: mean "
          f"{ratio.value:.2f}x (95% CI {ratio.low:.2f}-{ratio.high:.2f}, {ratio.method})")


if __name__ == "__main__":
    main()
