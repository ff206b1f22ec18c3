"""DVC stage: classification finetuning, from a pretraining checkpoint or from scratch.

    python stages/finetune.py --params params.yaml --sections finetune.common finetune.datasets.inat2018 \
        --stage finetune --dataset inat2018 --init runs/pretrain/pretrain.pt --run-dir runs/finetune/inat2018 \
        --metrics metrics/finetune_inat2018.json --plots plots/finetune_inat2018.csv
"""

from __future__ import annotations

import argparse
import sys

from mixmim.pipeline import finetune_stage, load_params


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--sections", nargs="+", required=True, help="params sections, later ones override")
    p.add_argument("--stage", default="finetune", choices=["finetune", "scratch", "linear_probe"])
    p.add_argument("--variant", default=None, help="run name suffix (default: the dataset)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--init", default=None, help="pretraining weights; omit to train from scratch")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--plots", required=True)
    a = p.parse_args(argv)
    finetune_stage(load_params(a.params), a.sections, a.stage, a.variant or a.dataset, a.dataset, a.init,
                   a.run_dir, a.metrics, a.plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
