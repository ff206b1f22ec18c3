"""DVC stage: k-NN and linear probe on frozen encoder features (mixmim.probes).

    python stages/probe.py --params params.yaml --sections probe --dataset imagenet --seed 0 \
        --init runs/pretrain/s0/pretrain.pt --variant imagenet-pretrained \
        --metrics metrics/probe_imagenet_pretrained_s0.json

Without --init the encoder is randomly initialised under the seed (the control), with the
architecture of --arch-from (a pretraining checkpoint) unless the section names a model. Writes the
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
    p.add_argument("--init", default=None, help="checkpoint to probe; omit for the random-init control")
    p.add_argument("--arch-from", default=None,
                   help="pretraining checkpoint whose architecture (not weights) the encoder copies when the "
                        "section sets no model (default: --init); gives the control the pretrained run's shape")
    p.add_argument("--variant", default=None, help="run name suffix (default: <dataset>-<pretrained|random>)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random init and the feature subset")
    p.add_argument("--metrics", required=True)
    a = p.parse_args(argv)
    variant = a.variant or f"{a.dataset}-{'pretrained' if a.init else 'random'}"
    return stage_main("stages/probe.py", lambda: probe_stage(
        load_params(a.params), a.sections, variant, a.dataset, a.init, a.metrics, seed=a.seed, arch_from=a.arch_from))


if __name__ == "__main__":
    sys.exit(main())
