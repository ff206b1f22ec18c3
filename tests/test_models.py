"""Behaviour of the encoder, the pretraining model and its ablations, and bad input."""

from __future__ import annotations

import pytest
import torch

from mixmim.models import build_classifier, build_pretrainer
from mixmim.models.masking import block_mask, random_mask, sample_mask

SMALL = dict(img_size=64, patch_size=4, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
             window_size=(8, 8, 4, 2), decoder_dim=32, decoder_depth=1, decoder_num_heads=2)


def small(**kw):
    torch.manual_seed(0)
    return build_pretrainer(**{**SMALL, **kw}).eval()


def cell_pixels(mask: torch.Tensor, cell: int, grid: tuple[int, int]) -> torch.Tensor:
    """Pixel-level (H, W) boolean map of the cells where mask == 1."""
    m = mask.reshape(grid).bool()
    return m.repeat_interleave(cell, 0).repeat_interleave(cell, 1)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 64, 64, generator=g)


MASK = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # 2x2 grid of 32 px cells


def tokens_of_group(latent: torch.Tensor, mask: torch.Tensor, value: int) -> torch.Tensor:
    return latent[:, mask[0] == value]


# --------------------------------------------------------------------- unmixing
def test_masked_attention_isolates_the_groups(batch):
    model = small()
    with torch.no_grad():
        ref = model(batch, mask=MASK).latent
        changed = batch.clone()
        changed[3] += torch.randn_like(changed[3])  # image 3 is image 0's partner
        out = model(changed, mask=MASK).latent
    # Image 0's own cells (mask == 0) in slot 0 and image 0's cells shown in slot 3 (mask == 1).
    torch.testing.assert_close(tokens_of_group(out, MASK, 0)[0], tokens_of_group(ref, MASK, 0)[0])
    torch.testing.assert_close(tokens_of_group(out, MASK, 1)[3], tokens_of_group(ref, MASK, 1)[3])
    assert not torch.allclose(tokens_of_group(out, MASK, 1)[0], tokens_of_group(ref, MASK, 1)[0])


@pytest.mark.parametrize("unmix", ["none", "mix_embedding"])
def test_without_masked_attention_the_partner_leaks(batch, unmix):
    model = small(unmix=unmix)
    with torch.no_grad():
        ref = model(batch, mask=MASK).latent
        changed = batch.clone()
        changed[3] += torch.randn_like(changed[3])
        out = model(changed, mask=MASK).latent
    assert not torch.allclose(tokens_of_group(out, MASK, 0)[0], tokens_of_group(ref, MASK, 0)[0], atol=1e-4)


def test_mix_embedding_marks_the_groups(batch):
    model = small(unmix="mix_embedding")
    assert [tuple(p.shape) for p in model.mix_embed] == [(2, 16), (2, 32), (2, 64), (2, 128)]
    with torch.no_grad():
        ref = model(batch, mask=MASK).latent
        model.mix_embed[0][1] += 1.0  # group 1's embedding only
        out = model(batch, mask=MASK).latent
        none = small(unmix="none")
        none.load_state_dict({k: v for k, v in model.state_dict().items() if "mix_embed" not in k})
        plain = none(batch, mask=MASK).latent
    assert not torch.allclose(out, ref)
    assert not torch.allclose(plain, ref)
    assert small().mix_embed is None and none.mix_embed is None


# --------------------------------------------------------------------- fills
@pytest.mark.parametrize("fill", ["zero", "learnable"])
def test_token_fills_hide_the_masked_pixels_and_ignore_other_images(batch, fill):
    model = small(fill=fill)
    assert model.dual is False
    masked = cell_pixels(MASK, 32, (2, 2))
    with torch.no_grad():
        ref = model(batch, mask=MASK).latent
        changed = batch.clone()
        changed[0][:, masked] += 5.0  # image 0's hidden pixels
        changed[1:] = torch.randn_like(changed[1:])  # every other image
        out = model(changed, mask=MASK).latent
    torch.testing.assert_close(out[0], ref[0])
    if fill == "learnable":
        with torch.no_grad():
            model.fill_token += 1.0
            assert not torch.allclose(model(batch, mask=MASK).latent[0], ref[0])


