"""The AdamW update alone: the engine's optimizer as it runs on the CPU, against PyTorch's
multi-tensor (``foreach``) and fused implementations, on a model's real parameter groups.

Why: in a MixMIM-B pretraining step on the 2-core development machine the AdamW update alone took
0.19-0.24 s (``step_floor.py``, tenth session, benchmarks/SESSIONS.md), against steps of 3.3-3.6 s.
``build_adamw`` (mixmim/engine/optim.py) leaves ``foreach`` and ``fused`` unset, so on the CPU
PyTorch runs its per-parameter loop (it defaults to the multi-tensor kernels only on accelerators).
This script measures what the other two would give, and whether they compute the same numbers: a
variant that is faster but not bit-identical would change every recorded result, so it cannot
replace the default without rerunning the pipelines. A fourth variant, ``chunked``, is the default's
own sequence of element-wise operations run over one slice of a parameter at a time (``--chunk``
elements, default ``CHUNK``), so that the slice stays in cache between the operations, with one
reused buffer for the denominator: the same operations on the same elements, so it can be
bit-identical. Smaller slices fit a smaller cache but pay PyTorch's per-operation overhead more often.

Every variant updates its own copy of the parameters, with the groups ``build_adamw`` makes
(weight decay off for norms, biases and the model's listed tables) and the same gradients. Each
round runs every variant for ``--steps`` timed updates, in an order rotated from round to round;
the round's figure is each variant's median update, and the ratio is the default's over the
variant's. Printed: medians over rounds with 95% bootstrap intervals, and after ``--check-steps``
updates from equal starting points, whether each variant's parameters equal the default's bit for
bit (else the largest difference).

    python benchmarks/optimizer_step.py --model mixmim_base --rounds 8
    python benchmarks/optimizer_step.py --model mixmim_base --rounds 8 --chunk 65536
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vs_original import bootstrap_median_ci, machine  # noqa: E402  (sibling benchmark script)

from mixmim.engine.optim import build_adamw  # noqa: E402
from mixmim.models import build_pretrainer  # noqa: E402
from mixmim.models.registry import MODEL_SIZES  # noqa: E402

#: Elements per slice of the ``chunked`` variant (2 MiB of fp32 per tensor; four tensors are touched).
CHUNK = 1 << 19


class ChunkedAdamW(torch.optim.AdamW):
    """PyTorch's per-parameter AdamW update (``_single_tensor_adam`` with decoupled weight decay,
    as the engine runs it on the CPU), its element-wise operations applied slice by slice.

    Only the engine's configuration: no amsgrad, maximize, capturable or differentiable."""

    def __init__(self, params, chunk: int = CHUNK, **kwargs) -> None:
        super().__init__(params, **kwargs)
        for option in ("amsgrad", "maximize", "capturable", "differentiable"):
            if any(g[option] for g in self.param_groups):
                raise ValueError(f"ChunkedAdamW: {option}=True is not the engine's update; expected it off")
        if chunk < 1:
            raise ValueError(f"chunk={chunk}: expected at least 1 element")
        self.chunk = chunk
        self._denom = torch.empty(0)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002  (the engine passes none)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # as torch.optim.AdamW initialises it
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"].item()
                step_size = lr / (1 - beta1**step)
                bias_correction2_sqrt = (1 - beta2**step) ** 0.5
                tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
                if not all(t.is_contiguous() for t in tensors):
                    raise ValueError(f"ChunkedAdamW: a parameter of shape {tuple(p.shape)} or its gradient "
                                     "is not contiguous; expected contiguous tensors (slices of the flat view)")
                flat = [t.view(-1) for t in tensors]
                n = flat[0].numel()
                if self._denom.numel() < min(n, self.chunk):
                    self._denom = torch.empty(min(n, self.chunk))
                for start in range(0, n, self.chunk):
                    end = min(start + self.chunk, n)
                    param, grad, exp_avg, exp_avg_sq = (t[start:end] for t in flat)
                    denom = self._denom[:end - start]
                    if wd != 0:
                        param.mul_(1 - lr * wd)
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    torch.sqrt(exp_avg_sq, out=denom)
                    denom.div_(bias_correction2_sqrt).add_(eps)
                    param.addcdiv_(exp_avg, denom, value=-step_size)


#: Each variant's optimizer class, called as ``VARIANTS[name](groups, betas=betas)``.
VARIANTS = {"default": torch.optim.AdamW, "foreach": partial(torch.optim.AdamW, foreach=True),
            "fused": partial(torch.optim.AdamW, fused=True), "chunked": ChunkedAdamW}


