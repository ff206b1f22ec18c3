"""DVC stage: k-NN and linear probe on frozen encoder features (mixmim.probes).

    python stages/probe.py --params params.yaml --sections probe --dataset imagenet --seed 0 \
        --checkpoint runs/pretrain/s0/pretrain.pt --weights pretrained \
        --metrics metrics/probe_imagenet_pretrained_s0.json

--weights pretrained probes the checkpoint's encoder; --weights random probes a randomly initialised
encoder of the same architecture (the control; weights drawn under --seed). The architecture
is the one saved in the checkpoint unless the params section names a model. Writes the
metrics JSON and, beside it, <stem>_knn_preds.json and <stem>_linear_preds.json (per-image
records, validation order).
"""

from __future__ import annotations

import argparse
import sys

from mixmim.pipeline import load_params, stage_main
from mixmim.probes import probe_stage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--sections", nargs="+", default=["probe"], help="params sections, later ones override")
    p.add_argument("--dataset", required=True, help="a classification dataset named in the params file's roots")
    p.add_argument("--checkpoint", default=None, help="a pretraining checkpoint of this suite (or a release)")
    p.add_argument("--weights", choices=("pretrained", "random"), default="pretrained",
                   help="probe the checkpoint's weights, or a random encoder of its architecture (the control)")
    p.add_argument("--variant", default=None, help="run name suffix (default: <dataset>-<weights>)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random init and of the feature subset")
    p.add_argument("--metrics", required=True)
    a = p.parse_args(argv)
    if a.weights == "pretrained" and not a.checkpoint:
        p.error("--weights pretrained needs --checkpoint")
    variant = a.variant or f"{a.dataset}-{a.weights}"
    weights = a.checkpoint if a.weights == "pretrained" else None
    return stage_main("stages/probe.py", lambda: probe_stage(
        load_params(a.params), a.sections, variant, a.dataset, weights, a.metrics, seed=a.seed,
        arch_from=a.checkpoint))


if __name__ == "__main__":
    sys.exit(main())
