"""Throughput and peak memory of one whole MixMIM pretraining step of this suite.

A step is forward, backward and an AdamW update on a random batch with a random mask,
fp32 or bf16 autocast, on the CPU or a CUDA device. Peak memory is the process's peak
resident set (CPU) or peak allocated memory (CUDA). For the comparison with the authors'
implementation see ``vs_original.py``. ``--ablation plain`` is an ablation of this suite's
own attention, not a comparison with anyone's code: it switches the CPU fast routes off
(``F.linear`` instead of oneDNN, ``F.scaled_dot_product_attention`` with the bias instead of
the written-out attention); run it in its own process. ``--ablation windows`` keeps every
window whole with a -inf bias across groups on the CPU too (what other devices do) instead of
one segment per (window, group); its shapes do not depend on the mask, which is what
``--compile`` (``torch.compile`` of the model) needs to avoid compiling again for every new mask.

    python benchmarks/pretrain_step.py --model mixmim_base --batch 4 --precision fp32 --steps 3
    python benchmarks/pretrain_step.py --ablation windows --compile --warmup 6 --steps 5
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from mixmim.models import build_pretrainer, encoder
from mixmim.models import layers


def whole_window_plan(grid, window, groups=None, dtype=torch.float32, split_windows=True):
    """``layers.attention_plan`` with the windows never split by group (a window covering the
    whole map is still split, as on every device)."""
    return layers.attention_plan(grid, window, groups, dtype, split_windows=False)


def run(args: argparse.Namespace) -> dict[str, object]:
    if args.ablation == "plain":
        layers.onednn_linear_applies = lambda x, w: False
        layers._explicit_attention_applies = lambda x, w: False
    elif args.ablation == "windows":
        encoder.attention_plan = whole_window_plan
    torch.manual_seed(0)
    device = torch.device(args.device)
    kwargs = {} if args.img_size is None else {"img_size": args.img_size}
    model = build_pretrainer(args.model, **kwargs).to(device).train()
    run_model = torch.compile(model) if args.compile else model
    size = model.encoder.img_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    imgs = torch.randn(args.batch, 3, *size, device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.precision]

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = run_model(imgs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    t0 = time.perf_counter()
    first_loss = step()
    for _ in range(args.warmup - 1):
        step()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"model": args.model, "batch": args.batch, "img_size": size[0], "precision": args.precision,
            "device": args.device, "ablation": args.ablation, "compile": args.compile, "steps": args.steps,
            "warmup_s": round(warmup_s, 1), "s_per_step": [round(t, 3) for t in times],
            "images_per_s": round(args.batch / med, 3), "s_per_step_median": round(med, 3),
            "peak_mem_mib": round(peak_mib, 1), "first_loss": first_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mixmim_base")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ablation", choices=["none", "plain", "windows"], default="none")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        raise ValueError(f"--steps {args.steps} --warmup {args.warmup}; expected at least 1 of each")
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
