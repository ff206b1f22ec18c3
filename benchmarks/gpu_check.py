"""The GPU path, checked and timed in one script (issue 12).

On a CUDA machine, ``python benchmarks/gpu_check.py`` runs:

(a) ``parity``: the model's masked window attention (relative position bias plus the
    group restriction, -inf across groups, N = 196 tokens per window) through every SDPA
    backend that accepts it (math, memory-efficient, cuDNN; flash refuses any
    ``attn_mask``) in bf16 and fp16, forward and backward (q, k, v and the bias), each
    against an fp64 reference, with the tolerances in ``TOLERANCE``. Warnings a backend
    raises (e.g. the memory-efficient kernel padding a bias whose last dimension is not a
    multiple of 8) are reported.
(b) ``pretrain``: MixMIM-B pretraining steps (forward, backward, fused AdamW) in bf16
    autocast, eager and ``torch.compile``: images/s, peak memory, MFU, from the median of the
    timed steps (each timed alone, min and max beside it), and how many graphs were compiled
    while they ran (a new mask every step changes the group segments' sizes, which can make a
    compiled model compile again).
(c) ``finetune``: the same for the classifier (cross-entropy on random labels).
(d) ``ddp``: a short ``torchrun`` of DDP pretraining steps over NCCL on all visible GPUs, each
    rank with its own images and masks, checking that every parameter agrees across the ranks
    afterwards (they do only if the gradients were all-reduced). ``make test`` runs the same
    workers over gloo on the CPU.

MFU = forward FLOPs per image (counted by ``FlopCounterMode`` on the model as it runs,
multiply-add = 2 FLOPs) x 3 (forward + backward) x images/s / the GPU's dense bf16 peak
(``PEAK_BF16_TFLOPS`` by device name, or ``--peak-tflops``).

Without CUDA it runs what a CPU can: parity of the CPU backends (math and the fused CPU
kernel, against fp64) and the FLOP accounting, and says so. ``--out FILE`` writes every
figure as JSON (written to a temporary name, then renamed), again after each part, so that a
run stopped by a time limit keeps the parts it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

# The GPU machine runs this file from a bare copy of the checkout, with its own python3 and no
# install of this project: the repository root goes on the path (it holds `mixmim`), and the
# torchrun workers of part (d) find it the same way.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mixmim.models import build_classifier, build_pretrainer  # noqa: E402
from mixmim.models.layers import WindowAttention, group_attention_bias  # noqa: E402
from mixmim.models.masking import random_mask  # noqa: E402

# Largest |error| / largest |reference| allowed against the fp64 reference.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4,
                    "GH200": 989.4, "A100": 312.0, "L40S": 362.05, "A10G": 70.0, "L4": 121.0}

_CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# --------------------------------------------------------------------------- #
# (a) backend parity of the masked window attention
# --------------------------------------------------------------------------- #
def masked_window_inputs(batch: int = 2, heads: int = 4, grid: int = 28, window: int = 14,
                         seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """fp64 q, k, v (B, nW*h, N, d) and the model's additive bias (1, nW*h, N, N)."""
    g = torch.Generator().manual_seed(seed)
    attn = WindowAttention(32 * heads, heads, (window, window))
    with torch.no_grad():
        attn.rel_pos_table.normal_(0, 1, generator=g)
    groups = random_mask((grid // 4, grid // 4), 0.5, generator=g)
    groups = groups.reshape(1, grid // 4, 1, grid // 4, 1).expand(1, -1, 4, -1, 4).reshape(1, -1)
    nw = (grid // window) ** 2
    n = window * window
    bias = attn.relative_bias().detach().unsqueeze(0) + group_attention_bias(groups, (grid, grid), (window, window),
                                                                             torch.float32)
    bias = bias.reshape(1, nw * heads, n, n).double()
    q, k, v = (torch.randn(batch, nw * heads, n, 32, generator=g, dtype=torch.float64) for _ in range(3))
    return tuple(t.to(device) for t in (q, k, v, bias))


def attention_reference(q, k, v, bias):
    """Softmax(q k^T / sqrt(d) + bias) v, written out."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
    return scores.softmax(-1) @ v


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def backend_parity(backend: SDPBackend, dtype: torch.dtype, device: str = "cpu", bias_grad: bool = True,
                   seed: int = 0) -> dict[str, object]:
    """Errors of one SDPA backend against fp64, forward and backward; ``ok`` within ``TOLERANCE``."""
    q64, k64, v64, b64 = masked_window_inputs(seed=seed, device=device)
    leaves64 = [t.clone().requires_grad_() for t in (q64, k64, v64, b64)]
    ref = attention_reference(*leaves64)
    gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(device)
    ref_grads = torch.autograd.grad(ref, leaves64, gy)

    leaves = [t.to(dtype).requires_grad_(i < 3 or bias_grad) for i, t in enumerate((q64, k64, v64, b64))]
    row = {"backend": backend.name, "dtype": str(dtype).replace("torch.", ""), "device": device}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3])
                wanted = [t for t in leaves if t.requires_grad]
                got = torch.autograd.grad(out, wanted, gy.to(dtype))
        except RuntimeError as err:
            row.update(ok=None, skipped=str(err).splitlines()[0][:200])
            return row
    names = ["q", "k", "v", "bias"][:len(got)]
    errors = {"out": relative_error(out, ref)}
    errors.update({f"d{n}": relative_error(gr, rg) for n, gr, rg in zip(names, got, ref_grads, strict=False)})
    row["errors"] = {k: float(f"{v:.3g}") for k, v in errors.items()}
    row["tolerance"] = TOLERANCE[dtype]
    row["ok"] = all(e <= TOLERANCE[dtype] for e in errors.values())
    row["warnings"] = sorted({str(w.message).splitlines()[0][:160] for w in caught})
    return row


def parity_rows(device: str) -> list[dict[str, object]]:
    if device == "cuda":
        cases = [(b, dt, True) for dt in (torch.bfloat16, torch.float16)
                 for b in (SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                           SDPBackend.FLASH_ATTENTION)]
    else:  # the fused CPU kernel gives no bias gradient, so its bias is a constant there
        cases = [(SDPBackend.MATH, dt, True) for dt in (torch.float32, torch.bfloat16)]
        cases += [(SDPBackend.FLASH_ATTENTION, dt, False) for dt in (torch.float32, torch.bfloat16)]
    return [backend_parity(b, dt, device, bias_grad=bg) for b, dt, bg in cases]


# --------------------------------------------------------------------------- #
# FLOP accounting and MFU
# --------------------------------------------------------------------------- #
def forward_flops_per_image(model: torch.nn.Module, img_size: int, kind: str, device: str = "cpu") -> int:
    """FLOPs (multiply-add = 2) of one training-mode forward pass of one image."""
    x = torch.randn(1, 3, img_size, img_size, device=device)
    with FlopCounterMode(display=False, custom_mapping={_CPU_FLASH: _cpu_flash_flops}) as counter:
        if kind == "pretrain":
            mask = random_mask(model.encoder.mask_grid, model.mask_ratio, device=torch.device(device))
            model(x, mask=mask)
        else:
            model(x)
    return counter.get_total_flops()


def mfu(flops_per_image_fwd: float, images_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: 3 x forward FLOPs per image x images/s / peak FLOP/s."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops}; expected the device's positive peak FLOP/s")
    return 3.0 * flops_per_image_fwd * images_per_s / peak_flops


def peak_bf16_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """The dense bf16 peak of a GPU by name (longest matching key), or the override."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


# --------------------------------------------------------------------------- #
# (b, c) timed training steps
# --------------------------------------------------------------------------- #
def compiled_graphs() -> int:
    """How many graphs ``torch.compile`` has made in this process so far."""
    from torch._dynamo.utils import counters  # noqa: PLC0415  (dynamo only where steps are timed)

    return int(counters["stats"]["unique_graphs"])


def time_steps(kind: str, model_name: str, batch: int, img_size: int, compile_model: bool, steps: int,
               warmup: int, device: str = "cuda", peak: float | None = None) -> dict[str, object]:
    torch.manual_seed(0)
    if kind == "pretrain":
        model = build_pretrainer(model_name, img_size=img_size).to(device).train()
    else:
        model = build_classifier(model_name, num_classes=1000, img_size=img_size).to(device).train()
    fwd_flops = forward_flops_per_image(model, img_size, kind, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    run = torch.compile(model) if compile_model else model
    imgs = torch.randn(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16)

    def step():
        with autocast:
            loss = run(imgs).loss if kind == "pretrain" else F.cross_entropy(run(imgs), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    graphs_before = compiled_graphs()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    row = {"kind": kind, "model": model_name, "batch": batch, "img_size": img_size, "compile": compile_model,
           "steps": steps, "warmup_s": round(warm_s, 1), "s_per_step": round(dt, 4),
           "s_per_step_min_max": [round(min(times), 4), round(max(times), 4)],
           "images_per_s": round(batch / dt, 1), "fwd_gflops_per_image": round(fwd_flops / 1e9, 2),
           "fwd_flops_per_image": fwd_flops, "loss": round(loss.item(), 4),
           # Graphs compiled during the timed steps: the masks change every step, and with them the sizes
           # of the group segments, so a compiled model may compile again while it is being timed.
           "graphs_compiled_while_timed": compiled_graphs() - graphs_before}
    if device == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if peak:
        row["mfu"] = round(mfu(fwd_flops, batch / dt, peak), 4)
    return row


# --------------------------------------------------------------------------- #
# (d) DDP over NCCL (over gloo on the CPU in make test)
# --------------------------------------------------------------------------- #
def ddp_worker(model_name: str, batch: int, img_size: int, steps: int, backend: str = "nccl",
               sync: bool = True) -> None:
    """One rank of part (d): ``steps`` timed DDP pretraining steps after one untimed step; rank 0
    prints the figures as one JSON line.

    Each rank draws its own images and masks, as a distributed sampler would hand out different
    ones, so the ranks' parameters agree afterwards only if their gradients were all-reduced:
    that is what ``params_agree`` checks, over every parameter. ``backend`` "nccl" runs on the
    rank's GPU in bf16 autocast with fused AdamW; "gloo" runs on the CPU in fp32, which is how
    ``make test`` checks the launch, the gradient exchange and the report without a GPU.
    ``sync=False`` skips the DDP wrapper (the test that the check can fail)."""
    import torch.distributed as dist

    cuda = backend == "nccl"
    if cuda:  # the device first, as the PyTorch DDP tutorial asks: it avoids hangs and memory on GPU 0
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)  # the same initial weights on every rank
    model = build_pretrainer(model_name, img_size=img_size).to(device)
    run = torch.nn.parallel.DistributedDataParallel(model) if sync else model
    opt = torch.optim.AdamW(run.parameters(), lr=1e-4, fused=cuda)
    torch.manual_seed(1 + rank)  # each rank its own images and masks
    imgs = torch.randn(batch, 3, img_size, img_size, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)
    wait = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = 0.0
    for i in range(steps + 1):
        if i == 1:
            wait()
            t0 = time.perf_counter()
        with autocast:
            loss = run(imgs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    wait()
    dt = (time.perf_counter() - t0) / steps
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    gap = (flat - ref).abs().max()
    dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps({"ddp_backend": backend, "ddp_world_size": world, "s_per_step": round(dt, 4),
                          "images_per_s_total": round(batch * world / dt, 1), "params_agree": gap.item() == 0.0,
                          "params_max_gap": gap.item()}), flush=True)
    # Without this, 2-rank gloo runs under torch 2.11 (the GPU image's release) hung at exit in 3 of 4
    # tries: the wrapper (which holds the group) goes first, and no rank leaves while another still works.
    del run
    dist.barrier()
    dist.destroy_process_group()


def run_ddp(model_name: str, batch: int, img_size: int, steps: int, nproc: int | None = None,
            backend: str | None = None, sync: bool = True, timeout_s: float = 900) -> dict[str, object]:
    """Part (d): ``torchrun`` of :func:`ddp_worker` on ``nproc`` ranks (default: every visible GPU),
    over NCCL when CUDA is there, else gloo; the workers' report, or their exit code and output tail."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    nproc = torch.cuda.device_count() if nproc is None else nproc
    if nproc < 1:
        raise ValueError(f"nproc={nproc}; expected at least one rank (no GPU is visible: pass nproc for gloo)")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", __file__,
           "--ddp-worker", "--ddp-backend", backend, "--model", model_name, "--batch", str(batch),
           "--img-size", str(img_size), "--steps", str(steps)] + ([] if sync else ["--ddp-no-sync"])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        out = err.stdout or ""  # bytes here even with text=True: what was read before the kill
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        return {"ddp_ok": False, "timed_out_s": timeout_s, "tail": out[-2000:]}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        return {"ddp_ok": False, "returncode": done.returncode, "tail": (done.stdout + done.stderr)[-2000:]}
    return {"ddp_ok": True, **json.loads(lines[-1])}


# --------------------------------------------------------------------------- #
def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="parity,pretrain,finetune,ddp",
                        help="comma-separated subset of parity, pretrain, finetune, ddp")
    parser.add_argument("--model", default="mixmim_base")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", default="eager,compiled",
                        help="comma-separated subset of eager, compiled: how parts (b) and (c) run the model")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ddp-backend", default="nccl", choices=["nccl", "gloo"], help=argparse.SUPPRESS)
    parser.add_argument("--ddp-no-sync", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args.model, args.batch, args.img_size, args.steps, args.ddp_backend, sync=not args.ddp_no_sync)
        return {}
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - {"parity", "pretrain", "finetune", "ddp"})
    if unknown:
        raise ValueError(f"--parts names {unknown}; expected a subset of parity, pretrain, finetune, ddp")
    mode_names = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not mode_names or set(mode_names) - {"eager", "compiled"}:
        raise ValueError(f"--modes {args.modes!r}; expected eager, compiled or both, comma-separated")
    modes = [m == "compiled" for m in ("eager", "compiled") if m in mode_names]
    cuda = torch.cuda.is_available()
    report: dict[str, object] = {"torch": torch.__version__, "cuda": cuda}

    def save() -> None:
        """Write what has been measured so far: a run stopped by a time limit keeps its finished parts."""
        if args.out:
            write_json(args.out, report)

    if not cuda:
        print("no CUDA device: running the CPU parts only (CPU backend parity, FLOP accounting); "
              "no GPU figures are produced", flush=True)
        report["parity"] = parity_rows("cpu")
        for row in report["parity"]:
            print(json.dumps(row), flush=True)
        save()
        model = build_pretrainer("mixmim_tiny")
        report["flops_tiny_pretrain_fwd_per_image"] = forward_flops_per_image(model, 64, "pretrain")
        print(f"mixmim_tiny pretraining forward: {report['flops_tiny_pretrain_fwd_per_image'] / 1e9:.3f} GFLOP/image")
    else:
        name = torch.cuda.get_device_name(0)
        peak = peak_bf16_flops(name, args.peak_tflops)
        report.update(device=name, peak_bf16_tflops=peak / 1e12 if peak else None,
                      devices=torch.cuda.device_count())
        print(f"{name} x{torch.cuda.device_count()}, torch {torch.__version__}, "
              f"bf16 peak {peak / 1e12 if peak else 'unknown (pass --peak-tflops)'} TFLOP/s", flush=True)
        save()
        if "parity" in parts:
            report["parity"] = parity_rows("cuda")
            for row in report["parity"]:
                print(json.dumps(row), flush=True)
            save()
        for kind in ("pretrain", "finetune"):
            if kind not in parts:
                continue
            rows = []
            for compiled in modes:
                try:
                    rows.append(time_steps(kind, args.model, args.batch, args.img_size, compiled, args.steps,
                                           args.warmup, "cuda", peak))
                except Exception as err:  # report and go on with the other parts
                    rows.append({"kind": kind, "compile": compiled, "error": f"{type(err).__name__}: {err}"[:500]})
                print(json.dumps(rows[-1]), flush=True)
                report[kind] = rows
                save()
                torch.cuda.empty_cache()
        if "ddp" in parts:
            report["ddp"] = run_ddp(args.model, min(args.batch, 64), args.img_size, 5)
            print(json.dumps(report["ddp"]), flush=True)
    save()
    return report


if __name__ == "__main__":
    main()
