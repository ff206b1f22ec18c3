"""DVC stage: classification finetuning, from a pretraining checkpoint or from scratch.

    python stages/finetune.py --params params.yaml --sections finetune.common finetune.datasets.inat2018 \
        --stage finetune --dataset inat2018 --seed 0 --init runs/pretrain/s0/pretrain.pt \
        --run-dir runs/finetune/inat2018/s0 --metrics metrics/finetune_inat2018_s0.json \
        --plots plots/finetune_inat2018_s0.csv
"""

from __future__ import annotations

import sys

from mixmim.pipeline import finetune_stage, load_params, stage_main, stage_parser


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__, None)
    p.add_argument("--stage", default="finetune", choices=["finetune", "scratch", "linear_probe"])
    p.add_argument("--dataset", required=True)
    p.add_argument("--init", default=None, help="pretraining weights; omit to train from scratch")
    a = p.parse_args(argv)
    return stage_main("stages/finetune.py", lambda: finetune_stage(
        load_params(a.params), a.sections, a.stage, a.variant or a.dataset, a.dataset, a.init, a.run_dir,
        a.metrics, a.plots, seed=a.seed))


if __name__ == "__main__":
    sys.exit(main())
