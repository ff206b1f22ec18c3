"""MixMIM on timm encoders (issue 6): ViT, Swin, PVT v2, ResNet / BiT ResNetV2 adapters.

Tiny configurations on 64 px images on the CPU. Every encoder but ViT has output stride
32, so the mask grid is 2x2 and MASK = [[1, 0], [0, 1]] puts a group boundary through
the middle of every receptive field; ViT-*/16 has a 4x4 grid.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import timm
import torch
from timm.layers import GroupNormAct

from mixmim.cli import main
from mixmim.flops import model_info
from mixmim.models import PretrainOutput
from mixmim.models.adapters import (
    GroupContext, PVTv2Adapter, ResNetAdapter, SwinAdapter, ViTAdapter, build_adapter,
)
from mixmim.models.adapters.mixed_ops import mixed_conv

DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_num_heads=2)

# name -> (timm name, timm kwargs, adapter class, extra adapter options)
CONFIGS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=64, depth=2, embed_dim=32, num_heads=2), ViTAdapter, {}),
    # window 4 with shift 2 on the 16x16 stage-1 map: shifted windows straddle the 32 px cells
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=64, embed_dim=16, depths=(2, 2, 2, 1), num_heads=(1, 2, 2, 4), window_size=4),
             SwinAdapter, {}),
    # spatial reduction by stride-8/4/2 convolutions (aligned with the cells)
    "pvt_v2": ("pvt_v2_b0", dict(embed_dims=(16, 32, 32, 64), num_heads=(1, 2, 2, 4), depths=(1, 1, 1, 1)),
               PVTv2Adapter, dict(img_size=64)),
    # linear SRA: adaptive 7x7 average pool of a 16x16 map, whose bins straddle the cells
    "pvt_v2_linear": ("pvt_v2_b0", dict(embed_dims=(16, 32, 32, 64), num_heads=(1, 2, 2, 4),
                                        depths=(1, 1, 1, 1), linear=True), PVTv2Adapter, dict(img_size=64)),
    "resnet": ("resnet18", dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64)), ResNetAdapter, dict(img_size=64)),
    # deep 3x3 stem and average-pool downsampling
    "resnet_d": ("resnet26d", dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64)), ResNetAdapter,
                 dict(img_size=64)),
    # BiT: pre-activation, weight standardisation, GroupNorm, "fixed" padded stem (narrowed here)
    "bit": ("resnetv2_50x1_bit", dict(channels=(32, 64, 128, 256),
                                      norm_layer=functools.partial(GroupNormAct, num_groups=8)),
            ResNetAdapter, dict(img_size=64)),
}
FAMILIES = list(CONFIGS)


def build(family: str, **options):
    name, kwargs, _, extra = CONFIGS[family]
    torch.manual_seed(0)
    return build_adapter(name, **kwargs, **extra, **DECODER, **options).eval()


def plain_model(family: str):
    name, kwargs, _, _ = CONFIGS[family]
    return timm.create_model(name, **kwargs).eval()


def plain_tokens(family: str, model, imgs: torch.Tensor) -> torch.Tensor:
    """The plain timm model's final features as (B, L, C) stride-grid tokens."""
    f = model.forward_features(imgs)
    if family == "vit":
        return f[:, model.num_prefix_tokens:]
    if family == "swin":
        return f.flatten(1, 2)
    return f.flatten(2).transpose(1, 2)


def mask_for(adapter) -> torch.Tensor:
    m = torch.zeros(1, adapter.num_cells)
    m[0, ::3] = 1.0  # 2x2 grid: cells 0 and 3; 4x4 grid: a scattered third
    return m


@pytest.fixture(scope="module")
def imgs():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def partner_changed(imgs: torch.Tensor) -> torch.Tensor:
    changed = imgs.clone()
    changed[1] += torch.randn(changed[1].shape, generator=torch.Generator().manual_seed(2))  # image 0's partner
    return changed


# --------------------------------------------------------------------- family and layout
@pytest.mark.parametrize("family", FAMILIES)
def test_builder_picks_the_family_from_the_timm_class(family):
    adapter = build(family)
    assert type(adapter) is CONFIGS[family][2]
    assert adapter.stride == (16 if family == "vit" else 32)
    assert adapter.mask_grid == ((4, 4) if family == "vit" else (2, 2))
    assert all(k.startswith(("encoder.", "decoder.")) for k in adapter.state_dict())


# --------------------------------------------------------------------- group restriction
@pytest.mark.parametrize("family", FAMILIES)
def test_group_restriction_keeps_the_partner_out(family, imgs):
    adapter = build(family)
    mask = mask_for(adapter)
    own = mask[0] == 0
    with torch.no_grad():
        ref = adapter.forward_features(imgs, mask=mask)
        out = adapter.forward_features(partner_changed(imgs), mask=mask)
    # image 0's own cells (slot 0, mask == 0) and image 0's cells shown in slot 1 (mask == 1)
    torch.testing.assert_close(out[0, own], ref[0, own], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1, ~own], ref[1, ~own], rtol=0, atol=1e-5)
    assert (out[0, ~own] - ref[0, ~own]).abs().max() > 1e-2  # the partner's cells did change


