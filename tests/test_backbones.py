"""MixMIM on timm encoders in the engines and the backbones pipelines (issue 6; Tables 3 and 13).

The engines pretrain a timm name through its MixMIM adapter and finetune it as the plain
timm model, initialised from the pretraining's ``encoder.*`` weights; the pipelines'
params build those models for every family. Tiny widths on 64 px images, CPU only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
import yaml
from mlflow import MlflowClient
from timm.models.vision_transformer import VisionTransformer

from mixmim.checkpoint import load_file
from mixmim.data.builtin import write_imagenet
from mixmim.engine.config import FinetuneConfig, PretrainConfig, from_mapping
from mixmim.engine.engine_finetune import build_model as build_finetune_model
from mixmim.engine.engine_finetune import classifier_prefixes, finetune, input_size
from mixmim.engine.optim import build_adamw
from mixmim.engine.engine_pretrain import build_model as build_pretrain_model
from mixmim.engine.engine_pretrain import pretrain
from mixmim.models.adapters import ADAPTER_OPTIONS, TimmMixMIMAdapter
from mixmim.pipeline import load_params, merged, tracking_fields
from mixmim.report.results import Result, Results
from mixmim.report.tables import Context, table3, table13
from mixmim.tracking import PRETRAIN_RUN_TAG

REPO = Path(__file__).resolve().parents[1]
BACKBONES = REPO / "pipelines" / "backbones"
PAPER = REPO / "pipelines" / "paper"
DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_num_heads=2)

# family -> (timm name, timm kwargs): tiny encoders of each adapter family at 64 px
TINY = {
    "vit": ("vit_tiny_patch16_224", dict(depth=2, embed_dim=32, num_heads=2)),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(embed_dim=16, depths=(2, 2, 2, 1), num_heads=(1, 2, 2, 4), window_size=4)),
    "pvt": ("pvt_v2_b0", dict(embed_dims=(16, 32, 32, 64), num_heads=(1, 2, 2, 4), depths=(1, 1, 1, 1))),
    "resnet": ("resnet18", dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))),
    # BiT (GroupNorm, weight standardisation); its builder fixes the depth, so narrow it only
    "bit": ("resnetv2_50x1_bit", dict(channels=(128, 128, 128, 128))),
}


def tiny(family: str) -> tuple[str, dict]:
    name, kwargs = TINY[family]
    return name, dict(kwargs)


def pretrain_config(family: str, **kw) -> PretrainConfig:
    name, kwargs = tiny(family)
    return from_mapping(PretrainConfig, {"model": name, "img_size": 64, "model_kwargs": {**kwargs, **DECODER}, **kw})


def finetune_config(family: str, **kw) -> FinetuneConfig:
    name, kwargs = tiny(family)
    return from_mapping(FinetuneConfig, {"model": name, "img_size": 64, "model_kwargs": kwargs, **kw})


def encoder_weights(adapter: TimmMixMIMAdapter) -> dict[str, torch.Tensor]:
    return {k[len("encoder."):]: v for k, v in adapter.state_dict().items() if k.startswith("encoder.")}


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "imagenet"
    write_imagenet(root, seed=0, image_size=64, num_classes=4, train_per_class=8, val_per_class=4)
    return root


def test_pretrain_then_finetune_a_timm_vit(data_root, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = dict(dataset="imagenet", data_root=str(data_root), batch_size=8, num_workers=0, epochs=1,
                  warmup_epochs=0, tracking_uri=store, experiment="backbones-tests", progress=False)
    pre = pretrain(pretrain_config("vit", output_dir=str(tmp_path / "pre"), **common))
    assert len(pre["history"]) == 1 and pre["history"][0]["train_loss"] > 0
    weights = tmp_path / "pre" / "pretrain.pt"
    saved = load_file(weights)["model"]
    assert any(k.startswith("decoder.") for k in saved)
    assert not any(k.startswith("encoder.head.") for k in saved)  # encoder built without a classifier

    quiet = dict(mixup=0.0, cutmix=0.0, label_smoothing=0.0, randaug=None, reprob=0.0, drop_path=0.0)
    ft_cfg = finetune_config("vit", init=str(weights), output_dir=str(tmp_path / "ft"), **quiet, **common)
    initial = build_finetune_model(ft_cfg, num_classes=4)
    assert type(initial) is VisionTransformer  # the plain timm model, no wrapper
    for key, value in initial.state_dict().items():
        if key.startswith("head."):
            continue
        torch.testing.assert_close(value, saved[f"encoder.{key}"], rtol=0, atol=0, msg=key)

    ft = finetune(ft_cfg)
    assert 0 <= ft["top1"] <= 100 and [h["epoch"] for h in ft["history"]] == [1]
    finetuned = load_file(tmp_path / "ft" / "finetune.pt")["model"]
    name, kwargs = tiny("vit")
    timm.create_model(name, img_size=64, num_classes=4, **kwargs).load_state_dict(finetuned, strict=True)
    # trained from the pretrained encoder: one epoch moves the weights a little, not to a fresh init
    key = "blocks.1.attn.qkv.weight"
    moved = (finetuned[key] - saved[f"encoder.{key}"]).norm()
    fresh = (finetuned[key] - build_finetune_model(finetune_config("vit"), 4).state_dict()[key]).norm()
    assert 0 < moved < 0.5 * fresh

    tags = MlflowClient(store).get_run(ft["run_id"]).data.tags
    assert tags[PRETRAIN_RUN_TAG] == pre["run_id"] and tags["mixmim.model"] == name


# --------------------------------------------------------------------------- every family
@pytest.mark.parametrize("family", list(TINY))
def test_pretrained_encoder_loads_strictly_into_the_finetuning_model(family, tmp_path):
    torch.manual_seed(0)
    adapter = build_pretrain_model(pretrain_config(family))
    assert isinstance(adapter, TimmMixMIMAdapter) and adapter.img_size == (64, 64)
    out = adapter(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(out.loss)
    path = tmp_path / "pretrain.pt"
    torch.save({"model": adapter.state_dict()}, path)

    model = build_finetune_model(finetune_config(family, init=str(path), drop_path=0.1), num_classes=5)
    heads = classifier_prefixes(model)
    assert heads
    enc = encoder_weights(adapter)
    own = model.state_dict()
    assert set(own) - set(enc) == {k for k in own if k.startswith(heads)}  # only the head is new
    for key in enc:
        torch.testing.assert_close(own[key], enc[key], rtol=0, atol=0, msg=key)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)

    # layer decay: the stem gets the smallest lr scale, the head the full lr
    opt = build_adamw(model, 1.0, 0.05, (0.9, 0.999), layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    first = next(iter(named.values()))
    head = [p for n, p in named.items() if n.startswith(heads)]
    assert all(scale[id(p)] == 1.0 for p in head)
    assert scale[id(first)] == min(scale.values()) < 0.5 ** 2
    assert len(set(scale.values())) >= 3


def test_init_from_a_finetuned_timm_checkpoint_replaces_the_head(tmp_path):
    first = build_finetune_model(finetune_config("resnet"), num_classes=3)
    path = tmp_path / "finetune.pt"
    torch.save({"model": first.state_dict()}, path)
    second = build_finetune_model(finetune_config("resnet", init=str(path)), num_classes=7)
    torch.testing.assert_close(second.layer1[0].conv1.weight, first.layer1[0].conv1.weight)
    assert second.fc.out_features == 7


def test_input_size_of_a_timm_name():
    assert input_size(finetune_config("vit")) == 64
    assert input_size(from_mapping(FinetuneConfig, {"model": "vit_base_patch16_224"})) == 224


# --------------------------------------------------------------------------- options
def test_unmix_maps_to_the_group_restriction():
    assert build_pretrain_model(pretrain_config("vit", unmix="masked_attention")).restrict is True
    assert build_pretrain_model(pretrain_config("vit", unmix="none")).restrict is False
    model = build_pretrain_model(pretrain_config("vit", mask_type="block", dual=False, mask_ratio=0.25,
                                                 range_mask_ratio=0.25, norm_pix_loss=False))
    assert (model.mask_type, model.dual, model.mask_ratio, model.range_mask_ratio, model.norm_pix_loss) == \
        ("block", False, 0.25, 0.25, False)


@pytest.mark.parametrize("family, options, match", [
    ("vit", {"unmix": "mix_embedding"}, r"unmix='mix_embedding' is not supported for the timm encoder"),
    ("vit", {"fill": "zero"}, r"fill='zero' is not supported"),
    ("vit", {"fill": "learnable", "dual": False}, r"fill='learnable' is not supported"),
    ("swin", {"grad_checkpointing": True}, r"grad_checkpointing=true is not supported .*\(swin adapter\)"),
    ("vit", {"model": "not_a_model"}, r"model='not_a_model' is neither a MixMIM size"),
])
def test_unsupported_pretraining_options_are_named(family, options, match):
    with pytest.raises(ValueError, match=match):
        build_pretrain_model(pretrain_config(family, **options))


def test_vit_takes_gradient_checkpointing():
    model = build_pretrain_model(pretrain_config("vit", grad_checkpointing=True))
    assert model.encoder.grad_checkpointing


@pytest.mark.parametrize("options, match", [
    ({"linear_probe": True}, r"linear_probe=true is not supported for the timm encoder"),
    ({"model": "not_a_model"}, r"model='not_a_model' is neither a MixMIM size"),
])
def test_unsupported_finetuning_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        build_finetune_model(finetune_config("vit", **options), num_classes=3)


def test_a_checkpoint_of_another_encoder_is_refused(tmp_path):
    adapter = build_pretrain_model(pretrain_config("vit"))
    path = tmp_path / "pretrain.pt"
    torch.save({"model": adapter.state_dict()}, path)
    with pytest.raises(ValueError, match=r"checkpoint parameter .patch_embed.proj.weight. has shape"):
        build_finetune_model(finetune_config("pvt", init=str(path)), num_classes=3)


# --------------------------------------------------------------------------- pipelines
def stage_sections(dvc_file: Path, stage: str, key: str) -> list[str]:
    """The --sections of a foreach (``${key}``) or matrix (``${item.<name>}``, seeds aside) stage's command."""
    spec = yaml.safe_load(dvc_file.read_text())["stages"][stage]
    cmd = re.sub(r"\$\{(?:key|item\.(?!seed\b)\w+)\}", key, spec["do"]["cmd"] if "do" in spec else spec["cmd"])
    return re.search(r"--sections (.*?) --", cmd)[1].split()