def test_shuffle_fill_permutes_the_masked_cells_of_each_image(batch):
    model = small(fill="shuffle")
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    tokens = model.encoder.embed(batch)
    torch.manual_seed(3)
    filled = model.fill_tokens(batch, tokens, mask)
    cells = lambda t: t.view(4, 2, 8, 2, 8, -1).permute(0, 1, 3, 2, 4, 5).reshape(4, 4, -1)
    src, dst = cells(tokens), cells(filled)
    for b in range(4):
        own = {tuple(src[b, i].tolist()) for i in (0, 1, 3)}
        assert {tuple(dst[b, i].tolist()) for i in (0, 1, 3)} == own


def test_zoomin_fill_comes_from_the_same_image(batch):
    model = small(fill="zoomin")
    flat = torch.ones(2, 3, 64, 64) * torch.tensor([0.5, -1.0]).view(2, 1, 1, 1)
    torch.testing.assert_close(model._zoomed_images(flat), flat)  # a flat image zooms to itself
    with torch.no_grad():
        ref = model(batch, mask=MASK).latent
        changed = batch.clone()
        changed[1:] = torch.randn_like(changed[1:])
        torch.manual_seed(0)
        a = model(changed, mask=MASK).latent
        torch.manual_seed(0)
        b = model(batch, mask=MASK).latent
    torch.testing.assert_close(a[0], b[0])
    assert ref.shape == a.shape


def test_dual_requires_mix_fill():
    with pytest.raises(ValueError, match="fill='zero'"):
        small(fill="zero", dual=True)


# --------------------------------------------------------------------- dual loss
def test_single_reconstruction_scores_only_masked_cells(batch):
    model = small(dual=False)
    out = model(batch, mask=MASK)
    assert out.pred.shape == (4, 4, 32 * 32 * 3)
    pred = out.pred.detach().clone()
    pred[:, MASK[0] == 0] += 3.0
    assert torch.isclose(model.loss(batch, pred, MASK), out.loss.detach())
    pred[:, MASK[0] == 1] += 3.0
    assert not torch.isclose(model.loss(batch, pred, MASK), out.loss.detach())


def test_dual_reconstruction_scores_both_images(batch):
    model = small()
    out = model(batch, mask=MASK)
    assert out.pred.shape == (8, 4, 32 * 32 * 3)
    for rows, cells in ((slice(0, 4), MASK[0] == 0), (slice(4, 8), MASK[0] == 1)):
        pred = out.pred.detach().clone()
        pred[rows][:, cells] += 3.0  # cells each branch cannot be scored on
        assert torch.isclose(model.loss(batch, pred, MASK), out.loss.detach())
    pred = out.pred.detach().clone()
    pred[4:, MASK[0] == 0] += 3.0
    assert not torch.isclose(model.loss(batch, pred, MASK), out.loss.detach())


