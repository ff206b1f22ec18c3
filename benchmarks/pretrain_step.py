"""Throughput and peak memory of one whole MixMIM pretraining step.

A step is forward, backward and an AdamW update on a random batch with a random mask.
Two attention implementations of the same math are compared:

- ``sdpa``: the model as shipped; ``F.scaled_dot_product_attention`` with one additive
  bias (relative position + group restriction) whose group part is built once per stage;
- ``naive``: a straightforward version kept here only for comparison; every block
  repeats the mask over the batch, builds its own group restriction, adds
  ``-1e30`` where groups differ and materialises the softmax, as the original code does.

Each variant runs in its own subprocess so that its peak resident memory (CPU) or peak
allocated memory (CUDA) is its own. Usage:

    python benchmarks/pretrain_step.py --model mixmim_base --batch 4 --img-size 224 \
        --precision fp32 --steps 3 --compare
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch
from torch import Tensor

from mixmim.models import build_pretrainer
from mixmim.models.layers import WindowAttention


def naive_window_attention(self: WindowAttention, x: Tensor, group_bias: Tensor | None = None) -> Tensor:
    """Masked-softmax attention written out, with the mask rebuilt in every block."""
    b, nw, n, c = x.shape
    h = self.num_heads
    qkv = self.qkv(x).view(b * nw, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = (q * (c // h) ** -0.5) @ k.transpose(-2, -1)
    attn = attn + self.relative_bias().unsqueeze(0)
    if group_bias is not None:
        # Recover the group of every token of every window, then repeat over the batch.
        groups = (group_bias[:, 0, 0, :] == 0).to(x.dtype)  # (nW, N): 1 = same group as token 0
        groups = groups.repeat(b, 1).unsqueeze(-1)  # (B*nW, N, 1)
        same = groups @ groups.transpose(1, 2) + (1 - groups) @ (1 - groups).transpose(1, 2)
        attn = attn - 1e30 * (1 - same).unsqueeze(1)
    attn = attn.softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, nw, n, c)
    return self.proj_drop(self.proj(out))


def run_variant(args: argparse.Namespace) -> dict[str, object]:
    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.attention == "naive":
        WindowAttention.forward = naive_window_attention
    kwargs = {} if args.img_size is None else {"img_size": args.img_size}
    model = build_pretrainer(args.model, **kwargs).to(device).train()
    size = model.encoder.img_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    imgs = torch.randn(args.batch, 3, *size, device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.precision]

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(imgs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first_loss = step()  # also a warm-up step
    for _ in range(args.warmup - 1):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "attention": args.attention, "model": args.model, "batch": args.batch, "img_size": size[0],
        "precision": args.precision, "device": args.device, "steps": args.steps,
        "images_per_s": round(args.batch * args.steps / elapsed, 3),
        "s_per_step": round(elapsed / args.steps, 3), "peak_mem_mib": round(peak_mib, 1),
        "first_loss": first_loss,
    }


def describe_machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mixmim_base")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attention", choices=["sdpa", "naive"], default="sdpa")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    parser.add_argument("--compare", action="store_true", help="run both variants, each in a subprocess")
    args = parser.parse_args()
    if not args.compare:
        print(json.dumps(run_variant(args)))
        return
    rows = []
    for attention in ("naive", "sdpa"):
        cmd = [sys.executable, __file__] + [a for a in sys.argv[1:] if a != "--compare"]
        cmd += ["--attention", attention]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    naive, sdpa = rows
    print(f"machine: {describe_machine(args.device)}; torch {torch.__version__}")
    print("| attention | model | batch | img | precision | images/s | s/step | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attention']} | {r['model']} | {r['batch']} | {r['img_size']} | {r['precision']} | "
              f"{r['images_per_s']} | {r['s_per_step']} | {r['peak_mem_mib']} |")
    print(f"first-step loss naive {naive['first_loss']:.6f}, sdpa {sdpa['first_loss']:.6f} (same math)")
    print(f"speedup sdpa/naive: {sdpa['images_per_s'] / naive['images_per_s']:.2f}x; "
          f"peak memory sdpa/naive: {sdpa['peak_mem_mib'] / naive['peak_mem_mib']:.2f}")


if __name__ == "__main__":
    main()
