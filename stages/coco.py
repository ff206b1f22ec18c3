"""DVC stage: COCO Mask R-CNN transfer (Table 4), from a pretraining checkpoint or from scratch.

    python stages/coco.py --params params.yaml --sections coco --variant default --seed 0 \
        --init runs/pretrain/s0/pretrain.pt --run-dir runs/coco/default/s0 --metrics metrics/coco_s0.json \
        --plots plots/coco_s0.csv
"""

from __future__ import annotations

import sys

from mixmim.dense_stages import coco_stage
from mixmim.pipeline import load_params, stage_main, stage_parser


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__, ["coco"])
    p.add_argument("--init", default=None, help="pretraining weights; omit to use the section's init (or none)")
    a = p.parse_args(argv)
    return stage_main("stages/coco.py", lambda: coco_stage(
        load_params(a.params), a.sections, a.variant or "default", a.init, a.run_dir, a.metrics, a.plots,
        seed=a.seed))


if __name__ == "__main__":
    sys.exit(main())
