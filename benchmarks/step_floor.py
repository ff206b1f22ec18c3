"""How close a MixMIM pretraining step is to the least this CPU needs for its matrix products.

A step (forward, backward, AdamW; batch 4, 224 px, fp32) of this suite makes a fixed list of
matrix products: the linear layers' forward, input-gradient and weight-gradient products, and
the attention's batched products. The script records that list once (shapes and calls, under a
``TorchDispatchMode``, where the model takes its plain ``F.linear`` route), then times every
distinct product alone in a loop, warm, by the library our model's forward takes for a product of
that shape on this machine (oneDNN for large fp32 products on AMD, the BLAS otherwise;
``torch.bmm`` for the attention), and the AdamW step alone on the model's gradients. Their sum is the *floor*: what a
step computing these products would take with nothing else to do and every operand in cache.

Beside it the script times whole steps, each after an untimed step of its own side (as
``vs_original.py --steady``), of this suite and, when its folder is given, of the original
(laid by ``../shared/bench-original/lay_original.sh``), the two sides alternating. The
original computes the same linear products but attends over whole windows with a mask, so its
attention products are twice ours; its floor is printed too (a product both sides make is timed once
and counted for both). What is left above the floor is
everything else: the attention's softmax and copies, norms, GELU, bias gradients, layout copies,
page faults and cache misses. ``original step / our floor`` bounds what any change to this
suite that keeps its products could give against the original on this machine.

    python benchmarks/step_floor.py --original /tmp/mixmim-original --rounds 6
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixmim.models import build_pretrainer
from mixmim.models import layers as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_original import bootstrap_median_ci, build_sides, load_original, machine, make_step  # noqa: E402

_aten = torch.ops.aten
#: product kind of each recorded ATen op
PRODUCTS = {_aten.mm.default: "linear", _aten.addmm.default: "linear", _aten.bmm.default: "attention"}
Product = tuple[str, tuple[int, ...]]  # (kind, (m, k, n) or (batch, m, k, n))


class _RecordProducts(TorchDispatchMode):
    """Counts every matrix product by kind and shape."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[Product] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = PRODUCTS.get(func)
        if kind is not None:
            a, b = (args[1], args[2]) if func is _aten.addmm.default else (args[0], args[1])
            shape = (*a.shape, b.shape[-1])  # (m, k, n) or (batch, m, k, n)
            self.counts[(kind, tuple(int(s) for s in shape))] += 1
        return func(*args, **(kwargs or {}))


def step_products(model: torch.nn.Module, loss_of: Callable, x: torch.Tensor) -> collections.Counter[Product]:
    """The matrix products of one forward and backward, by (kind, shape): calls."""
    with _RecordProducts() as rec:
        loss_of(model, x).backward()
    model.zero_grad(set_to_none=True)
    return rec.counts


def flops(products: collections.Counter[Product], kind: str | None = None) -> int:
    """Floating-point operations (2 per multiply-add) of the products of ``kind`` (all when None)."""
    total = 0
    for (k, shape), calls in products.items():
        if kind is None or k == kind:
            macs = 1
            for s in shape:
                macs *= s
            total += 2 * macs * calls
    return total


def product_seconds(kind: str, shape: tuple[int, ...], reps: int) -> float:
    """Median seconds of one product of this shape alone, by the library the model uses for it."""
    if kind == "attention":
        batch, m, k, n = shape
        a, b = torch.randn(batch, m, k), torch.randn(batch, k, n)

        def run():
            return torch.bmm(a, b)
    else:
        m, k, n = shape
        a, w = torch.randn(m, k), torch.randn(n, k)
        if L.onednn_linear_applies(a, w):
            def run():
                return L._onednn_mm(a, w)
        else:
            wt = w.t()

            def run():
                return a.mm(wt)
    run()
    run()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def products_seconds(products: collections.Counter[Product], timings: dict[Product, float]) -> dict[str, float]:
    """Seconds per step of the products of each kind, from each distinct product's time alone."""
    out: dict[str, float] = collections.defaultdict(float)
    for product, calls in products.items():
        out[product[0]] += calls * timings[product]
    return dict(out)


