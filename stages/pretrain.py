"""DVC stage: MixMIM pretraining. Reads params sections, runs mixmim.engine, writes outs.

    python stages/pretrain.py --params params.yaml --sections pretrain --variant default \
        --run-dir runs/pretrain --metrics metrics/pretrain.json --plots plots/pretrain.csv
"""

from __future__ import annotations

import argparse
import sys

from mixmim.pipeline import load_params, pretrain_stage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--sections", nargs="+", default=["pretrain"], help="params sections, later ones override")
    p.add_argument("--variant", default="default")
    p.add_argument("--run-dir", required=True, help="checkpoints and weights (kept across kills to resume)")
    p.add_argument("--metrics", required=True)
    p.add_argument("--plots", required=True)
    a = p.parse_args(argv)
    pretrain_stage(load_params(a.params), a.sections, a.variant, a.run_dir, a.metrics, a.plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
