"""What the benchmark scripts compute besides timings (no timing is asserted):
step_breakdown.py's bookkeeping, which modules it times under which kind and the figures it
derives from one step's parts; whole_window_attention.py's candidate, against the plain
formulation; backward_variants_ab.py's variants, against the model's own backward; step_floor.py's
record of a step's matrix products, against torch's FLOP counter."""

from __future__ import annotations

import collections
import importlib.util
from pathlib import Path

import pytest
import torch

from mixmim.models import build_pretrainer



def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


step_breakdown = _load("step_breakdown")
whole_window = _load("whole_window_attention")
variants_ab = _load("backward_variants_ab")
step_floor = _load("step_floor")


def test_derived_takes_the_projections_out_of_the_window_attention():
    acc = {("WindowAttention", "forward"): 0.5, ("WindowAttention", "backward"): 1.0,
           (step_breakdown.PROJECTIONS, "forward"): 0.2, (step_breakdown.PROJECTIONS, "backward"): 0.4,
           ("Linear", "forward"): 1.5, ("Linear", "backward"): 3.0}
    out = step_breakdown.derived({"forward": 2.0, "backward": 4.0, "AdamW": 0.5}, acc)
    assert out["step"] == pytest.approx(6.5)
    assert out[step_breakdown.PROPER] == pytest.approx(0.9)
    assert out["Linear (all) forward+backward"] == pytest.approx(5.1)


def test_instrument_counts_the_attention_projections_apart():
    torch.manual_seed(0)
    model = build_pretrainer("mixmim_tiny", img_size=64)
    acc = step_breakdown.instrument(model, step_breakdown.KINDS)
    model(torch.randn(2, 3, 64, 64)).loss.backward()
    kinds = {k for k, _ in acc}
    assert {"WindowAttention", "Linear", step_breakdown.PROJECTIONS} <= kinds
    assert all(v >= 0 for v in acc.values())
    timed_as = {id(m): m.forward.__kwdefaults__["_key"][0] for m in model.modules() if "forward" in vars(m)}
    attns = [m for m in model.modules() if type(m).__name__ == "WindowAttention"]
    projections = {id(m.qkv) for m in attns} | {id(m.proj) for m in attns}
    assert attns and {i for i, k in timed_as.items() if k == step_breakdown.PROJECTIONS} == projections
    assert acc[(step_breakdown.PROJECTIONS, "forward")] < acc[("WindowAttention", "forward")]


@pytest.mark.parametrize("grid,window,width,heads", [(28, 14, 64, 2), (14, 7, 32, 4), (7, 7, 64, 2)])
def test_whole_window_candidate_matches_the_plain_formulation(grid, window, width, heads):
    err = whole_window.parity(grid, window, width, heads)
    assert set(err) == {"out", "dqkv", "dtable"}
    assert all(e < 1e-10 for e in err.values()), err


def test_whole_window_candidate_is_switched_in_and_out():
    from mixmim.models import encoder, layers

    whole_window.use_candidate(True)
    try:
        groups = torch.tensor([[0.0, 1.0] * 98])
        plan = encoder.attention_plan((14, 14), (7, 7), groups)
        assert plan.segments is None and plan.group_bias is not None
    finally:
        whole_window.use_candidate(False)
    assert encoder.attention_plan is layers.attention_plan
    assert layers.attention_plan((14, 14), (7, 7), groups).segments is not None


def test_whole_window_stages_are_the_registered_architecture():
    st = whole_window.stages("mixmim_base")
    assert [(g, w) for g, w, *_ in st] == [(56, 14), (28, 14), (14, 14), (7, 7)]
    assert sum(blocks for *_, blocks in st) == 24


def test_segment_node_timing_keeps_the_results(monkeypatch):
    from mixmim.models import layers

    for owner, name in ((layers, "_SegmentAttention"), (layers, "_SOFTMAX_OUT"),
                        (layers, "_SOFTMAX_BACKWARD_OUT"), (torch, "bmm")):
        monkeypatch.setattr(owner, name, getattr(owner, name))  # restored afterwards
    torch.manual_seed(0)
    model = build_pretrainer("mixmim_tiny", img_size=64)
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    plain = model(x).loss
    plain.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    acc = collections.defaultdict(float)
    step_breakdown.time_segment_node(acc)
    torch.manual_seed(1)
    timed = model(x).loss
    timed.backward()
    assert torch.equal(plain, timed)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters(), strict=True))
    for d in ("forward", "backward"):
        products, softmax = acc[(step_breakdown.SEGMENT_PRODUCTS, d)], acc[(step_breakdown.SEGMENT_SOFTMAX, d)]
        assert 0 < products and 0 < softmax and products + softmax < acc[(step_breakdown.SEGMENTS, d)]
    counted = dict(acc)
    torch.bmm(torch.randn(2, 3, 4), torch.randn(2, 4, 5))  # outside the node: passes through uncounted
    assert acc == counted
    rest = step_breakdown.derived({"forward": 1.0}, acc)[step_breakdown.SEGMENT_REST]
    assert 0 < rest < acc[(step_breakdown.SEGMENTS, "forward")] + acc[(step_breakdown.SEGMENTS, "backward")]


