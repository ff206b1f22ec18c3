"""Steady-state A/B, in one process, of variants of the CPU training path: the oneDNN linear
backward (AMD route), the MLP on the BLAS route (Intel) and the segmented window attention node.

On the AMD development machine a profiled step (``profile_step.py --only ours --shapes``) shows
its largest operator after the products inside the weight gradients of the linear layers:
oneDNN's entry point makes the transposed output gradient contiguous before the product (fc1 of
stage 3, (784, 2048) -> (2048, 784); benchmarks/README.md has the figures). That suggested four
changes, each tried here against the code as it is, with the same model, weights and inputs:

- ``mkl-weight-grad``: every weight gradient through the BLAS (MKL), which reads the
  transposed operands in place (no copy). Not bit-identical (rounding-level differences).
- ``copy-workspace``: the transposed copy goes into a buffer kept from call to call (one
  per thread), so the copy never touches freshly mapped pages. Bit-identical.
- ``gelu-recompute``: the MLP saves only the fc1 output and recomputes the GELU in its
  backward, a quarter less activation memory per block and so fewer pages to fault in
  again after glibc returns them. Bit-identical.
- ``blocked-transpose``: the transposed copy made in two passes (whole 64-channel runs first,
  then each (tokens, 64) tile transposed), so that no pass strides through memory by a power
  of two: the profiler put the (784, 2048) copy at 20 ms a call against 1.6 ms for the
  (784, 1536) one. Bit-identical.
- ``narrow-copy`` (sixteenth session): where the output gradient is wider than the layer's input
  (fc1, qkv), the product is turned around: ``x2.T`` (the narrower operand) is copied and oneDNN
  computes the transposed weight gradient, which is then copied into the weight's layout. On the
  shapes tried, oneDNN's result equals the model's bit for bit (checked here on every gradient).

- ``segment-block-layout`` (eighteenth session, both routes): the segmented attention node
  (``_SegmentAttention``) with its layout copies made once per block instead of once per segment:
  q is scaled into one (B, heads, L, d) buffer and k, v copied into one (2, B, heads, L, d)
  buffer, each segment's operands being views of them, and the output gradient is laid out once
  per block the same way. The model copies q twice per segment (the scaled product keeps the
  strided layout, then the reshape copies it) and k, v and the output gradient once each; the
  variant writes q once and makes the other copies in one piece per block. The backward reads
  the segments' views of the saved buffers. Bit-identical.
- ``blas-mlp`` (twentieth session, BLAS route only): on the route Intel CPUs take, the MLP is
  autograd's own fc1, GELU and fc2, so its GELU gradient lands in a fresh 4C-wide buffer and three
  nodes run. The variant is the BLAS twin of the AMD route's ``_OneDNNMlp``: one node, the same
  ``addmm`` / ``mm`` products autograd's linear makes, and the GELU gradient written over the
  gradient it is computed from. Bit-identical.

``--copy-times`` instead times, by the wall clock inside ordinary steps, each weight gradient's
transposed copy and its product, by shape (what the profiler's table could not be trusted for).

Each round times one step of each side, order alternating, and every timed step follows an
untimed step of the same side (as in ``vs_original.py --steady``); the figure is the median
of per-round ratios (current / variant, above 1 means the variant is faster) with a 95%
bootstrap interval. Each variant changes one linear route (``ROUTES``): the linear-backward
variants (and ``--copy-times``) the oneDNN one, ``blas-mlp`` the BLAS one, and the script refuses a
variant where the CPU backend is the other (``MIXMIM_CPU_LINEAR`` chooses it by hand);
``segment-block-layout`` runs on either route.

    python benchmarks/backward_variants_ab.py --variant copy-workspace --rounds 10
    python benchmarks/backward_variants_ab.py --variant segment-block-layout --rounds 20
    python benchmarks/backward_variants_ab.py --variant blas-mlp --rounds 20
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mixmim.models import build_pretrainer
from mixmim.models import layers as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_original import bootstrap_median_ci  # noqa: E402  (sibling benchmark script)

_MODEL_WEIGHT_GRAD = L._weight_grad  # the model's own, for the layers a variant leaves alone
_MODEL_MLP_FORWARD = L.Mlp.forward


def _keeps_blas(g2: torch.Tensor, x2: torch.Tensor) -> bool:
    """The model's rule in ``_weight_grad``: narrow layers take the BLAS product, without a copy."""
    cin, cout = x2.shape[1], g2.shape[1]
    return cin * cout < 128 * (cin + cout)


