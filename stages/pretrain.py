"""DVC stage: MixMIM pretraining. Reads params sections, runs mixmim.engine, writes outs.

    python stages/pretrain.py --params params.yaml --sections pretrain --variant default --seed 0 \
        --run-dir runs/pretrain/s0 --metrics metrics/pretrain_s0.json --plots plots/pretrain_s0.csv

The weights later stages read are <run-dir>/pretrain.pt and <run-dir>/mlflow_run.json.
"""

from __future__ import annotations

import sys

from mixmim.pipeline import load_params, pretrain_stage, stage_main, stage_parser


def main(argv: list[str] | None = None) -> int:
    a = stage_parser(__doc__, ["pretrain"]).parse_args(argv)
    return stage_main("stages/pretrain.py", lambda: pretrain_stage(
        load_params(a.params), a.sections, a.variant or "default", a.run_dir, a.metrics, a.plots, seed=a.seed))


if __name__ == "__main__":
    sys.exit(main())