def check_family(params, pre_sections: list[str], ft_sections: list[str]) -> tuple[PretrainConfig, FinetuneConfig]:
    """Both sections validate, and the finetuning builds the pretraining's encoder (meta device)."""
    pre = from_mapping(PretrainConfig, merged(params, pre_sections), where=" + ".join(pre_sections))
    ft = from_mapping(FinetuneConfig, merged(params, ft_sections), where=" + ".join(ft_sections))
    assert pre.model == ft.model and input_size(ft) == (pre.img_size or 224)
    enc_kwargs = {k: v for k, v in pre.model_kwargs.items() if k not in ADAPTER_OPTIONS}
    assert enc_kwargs == ft.model_kwargs
    with torch.device("meta"):
        enc = encoder_weights(build_pretrain_model(pre))
        model = build_finetune_model(ft, num_classes=10)
    heads = classifier_prefixes(model)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(heads)}
    assert own == {k: tuple(v.shape) for k, v in enc.items()}
    return pre, ft


def test_backbones_pipeline_params_build_every_family():
    params = load_params(BACKBONES / "params.yaml")
    dvc_file = BACKBONES / "dvc.yaml"
    assert params.tracking().experiment == "backbones"
    families = params.section("families")
    assert set(families) == {"vit", "swin", "pvt", "resnet"}
    for family in families:
        pre, ft = check_family(params, stage_sections(dvc_file, "pretrain", family),
                               stage_sections(dvc_file, "finetune", family))
        scratch = from_mapping(FinetuneConfig, merged(params, stage_sections(dvc_file, "scratch", family)))
        assert scratch.epochs == ft.epochs and scratch.model == ft.model  # the same budget and encoder
        assert params.dataset_root(pre.dataset).endswith("data/builtin/imagenet")
        tags = tracking_fields(params, "scratch", family, "imagenet", ft.model, {})["tags"]
        assert (tags["mixmim.stage"], tags["mixmim.variant"], tags["mixmim.model"]) == ("scratch", family, ft.model)


