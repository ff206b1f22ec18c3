"""The fill ablation (Table 6) and dual reconstruction (Table 7) compute different things."""

from __future__ import annotations

import itertools

import pytest
import torch

from mixmim.models import build_pretrainer
from mixmim.models.pretrainer import check_fill_settings

SMALL = dict(img_size=64, patch_size=4, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
             window_size=(8, 8, 4, 2), decoder_dim=32, decoder_depth=1, decoder_num_heads=2)

#: Table 6 rows and the Table 7 "no dual" row, as constructor arguments.
VARIANTS = {
    "mix": dict(fill="mix"),
    "zero": dict(fill="zero"),
    "learnable": dict(fill="learnable"),
    "shuffle": dict(fill="shuffle"),
    "zoomin": dict(fill="zoomin"),
    "mix-single": dict(fill="mix", dual=False),
}
MASK = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # 2x2 grid of 32 px cells


def build(**kw):
    torch.manual_seed(0)
    return build_pretrainer(**{**SMALL, **kw}).eval()


@pytest.fixture
def batch():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_table6_and_table7_variants_give_different_losses(batch):
    reference = build().state_dict()
    losses = {}
    for name, kw in VARIANTS.items():
        model = build(**kw)
        missing, unexpected = model.load_state_dict(reference, strict=False)
        # Same weights: only the variant's own parameters (the learnable fill token) are not shared,
        # and only the mix fills keep the decoder's mask token.
        assert set(missing) <= {"fill_token"}, missing
        assert set(unexpected) <= {"decoder.mask_token"}, unexpected
        torch.manual_seed(5)  # shuffle order and zoom-in crop
        with torch.no_grad():
            losses[name] = model(batch, mask=MASK).loss.item()
    # The learnable token starts near zero (std 0.02), so zero and learnable differ least; identical
    # computations give bit-identical losses, float noise is ~1e-7 at a loss of ~1.
    for (a, la), (b, lb) in itertools.combinations(losses.items(), 2):
        assert abs(la - lb) > 1e-6, f"{a} and {b} give the same loss {la}"


@pytest.mark.parametrize("fill", ["zero", "learnable", "shuffle", "zoomin"])
def test_non_mix_fills_encode_the_whole_image_and_decode_every_cell(fill):
    model = build(fill=fill)
    assert (model.unmix, model.dual) == ("none", False)
    assert model.decoder.mask_token is None
    assert "decoder.mask_token" not in model.no_weight_decay()


def test_what_fills_the_masked_cells_reaches_the_visible_cells(batch):
    model = build(fill="learnable")
    with torch.no_grad():
        ref = model(batch, mask=MASK)
        # Not a constant shift: every LayerNorm would remove one added to all channels alike.
        model.fill_token.add_(torch.randn(model.fill_token.shape, generator=torch.Generator().manual_seed(2)))
        out = model(batch, mask=MASK)
    visible = MASK[0] == 0
    assert not torch.allclose(out.latent[:, visible], ref.latent[:, visible], atol=1e-4)
    assert not torch.isclose(out.loss, ref.loss)


def test_the_prediction_of_a_masked_cell_reads_its_own_encoder_output(batch):
    """SimMIM-style decoding: the decoder's input at a filled cell is the encoder's output there."""
    model = build(fill="zero")
    latent = torch.randn(4, 4, model.encoder.num_features)
    with torch.no_grad():
        ref = model.decoder(latent, None, False)
        changed = latent.clone()
        changed[:, 0] += 1.0  # cell 0 is masked in MASK
        out = model.decoder(changed, None, False)
    assert not torch.allclose(out, ref)


def test_mix_fill_still_hides_the_partner_and_uses_mask_tokens(batch):
    model = build()
    assert (model.unmix, model.dual) == ("masked_attention", True)
    assert model.decoder.mask_token is not None
    with torch.no_grad():
        pred = model(batch, mask=MASK).pred
    assert pred.shape == (8, 4, 32 * 32 * 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fill="zero", unmix="masked_attention"), "fill='zero' with unmix='masked_attention'"),
        (dict(fill="shuffle", unmix="mix_embedding"), "fill='shuffle' with unmix='mix_embedding'"),
        (dict(fill="learnable", dual=True), "dual=True with fill='learnable'"),
        (dict(fill="zoomin", unmix="none", dual=True), "dual=True with fill='zoomin'"),
    ],
)
def test_meaningless_fill_combinations_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_pretrainer(**{**SMALL, **kwargs})


def test_fill_defaults_resolve_per_fill():
    assert check_fill_settings("mix", None, None) == ("masked_attention", True)
    assert check_fill_settings("mix", "none", False) == ("none", False)
    assert check_fill_settings("zoomin", None, None) == ("none", False)


def test_decoder_without_mask_token_refuses_a_mask():
    model = build(fill="zero")
    with pytest.raises(ValueError, match="without a mask token"):
        model.decoder(torch.randn(1, 4, model.encoder.num_features), MASK, False)


def test_every_ablation_variant_builds_under_the_fill_rules():
    """The shipped Table 6-10 variants are combinations the model accepts, and the fill variants
    really encode one image whole (no group restriction) and decode every cell."""
    from pathlib import Path

    from mixmim.engine.config import PretrainConfig, from_mapping
    from mixmim.engine.engine_pretrain import build_model
    from mixmim.pipeline import load_params, merged

    params = load_params(Path(__file__).resolve().parents[1] / "pipelines" / "ablations" / "params.yaml")
    for name in params.section("variants"):
        model = build_model(from_mapping(PretrainConfig, merged(params, ["pretrain", f"variants.{name}"])))
        if model.fill != "mix":
            assert (model.unmix, model.dual, model.decoder.mask_token) == ("none", False, None), name
