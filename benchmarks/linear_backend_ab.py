"""Our MixMIM pretraining step with its fp32 linear products by oneDNN against the BLAS, on this CPU.

``mixmim.models.layers.CPU_LINEAR_BACKEND`` chooses by CPU vendor (oneDNN on AMD, the BLAS, i.e.
MKL, elsewhere). This script measures the choice on the machine it runs on: one model, one
optimizer and one input, and the two backends alternating round by round in one process (the
order flips every round). In each round every backend runs one untimed step, then one timed
step, so that each timed step follows a step of its own backend. It prints the median step time
of each and the median of the per-round ratios (oneDNN time / BLAS time: above 1, the BLAS is
faster) with a 95% bootstrap interval.

    python benchmarks/linear_backend_ab.py --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_original import bootstrap_median_ci, machine, make_step  # noqa: E402  (sibling benchmark script)

from mixmim.models import build_pretrainer, layers  # noqa: E402

BACKENDS = ("onednn", "blas")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mixmim_base")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if args.rounds < 2 or args.batch < 1:
        raise ValueError(f"--rounds {args.rounds} --batch {args.batch}; expected at least 2 rounds and 1 image")
    if layers._ONEDNN_LINEAR is None:
        raise SystemExit("this torch build has no oneDNN linear op; nothing to compare")
    here = machine()  # before the rounds switch the backend: it names the automatic choice
    torch.manual_seed(0)
    model = build_pretrainer(args.model)
    size = model.encoder.img_size
    step = make_step(model, lambda m, x: m(x).loss, torch.randn(args.batch, 3, *size), "fp32")
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for backend in BACKENDS:  # warm-up, not timed
        layers.CPU_LINEAR_BACKEND = backend
        step()
    for r in range(args.rounds):
        for backend in BACKENDS if r % 2 == 0 else BACKENDS[::-1]:
            layers.CPU_LINEAR_BACKEND = backend
            step()
            times[backend].append(step())
    ratios = [o / b for o, b in zip(times["onednn"], times["blas"], strict=True)]
    lo, hi = bootstrap_median_ci(ratios)
    print(f"machine: {here}")
    print(f"{args.model}, batch {args.batch}, {size[0]} px, fp32, {args.rounds} rounds")
    print("step seconds:", {k: [round(t, 3) for t in v] for k, v in times.items()})
    print(f"median step: oneDNN {statistics.median(times['onednn']):.3f} s, BLAS {statistics.median(times['blas']):.3f} s; "
          f"oneDNN / BLAS (median of per-round ratios) {statistics.median(ratios):.3f}, 95% CI [{lo:.3f}, {hi:.3f}]")


if __name__ == "__main__":
    main()
