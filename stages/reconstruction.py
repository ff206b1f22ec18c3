"""DVC stage: the pretrained model's reconstruction error on held-out images, split into colour and structure
(mixmim.reconstruction_error).

    python stages/reconstruction.py --params params.yaml --sections reconstruction --seed 0 \
        --checkpoint runs/pretrain/s0/pretrain.pt --metrics metrics/reconstruction_s0.json

The section names one folder of images per domain as ``<roots key>/<folder under that root>`` (images the
pretraining never read) and how many of each to use. Writes the metrics JSON (per domain and pooled: loss,
colour, structure, the predict-the-mean reference and the share of it the structure removes) and, beside
it, <stem>_preds.json with the per-image values the report's intervals and tests use.
"""

from __future__ import annotations

import argparse
import sys

from mixmim.pipeline import load_params, stage_main
from mixmim.reconstruction_error import reconstruction_stage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--sections", nargs="+", default=["reconstruction"], help="params sections, later ones override")
    p.add_argument("--checkpoint", required=True, help="a pretraining checkpoint of this suite")
    p.add_argument("--seed", type=int, default=None, help="seed of the image subset and the masks")
    p.add_argument("--variant", default="default", help="the pretraining variant (an ablation's name; MLflow run name)")
    p.add_argument("--metrics", required=True)
    a = p.parse_args(argv)
    return stage_main("stages/reconstruction.py", lambda: reconstruction_stage(
        load_params(a.params), a.sections, a.checkpoint, a.metrics, seed=a.seed, variant=a.variant))


if __name__ == "__main__":
    sys.exit(main())
