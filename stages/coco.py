"""DVC stage: COCO Mask R-CNN transfer (Table 4), from a pretraining checkpoint or from scratch.

    python stages/coco.py --params params.yaml --sections coco --variant default \
        --init runs/pretrain/pretrain.pt --run-dir runs/coco --metrics metrics/coco.json --plots plots/coco.csv
"""

from __future__ import annotations

import argparse
import sys

from mixmim.pipeline import load_params
from mixmim.transfer.stages import coco_stage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--sections", nargs="+", default=["coco"], help="params sections, later ones override")
    p.add_argument("--variant", default="default", help="run name suffix")
    p.add_argument("--init", default=None, help="pretraining weights; omit to use the section's init (or none)")
    p.add_argument("--run-dir", required=True, help="checkpoints and weights (kept across kills to resume)")
    p.add_argument("--metrics", required=True)
    p.add_argument("--plots", required=True)
    a = p.parse_args(argv)
    coco_stage(load_params(a.params), a.sections, a.variant, a.init, a.run_dir, a.metrics, a.plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