def adamw_seconds(sides: dict[str, tuple[torch.nn.Module, Callable]], x: torch.Tensor, reps: int) -> dict[str, float]:
    """Median seconds of the benchmark's AdamW step alone on each side's gradients of one real
    step, the sides alternating (their parameters are the same tensors in number and size)."""
    opts = {}
    for name, (model, loss_of) in sides.items():
        opts[name] = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_of(model, x).backward()
        opts[name].step()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(reps):
        for name, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t)
    for model, _ in sides.values():
        model.zero_grad(set_to_none=True)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", type=Path, help="folder laid by lay_original.sh (optional)")
    p.add_argument("--rounds", type=int, default=6, help="timed steps per side")
    p.add_argument("--reps", type=int, default=7, help="timings of each distinct product")
    p.add_argument("--model", default="mixmim_base")
    p.add_argument("--batch", type=int, default=4)
    a = p.parse_args()
    if a.rounds < 1 or a.reps < 1:
        raise SystemExit(f"--rounds {a.rounds}, --reps {a.reps}; expected at least 1 each")
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, 224, 224)
    if a.original is not None:
        sides = build_sides(load_original(a.original), a.model)
    else:
        sides = {"ours": (build_pretrainer(a.model), lambda m, x: m(x).loss)}

    prods = {}
    for name, (model, loss_of) in sides.items():
        torch.manual_seed(1)  # a fixed seed for the recorded step (our attention products follow the mask)
        prods[name] = step_products(model, loss_of, x)
    # a product both sides make is timed once, so that the same work gets the same time
    distinct = sorted(set().union(*prods.values()))
    timings = {product: product_seconds(*product, a.reps) for product in distinct}
    adamw = adamw_seconds(sides, x, a.reps)
    floors = {name: {**products_seconds(prods[name], timings), "AdamW": adamw[name]} for name in sides}

    steps: dict[str, list[float]] = {name: [] for name in sides}
    step_of = {name: make_step(m, loss_of, x, "fp32") for name, (m, loss_of) in sides.items()}
    order = list(sides)
    for r in range(a.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            step_of[name](record=False)  # each timed step after an untimed one of its own side
            steps[name].append(step_of[name]())

    print(f"machine: {machine()}")
    print(f"{a.model}, batch {a.batch}, 224 px, fp32; steps: median of {a.rounds} (each after an untimed one of "
          f"its own side, sides alternating); each distinct product timed alone {a.reps} times (median)")
    print(f"{'':<34}" + "".join(f"{n:>12}" for n in sides))
    rows = [
        ("linear products, GFLOP", lambda n: f"{flops(prods[n], 'linear') / 1e9:.1f}"),
        ("attention products, GFLOP", lambda n: f"{flops(prods[n], 'attention') / 1e9:.1f}"),
        ("linear products alone, s", lambda n: f"{floors[n].get('linear', 0.0):.3f}"),
        ("  rate, GFLOP/s", lambda n: f"{flops(prods[n], 'linear') / floors[n]['linear'] / 1e9:.0f}"),
        ("attention products alone, s", lambda n: f"{floors[n].get('attention', 0.0):.3f}"),
        ("  rate, GFLOP/s", lambda n: f"{flops(prods[n], 'attention') / floors[n]['attention'] / 1e9:.0f}"
         if floors[n].get("attention") else "-"),
        ("AdamW step alone, s", lambda n: f"{floors[n]['AdamW']:.3f}"),
        ("floor (sum), s", lambda n: f"{sum(floors[n].values()):.3f}"),
        ("step, s (median)", lambda n: f"{statistics.median(steps[n]):.3f}"),
        ("step above the floor, s", lambda n: f"{statistics.median(steps[n]) - sum(floors[n].values()):.3f}"),
    ]
    for label, cell in rows:
        print(f"{label:<34}" + "".join(f"{cell(n):>12}" for n in sides))
    ours_floor = sum(floors["ours"].values())
    lo, hi = bootstrap_median_ci([s / ours_floor for s in steps["ours"]])
    print(f"our step / our floor: {statistics.median(steps['ours']) / ours_floor:.2f} "
          f"(95% CI {lo:.2f}-{hi:.2f}, n = {a.rounds} steps)")
    if "original" in sides:
        ratios = [o / s for o, s in zip(steps["original"], steps["ours"], strict=True)]
        lo, hi = bootstrap_median_ci(ratios)
        print(f"speed-up, original / ours: {statistics.median(ratios):.3f}x (95% CI {lo:.3f}-{hi:.3f}, "
              f"n = {a.rounds} rounds)")
        bound = [o / ours_floor for o in steps["original"]]
        lo, hi = bootstrap_median_ci(bound)
        print(f"original step / our floor (the most any change keeping our products could give): "
              f"{statistics.median(bound):.2f}x (95% CI {lo:.2f}-{hi:.2f}, n = {a.rounds} steps)")


if __name__ == "__main__":
    main()
