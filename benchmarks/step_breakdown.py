"""Where a pretraining step's wall time goes, by module kind, forward and backward, both sides.

``profile_step.py`` reports ``torch.profiler``'s self time per operator, which in this step
misplaces time between neighbouring operators (the same GELU of the same shape reads 10x
apart on the two sides). This script times with the wall clock instead: every module of
the chosen kinds has its forward timed directly, and identity autograd nodes placed at its
input and output stamp the moments its backward begins and ends (autograd on the CPU runs one
node at a time, so the span between the stamps is that module's backward, nested modules
included). A step is forward, backward and an AdamW step of MixMIM pretraining, batch 4,
224 px, fp32, each side in a process of its own (``--side``), after two warm-up steps;
medians over ``--steps`` steps. Kinds nest: ``Linear`` inside ``WindowAttention`` and ``Mlp``
is counted in both; the qkv and output projections of the window attention are also counted
apart (``Linear in WindowAttention``), so that the attention proper (scores, bias, softmax,
weighted sum and their gradients) is the difference. From that the script prints a bound: the
original's step over ours with our attention proper taken out, i.e. the most that any change to
our window attention alone could give against the original on this machine. On our side the
segmented attention's autograd node is also timed from inside (``segment attention node``), a
check that the stamps do not lend the attention time that belongs elsewhere, and that time is
split into the node's matrix products, its softmax and the rest (copies, bias, table gradient).

    python benchmarks/step_breakdown.py /tmp/mixmim-original --steps 3
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_original import load_original, machine  # noqa: E402  (sibling benchmark script)

KINDS = ("Linear", "Mlp", "GELU", "LayerNorm", "WindowAttention", "Attention", "PatchMerging")
PROJECTIONS = "Linear in WindowAttention"  # the window attention's qkv and output projections
PROPER = "window attention proper forward+backward"
SEGMENT_REST = "segment attention rest forward+backward"  # the node less its products and softmax


class _Stamp(torch.autograd.Function):
    """Identity whose backward calls ``stamp(key)`` when the gradient reaches it."""

    @staticmethod
    def forward(ctx, x, key, stamp):
        ctx.key, ctx.stamp = key, stamp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.stamp(ctx.key)
        return grad, None, None


def instrument(model: torch.nn.Module, kinds: tuple[str, ...]) -> dict[tuple[str, str], float]:
    """Wrap the forward of every module whose class name is in ``kinds``; returns the accumulator
    {(kind, "forward" | "backward"): seconds} the wrappers add to."""
    acc: dict[tuple[str, str], float] = collections.defaultdict(float)
    begun: dict[tuple[str, int], float] = {}

    def backward_begins(key):
        begun[key] = time.perf_counter()

    def backward_ends(key):
        if key in begun:
            acc[(key[0], "backward")] += time.perf_counter() - begun.pop(key)

    projections = {id(child) for mod in model.modules() if type(mod).__name__ == "WindowAttention"
                   for child in mod.children() if type(child).__name__ == "Linear"}
    for mod in model.modules():
        kind = type(mod).__name__
        if kind not in kinds:
            continue
        if id(mod) in projections:
            kind = PROJECTIONS
        inner = mod.forward

        def forward(x, *a, _inner=inner, _key=(kind, id(mod)), **kw):
            if torch.is_tensor(x) and x.requires_grad:
                x = _Stamp.apply(x, _key, backward_ends)
            t = time.perf_counter()
            y = _inner(x, *a, **kw)
            acc[(_key[0], "forward")] += time.perf_counter() - t
            if torch.is_tensor(y) and y.requires_grad:
                y = _Stamp.apply(y, _key, backward_begins)
            return y

        mod.forward = forward
    return acc


SEGMENTS = "segment attention node"
SEGMENT_PRODUCTS = "segment attention products"  # its batched matrix products (torch.bmm)
SEGMENT_SOFTMAX = "segment attention softmax"  # the softmax and its gradient


def time_segment_node(acc: dict[tuple[str, str], float]) -> None:
    """Time our segmented attention's forward and backward from inside its autograd node, and
    inside those, its matrix products and its softmax: the node looks up ``torch.bmm`` and the
    layers module's softmax kernels when it calls them, so wrappers put there see exactly the
    node's calls (other callers pass through uncounted). The rest of the node (q/k/v layout
    copies, the bias gather and add, the table gradient, writing outputs and gradients into the
    block's buffers) is the node's time less these two. The wrappers stay in place for the rest
    of the process, which ``measure`` runs one side in."""
    from mixmim.models import layers

    inner = layers._SegmentAttention
    inside: list[str] = []  # the direction the node is running, while it runs

    def counted(fn, kind: str):
        def wrapper(*args, **kwargs):
            if not inside:
                return fn(*args, **kwargs)
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            acc[(kind, inside[-1])] += time.perf_counter() - t
            return out

        return wrapper

    torch.bmm = counted(torch.bmm, SEGMENT_PRODUCTS)
    layers._SOFTMAX_OUT = counted(layers._SOFTMAX_OUT, SEGMENT_SOFTMAX)
    layers._SOFTMAX_BACKWARD_OUT = counted(layers._SOFTMAX_BACKWARD_OUT, SEGMENT_SOFTMAX)

    class _TimedSegments(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            inside.append("forward")
            t = time.perf_counter()
            try:
                out = inner.forward(ctx, *args)
            finally:
                inside.pop()
            acc[(SEGMENTS, "forward")] += time.perf_counter() - t
            return out

        @staticmethod
        def backward(ctx, grad):
            inside.append("backward")
            t = time.perf_counter()
            try:
                grads = inner.backward(ctx, grad)
            finally:
                inside.pop()
            acc[(SEGMENTS, "backward")] += time.perf_counter() - t
            return grads

    layers._SegmentAttention = _TimedSegments


def measure(folder: Path, side: str, steps: int) -> dict:
    torch.manual_seed(0)
    if side == "ours":
        from mixmim.models import build_pretrainer

        model = build_pretrainer("mixmim_base")

        def loss_of(x):
            return model(x).loss
    else:
        model = load_original(folder).mixmim_base(norm_pix_loss=True)

        def loss_of(x):
            return model(x, mask_ratio=0.5)[0]
    acc = instrument(model, KINDS)
    if side == "ours":
        time_segment_node(acc)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(4, 3, 224, 224)

    def step() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        loss = loss_of(x)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    step()
    step()
    parts = collections.defaultdict(list)
    for _ in range(steps):
        acc.clear()
        phases = dict(zip(("forward", "backward", "AdamW"), step(), strict=True))
        for key, v in acc.items():
            parts[f"{key[0]} {key[1]}"].append(v)
        for name, v in derived(phases, acc).items():
            parts[name].append(v)
    return {k: statistics.median(v) for k, v in parts.items()}


def derived(phases: dict[str, float], acc: dict[tuple[str, str], float]) -> dict[str, float]:
    """One step's phases and the figures computed from its parts: every linear layer together,
    the window attention without its projections (the attention proper) and, where the segmented
    attention node was timed, that node without its products and softmax."""
    both = ("forward", "backward")
    out = dict(phases)
    out["step"] = sum(phases.values())
    out["Linear (all) forward+backward"] = sum(acc.get((k, d), 0.0) for k in ("Linear", PROJECTIONS) for d in both)
    out[PROPER] = sum(acc.get(("WindowAttention", d), 0.0) - acc.get((PROJECTIONS, d), 0.0) for d in both)
    if any(k == SEGMENTS for k, _ in acc):
        out[SEGMENT_REST] = sum(acc.get((SEGMENTS, d), 0.0) - acc.get((SEGMENT_PRODUCTS, d), 0.0)
                                - acc.get((SEGMENT_SOFTMAX, d), 0.0) for d in both)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("original", type=Path, help="folder laid by lay_original.sh")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--side", choices=["ours", "original"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}; expected at least 1")
    if args.side:
        print(json.dumps(measure(args.original, args.side, args.steps)))
        return
    load_original(args.original)  # a clear message now if it is not laid
    res = {}
    for side in ("ours", "original"):
        cmd = [sys.executable, __file__, str(args.original), "--steps", str(args.steps), "--side", side]
        res[side] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    print(f"machine: {machine()}")
    print(f"MixMIM-B pretraining, batch 4, 224 px, fp32; median of {args.steps} steps; wall seconds per step")
    print(f"{'part':<42}{'ours':>9}{'original':>10}")
    first = ["step", "forward", "backward", "AdamW"]
    keys = first + sorted(k for k in set(res["ours"]) | set(res["original"]) if k not in first)
    for k in keys:
        print(f"{k:<42}" + "".join(f"{res[s][k]:>9.3f}" if k in res[s] else f"{'-':>9}" for s in ("ours", "original")))
    ours, theirs = res["ours"], res["original"]
    print(f"speed-up {theirs['step'] / ours['step']:.3f}x; with our window attention proper at zero cost "
          f"({ours['step']:.3f} - {ours[PROPER]:.3f} s): at most {theirs['step'] / (ours['step'] - ours[PROPER]):.3f}x")


if __name__ == "__main__":
    main()