def test_loss_backpropagates_and_mask_is_sampled(batch):
    model = small().train()
    out = model(batch)
    assert out.mask.shape == (1, 4) and out.mask.sum() == 2
    out.loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.decoder.mask_token.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    grads = []
    for ckpt in (False, True):
        model = small(use_checkpoint=ckpt).train()
        model(batch, mask=MASK).loss.backward()
        grads.append(model.encoder.stages[0].blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


# --------------------------------------------------------------------- masks
def test_random_mask_has_exact_count():
    for ratio in (0.25, 0.5, 0.75):
        assert random_mask((7, 7), ratio).sum() == int(49 * ratio)


def test_block_mask_is_one_rectangle():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = block_mask((7, 7), 0.5, generator=g).reshape(7, 7)
        rows, cols = m.any(1).nonzero().squeeze(1), m.any(0).nonzero().squeeze(1)
        assert m.sum() == len(rows) * len(cols)  # filled bounding box
        assert rows.max() - rows.min() + 1 == len(rows) and cols.max() - cols.min() + 1 == len(cols)
        assert 15 <= m.sum() <= 35


def test_range_mask_ratio_varies_per_batch():
    g = torch.Generator().manual_seed(0)
    counts = {int(sample_mask((10, 10), "random", 0.5, 0.3, generator=g).sum()) for _ in range(30)}
    assert min(counts) >= 50 and max(counts) < 80 and len(counts) > 5


def test_stage_masks_are_nearest_upsampled():
    enc = small().encoder
    masks = enc.stage_masks(MASK)
    assert [m.shape[1] for m in masks] == [256, 64, 16, 4]
    full = masks[0].reshape(16, 16)
    assert full[:8, :8].eq(1).all() and full[:8, 8:].eq(0).all() and full[8:, 8:].eq(1).all()


# --------------------------------------------------------------------- encoder
@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 32)])
def test_feature_maps_have_strides_4_to_32(size):
    model = build_classifier(num_classes=3, **{**{k: v for k, v in SMALL.items() if not k.startswith("decoder")},
                                               "img_size": size, "window_size": (8, 4, 2, 3)})
    feats = model.encoder.forward_features(torch.randn(2, 3, *size))
    for i, f in enumerate(feats):
        assert f.shape == (2, 16 * 2**i, size[0] // (4 * 2**i), size[1] // (4 * 2**i))
    assert model(torch.randn(2, 3, *size)).shape == (2, 3)


def test_patch_size_and_stage_count_set_the_stride():
    model = build_pretrainer(img_size=48, patch_size=2, embed_dim=8, depths=(1, 1, 1), num_heads=(1, 1, 2),
                             window_size=6, decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
    assert model.stride == 8 and model.encoder.mask_grid == (6, 6)
    out = model(torch.randn(2, 3, 48, 48))
    assert out.pred.shape == (4, 36, 8 * 8 * 3)


def test_large_window_becomes_global_attention():
    model = small()
    assert model.encoder.stages[2].blocks[0].window == (4, 4)  # 4x4 map, window 4
    enc = build_classifier(num_classes=2, img_size=(64, 96), embed_dim=16, depths=(1, 1, 1, 1), num_heads=1,
                           window_size=(8, 4, 2, 3)).encoder
    # Stage 4 is a 2x3 map: a window of 3 covers it whole, as one non-square window.
    assert [s.blocks[0].window for s in enc.stages] == [(8, 8), (4, 4), (2, 2), (2, 3)]


def test_registered_sizes_build_by_name_with_overrides():
    model = build_pretrainer("mixmim_nano", fill="zero", dual=False, mask_type="block")
    assert (model.fill, model.dual, model.mask_type) == ("zero", False, "block")
    assert build_classifier("mixmim_nano", num_classes=7).head.out_features == 7
    with pytest.raises(ValueError, match="mixmim_gigantic"):
        build_pretrainer("mixmim_gigantic")


# --------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(img_size=100), "not divisible by the encoder stride 32"),
        (dict(img_size=96, window_size=(7, 7, 7, 7)), r"window \(7, 7\) does not tile the 24x24"),
        (dict(num_heads=(3, 2, 2, 4)), "3 heads do not divide the width 16"),
        (dict(decoder_num_heads=5), "decoder_num_heads=5"),
        (dict(fill="noise"), "fill='noise'"),
        (dict(unmix="both"), "unmix='both'"),
        (dict(mask_type="grid"), "mask_type='grid'"),
        (dict(mask_ratio=1.2), "mask_ratio=1.2"),
        (dict(num_heads=(1, 2)), "one per stage"),
    ],
)
def test_bad_configuration_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_pretrainer(**{**SMALL, **kwargs})


def test_bad_masks_and_inputs_are_named(batch):
    model = small()
    with pytest.raises(ValueError, match=r"mask of shape \(4,\); expected \(1, 4\)"):
        model(batch, mask=torch.ones(4))
    with pytest.raises(ValueError, match="mask holds the value 0.5"):
        model(batch, mask=torch.tensor([[0.5, 0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"does not match the encoder, which was built for \(B, C, 64, 64\)"):
        model(torch.randn(2, 3, 96, 96))
