"""Where a pretraining step's time goes: self CPU time per operator, this suite beside the
authors' implementation (laid by ``../shared/bench-original/lay_original.sh``), from
``torch.profiler`` over one step (forward, backward, AdamW) after warm-up steps.

    python benchmarks/profile_step.py /tmp/mixmim-original --precision fp32 --top 30
    python benchmarks/profile_step.py /tmp/mixmim-original --only ours --shapes   # by input shape

Profiler times include its own overhead and, on a shared machine, other jobs; compare the
two columns of one run, not runs with each other.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_original import build_sides, load_original  # noqa: E402


def self_cpu_table(model, loss_of, x, precision: str, warmup: int, group_by_shape: bool):
    """{op name (with shapes when asked): (self CPU ms, calls)} over one step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step():
        with ctx:
            loss = loss_of(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=group_by_shape) as prof:
        step()
    table = {}
    for ev in prof.key_averages(group_by_input_shape=group_by_shape):
        key = ev.key + (f" {ev.input_shapes}" if group_by_shape else "")
        table[key] = (ev.self_cpu_time_total / 1e3, ev.count)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("original", type=Path, help="folder laid by lay_original.sh")
    parser.add_argument("--model", default="mixmim_base")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--only", choices=["ours", "original"])
    parser.add_argument("--shapes", action="store_true", help="group operators by input shapes")
    args = parser.parse_args()
    sides = build_sides(load_original(args.original), args.model)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    names = [args.only] if args.only else ["ours", "original"]
    tables = {k: self_cpu_table(*sides[k], x, args.precision, args.warmup, args.shapes) for k in names}
    keys = sorted({k for t in tables.values() for k in t}, key=lambda k: -max(t.get(k, (0, 0))[0] for t in tables.values()))
    print(f"{args.model}, batch {args.batch}, {args.img_size} px, {args.precision}, {torch.get_num_threads()} threads; "
          "self CPU ms (calls)")
    print(f"{'operator':60s}" + "".join(f"{n:>22s}" for n in names))
    for key in keys[: args.top]:
        cells = "".join(f"{tables[n].get(key, (0, 0))[0]:14.1f} ({tables[n].get(key, (0, 0))[1]:4d})" for n in names)
        print(f"{key[:60]:60s}{cells}")
    print(f"{'total':60s}" + "".join(f"{sum(v[0] for v in tables[n].values()):22.1f}" for n in names))


if __name__ == "__main__":
    main()