def _use_route(monkeypatch, route: str) -> None:
    """Route every fp32 product of a small model through oneDNN, as MixMIM-B's are on AMD, or
    through the BLAS, as on Intel."""
    from mixmim.models import layers

    if route == "onednn":
        if layers._ONEDNN_LINEAR is None:
            pytest.skip("this torch build has no oneDNN linear")
        monkeypatch.setattr(layers, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(layers, "CPU_LINEAR_BACKEND", route)


@pytest.fixture
def onednn_everywhere(monkeypatch):
    _use_route(monkeypatch, "onednn")


@pytest.mark.parametrize("name", sorted(variants_ab.VARIANTS))
def test_backward_variants_compute_the_same_gradients(monkeypatch, name):
    routes = variants_ab.ROUTES[name]
    _use_route(monkeypatch, "onednn" if "onednn" in routes else "blas")
    calls = []

    def counted(fn):
        def wrapper(*args):
            calls.append(fn.__name__)
            return fn(*args)
        return wrapper

    # count the variant's functions, so that equal gradients cannot come from the variant not running
    original = variants_ab.VARIANTS[name]
    swapped = {k: counted(v) if callable(v) and not isinstance(v, type) else v for k, v in original.items()}
    monkeypatch.setitem(variants_ab.VARIANTS, name, swapped)
    torch.manual_seed(0)
    model = build_pretrainer("mixmim_tiny", img_size=64)
    x = torch.randn(2, 3, 64, 64)
    diff = variants_ab.max_difference(name, model, x)
    if name in variants_ab.BIT_IDENTICAL:
        assert diff == 0.0
    else:
        assert diff < 1e-4  # another BLAS: at most rounding-level differences
    if any(swapped[k] is not original[k] for k in original):
        assert calls  # (the MLP class of gelu-recompute is checked in the next test)


def _node_names(loss: torch.Tensor) -> set[str]:
    """Class names of every autograd node behind ``loss``."""
    seen, todo = {}, [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = type(node).__name__
            todo += [n for n, _ in node.next_functions]
    return set(seen.values())


def test_backward_variants_take_effect_and_are_undone(onednn_everywhere):
    from mixmim.models import layers

    torch.manual_seed(0)
    model = build_pretrainer("mixmim_tiny", img_size=64)
    x = torch.randn(2, 3, 64, 64)
    original = layers._OneDNNMlp
    with variants_ab.variant("gelu-recompute"):
        names = _node_names(model(x).loss)
    assert "_RecomputeGeluMlpBackward" in names and "_OneDNNMlpBackward" not in names
    assert layers._OneDNNMlp is original
    with pytest.raises(ValueError, match="expected one of"):
        with variants_ab.variant("no-such-variant"):
            pass


def test_segment_block_layout_replaces_the_node_on_the_blas_route_too(monkeypatch):
    from mixmim.models import layers

    monkeypatch.setattr(layers, "CPU_LINEAR_BACKEND", "blas")  # the oneDNN route is the parametrized test's
    torch.manual_seed(0)
    model = build_pretrainer("mixmim_tiny", img_size=64)
    x = torch.randn(2, 3, 64, 64)
    with variants_ab.variant("segment-block-layout"):
        names = _node_names(model(x).loss)
    assert "_BlockLayoutSegmentAttentionBackward" in names and "_SegmentAttentionBackward" not in names
    assert "_SegmentAttentionBackward" in _node_names(model(x).loss)
    assert variants_ab.max_difference("segment-block-layout", model, x) == 0.0
    assert variants_ab.ROUTES["segment-block-layout"] == {"onednn", "blas"}
    assert layers._SegmentAttention.__name__ == "_SegmentAttention"


def test_blas_mlp_replaces_autograds_three_nodes_and_is_undone(monkeypatch):
    from mixmim.models import layers

    _use_route(monkeypatch, "blas")
    torch.manual_seed(0)
    model = build_pretrainer("mixmim_tiny", img_size=64)
    x = torch.randn(2, 3, 64, 64)
    forward = layers.Mlp.forward
    with variants_ab.variant("blas-mlp"):
        names = _node_names(model(x).loss)
        with torch.no_grad():  # not training: the variant hands over to the model's own forward
            torch.manual_seed(1)
            untrained = model(x).loss
    assert "_BlasMlpBackward" in names  # (the decoder's timm blocks keep their own GELU nodes)
    assert layers.Mlp.forward is forward
    assert "_BlasMlpBackward" not in _node_names(model(x).loss)
    with torch.no_grad():
        torch.manual_seed(1)
        assert torch.equal(model(x).loss, untrained)


def test_onednn_variants_are_refused_on_the_blas_route(monkeypatch):
    from mixmim.models import layers

    monkeypatch.setattr(layers, "CPU_LINEAR_BACKEND", "blas")
    for argv, what in ((["--variant", "copy-workspace"], "--variant copy-workspace"), (["--copy-times"], "--copy-times")):
        monkeypatch.setattr("sys.argv", ["backward_variants_ab.py", *argv])
        with pytest.raises(SystemExit, match=f"backend here is 'blas'; {what} changes the oneDNN route only"):
            variants_ab.main()
    monkeypatch.setattr(layers, "CPU_LINEAR_BACKEND", "onednn")
    monkeypatch.setattr("sys.argv", ["backward_variants_ab.py", "--variant", "blas-mlp"])
    with pytest.raises(SystemExit, match=r"backend here is 'onednn'; --variant blas-mlp changes the BLAS route only "
                                         r"\(set MIXMIM_CPU_LINEAR=blas"):
        variants_ab.main()


def test_ab_alternates_and_times_each_side_under_its_own_code():
    from mixmim.models import layers

    seen = []
    res = variants_ab.ab("mkl-weight-grad", 3, lambda: seen.append(layers._weight_grad is variants_ab._mkl_weight_grad))
    assert [len(v) for v in res["times"].values()] == [3, 3]
    # two steps (untimed, timed) per side per round, order alternating: current first in round 0
    assert seen == [False, False, True, True, True, True, False, False, False, False, True, True]


@pytest.mark.parametrize("n, c", [(12, 128), (784, 512), (196, 1024), (33, 70)])
def test_two_stage_transpose_is_the_transpose(n, c):
    g = torch.randn(n, c)
    if c % 64:
        with pytest.raises(RuntimeError):
            variants_ab._two_stage_transpose(g)
        assert torch.equal(variants_ab._two_stage_transpose(g, block=c // 2), g.t())
    else:
        out = variants_ab._two_stage_transpose(g)
        assert out.is_contiguous() and torch.equal(out, g.t())


def test_step_floor_records_the_products_the_flop_counter_counts():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_pretrainer("mixmim_tiny", img_size=64)
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    products = step_floor.step_products(model, lambda m, x: m(x).loss, x)
    assert all(p.grad is None for p in model.parameters())  # the recording leaves no gradients behind
    torch.manual_seed(1)  # the same mixing mask, so the same segments
    with FlopCounterMode(display=False) as fc:
        model(x).loss.backward()
    counted = fc.get_flop_counts()["Global"]
    aten = torch.ops.aten
    linear = sum(counted.get(op, 0) for op in (aten.mm, aten.addmm))
    assert step_floor.flops(products, "linear") == linear > 0
    assert step_floor.flops(products, "attention") == counted.get(aten.bmm, 0) > 0
    assert step_floor.flops(products) == linear + counted[aten.bmm]
    # forward, input gradient and weight gradient of every linear layer (every input needs a gradient)
    n_linear = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert sum(c for (k, _), c in products.items() if k == "linear") == 3 * n_linear


def test_step_floor_counts_each_product_by_its_calls():
    products = collections.Counter({("linear", (4, 5, 6)): 3, ("attention", (2, 4, 5, 6)): 2, ("linear", (7, 8, 9)): 1})
    timings = {("linear", (4, 5, 6)): 0.5, ("attention", (2, 4, 5, 6)): 0.25, ("linear", (7, 8, 9)): 2.0}
    assert step_floor.products_seconds(products, timings) == {"linear": 3.5, "attention": 0.5}
    assert step_floor.flops(products, "linear") == 2 * (3 * 120 + 504)
    assert step_floor.flops(products, "attention") == 2 * 2 * 240


def test_copy_times_splits_the_weight_gradient_without_changing_it(onednn_everywhere):
    from mixmim.models import layers

    torch.manual_seed(0)
    model = build_pretrainer("mixmim_tiny", img_size=64)
    x = torch.randn(2, 3, 64, 64)
    ref = variants_ab.gradients(model, x)
    grads = {}

    def step():
        grads.update(variants_ab.gradients(model, x))

    rows = variants_ab.copy_times(step, 2)
    assert all(torch.equal(ref[k], grads[k]) for k in ref)
    assert layers._weight_grad is variants_ab._MODEL_WEIGHT_GRAD  # put back
    assert rows and all(r["calls"] >= 1 and r["copy"] > 0 and r["product"] > 0 for r in rows.values())
