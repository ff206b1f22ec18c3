"""A candidate for the CPU training path, measured and not kept: whole-window attention as one node.

On the CPU the model splits every window by mixing group and attends within each
(window, group) segment (``layers._SegmentAttention``): no masked score is computed, but it
takes a dozen small operations per segment (up to 32 segments per block in stage 1 of
MixMIM-B, 16 windows of 196 tokens). The candidate here does what other devices do (whole
windows, a -inf bias across groups; in a window mixed half and half, twice the score FLOPs of
its two segments) in one autograd node with a handful of batched operations: q scaled once,
one ``bmm`` for all windows' scores, bias added and softmax taken in place, the
relative-position gradient gathered by one ``index_add_``.

The script (1) checks the candidate against the plain formulation in fp64, forward and
backward, on the shapes of MixMIM-B's four stages; (2) times the attention alone, segments
against the candidate, per block (the one window of stages 3 and 4 covers the whole map and
the model splits it by group on every device, so there the two run the same code); (3) times
whole MixMIM-B pretraining steps (batch 4, 224 px, fp32) with the model's segments and with
the candidate, alternating in one process, each timed step after an untimed one of the same
variant, with a 95% bootstrap interval of the median per-round ratio (segments time /
candidate time: above 1, the candidate is faster).

    python benchmarks/whole_window_attention.py --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_step import whole_window_plan  # noqa: E402  (sibling benchmark scripts)
from vs_original import bootstrap_median_ci, machine, make_step  # noqa: E402

from mixmim.models import build_pretrainer, encoder, layers  # noqa: E402
from mixmim.models.masking import random_mask  # noqa: E402
from mixmim.models.registry import MODEL_SIZES  # noqa: E402

SOFTMAX_OUT = torch.ops.aten._softmax.out
SOFTMAX_BACKWARD_OUT = torch.ops.aten._softmax_backward_data.out
MASK_CELLS = 7  # the mixing mask's grid at 224 px (stride 32)


def stages(name: str = "mixmim_base") -> list[tuple[int, int, int, int, int]]:
    """(grid, window, width, heads, blocks) of each stage of a registered size."""
    size = MODEL_SIZES[name]
    out = []
    for i, (depth, heads, window) in enumerate(zip(size.depths, size.num_heads, size.window_size, strict=True)):
        grid = size.img_size // size.patch_size // 2**i
        out.append((grid, min(window, grid), size.embed_dim * 2**i, heads, depth))
    return out


class WholeWindowAttention(torch.autograd.Function):
    """softmax((q * scale) k^T + relative bias + group bias) v over ``nw`` consecutive windows.

    qkv: (B, nW*n, 3C) tokens in window order; table: (T, heads); index: (n*n,) table index;
    group_bias: (nW, 1, n, n), 0 within a group and -inf across, or None. Returns (B, nW*n, C).
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, table: Tensor, heads: int, nw: int, index: Tensor,
                group_bias: Tensor | None) -> Tensor:
        b, length, c3 = qkv.shape
        d = c3 // 3 // heads
        n = length // nw
        scale = d**-0.5
        t = qkv.view(b, nw, n, 3, heads, d)
        q = qkv.new_empty(b, nw, heads, n, d)
        torch.mul(t[:, :, :, 0].transpose(2, 3), scale, out=q)
        k = t[:, :, :, 1].transpose(2, 3).contiguous()
        v = t[:, :, :, 2].transpose(2, 3).contiguous()
        q, k, v = (x.view(-1, n, d) for x in (q, k, v))
        bias = table.t().index_select(1, index).view(heads, n, n)
        if group_bias is not None:
            bias = bias + group_bias  # (nW, heads, n, n)
        scores = torch.bmm(q, k.transpose(1, 2))
        scores.view(b, -1, heads, n, n).add_(bias.view(-1, heads, n, n))
        attn = SOFTMAX_OUT(scores, -1, False, out=scores)
        out = torch.bmm(attn, v).view(b, nw, heads, n, d)
        ctx.save_for_backward(q, k, v, attn, index)
        ctx.meta = (b, nw, n, heads, d, scale, table.shape)
        return out.transpose(2, 3).reshape(b, length, heads * d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        b, nw, n, heads, d, scale, table_shape = ctx.meta
        q, k, v, attn, index = ctx.saved_tensors
        go = grad.view(b, nw, n, heads, d).transpose(2, 3).reshape(-1, n, d)
        gattn = torch.bmm(go, v.transpose(1, 2))
        gv = torch.bmm(attn.transpose(1, 2), go)
        gs = SOFTMAX_BACKWARD_OUT(gattn, attn, -1, attn.dtype, grad_input=gattn)  # 0 where masked
        gtable_t = grad.new_zeros(table_shape[1], table_shape[0])
        gtable_t.index_add_(1, index, gs.view(-1, heads, n * n).sum(0))
        gq = torch.bmm(gs, k).mul_(scale)
        gk = torch.bmm(gs.transpose(1, 2), q)
        gqkv = grad.new_empty(b, nw, n, 3, heads, d)
        for j, part in enumerate((gq, gk, gv)):
            gqkv[:, :, :, j].copy_(part.view(b, nw, heads, n, d).transpose(2, 3))
        return gqkv.view(b, nw * n, 3 * heads * d), gtable_t.t(), None, None, None, None


def candidate_attention(attn: layers.WindowAttention, qkv: Tensor, plan: layers.AttentionPlan) -> Tensor:
    """The candidate on a whole-window plan (``attention_plan(..., split_windows=False)``)."""
    group_bias = plan.group_bias.to(qkv.dtype) if plan.group_bias is not None else None
    return WholeWindowAttention.apply(qkv, attn.rel_pos_table, attn.num_heads, plan.num_windows,
                                      attn.rel_pos_index.reshape(-1), group_bias)


def plain_attention(attn: layers.WindowAttention, qkv: Tensor, plan: layers.AttentionPlan) -> Tensor:
    """The model's written-out formulation on the same plan (autograd through every operation)."""
    bias = attn.relative_bias()
    if plan.group_bias is not None:
        bias = bias + plan.group_bias.to(bias.dtype)
    return attn._attend(qkv, bias, plan.num_windows)


def stage_inputs(grid: int, window: int, width: int, heads: int, dtype: torch.dtype, seed: int = 0):
    """A window attention of one stage, a random mixing mask at stride 32 at this stage's
    resolution (1, grid*grid), and (qkv, output gradient) for a batch of 4."""
    g = torch.Generator().manual_seed(seed)
    attn = layers.WindowAttention(width, heads, (window, window)).to(dtype)
    with torch.no_grad():
        attn.rel_pos_table.normal_(0, 1, generator=g)
    s = grid // MASK_CELLS
    mask = random_mask((MASK_CELLS, MASK_CELLS), 0.5, generator=g).view(1, MASK_CELLS, MASK_CELLS)
    groups = mask.repeat_interleave(s, 1).repeat_interleave(s, 2).reshape(1, -1)
    qkv = torch.randn(4, grid * grid, 3 * width, generator=g, dtype=dtype)
    grad = torch.randn(4, grid * grid, width, generator=g, dtype=dtype)
    return attn, groups, qkv, grad


def whole_plan(grid: int, window: int, groups: Tensor, dtype: torch.dtype) -> layers.AttentionPlan:
    """Whole windows with the -inf group bias, a window covering the whole map included (the
    model splits that one by group on every device)."""
    plan = layers.attention_plan((grid, grid), (window, window), groups, dtype, split_windows=False)
    if plan.segments is not None:
        plan = layers.AttentionPlan((window, window), 1, group_bias=layers.group_attention_bias(
            groups, (grid, grid), (window, window), dtype))
    return plan


def parity(grid: int, window: int, width: int, heads: int) -> dict[str, float]:
    """Largest |difference| between the candidate and the plain formulation in fp64, on whole windows."""
    attn, groups, qkv, grad = stage_inputs(grid, window, width, heads, torch.float64)
    plan = whole_plan(grid, window, groups, torch.float64)
    results = []
    for fn in (plain_attention, candidate_attention):
        x = qkv.clone().requires_grad_()
        attn.rel_pos_table.grad = None
        out = fn(attn, x, plan)
        out.backward(grad)
        results.append((out.detach(), x.grad, attn.rel_pos_table.grad.clone()))
    (o1, gx1, gt1), (o2, gx2, gt2) = results
    return {"out": (o1 - o2).abs().max().item(), "dqkv": (gx1 - gx2).abs().max().item(),
            "dtable": (gt1 - gt2).abs().max().item()}


def _median_time(fn: Callable[[], object], reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def isolated(grid: int, window: int, width: int, heads: int) -> tuple[float, float]:
    """Seconds per block, forward and backward of the attention alone: segments, candidate."""
    attn, groups, qkv, grad = stage_inputs(grid, window, width, heads, torch.float32)
    segments = layers.attention_plan((grid, grid), (window, window), groups, torch.float32)
    whole = layers.attention_plan((grid, grid), (window, window), groups, torch.float32, split_windows=False)
    x = qkv.requires_grad_()

    def seg():
        layers._SegmentAttention.apply(x, attn.rel_pos_table, heads, segments.segments,
                                       segments.segment_index).backward(grad)

    def cand():
        if whole.segments is not None:  # a window covering the whole map is split either way
            return seg()
        candidate_attention(attn, x, whole).backward(grad)

    return _median_time(seg), _median_time(cand)


def use_candidate(on: bool) -> None:
    """Switch the model's CPU training path between its segments and the candidate."""
    encoder.attention_plan = whole_window_plan if on else layers.attention_plan


_MODEL_FORWARD = layers.WindowAttention.forward


def _forward_with_candidate(self: layers.WindowAttention, x: Tensor, plan: layers.AttentionPlan) -> Tensor:
    if plan.segments is None and layers._explicit_attention_applies(x, self.rel_pos_table) and self.attn_drop == 0:
        return self.proj_drop(self.proj(candidate_attention(self, self.qkv(x), plan)))
    return _MODEL_FORWARD(self, x, plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if args.rounds < 2:
        raise ValueError(f"--rounds {args.rounds}; expected at least 2")
    print(f"machine: {machine()}")
    total = [0.0, 0.0]
    for grid, window, width, heads, blocks in stages():
        err = parity(grid, window, width, heads)
        seg, cand = isolated(grid, window, width, heads)
        total[0] += blocks * seg
        total[1] += blocks * cand
        print(f"stage grid {grid}, window {window}: fp64 max |candidate - plain| " + ", ".join(f"{k} {v:.1e}" for k, v in err.items())
              + f"; attention alone per block: segments {seg * 1e3:.1f} ms, candidate {cand * 1e3:.1f} ms")
    print(f"attention alone, all {sum(st[-1] for st in stages())} blocks: segments {total[0]:.3f} s, candidate {total[1]:.3f} s per step")

    layers.WindowAttention.forward = _forward_with_candidate
    torch.manual_seed(0)
    model = build_pretrainer("mixmim_base")
    step = make_step(model, lambda m, x: m(x).loss, torch.randn(4, 3, 224, 224), "fp32")
    variants = ("segments", "candidate")
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # warm-up, not timed
        use_candidate(v == "candidate")
        step()
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            use_candidate(v == "candidate")
            step()
            times[v].append(step())
    use_candidate(False)
    ratios = [s / c for s, c in zip(times["segments"], times["candidate"], strict=True)]
    lo, hi = bootstrap_median_ci(ratios)
    print(f"MixMIM-B pretraining steps, batch 4, 224 px, fp32, {args.rounds} rounds")
    print("step seconds:", {k: [round(t, 3) for t in v] for k, v in times.items()})
    print(f"median step: segments {statistics.median(times['segments']):.3f} s, "
          f"candidate {statistics.median(times['candidate']):.3f} s; segments / candidate "
          f"{statistics.median(ratios):.3f} (95% CI {lo:.3f}-{hi:.3f}, n = {args.rounds} rounds)")


if __name__ == "__main__":
    main()