def test_paper_backbones_params_build_every_family():
    params = load_params(PAPER / "params.yaml")
    dvc_file = PAPER / "dvc.yaml"
    expected = {"vit": ("vit_base_patch16_224", 300, 100), "swin": ("swin_base_patch4_window7_224", 600, 100),
                "resnet": ("resnetv2_50x3_bit", 300, 100), "vit-large": ("vit_large_patch16_224", 300, 50),
                "swin-large": ("swin_large_patch4_window7_224", 600, 50), "pvt-large": ("pvt_v2_b4", 300, 50),
                "resnet-101x3": ("resnetv2_101x3_bit", 300, 100)}
    assert set(params.section("backbones.families")) == set(expected)
    for family, (model, epochs, ft_epochs) in expected.items():
        pre, ft = check_family(params, stage_sections(dvc_file, "backbones_pretrain", family),
                               stage_sections(dvc_file, "backbones_finetune", family))
        assert (pre.model, pre.epochs, ft.epochs, input_size(ft)) == (model, epochs, ft_epochs, 224)
        assert pre.batch_size * pre.accum_iter == ft.batch_size * ft.accum_iter == 128


def test_report_places_every_family_of_the_pipeline(tmp_path):
    """Results named as the backbones pipeline names them (<stage>_<family>_s<seed>.json) fill Tables 3 and 13."""
    params = load_params(BACKBONES / "params.yaml")
    runs = []
    for i, family in enumerate(params.section("families")):
        model = params.get(f"families.{family}.finetune.model")
        for stage, top1 in (("finetune", 60.0 + i), ("scratch", 40.0 + i)):
            runs.append(Result("backbones", stage, family, 0, tmp_path / f"{stage}_{family}_s0.json",
                               {"top1": top1, "model": model}))
    ctx = Context(Results(runs, {"backbones": str(tmp_path)}), resamples=1000)
    t3 = table3(ctx).frame
    ours = dict(zip(zip(t3["method"], t3["backbone"]), t3["top1_ours"]))
    assert (ours[("MixMIM", "ViT-B")], ours[("Supervised", "ViT-B")]) == ("60.0", "40.0")
    assert (ours[("MixMIM", "Swin-B")], ours[("MixMIM", "PVT-L")]) == ("61.0", "62.0")
    t13 = table13(ctx).frame
    ours = dict(zip(zip(t13["method"], t13["backbone"]), t13["top1_ours"]))
    assert (ours[("MixMIM", "Res50x3")], ours[("BiT-S", "Res50x3")]) == ("63.0", "43.0")