def _mkl_weight_grad(g2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    return g2.t().mm(x2)


_workspace = threading.local()


def _workspace_weight_grad(g2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    if _keeps_blas(g2, x2):
        return _MODEL_WEIGHT_GRAD(g2, x2)
    cout, n = g2.shape[1], g2.numel()
    buf = getattr(_workspace, "buf", None)
    if buf is None or buf.numel() < n or buf.dtype != g2.dtype:
        buf = _workspace.buf = torch.empty(n, dtype=g2.dtype)
    g2t = buf[:n].view(cout, g2.shape[0]).copy_(g2.t())
    return L._onednn_mm(g2t, x2.t())


def _two_stage_transpose(g2: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``g2.t().contiguous()`` in two copies: whole ``block``-channel runs first, then each
    (tokens, block) tile transposed, so no copy strides through memory by a power of two."""
    n, c = g2.shape
    tiles = g2.view(n, c // block, block).transpose(0, 1).contiguous()
    return tiles.transpose(1, 2).contiguous().view(c, n)


def _blocked_weight_grad(g2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    if _keeps_blas(g2, x2) or g2.shape[1] % 64:
        return _MODEL_WEIGHT_GRAD(g2, x2)
    return L._onednn_mm(_two_stage_transpose(g2), x2.t())


def _narrow_copy_weight_grad(g2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    if _keeps_blas(g2, x2) or g2.shape[1] <= x2.shape[1]:
        return _MODEL_WEIGHT_GRAD(g2, x2)
    return L._onednn_mm(x2.t(), g2.t()).t().contiguous()


class _RecomputeGeluMlp(torch.autograd.Function):
    """The model's ``_OneDNNMlp`` saving the fc1 output only; the GELU is recomputed in backward."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        x2 = x.reshape(-1, x.shape[-1])
        h = L._onednn_mm(x2, w1, b1)
        ctx.save_for_backward(x2, w1, h, w2)
        ctx.x_shape = x.shape
        ctx.has_bias = (b1 is not None, b2 is not None)
        return L._onednn_mm(F.gelu(h), w2, b2).view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, w1, h, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        a = F.gelu(h)
        ga, gw2, gb2 = L._onednn_linear_grads(grad.reshape(-1, grad.shape[-1]), a, w2, True, need[3],
                                              ctx.has_bias[1] and need[4])
        del a
        gh = L._GELU_BACKWARD_INTO(ga, h, grad_input=ga)
        gx, gw1, gb1 = L._onednn_linear_grads(gh, x2, w1, need[0], need[1], ctx.has_bias[0] and need[2])
        return (gx.view(ctx.x_shape) if gx is not None else None), gw1, gb1, gw2, gb2


class _BlasMlp(torch.autograd.Function):
    """fc1, exact GELU, fc2 as one node on the BLAS route: the products autograd's ``F.linear``
    makes for a contiguous input (``addmm`` forward; ``mm`` for the input and weight gradients,
    the weight gradient as ``g.T @ x``), the GELU gradient written over its own input."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        x2 = x.view(-1, x.shape[-1])
        h = torch.addmm(b1, x2, w1.t())
        a = F.gelu(h)
        ctx.save_for_backward(x2, w1, h, a, w2)
        ctx.x_shape = x.shape
        return torch.addmm(b2, a, w2.t()).view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, w1, h, a, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])
        ga = g2.mm(w2)
        gw2 = g2.t().mm(a) if need[3] else None
        gb2 = g2.sum(0) if need[4] else None
        gh = L._GELU_BACKWARD_INTO(ga, h, grad_input=ga)
        gx = gh.mm(w1).view(ctx.x_shape) if need[0] else None
        gw1 = gh.t().mm(x2) if need[1] else None
        gb1 = gh.sum(0) if need[2] else None
        return gx, gw1, gb1, gw2, gb2


def _blas_mlp_forward(self: L.Mlp, x: torch.Tensor) -> torch.Tensor:
    """``Mlp.forward`` taking :class:`_BlasMlp` where the model's MLP is autograd's three nodes on
    the BLAS route (fp32 on the CPU, contiguous input, biases, no dropout, exact GELU, training)."""
    w1, w2, b1, b2 = self.fc1.weight, self.fc2.weight, self.fc1.bias, self.fc2.bias
    if (isinstance(self.drop, nn.Identity) and self.act.approximate == "none" and b1 is not None
            and b2 is not None and not L.onednn_linear_applies(x, w1) and x.device.type == "cpu"
            and x.dtype == w1.dtype == w2.dtype == torch.float32 and x.is_contiguous()
            and not torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
            and (x.requires_grad or w1.requires_grad or w2.requires_grad)):
        return _BlasMlp.apply(x, w1, b1, w2, b2)
    return _MODEL_MLP_FORWARD(self, x)


class _BlockLayoutSegmentAttention(torch.autograd.Function):
    """The model's ``_SegmentAttention`` with one layout copy per block instead of per segment.

    Same products, softmax, bias and table gradient, in the same order and on the same values:
    ``q * scale`` is the same multiplication written into a (B, heads, L, d) buffer, and a segment's
    (B*heads, n, d) operand is a strided view of such a buffer rather than a contiguous copy.
    """

    @staticmethod
    def forward(ctx, qkv, table, heads, segments, index):
        b, length, c3 = qkv.shape
        d = c3 // 3 // heads
        scale = d**-0.5
        t = qkv.view(b, length, 3, heads, d)
        q_all = qkv.new_empty(b, heads, length, d)
        torch.mul(t[:, :, 0].transpose(1, 2), scale, out=q_all)
        kv_all = t[:, :, 1:].permute(2, 0, 3, 1, 4).contiguous()  # (2, B, heads, L, d)
        out = qkv.new_empty(b, length, heads, d)
        table_t = table.t()
        attns = []
        for (start, end), idx in zip(segments, index, strict=True):
            n = end - start
            q = q_all[:, :, start:end].reshape(b * heads, n, d)  # views: B and heads merge
            k = kv_all[0, :, :, start:end].reshape(b * heads, n, d)
            v = kv_all[1, :, :, start:end].reshape(b * heads, n, d)
            scores = torch.bmm(q, k.transpose(1, 2)).view(b, heads, n, n)
            scores += table_t.index_select(1, idx).view(heads, n, n).to(scores.dtype)
            attn = L._SOFTMAX_OUT(scores, -1, False, out=scores).view(b * heads, n, n)
            out[:, start:end].copy_(torch.bmm(attn, v).view(b, heads, n, d).transpose(1, 2))
            attns.append(attn)
        ctx.save_for_backward(q_all, kv_all, *attns, *index)
        ctx.meta = (b, length, heads, d, scale, table.shape, table.dtype, segments)
        return out.view(b, length, heads * d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        b, length, heads, d, scale, table_shape, table_dtype, segments = ctx.meta
        saved = ctx.saved_tensors
        num = len(segments)
        q_all, kv_all, attns, index = saved[0], saved[1], saved[2:2 + num], saved[2 + num:]
        g_all = grad.view(b, length, heads, d).transpose(1, 2).contiguous()  # (B, heads, L, d)
        gqkv = grad.new_empty(b, length, 3, heads, d)
        gtable_t = grad.new_zeros(table_shape[1], table_shape[0], dtype=table_dtype)
        for (start, end), idx, attn in zip(segments, index, attns, strict=True):
            n = end - start
            q = q_all[:, :, start:end].reshape(b * heads, n, d)
            k = kv_all[0, :, :, start:end].reshape(b * heads, n, d)
            v = kv_all[1, :, :, start:end].reshape(b * heads, n, d)
            go = g_all[:, :, start:end].reshape(b * heads, n, d)
            gattn = torch.bmm(go, v.transpose(1, 2))
            gv = torch.bmm(attn.transpose(1, 2), go)
            gs = L._SOFTMAX_BACKWARD_OUT(gattn, attn, -1, attn.dtype, grad_input=gattn)
            gtable_t.index_add_(1, idx, gs.view(b, heads, n * n).sum(0).to(table_dtype))
            gq = torch.bmm(gs, k).mul_(scale)
            gk = torch.bmm(gs.transpose(1, 2), q)
            dst = gqkv[:, start:end]
            for j, part in enumerate((gq, gk, gv)):
                dst[:, :, j].copy_(part.view(b, heads, n, d).transpose(1, 2))
        return gqkv.view(b, length, 3 * heads * d), gtable_t.t(), None, None, None


VARIANTS: dict[str, dict[str, object]] = {
    "mkl-weight-grad": {"_weight_grad": _mkl_weight_grad},
    "copy-workspace": {"_weight_grad": _workspace_weight_grad},
    "gelu-recompute": {"_OneDNNMlp": _RecomputeGeluMlp},
    "blocked-transpose": {"_weight_grad": _blocked_weight_grad},
    "narrow-copy": {"_weight_grad": _narrow_copy_weight_grad},
    "segment-block-layout": {"_SegmentAttention": _BlockLayoutSegmentAttention},
    "blas-mlp": {"Mlp.forward": _blas_mlp_forward},
}
BIT_IDENTICAL = {"copy-workspace", "gelu-recompute", "blocked-transpose", "narrow-copy", "segment-block-layout",
                 "blas-mlp"}
# the CPU linear routes (layers.CPU_LINEAR_BACKEND) on which each variant changes what runs
ROUTES: dict[str, set[str]] = {name: {"onednn"} for name in VARIANTS}
ROUTES["segment-block-layout"] = {"onednn", "blas"}
ROUTES["blas-mlp"] = {"blas"}
_ROUTE_NAMES = {"onednn": "oneDNN", "blas": "BLAS"}


def _owner(key: str) -> tuple[object, str]:
    """The object holding a VARIANTS key (``name`` in ``layers``, or ``Class.attribute``) and the attribute."""
    *path, attr = key.split(".")
    obj: object = L
    for part in path:
        obj = getattr(obj, part)
    return obj, attr


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Swap the named variant's functions into ``mixmim.models.layers`` for the duration."""
    if name not in VARIANTS:
        raise ValueError(f"variant {name!r}; expected one of {sorted(VARIANTS)}")
    saved = {k: getattr(*_owner(k)) for k in VARIANTS[name]}
    for k, v in VARIANTS[name].items():
        setattr(*_owner(k), v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(*_owner(k), v)


def gradients(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss and every parameter gradient of one pretraining step (seeded mask)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = model(x).loss
    loss.backward()
    out = {"loss": loss.detach().clone()}
    out.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    return out


def max_difference(name: str, model: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference of loss and gradients between the current code and ``name``."""
    ref = gradients(model, x)
    with variant(name):
        new = gradients(model, x)
    assert ref.keys() == new.keys()
    return max((ref[k] - new[k]).abs().max().item() for k in ref)


def ab(name: str, rounds: int, step: Callable[[], None]) -> dict[str, dict[str, list[float]]]:
    """Per-round step seconds and minor faults of the current code ('current') and the variant."""
    times: dict[str, list[float]] = {"current": [], name: []}
    faults: dict[str, list[float]] = {"current": [], name: []}
    for r in range(rounds):
        for side in (("current", name) if r % 2 == 0 else (name, "current")):
            with variant(name) if side == name else contextlib.nullcontext():
                step()  # untimed: the timed step follows one of its own kind
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t = time.perf_counter()
                step()
                times[side].append(time.perf_counter() - t)
                faults[side].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"times": times, "faults": faults}


def copy_times(step: Callable[[], None], steps: int) -> dict[tuple[int, int], dict[str, float]]:
    """Per weight-gradient shape (tokens, output channels) on the oneDNN route: calls, seconds of
    the transposed copy and of the product, per step (means over ``steps`` steps). The model's
    own ``_weight_grad`` is split in two timed halves that compute what it computes."""
    acc: dict[tuple[int, int], dict[str, float]] = {}

    def timed(g2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        if _keeps_blas(g2, x2):
            return _MODEL_WEIGHT_GRAD(g2, x2)
        t0 = time.perf_counter()
        g2t = g2.t().contiguous()
        t1 = time.perf_counter()
        out = L._onednn_mm(g2t, x2.t())
        t2 = time.perf_counter()
        row = acc.setdefault(tuple(g2.shape), {"calls": 0.0, "copy": 0.0, "product": 0.0})
        row["calls"] += 1
        row["copy"] += t1 - t0
        row["product"] += t2 - t1
        return out

    saved = L._weight_grad
    L._weight_grad = timed
    try:
        for _ in range(steps):
            step()
    finally:
        L._weight_grad = saved
    return {k: {n: v / steps for n, v in row.items()} for k, row in acc.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=sorted(VARIANTS))
    p.add_argument("--copy-times", action="store_true", help="time the weight gradients' transposed copies instead")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--model", default="mixmim_base")
    p.add_argument("--batch", type=int, default=4)
    a = p.parse_args()
    if (a.variant is None) == (not a.copy_times):
        p.error("give one of --variant NAME and --copy-times")
    routes = ROUTES[a.variant] if a.variant else {"onednn"}
    if L.CPU_LINEAR_BACKEND not in routes:
        what = f"--variant {a.variant}" if a.variant else "--copy-times"
        (route,) = routes
        raise SystemExit(f"the CPU linear backend here is {L.CPU_LINEAR_BACKEND!r}; {what} changes the "
                         f"{_ROUTE_NAMES[route]} route only (set MIXMIM_CPU_LINEAR={route} to force it)")
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, 224, 224)
    model = build_pretrainer(a.model)
    diff = max_difference(a.variant, model, x) if a.variant else 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model(x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    step()
    if a.copy_times:
        rows = copy_times(step, a.rounds)
        print(f"{a.model}, batch {a.batch}, 224 px, fp32, {torch.get_num_threads()} threads; weight gradients on "
              f"the oneDNN route, wall ms per step (mean of {a.rounds} steps)")
        print(f"{'output gradient (tokens, channels)':<36}{'calls':>6}{'copy':>9}{'product':>9}{'copy MB/ms':>12}")
        for shape, row in sorted(rows.items(), key=lambda kv: -kv[1]["copy"]):
            mb = shape[0] * shape[1] * 4 / 1e6 * row["calls"]
            print(f"{str(shape):<36}{row['calls']:>6.0f}{row['copy'] * 1e3:>9.1f}{row['product'] * 1e3:>9.1f}"
                  f"{mb / (row['copy'] * 1e3):>12.2f}")
        print(f"all: copies {sum(r['copy'] for r in rows.values()) * 1e3:.1f} ms, products "
              f"{sum(r['product'] for r in rows.values()) * 1e3:.1f} ms per step")
        return
    res = ab(a.variant, a.rounds, step)
    t, f = res["times"], res["faults"]
    ratios = [c / v for c, v in zip(t["current"], t[a.variant], strict=True)]
    lo, hi = bootstrap_median_ci(ratios)
    print(f"{a.model}, batch {a.batch}, 224 px, fp32, {torch.get_num_threads()} threads, backend {L.CPU_LINEAR_BACKEND}")
    print(f"variant {a.variant}: max |difference| of loss and gradients {diff:.3g}"
          f" ({'bit-identical' if diff == 0 else 'not bit-identical'})")
    print(f"step s (median of {a.rounds}): current {statistics.median(t['current']):.3f}, "
          f"variant {statistics.median(t[a.variant]):.3f}; current / variant {statistics.median(ratios):.3f} "
          f"(95% CI {lo:.3f}-{hi:.3f}, n = {a.rounds} rounds)")
    print(f"minor faults per step (median): current {statistics.median(f['current']):.0f}, "
          f"variant {statistics.median(f[a.variant]):.0f}")


if __name__ == "__main__":
    main()