@pytest.mark.parametrize("family", FAMILIES)
def test_without_the_restriction_the_partner_leaks(family, imgs):
    adapter = build(family, restrict=False)
    mask = mask_for(adapter)
    own = mask[0] == 0
    with torch.no_grad():
        ref = adapter.forward_features(imgs, mask=mask)
        out = adapter.forward_features(partner_changed(imgs), mask=mask)
    assert (out[0, own] - ref[0, own]).abs().max() > 1e-3


# --------------------------------------------------------------------- plain timm equivalence
@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_is_the_plain_timm_model(family, imgs):
    adapter = build(family)
    plain = plain_model(family)
    plain.load_state_dict(adapter.encoder.state_dict(), strict=True)
    with torch.no_grad():
        expected = plain_tokens(family, plain, imgs)
        # all-zero mask: no mixing, one group, the restriction in place
        got = adapter.forward_features(imgs, mask=torch.zeros(1, adapter.num_cells))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        # all-one mask: every cell from the partner, i.e. the plain model on the flipped batch
        got = adapter.forward_features(imgs, mask=torch.ones(1, adapter.num_cells))
        torch.testing.assert_close(got, expected.flip(0), rtol=1e-4, atol=1e-4)
        # outside the pretraining forward the swapped operators are inert
        torch.testing.assert_close(adapter.encoder(imgs), plain(imgs), rtol=0, atol=0)


# --------------------------------------------------------------------- loss
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_is_finite_and_reaches_the_encoder(family, imgs):
    adapter = build(family).train()
    out = adapter(imgs)
    assert isinstance(out, PretrainOutput)
    assert out.mask.shape == (1, adapter.num_cells) and out.mask.sum() == int(adapter.num_cells * 0.5)
    assert out.pred.shape == (4, adapter.num_cells, adapter.stride**2 * 3)  # dual: 2B rows
    assert out.latent.shape == (2, adapter.num_cells, adapter.num_features)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    first = next(p for p in adapter.encoder.parameters() if p.requires_grad)  # patch embedding / stem
    assert first.grad is not None and torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0


def test_given_mask_is_used_and_checked(imgs):
    adapter = build("vit")
    mask = mask_for(adapter)
    with torch.no_grad():
        out = adapter(imgs, mask=mask)
    assert torch.equal(out.mask, mask)
    with pytest.raises(ValueError, match="expected \\(1, 16\\)"):
        adapter(imgs, mask=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="does not match the adapter"):
        adapter(imgs[:, :, :32])


def test_deepcopy_rebinds_the_swapped_operators(imgs):
    adapter = build("resnet")
    twin = copy.deepcopy(adapter)
    assert twin.encoder.conv1.forward.args[-1] is twin.ctx
    mask = mask_for(adapter)
    with torch.no_grad():
        torch.testing.assert_close(twin.forward_features(imgs, mask), adapter.forward_features(imgs, mask))


# --------------------------------------------------------------------- operators
def test_mixed_convolution_renormalises_by_the_valid_fraction():
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.fill_(0.5)
    ctx = GroupContext((2, 2))
    mixed_conv(conv, ctx)
    x = torch.ones(1, 1, 8, 8)
    x[..., 4:, :] = 100.0  # bottom half belongs to group 1 below; its pixels must not leak up
    with ctx.use(torch.tensor([[0.0, 0.0, 1.0, 1.0]])), torch.no_grad():
        y = conv(x)
    inner = y[0, 0, 1:-1, 1:-1]
    # every interior window sees only its own group's constant, rescaled to the full 3x3 window
    expected = torch.where(torch.arange(1, 7)[:, None] < 4, 9.0 + 0.5, 900.0 + 0.5).expand(6, 6)
    torch.testing.assert_close(inner, expected)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))


def test_models_that_pool_across_positions_are_refused():
    with pytest.raises(NotImplementedError, match="se"):
        build_adapter("seresnet18", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), img_size=64, **DECODER)
    with pytest.raises(NotImplementedError, match="no MixMIM adapter for ConvNeXt"):
        build_adapter("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), **DECODER)


def test_table13_encoders_build_on_the_meta_device():
    with torch.device("meta"):
        adapter = build_adapter("resnetv2_50x3_bit")
        out = adapter(torch.zeros(2, 3, 224, 224))
    assert adapter.mask_grid == (7, 7) and adapter.num_features == 6144
    assert out.pred.shape == (4, 49, 32 * 32 * 3)
    # stem conv, padding, max pool, 16 3x3 convs, 3 GroupNorms per block and the final one
    assert len(adapter.mixed_modules) == 1 + 1 + 1 + 16 + 48 + 1


# --------------------------------------------------------------------- Table 2 figures
@pytest.mark.parametrize("name, params, gflops", [
    ("vit_base_patch16_224", (86.0, 86.0), (17.5, 17.5)),
    ("swin_base_patch4_window7_224", (88.0, 88.0), (15.4, 15.6)),
])
def test_table2_figures_of_timm_encoders_within_two_percent(name, params, gflops):
    info = model_info(name)
    assert info.img_size == 224
    assert params[0] * 0.98 <= info.params_m <= params[1] * 1.02
    assert gflops[0] * 0.98 <= info.gflops <= gflops[1] * 1.02


def test_info_cli_accepts_timm_names(capsys):
    assert main(["info", "vit_base_patch16_224", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "vit_base_patch16_224" and out["img_size"] == 224
    assert abs(out["gflops"] - 17.5) / 17.5 < 0.02 and abs(out["params_m"] - 86) / 86 < 0.02
