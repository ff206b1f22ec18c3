"""The CPU fast paths of the encoder compute what the plain formulation computes.

Training on the CPU takes routes of its own (oneDNN linear products, the MLP as one oneDNN
node with the GELU gradient in place, the written-out attention with an in-place bias,
per-group attention in every window as one autograd node, with tokens kept in attention
order through a stage). Each is checked here, forward and backward, against ``F.linear`` /
``F.scaled_dot_product_attention`` on row-major tokens with a -inf group bias.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixmim.models import build_classifier, build_pretrainer
from mixmim.models import layers
from mixmim.models.layers import (
    Linear,
    MixMIMBlock,
    attention_plan,
    fast_linear,
    onednn_linear_applies,
    reorder_tokens,
    use_fast_linears,
)

SMALL = dict(img_size=64, patch_size=4, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
             window_size=(8, 8, 4, 2), decoder_dim=32, decoder_depth=1, decoder_num_heads=2)


@pytest.fixture(autouse=True)
def onednn_for_small_products(monkeypatch):
    """The tiny test models fall below the size above which oneDNN is used, and Intel CPUs
    use the BLAS instead; take the oneDNN route anyway, on every machine."""
    monkeypatch.setattr(layers, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(layers, "CPU_LINEAR_BACKEND", "onednn")


@pytest.fixture
def plain_paths(monkeypatch):
    """Switch the fast routes off: F.linear and F.scaled_dot_product_attention everywhere."""
    def use():
        monkeypatch.setattr(layers, "onednn_linear_applies", lambda x, w: False)
        monkeypatch.setattr(layers, "_explicit_attention_applies", lambda x, w: False)
    return use


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(fast_loss, fast_grads, plain_loss, plain_grads):
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == plain_grads.keys() and fast_grads
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(layers._ONEDNN_LINEAR is None, reason="this torch build has no oneDNN linear op")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cin,cout", [(24, 40), (256, 384)])  # weight gradient by BLAS, by oneDNN
def test_onednn_linear_matches_f_linear(bias, cin, cout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, cin, generator=g).transpose(0, 1).requires_grad_()  # non-contiguous input
    w = torch.randn(cout, cin, generator=g, requires_grad=True)
    b = torch.randn(cout, generator=g, requires_grad=True) if bias else None
    assert onednn_linear_applies(x, w)
    out = fast_linear(x, w, b)
    gy = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, w] + ([b] if bias else []), gy)
    ref = F.linear(x, w, b)
    want = torch.autograd.grad(ref, [x, w] + ([b] if bias else []), gy)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(layers._ONEDNN_LINEAR is None, reason="this torch build has no oneDNN linear op")
def test_fused_mlp_matches_the_plain_layers(plain_paths):
    """fc1-GELU-fc2 as one node (GELU gradient written in place) equals the three layers."""
    torch.manual_seed(0)
    mlp = layers.Mlp(24, 96)
    x = torch.randn(3, 7, 24, requires_grad=True)
    params = [x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    out = mlp(x)
    assert out.grad_fn.name() == "_OneDNNMlpBackward"
    gy = torch.randn_like(out)
    got = torch.autograd.grad(out, params, gy)
    plain_paths()
    ref = mlp(x)
    assert ref.grad_fn.name() != "_OneDNNMlpBackward"
    want = torch.autograd.grad(ref, params, gy)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)


def test_onednn_linear_stays_out_of_autocast_and_other_dtypes(monkeypatch):
    w = torch.randn(8, 4)
    assert onednn_linear_applies(torch.randn(2, 4), w) == (layers._ONEDNN_LINEAR is not None)
    monkeypatch.setattr(layers, "ONEDNN_MIN_MACS", 2 * 4 * 8 + 1)  # small products keep F.linear
    assert not onednn_linear_applies(torch.randn(2, 4), w)
    monkeypatch.setattr(layers, "ONEDNN_MIN_MACS", 0)
    assert not onednn_linear_applies(torch.randn(2, 4, dtype=torch.bfloat16), w)
    assert not onednn_linear_applies(torch.randn(2, 4, device="meta"), w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_linear_applies(torch.randn(2, 4), w)
        assert fast_linear(torch.randn(2, 4), w).dtype == torch.bfloat16


def test_blas_backend_keeps_f_linear(monkeypatch):
    monkeypatch.setattr(layers, "CPU_LINEAR_BACKEND", "blas")
    x, w = torch.randn(2, 4, requires_grad=True), torch.randn(8, 4)
    assert not onednn_linear_applies(x, w)
    out = fast_linear(x, w)
    assert out.grad_fn.name() == "MmBackward0"  # autograd's own linear, not _OneDNNLinear
    mlp = layers.Mlp(4, 8)
    assert mlp(x.unsqueeze(0)).grad_fn.name() != "_OneDNNMlpBackward"


@pytest.mark.parametrize("choice,vendor,expected", [
    ("auto", "AuthenticAMD", "onednn"), ("auto", "GenuineIntel", "blas"), ("auto", "", "blas"),
    ("onednn", "GenuineIntel", "onednn"), ("blas", "AuthenticAMD", "blas"),
])
def test_cpu_linear_backend_by_vendor_and_by_hand(choice, vendor, expected):
    assert layers.resolve_cpu_linear_backend(choice, vendor) == expected


def test_cpu_linear_backend_refuses_unknown_choice():
    with pytest.raises(ValueError, match=r"MIXMIM_CPU_LINEAR='mkl': expected one of auto, onednn, blas"):
        layers.resolve_cpu_linear_backend("mkl", "GenuineIntel")


def test_cpu_vendor_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert layers.cpu_vendor(info) == "AuthenticAMD"
    assert layers.cpu_vendor(tmp_path / "missing") == ""


def test_use_fast_linears_keeps_parameters_and_outputs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.GELU(), torch.nn.Linear(7, 3, bias=False))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 6)
    ref = net(x)
    use_fast_linears(net)
    assert all(type(m) is Linear for m in (net[0], net[2]))
    assert net.state_dict().keys() == before.keys()
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-6)


def test_reorder_tokens_round_trip_and_gradient():
    x = torch.randn(2, 16, 3, requires_grad=True)
    a, b = torch.randperm(16), torch.randperm(16)
    y = reorder_tokens(x, None, a)
    torch.testing.assert_close(y, x[:, a])
    z = reorder_tokens(y, a, b)
    torch.testing.assert_close(z, x[:, b])
    back = reorder_tokens(z, b, None)
    torch.testing.assert_close(back, x)
    gy = torch.randn_like(back)
    (gx,) = torch.autograd.grad(back, x, gy)
    torch.testing.assert_close(gx, gy)


def test_restricted_plan_has_one_segment_per_group_of_each_window():
    grid, window = (8, 8), (4, 4)
    groups = torch.zeros(1, 64)
    groups[0, :20] = 1  # rows 0-1 and 4 tokens of row 2 (row-major) in group 1
    plan = attention_plan(grid, window, groups)
    sizes = [e - s for s, e in plan.segments]
    # window 0: 4 of group 0, then 12 of group 1; window 1: 8 and 8; windows 2 and 3: group 0 only
    assert sizes == [4, 12, 8, 8, 16, 16]
    assert [i.numel() for i in plan.segment_index] == [n * n for n in sizes]
    # every segment holds one group of one window
    rows = plan.order // 8
    cols = plan.order % 8
    win = (rows // 4) * 2 + cols // 4
    for s, e in plan.segments:
        assert win[s:e].unique().numel() == 1 and groups[0, plan.order[s:e]].unique().numel() == 1
    assert sorted(plan.order.tolist()) == list(range(64))
    kept = attention_plan(grid, window, groups, split_windows=False)
    assert kept.segments is None and kept.group_bias is not None


@pytest.mark.parametrize("grid,window", [((8, 8), (4, 4)), ((8, 8), (8, 8))])
@pytest.mark.parametrize("restrict", [False, True])
@pytest.mark.parametrize("split_windows", [True, False])
def test_block_in_plan_order_matches_plain_windows(plain_paths, grid, window, restrict, split_windows):
    """A block on tokens in plan order (training route) equals the same block on row-major
    tokens with the fused attention and, when restricted, a -inf group bias."""
    torch.manual_seed(0)
    blk = MixMIMBlock(16, 2, grid, window).train()
    with torch.no_grad():
        blk.attn.rel_pos_table.normal_()
    x = torch.randn(3, grid[0] * grid[1], 16, requires_grad=True)
    groups = (torch.rand(1, grid[0] * grid[1]) < 0.5).float() if restrict else None
    plan = attention_plan(grid, blk.window, groups, split_windows=split_windows)
    if restrict and (split_windows or plan.num_windows == 1):
        assert plan.segments is not None and len(plan.segments) >= 2 * plan.num_windows - 1
    out = reorder_tokens(blk(reorder_tokens(x, None, plan.order), plan), plan.order, None)
    gy = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, blk.attn.rel_pos_table, blk.attn.qkv.weight], gy)

    plain_paths()
    windows = attention_plan(grid, blk.window)  # window order only
    if groups is not None:
        windows.group_bias = layers.group_attention_bias(groups, grid, blk.window, torch.float32)
    ref = reorder_tokens(blk(reorder_tokens(x, None, windows.order), windows), windows.order, None)
    want = torch.autograd.grad(ref, [x, blk.attn.rel_pos_table, blk.attn.qkv.weight], gy)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("unmix", ["masked_attention", "none"])
def test_pretraining_step_matches_the_plain_formulation(plain_paths, unmix):
    imgs = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])

    def step():
        torch.manual_seed(0)
        model = build_pretrainer(**SMALL, unmix=unmix).train()
        loss = model(imgs, mask=mask).loss
        loss.backward()
        return loss.detach(), grads(model)

    fast = step()
    plain_paths()
    assert_same_step(*fast, *step())


def test_finetuning_step_matches_the_plain_formulation(plain_paths):
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))

    def step():
        torch.manual_seed(0)
        model = build_classifier(num_classes=5, **{k: v for k, v in SMALL.items() if not k.startswith("decoder")})
        loss = model.train()(imgs).logsumexp(-1).sum()
        loss.backward()
        return loss.detach(), grads(model)

    fast = step()
    plain_paths()
    assert_same_step(*fast, *step())


def test_use_checkpoint_gives_the_same_gradients():
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    out = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_pretrainer(**SMALL, use_checkpoint=ckpt).train()
        loss = model(imgs, mask=mask).loss
        loss.backward()
        out.append((loss.detach(), grads(model)))
    assert_same_step(*out[0], *out[1])