def engine_groups(model: torch.nn.Module, lr: float, weight_decay: float,
                  betas: tuple[float, float]) -> list[dict]:
    """The parameter groups of the engine's optimizer (``build_adamw``), as (params, lr, weight_decay)."""
    opt = build_adamw(model, lr, weight_decay, betas)
    return [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]


def clone_groups(groups: list[dict]) -> list[dict]:
    """Independent leaf copies of the groups' parameters (same values), so variants never share state."""
    return [{**g, "params": [p.detach().clone().requires_grad_(True) for p in g["params"]]} for g in groups]


def gradients(groups: list[dict], seed: int) -> list[torch.Tensor]:
    """One random gradient per parameter, the same for every variant for a given ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) * 1e-3 for g in groups for p in g["params"]]


def make_optimizer(groups: list[dict], betas: tuple[float, float], variant: str,
                   variants: Mapping[str, Callable[..., torch.optim.AdamW]] = VARIANTS) -> torch.optim.AdamW:
    """The named variant's optimizer over ``groups`` (names not in ``variants`` refused)."""
    if variant not in variants:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(variants)}")
    return variants[variant](groups, betas=betas)


def set_grads(groups: list[dict], grads: list[torch.Tensor]) -> None:
    params = [p for g in groups for p in g["params"]]
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad


def compare(groups_a: list[dict], groups_b: list[dict]) -> tuple[bool, float]:
    """(bit-identical, largest absolute difference) of two groups' parameters."""
    pairs = [(a.detach(), b.detach()) for ga, gb in zip(groups_a, groups_b, strict=True)
             for a, b in zip(ga["params"], gb["params"], strict=True)]
    same = all(torch.equal(a, b) for a, b in pairs)
    return same, max(float((a - b).abs().max()) for a, b in pairs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mixmim_base", choices=sorted(MODEL_SIZES))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed updates per variant per round")
    parser.add_argument("--check-steps", type=int, default=3, help="updates before the bit-identity check")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--chunk", type=int, default=CHUNK,
                        help=f"elements per slice of the chunked variant (default {CHUNK}: 2 MiB of fp32)")
    args = parser.parse_args(argv)
    for name in ("rounds", "steps", "check_steps", "chunk"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)}: expected at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_pretrainer(args.model)
    betas, lr, wd = (0.9, 0.95), 1.5e-4, 0.05  # Table 11's betas and weight decay
    base = engine_groups(model, lr, wd, betas)
    del model
    n_params = sum(p.numel() for g in base for p in g["params"])
    n_tensors = sum(len(g["params"]) for g in base)
    print(f"machine: {machine()}")
    print(f"{args.model}: {n_tensors} parameter tensors, {n_params / 1e6:.1f} M parameters, "
          f"{len(base)} groups (build_adamw); {args.rounds} rounds of {args.steps} timed updates per variant; "
          f"chunked: {args.chunk} elements per slice")
    variants = {**VARIANTS, "chunked": partial(ChunkedAdamW, chunk=args.chunk)}

    # Bit-identity: every variant from the same start with the same gradients. These updates also
    # create each optimizer's state, so the timed updates that follow (on the last gradients) are
    # steady-state ones.
    groups = {v: clone_groups(base) for v in variants}
    opts = {v: make_optimizer(groups[v], betas, v, variants) for v in variants}
    for step in range(args.check_steps):
        grads = gradients(base, seed=step)
        for v in variants:
            set_grads(groups[v], grads)
            opts[v].step()
    for v in variants:
        if v != "default":
            same, diff = compare(groups["default"], groups[v])
            print(f"{v} after {args.check_steps} updates: " + ("bit-identical to the default" if same
                  else f"differs from the default, largest absolute difference {diff:.3g}"))
    names = list(variants)
    times: dict[str, list[float]] = {v: [] for v in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for v in order:
            per = []
            for _ in range(args.steps):
                t = time.perf_counter()
                opts[v].step()
                per.append(time.perf_counter() - t)
            times[v].append(statistics.median(per))
    for v in names:
        lo, hi = bootstrap_median_ci(times[v])
        print(f"{v}: update {1e3 * statistics.median(times[v]):.1f} ms (95% CI {1e3 * lo:.1f}-{1e3 * hi:.1f}, "
              f"n = {args.rounds} rounds)")
    for v in names[1:]:
        ratios = [d / x for d, x in zip(times["default"], times[v], strict=True)]
        lo, hi = bootstrap_median_ci(ratios)
        print(f"default / {v}: {statistics.median(ratios):.2f}x (95% CI {lo:.2f}-{hi:.2f}, n = {args.rounds} rounds)")
    print("per-round medians (ms): " + "; ".join(f"{v} " + ", ".join(f"{1e3 * t:.1f}" for t in times[v]) for v in names))


if __name__ == "__main__":
    main()
