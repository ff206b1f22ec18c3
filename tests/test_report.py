"""The report on a real MLflow SQLite store filled with fake runs that follow the pipelines' data contract.

One store and one report per module (a store's first use runs MLflow's migrations, and
the report draws five figures); each test reads what it needs from the built report.
"""

from __future__ import annotations

import runpy
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import torch

from mixmim.data.builtin import write_imagenet
from mixmim.engine.config import ConfigError, PretrainConfig, to_dict
from mixmim.models import build_pretrainer, patchify
from mixmim.report import build_report
from mixmim.report.reconstruction import paste, unnormalise_cells
from mixmim.tracking import PRETRAIN_RUN_TAG, Tracker, default_tracking_uri

EXPERIMENTS = {"default": "default", "ablations": "ablations", "backbones": "backbones"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _log_run(uri: str, experiment: str, stage: str, variant: str, *, dataset: str = "imagenet",
             model: str = "mixmim_tiny", params: Mapping[str, Any] | None = None,
             metrics: Mapping[str, float] | None = None, losses: int = 0, parent: str | None = None,
             fail: bool = False) -> str:
    """One run as the pipeline's stages log it (tags, params, final metrics, loss history)."""
    tags = {"mixmim.pipeline": experiment, "mixmim.stage": stage, "mixmim.variant": variant,
            "mixmim.dataset": dataset, "mixmim.model": model, "mixmim.scale": "builtin"}
    if parent:
        tags[PRETRAIN_RUN_TAG] = parent
    tracker = Tracker(uri, experiment, f"{stage}/{variant}", tags=tags)
    try:
        with tracker:
            tracker.log_params({"model": model, **(params or {})})
            for step in range(1, losses + 1):
                tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
            tracker.log_metrics(dict(metrics or {}), step=losses)
            if fail:
                raise RuntimeError("simulated crash")
    except RuntimeError:
        assert fail
    assert tracker.run_id is not None
    return tracker.run_id


def _populate(uri: str) -> None:
    # default pipeline: pretrain -> finetunes (variant = dataset), scratch, dense transfers
    pre = _log_run(uri, "default", "pretrain", "default", params={"epochs": 4, "fill": "mix"},
                   metrics={"final/train_loss": 0.4}, losses=6)
    _log_run(uri, "default", "finetune", "imagenet", params={"epochs": 3}, parent=pre,
             metrics={"final/top1": 71.3, "final/top5": 99.0, "final/best_top1": 72.0})
    _log_run(uri, "default", "scratch", "imagenet", params={"epochs": 3}, metrics={"final/top1": 40.5})
    _log_run(uri, "default", "finetune", "inat2018", dataset="inat2018", params={"epochs": 3}, parent=pre,
             metrics={"final/top1": 33.3})
    _log_run(uri, "default", "coco", "default", dataset="coco", parent=pre, params={"epochs": 2},
             metrics={"final/ap_box": 0.123, "final/ap_mask": 0.101, "final/ap50_box": 0.3, "final/ap75_box": 0.1,
                      "model/gflops": 1.33, "model/params_m": 6.84})
    _log_run(uri, "default", "ade20k", "default", dataset="ade20k", parent=pre, params={"max_iters": 50},
             metrics={"final/miou": 0.2345, "final/pixel_acc": 0.6, "final/baseline_miou": 0.05})
    # ablations pipeline
    pretrains = {
        "default": {"epochs": 2},
        "fill-zero": {"epochs": 2, "fill": "zero", "dual": False},
        "dual-off": {"epochs": 2, "dual": False},
        "mask-block": {"epochs": 2, "mask_type": "block"},
        "mask-range-0.2": {"epochs": 2, "mask_ratio": 0.4, "range_mask_ratio": 0.2},
        "mask-range-0.1": {"epochs": 2, "mask_ratio": 0.5, "range_mask_ratio": 0.1},
        "epochs-4": {"epochs": 4},
        "unmix-none": {"epochs": 2, "unmix": "none"},
    }
    ids = {v: _log_run(uri, "ablations", "pretrain", v, params={"mask_type": "random", "mask_ratio": 0.5,
                                                                 "range_mask_ratio": 0.0, **p},
                       losses=3 if v in ("default", "fill-zero") else 0)
           for v, p in pretrains.items()}
    top1 = {"default": 60.0, "dual-off": 58.0, "mask-block": 50.0, "mask-range-0.2": 57.0,
            "mask-range-0.1": 56.0, "epochs-4": 62.0, "unmix-none": 54.0}
    _log_run(uri, "ablations", "finetune", "fill-zero", params={"epochs": 2}, parent=ids["fill-zero"],
             metrics={"final/top1": 11.0})  # superseded by the rerun below
    _log_run(uri, "ablations", "finetune", "fill-zero", params={"epochs": 2}, parent=ids["fill-zero"],
             metrics={"final/top1": 55.5})
    _log_run(uri, "ablations", "finetune", "fill-zero", params={"epochs": 2}, parent=ids["fill-zero"],
             metrics={"final/top1": 99.9}, fail=True)  # failed: never counts
    for variant, value in top1.items():
        _log_run(uri, "ablations", "finetune", variant, params={"epochs": 2}, parent=ids[variant],
                 metrics={"final/top1": value})
    _log_run(uri, "ablations", "ade20k", "default", dataset="ade20k", parent=ids["default"],
             params={"img_size": 128, "max_iters": 200}, metrics={"final/miou": 0.30})
    _log_run(uri, "ablations", "ade20k", "fill-zero", dataset="ade20k", parent=ids["fill-zero"],
             metrics={"final/miou": 0.25})
    # backbones pipeline: variant = timm family
    vit = _log_run(uri, "backbones", "pretrain", "vit", model="vit_tiny_patch16_224", params={"epochs": 2})
    _log_run(uri, "backbones", "finetune", "vit", model="vit_tiny_patch16_224", parent=vit,
             params={"epochs": 2, "img_size": 64}, metrics={"final/top1": 45.0})
    _log_run(uri, "backbones", "scratch", "vit", model="vit_tiny_patch16_224", params={"epochs": 2, "img_size": 64},
             metrics={"final/top1": 30.0})
    _log_run(uri, "backbones", "finetune", "resnet", model="resnet18", params={"epochs": 2},
             metrics={"final/top1": 40.0})


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = build_pretrainer("mixmim_nano")
    torch.save({"model": model.state_dict(), "config": to_dict(PretrainConfig(model="mixmim_nano"))}, path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("report")
    uri = default_tracking_uri(root)
    _populate(uri)
    weights = _checkpoint(root / "pretrain.pt")
    images = write_imagenet(root / "imagenet", num_classes=2, train_per_class=2, val_per_class=2)
    out = root / "reports"
    report = build_report(uri, EXPERIMENTS, out_dir=out, pretrain_weights=weights, sample_images=images / "val",
                          scale_note="Built-in stand-in data at 64 px; not comparable to the paper.")
    return {"uri": uri, "out": out, "report": report, "root": root}


def _table(built: Mapping[str, Any], stem: str) -> pd.DataFrame:
    return pd.read_csv(built["out"] / "tables" / f"{stem}.csv", dtype=str, keep_default_na=False)


def _row(frame: pd.DataFrame, **match: str) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    for column, value in match.items():
        mask &= frame[column] == value
    assert mask.sum() == 1, f"expected one row with {match}, got {int(mask.sum())}"
    return frame[mask].iloc[0]


STEMS = ("pretrained_vs_scratch", "table2_in1k_mim", "table3_same_encoder", "table4_coco_ade20k",
         "table5_cls_transfer", "table6_filling", "table7_dual", "table8_masking", "table9_epochs",
         "table10_unmixing", "table13_convnets")
FIGURE_NAMES = ("figure2_flops_vs_top1.png", "figure2_flops_vs_coco_ap.png", "figure2_flops_vs_ade_miou.png",
                "pretrain_loss_curves.png", "mixing_reconstruction.png")


def test_every_table_and_figure_is_written_and_indexed(built: Mapping[str, Any]) -> None:
    out: Path = built["out"]
    for stem in STEMS:
        for suffix in (".md", ".csv", ".tex"):
            assert (out / "tables" / f"{stem}{suffix}").stat().st_size > 0, f"{stem}{suffix}"
    readme = (out / "README.md").read_text()
    assert "Built-in stand-in data at 64 px" in readme
    for name in (*STEMS, *FIGURE_NAMES):
        assert name in readme
    assert "not drawn" not in readme
    assert not list(out.parent.glob(".reports.*"))  # no staging folder left behind
    tex = (out / "tables" / "table6_filling.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\bottomrule" in tex and "---" in tex


def test_table6_puts_paper_and_ours_side_by_side(built: Mapping[str, Any]) -> None:
    t6 = _table(built, "table6_filling")
    assert list(t6.columns[:5]) == ["fill", "top1 (paper)", "top1 (ours)", "mIoU (paper)", "mIoU (ours)"]
    mix = _row(t6, fill="mix")
    assert (mix["top1 (paper)"], mix["top1 (ours)"], mix["mIoU (ours)"]) == ("84.6", "60.0", "30.0")
    assert mix["scale (ours)"] == ("built-in data, mixmim_tiny, 64 px, 2 pretrain + 2 finetune epochs; "
                                   "built-in data, mixmim_tiny, 128 px, 2 pretrain + 200 transfer iterations")
    zero = _row(t6, fill="zero")  # the latest finished rerun, not the superseded or the failed run
    assert (zero["top1 (paper)"], zero["top1 (ours)"], zero["mIoU (ours)"]) == ("84.1", "55.5", "25.0")
    learnable = _row(t6, fill="learnable")
    assert learnable["top1 (paper)"] == "84.1"
    assert learnable["top1 (ours)"].startswith("— (") and "fill-learnable" in learnable["top1 (ours)"]
    md = (built["out"] / "tables" / "table6_filling.md").read_text()
    assert "| mix | 84.6 | 60.0 | 49.9 | 30.0 |" in md


def test_missing_cells_say_why(built: Mapping[str, Any]) -> None:
    t2 = _table(built, "table2_in1k_mim")
    assert _row(t2, method="MAE")["top1 (ours)"] == "— (MAE not reproduced)"
    ours = t2[t2["method"] == "MixMIM"]
    assert list(ours["top1 (ours)"]) == ["— (MixMIM-B, 300 epochs not run at built-in scale)", "71.3"]
    t3 = _table(built, "table3_same_encoder")
    assert _row(t3, method="MixMIM", backbone="ViT-B")["top1 (ours)"] == "45.0"
    assert _row(t3, method="Supervised", backbone="ViT-B")["top1 (ours)"] == "30.0"
    assert _row(t3, method="MixMIM", backbone="ViT-L")["top1 (ours)"] == "— (ViT-L not run at built-in scale)"
    assert "no finished finetune run of 'swin'" in _row(t3, method="MixMIM", backbone="Swin-B")["top1 (ours)"]
    t4 = _table(built, "table4_coco_ade20k")
    b = _row(t4, method="MixMIM", backbone="MixMIM-B")
    assert (b["AP box (ours)"], b["AP mask (ours)"], b["mIoU (ours)"]) == ("12.3", "10.1", "23.4")
    assert (b["COCO GFLOPs (ours)"], b["COCO params M (ours)"]) == ("1.3", "6.8")  # as the coco run logged them
    assert b["ADE GFLOPs (ours)"].startswith("— (model/gflops not logged by run ")
    t5 = _table(built, "table5_cls_transfer")
    b5 = _row(t5, method="MixMIM", backbone="MixMIM-B")
    assert b5["iNat18 (ours)"] == "33.3" and "no finished finetune run on places365" in b5["Places365 (ours)"]
    assert b5["average (ours)"] == "— (3 of 4 datasets not run)"
    t13 = _table(built, "table13_convnets")
    assert _row(t13, method="MixMIM", backbone="Res50x3")["top1 (ours)"] == "40.0"
    assert _row(t13, method="BiT-M", backbone="Res50x3")["top1 (ours)"] == "— (needs ImageNet-21K labels)"


def test_ablation_tables_match_variants_by_name_params_and_sweep(built: Mapping[str, Any]) -> None:
    t7 = _table(built, "table7_dual")
    assert _row(t7, dual="false")["top1 (ours)"] == "58.0"
    t8 = _table(built, "table8_masking")
    assert _row(t8, **{"mask type": "block"})["top1 (ours)"] == "50.0"
    assert _row(t8, **{"mask ratio": "0.4"})["top1 (ours)"] == "57.0"
    assert "ratio 0.3 + U(0, 0.4)" in _row(t8, **{"mask ratio": "0.3"})["top1 (ours)"]
    extra = _row(t8, **{"variant (ours)": "mask-range-0.1"})
    assert extra["top1 (paper)"] == "— (not in the paper)" and extra["top1 (ours)"] == "56.0"
    t9 = _table(built, "table9_epochs")  # a scaled-down sweep is paired with the paper's by rank
    ours = ["pretrain epochs (ours)", "top1 (ours)"]
    assert _row(t9, **{"pretrain epochs (paper)": "300"})[ours].tolist() == ["2", "60.0"]
    assert _row(t9, **{"pretrain epochs (paper)": "600"})[ours].tolist() == ["4", "62.0"]
    assert _row(t9, **{"pretrain epochs (paper)": "900"})["top1 (ours)"] == "— (our sweep has 2 budget(s))"
    t10 = _table(built, "table10_unmixing")
    assert _row(t10, approach="none (w/o unmixing)")["top1 (ours)"] == "54.0"
    assert _row(t10, approach="masked self-attention")["top1 (ours)"] == "60.0"
    assert "unmix-mix_embedding" in _row(t10, approach="mix embedding")["top1 (ours)"]


def test_pretrained_vs_scratch_shows_both(built: Mapping[str, Any]) -> None:
    table = _table(built, "pretrained_vs_scratch")
    imagenet = _row(table, dataset="imagenet")
    assert imagenet["top1 MixMIM-pretrained (ours)"] == "71.3"
    assert imagenet["top1 from scratch (ours)"] == "40.5"
    assert imagenet["gain (points)"] == "+30.8"
    assert imagenet["finetune epochs (pretrained / scratch)"] == "3 / 3"
    assert imagenet["top1 linear probe (ours)"].startswith("— (no finished linear_probe run")
    assert _row(table, dataset="inat2018")["top1 from scratch (ours)"].startswith("— (")


def test_figures_are_non_empty_pngs(built: Mapping[str, Any]) -> None:
    for name in FIGURE_NAMES:
        data = (built["out"] / "figures" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
    assert len(built["report"].figures) == len(FIGURE_NAMES) and not built["report"].skipped


def test_perfect_prediction_reconstructs_the_image() -> None:
    """Unnormalising with the target cell's statistics inverts norm_pix targets exactly."""
    torch.manual_seed(0)
    img = torch.randn(3, 64, 64)
    cells = patchify(img.unsqueeze(0), 32)[0]
    target = (cells - cells.mean(-1, keepdim=True)) / (cells.var(-1, keepdim=True) + 1e-6) ** 0.5
    pred = unnormalise_cells(target, img, 32, norm_pix=True)
    predicted = torch.tensor([1.0, 0.0, 0.0, 1.0])
    out = paste(torch.zeros_like(img), pred, predicted, 32, (2, 2))
    assert torch.allclose(out[:, :32, :32], img[:, :32, :32], atol=1e-4)  # predicted cell: from the model
    assert torch.equal(out[:, :32, 32:], torch.zeros(3, 32, 32))  # visible cell: kept from the input


def test_table4_shows_the_logged_dense_costs_beside_the_paper() -> None:
    """Table builders are pure functions of a RunIndex, so they need no store."""
    from mixmim.report.runs import Run, RunIndex
    from mixmim.report.tables import table4

    coco = Run("r1", "default", "paper", "coco", "default", "coco", "mixmim_base", "paper",
               metrics={"final/ap_box": 0.5, "final/ap_mask": 0.45, "model/gflops": 700.6, "model/params_m": 110.2})
    t4 = table4(RunIndex([coco], {"default": "paper"}))
    b, large = t4[t4["backbone"] == "MixMIM-B"].iloc[0], t4[t4["backbone"] == "MixMIM-L"].iloc[0]
    assert (b["COCO GFLOPs (paper)"], b["COCO GFLOPs (ours)"], b["COCO params M (ours)"]) == ("701", "701", "110")
    assert b["AP box (ours)"] == "50.0"
    assert b["ADE GFLOPs (ours)"] == b["mIoU (ours)"] == "— (no finished ade20k run in 'paper')"
    assert large["AP box (ours)"] == "— (MixMIM-L not run at paper scale)"
    assert b["scale (ours)"] == "paper data, mixmim_base, 224 px"


def test_scale_label_names_the_encoder_arguments_a_run_changed() -> None:
    from mixmim.report.runs import Run, RunIndex
    from mixmim.report.tables import scale_label

    params = {"img_size": "64", "model_kwargs.embed_dim": "48", "model_kwargs.window_size": "4",
              **{f"model_kwargs.depths.{i}": "2" for i in range(4)}, "model_kwargs.depths.10": "3",
              "model_kwargs.decoder_dim": "128"}
    run = Run("r1", "backbones", "backbones", "finetune", "swin", "imagenet", "swin_tiny_patch4_window7_224",
              "builtin", params=params)
    label = scale_label(run, RunIndex([run], {"backbones": "backbones"}))
    assert label.startswith("built-in data, swin_tiny_patch4_window7_224 "
                            "(depths=[2, 2, 2, 2, 3], embed_dim=48, window_size=4), 64 px")
    assert "decoder" not in label


def test_single_reconstruction_without_a_partner_image_drops_those_columns() -> None:
    from mixmim.report.figures import mixing_figure
    from mixmim.report.reconstruction import fixed_mask, reconstruct_pairs

    torch.manual_seed(0)
    model = build_pretrainer("mixmim_nano", fill="zero", dual=False, mask_type="block").eval()
    views = reconstruct_pairs(model, torch.randn(2, 3, 64, 64), fixed_mask(model))
    assert len(views) == 1 and views[0].original_b is None and views[0].recon_b is None
    assert views[0].recon_a.shape == (64, 64, 3) and 0.0 <= views[0].recon_a.min() <= views[0].recon_a.max() <= 1.0
    assert len(mixing_figure(views).axes) == 3  # image A, input, reconstruction of A


def test_failed_build_keeps_the_previous_report(built: Mapping[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import mixmim.report.build as build

    out = built["root"] / "kept"
    out.mkdir()
    (out / "README.md").write_text("previous report\n")

    def crash(*_: Any) -> None:
        raise RuntimeError("killed mid-report")

    monkeypatch.setattr(build, "_top1_figure", crash)
    with pytest.raises(RuntimeError, match="killed mid-report"):
        build_report(built["uri"], EXPERIMENTS, out_dir=out)
    assert [p.name for p in out.iterdir()] == ["README.md"]
    assert (out / "README.md").read_text() == "previous report\n"
    assert not list(out.parent.glob(".kept.*"))


# --------------------------------------------------------------------------- the DVC stage


def _stage_module() -> SimpleNamespace:
    """The stage script's functions (it is a script, not a module of the package)."""
    path = Path(__file__).resolve().parents[1] / "stages" / "report.py"
    return SimpleNamespace(**runpy.run_path(str(path), run_name="stage_report"))


def test_stage_checks_params_and_resolves_relative_sqlite(tmp_path: Path) -> None:
    stage = _stage_module()
    params = tmp_path / "params.yaml"
    params.write_text("tracking: {uri: 'sqlite:///store/mlflow.db', other: 1}\n"
                      "report: {out_dir: out, experiments: {default: paper}, scale_note: x}\n")
    checked, uri = stage.load_params(params, root=tmp_path)
    assert uri == f"sqlite:///{(tmp_path / 'store' / 'mlflow.db').resolve().as_posix()}"
    assert checked.experiments == {"default": "paper"} and checked.pretrain_weights is None
    for text, key in (("report: {out_dir: out, colour: red}", "colour"),
                      ("report: {out_dir: 3}", "report.out_dir"),
                      ("report: {experiments: {default: 1}}", "report.experiments.default"),
                      ("report: {experiments: {extras: x}}", "extras"),
                      ("tracking: {uri: 5}\nreport: {}", "tracking.uri")):
        params.write_text(text + "\n")
        with pytest.raises(ConfigError, match=key):
            stage.load_params(params, root=tmp_path)


def test_stage_writes_the_report(built: Mapping[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    stage = _stage_module()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        f"tracking: {{uri: '{built['uri']}'}}\n"
        "report: {out_dir: reports, experiments: {default: default}, scale_note: tiny}\n")
    assert stage.main(["--params", "params.yaml"]) == 0
    readme = (tmp_path / "reports" / "README.md").read_text()
    assert "mixing_reconstruction.png: not drawn (needs both pretrain_weights and sample_images" in readme
    assert "- ablations: not given" in readme
    assert "skipped mixing_reconstruction.png" in capsys.readouterr().out
    t6 = pd.read_csv(tmp_path / "reports" / "tables" / "table6_filling.csv", dtype=str, keep_default_na=False)
    assert _row(t6, fill="zero")["top1 (ours)"] == "— (no 'ablations' experiment given to the report)"
