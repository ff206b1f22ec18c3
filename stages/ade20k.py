"""DVC stage: ADE20K UperNet transfer (Table 4), from a pretraining checkpoint or from scratch.

    python stages/ade20k.py --params params.yaml --sections ade20k --variant default --seed 0 \
        --init runs/pretrain/s0/pretrain.pt --run-dir runs/ade20k/default/s0 --metrics metrics/ade20k_s0.json \
        --plots plots/ade20k_s0.csv
"""

from __future__ import annotations

import sys

from mixmim.dense_stages import ade20k_stage
from mixmim.pipeline import load_params, stage_main, stage_parser


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__, ["ade20k"])
    p.add_argument("--init", default=None, help="pretraining weights; omit to use the section's init (or none)")
    a = p.parse_args(argv)
    return stage_main("stages/ade20k.py", lambda: ade20k_stage(
        load_params(a.params), a.sections, a.variant or "default", a.init, a.run_dir, a.metrics, a.plots,
        seed=a.seed))


if __name__ == "__main__":
    sys.exit(main())
