"""The report as a function of committed results: metrics JSON and per-image records of every pipeline.

One synthetic results tree per module (three pipelines, seeds, per-image records), one
report built from it; each test reads what it needs. The tables must not depend on the
MLflow store, must be deterministic, and must carry intervals, n, seeds and paired tests.
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from mixmim import stats
from mixmim.data.builtin import write_imagenet
from mixmim.engine.config import ConfigError, PretrainConfig, to_dict
from mixmim.models import build_pretrainer, patchify
from mixmim.records import write_classification_records, write_detection_records, write_segmentation_records
from mixmim.report import build_report, build_tables_from
from mixmim.report.results import MEASURES
from mixmim.report.reconstruction import paste, unnormalise_cells
from mixmim.tracking import Tracker, default_tracking_uri

PIPELINES = {"default": "metrics", "ablations": "pipelines/ablations/metrics",
             "backbones": "pipelines/backbones/metrics"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_VAL = 120
LABELS = [i % 10 for i in range(N_VAL)]  # 10 balanced classes: chance = 10%


def _metrics(folder: Path, stem: str, **values: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def _classification(folder: Path, stem: str, accuracy: float, rng_seed: int, suffix: str = "",
                    key: str = "top1", **extra: Any) -> None:
    """A classification result whose per-image records hold ``accuracy`` of the images right."""
    rng = np.random.default_rng(rng_seed)
    right = rng.permutation(N_VAL) < round(accuracy * N_VAL)
    preds = [y if ok else (y + 1) % 10 for y, ok in zip(LABELS, right)]
    write_classification_records(folder / f"{stem}{suffix}_preds.json", LABELS, preds)
    path = folder / f"{stem}.json"
    values = json.loads(path.read_text()) if path.exists() else {}
    values.update({key: 100.0 * float(right.mean()), "n_val": N_VAL, **extra})
    _metrics(folder, stem, **values)


def _segmentation(folder: Path, stem: str, quality: float, rng_seed: int, **extra: Any) -> None:
    rng = np.random.default_rng(rng_seed)
    union = rng.integers(50, 100, size=(20, 4))
    inter = (union * np.clip(quality + rng.normal(0, 0.05, size=union.shape), 0, 1)).astype(int)
    write_segmentation_records(folder / f"{stem}_preds.json", inter.tolist(), union.tolist(), list("abcd"))
    _metrics(folder, stem, miou=stats.miou_from_counts(inter, union), n_val=20, baseline_miou=0.05, **extra)


def _detection(folder: Path, stem: str, hit_rate: float, rng_seed: int, **extra: Any) -> None:
    rng = np.random.default_rng(rng_seed)
    images = []
    for i in range(20):
        dets = [[1, float(rng.random()), int(rng.random() < hit_rate) * 1023, 0] for _ in range(3)]
        images.append({"image_id": i + 1, "gt": {"1": 3}, "dets": dets})
    write_detection_records(folder / f"{stem}_preds.json", images, images)
    ap = stats.coco_ap_from_records(images)
    _metrics(folder, stem, ap_box=ap, ap_mask=ap, n_val=20, **extra)


def _populate(root: Path) -> None:
    d, a, b = (root / PIPELINES[k] for k in ("default", "ablations", "backbones"))
    for folder in (root, a.parent, b.parent):  # each pipeline's params: the scale the report's labels name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "params.yaml").write_text("tracking: {scale: builtin}\n")
    common = {"model": "mixmim_tiny", "img_size": 64, "epochs": 3}
    _metrics(d, "pretrain_s0", epochs=4, train_loss=0.5, mean_loss_baseline=0.9, seed=0)
    _classification(d, "finetune_imagenet_s0", 0.7, 1, seed=0, init="pretrained", **common)
    _classification(d, "scratch_imagenet_s0", 0.3, 2, seed=0, init="scratch", **common)
    _classification(d, "finetune_inat2018_s0", 0.1, 3, seed=0, **common)  # at chance
    for i, name in enumerate(("inat2019", "places205", "places365")):
        _classification(d, f"finetune_{name}_s0", 0.6, 4 + i, seed=0, **common)
    _detection(d, "coco_s0", 0.8, 7, model="mixmim_tiny", img_size=128, epochs=2, model_gflops=1.33,
               model_params_m=6.85)
    _detection(d, "scratch_coco_s0", 0.2, 8, model="mixmim_tiny", img_size=128, epochs=2, init="scratch")
    _segmentation(d, "ade20k_s0", 0.8, 9, model="mixmim_tiny", img_size=128, max_iters=20)
    _segmentation(d, "scratch_ade20k_s0", 0.8, 9, model="mixmim_tiny", img_size=128, max_iters=20, init="scratch")
    _classification(d, "probe_imagenet_pretrained_s0", 0.5, 10, "_knn", key="knn_top1")
    _classification(d, "probe_imagenet_pretrained_s0", 0.55, 11, "_linear", key="linear_top1")
    # ablations: three seeds of the default and of fill-zero, one of the others
    for seed in range(3):
        _metrics(a, f"pretrain_default_s{seed}", epochs=4, train_loss=[0.50, 0.52, 0.51][seed],
                 mean_loss_baseline=0.9, seed=seed)
        _metrics(a, f"pretrain_fill-zero_s{seed}", epochs=4, train_loss=[0.60, 0.63, 0.61][seed],
                 mean_loss_baseline=0.9, seed=seed)
        _classification(a, f"finetune_default_s{seed}", [0.70, 0.75, 0.80][seed], 20 + seed, seed=seed, **common)
        _classification(a, f"finetune_fill-zero_s{seed}", [0.20, 0.25, 0.30][seed], 30 + seed, seed=seed, **common)
        for variant, shares in (("default", [10.0, 11.0, 12.0]), ("fill-zero", [20.0, 22.0, 21.0])):
            _metrics(a, f"reconstruction_{variant}_s{seed}", seed=seed, model="mixmim_tiny",
                     all={"structure_explained_pct": shares[seed], "n": 40})
    _segmentation(a, "ade20k_default_s0", 0.8, 40)
    _segmentation(a, "ade20k_fill-zero_s0", 0.8, 40)  # identical records: p = 1
    _metrics(a, "pretrain_epochs-8_s0", epochs=8, seed=0)
    _classification(a, "finetune_epochs-8_s0", 0.7, 41, seed=0, **common)
    _metrics(a, "pretrain_mask-range-40-20_s0", epochs=4, seed=0)
    _classification(a, "finetune_mask-range-40-20_s0", 0.7, 42, seed=0, **common)
    # backbones
    _metrics(b, "pretrain_vit_s0", epochs=4, seed=0)
    _classification(b, "finetune_vit_s0", 0.5, 50, seed=0, model="vit_tiny_patch16_224", img_size=64, epochs=3,
                    model_kwargs={"embed_dim": 48, "decoder_dim": 32})
    _classification(b, "scratch_vit_s0", 0.45, 51, seed=0, model="vit_tiny_patch16_224", img_size=64, epochs=3)
    for init, (knn, linear) in (("pretrained", (0.6, 0.65)), ("random", (0.2, 0.25))):
        _classification(b, f"probe_vit_{init}_s0", knn, 52, "_knn", key="knn_top1")
        _classification(b, f"probe_vit_{init}_s0", linear, 53, "_linear", key="linear_top1")


def _log_losses(uri: str) -> None:
    for experiment, variant, seeds in (("default", "default", [0]), ("ablations", "default", [0, 1, 2]),
                                       ("ablations", "fill-zero", [0, 1])):
        for seed in seeds:
            tags = {"mixmim.stage": "pretrain", "mixmim.variant": variant, "mixmim.seed": str(seed)}
            with Tracker(uri, experiment, f"pretrain/{variant}/s{seed}", tags=tags) as tracker:
                for step in range(1, 41):
                    tracker.log_metrics({"train/loss": 1.0 / step ** 0.3 + 0.02 * seed}, step=step)


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = build_pretrainer("mixmim_nano")
    torch.save({"model": model.state_dict(), "config": to_dict(PretrainConfig(model="mixmim_nano"))}, path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("report")
    _populate(root)
    uri = default_tracking_uri(root / "store")
    _log_losses(uri)
    weights = _checkpoint(root / "pretrain.pt")
    images = write_imagenet(root / "imagenet", num_classes=2, train_per_class=2, val_per_class=2)
    out = root / "reports"
    report = build_report(PIPELINES, out_dir=out, root=root, tracking_uri=uri,
                          experiments={"default": "default", "ablations": "ablations"}, pretrain_weights=weights,
                          sample_images=images / "val", scale_note="synthetic results", resamples=1000)
    return {"uri": uri, "out": out, "report": report, "root": root}


def _table(built: Mapping[str, Any], stem: str) -> pd.DataFrame:
    return pd.read_csv(built["out"] / "tables" / f"{stem}.csv", dtype=str, keep_default_na=False)


def _row(frame: pd.DataFrame, **match: str) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    for column, value in match.items():
        mask &= frame[column] == value
    assert mask.sum() == 1, f"expected one row with {match}, got {int(mask.sum())}"
    return frame[mask].iloc[0]


STEMS = ("calibration", "reconstruction", "run_mapping", "table2_in1k_mim", "table3_same_encoder", "table4_coco_ade20k",
         "table5_cls_transfer", "table6_filling", "table7_dual", "table8_masking", "table9_epochs",
         "table10_unmixing", "table13_convnets")
FIGURE_NAMES = ("figure2_flops_vs_top1.png", "figure2_flops_vs_coco_ap.png", "figure2_flops_vs_ade_miou.png",
                "pretrain_loss_curves.png", "mixing_reconstruction.png")


def test_every_table_and_figure_is_written_and_indexed(built: Mapping[str, Any]) -> None:
    readme = (built["out"] / "README.md").read_text()
    for stem in STEMS:
        for ext in ("md", "csv", "tex"):
            assert (built["out"] / "tables" / f"{stem}.{ext}").is_file(), (stem, ext)
        assert f"tables/{stem}.md" in readme
    for name in FIGURE_NAMES:
        data = (built["out"] / "figures" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
    assert "last epoch" in readme and not built["report"].skipped


def test_tables_are_deterministic_and_need_no_mlflow(built: Mapping[str, Any], tmp_path: Path) -> None:
    """A fresh process rebuilds every table byte for byte from the committed files, without importing mlflow."""
    code = (
        "import sys, pathlib\n"
        "from mixmim.report.build import build_tables_from\n"
        "from mixmim.report.render import write_table\n"
        f"tables, _ = build_tables_from({PIPELINES!r}, root={str(built['root'])!r}, resamples=1000)\n"
        f"out = pathlib.Path({str(tmp_path / 'fresh')!r})\n"
        "for t in tables: write_table(t.frame, out, t.key, t.title, t.notes)\n"
        "print('mlflow' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert done.stdout.strip() == "False"  # the tables never touched the tracking store
    assert not (tmp_path / "mlflow.db").exists()
    committed = sorted((built["out"] / "tables").iterdir())
    assert [p.name for p in committed] == sorted(p.name for p in (tmp_path / "fresh").iterdir())
    for path in committed:
        assert (tmp_path / "fresh" / path.name).read_bytes() == path.read_bytes(), path.name


def test_seeds_give_a_t_interval_and_paired_tests_resolve(built: Mapping[str, Any]) -> None:
    t6 = _table(built, "table6_filling")
    default, zero = _row(t6, fill="mix"), _row(t6, fill="zero")
    ci = stats.t_interval([70.0, 75.0, 80.0])
    assert default["top1_ours"] == "75.0" and default["top1_n_seeds"] == "3" and default["top1_n_val"] == str(N_VAL)
    assert default["top1_chance"] == "10.0" and default["miou_chance"] == "5.0"
    assert (float(default["top1_ours_ci_low"]), float(default["top1_ours_ci_high"])) == pytest.approx(
        (ci.low, ci.high), abs=0.06)
    assert zero["top1_diff_vs_default"] == "-50.0" and zero["top1_resolved_vs_default"] == "yes"
    assert float(zero["top1_p_vs_default"].replace("<", "")) < 0.05
    # identical ADE20K records for both variants: nothing to resolve
    assert zero["miou_p_vs_default"] == "1" and zero["miou_resolved_vs_default"] == "no"
    assert _row(t6, fill="learnable")["top1_ours"] == (
        "— (no finetune_fill-learnable_s*.json in the ablations pipeline's metrics)")
    md = (built["out"] / "tables" / "table6_filling.md").read_text()
    assert "75.0 (" in md and "chance level" in md and "n = 120 validation images" in md


def test_a_difference_one_seed_makes_is_not_resolved(tmp_path: Path) -> None:
    """Seed-averaged predictions differ clearly on the images, but the seeds disagree: not resolved."""
    from mixmim.report.results import compare, load_results

    folder = tmp_path / "metrics"
    for seed, (acc_a, acc_b) in enumerate([(0.95, 0.60), (0.55, 0.60), (0.95, 0.60)]):
        _classification(folder, f"finetune_a_s{seed}", acc_a, 100 + seed, seed=seed)
        _classification(folder, f"finetune_b_s{seed}", acc_b, 200 + seed, seed=seed)
    res = load_results({"ablations": "metrics"}, tmp_path)
    test = compare(res.group("ablations", "finetune", "a"), res.group("ablations", "finetune", "b"), MEASURES["top1"],
                   resamples=1000)
    assert test.p_value is not None and test.p_value < 0.05  # the image-level test alone would call it
    expected = stats.paired_t_test([95.0, 55.0, 95.0], [60.0, 60.0, 60.0]).p_value
    assert test.p_seeds == pytest.approx(expected, rel=1e-6) and expected > 0.05
    assert test.resolved == "no"


def test_pretraining_loss_per_variant_with_seed_interval_and_paired_t(built: Mapping[str, Any]) -> None:
    t6 = _table(built, "table6_filling")
    default, zero = _row(t6, fill="mix"), _row(t6, fill="zero")
    ci = stats.t_interval([0.50, 0.52, 0.51])
    assert default["pretrain_loss_ours"] == "0.510" and default["pretrain_loss_n_seeds"] == "3"
    assert (float(default["pretrain_loss_ours_ci_low"]), float(default["pretrain_loss_ours_ci_high"])) == (
        pytest.approx((ci.low, ci.high), abs=6e-4))
    assert default["pretrain_loss_chance"] == "0.900"  # the predict-the-mean level
    assert zero["pretrain_loss_diff_vs_default"] == "+0.103"
    p = stats.paired_t_test([0.60, 0.63, 0.61], [0.50, 0.52, 0.51]).p_value
    assert float(zero["pretrain_loss_p_vs_default"]) == pytest.approx(p, rel=1e-2) and p < 0.05
    assert zero["pretrain_loss_resolved_vs_default"] == "yes"
    md = (built["out"] / "tables" / "table6_filling.md").read_text()
    assert "0.510 (" in md and "paired t test over seeds" in md
    # one seed and no loss recorded: the cell says which file lacks it, and nothing is tested
    t8 = _table(built, "table8_masking")
    one = t8[t8["variant_ours"] == "mask-range-40-20"].iloc[0]
    assert one["pretrain_loss_ours"] == "— (no train_loss in pretrain_mask-range-40-20_s0.json)"
    assert one["pretrain_loss_resolved_vs_default"] == "—"


def test_ablation_tables_carry_the_held_out_structure_explained(built: Mapping[str, Any]) -> None:
    """The reconstruction stage of every variant: its pooled share (a nested key of the metrics JSON) with a t
    interval over seeds, the reference's 0 as chance, and a paired t test over seeds against the default."""
    t6 = _table(built, "table6_filling")
    default, zero = _row(t6, fill="mix"), _row(t6, fill="zero")
    ci = stats.t_interval([10.0, 11.0, 12.0])
    assert default["structure_explained_ours"] == "11.0" and default["structure_explained_n_seeds"] == "3"
    assert (float(default["structure_explained_ours_ci_low"]), float(default["structure_explained_ours_ci_high"])) \
        == pytest.approx((ci.low, ci.high), abs=0.06)
    assert default["structure_explained_chance"] == "0.0"
    p = stats.paired_t_test([20.0, 22.0, 21.0], [10.0, 11.0, 12.0]).p_value
    assert zero["structure_explained_diff_vs_default"] == "+10.0"
    assert float(zero["structure_explained_p_vs_default"]) == pytest.approx(p, rel=1e-2)
    assert zero["structure_explained_resolved_vs_default"] == ("yes" if p < 0.05 else "no")
    assert "structure_explained_p_seeds_vs_default" not in t6.columns  # seeds are its only sample
    assert _row(t6, fill="learnable")["structure_explained_ours"].startswith("— (no reconstruction_fill-learnable")
    assert "held-out structure explained (%): per variant" in (built["out"] / "tables" / "table6_filling.md").read_text()


def test_single_seed_gets_a_bootstrap_interval_and_mcnemar(built: Mapping[str, Any]) -> None:
    t2 = _table(built, "table2_in1k_mim")
    ours = _row(t2, method="MixMIM", pretrain_epochs_paper="600")
    assert ours["top1_ours"] == "70.0" and ours["top1_n_seeds"] == "1"
    low, high = float(ours["top1_ours_ci_low"]), float(ours["top1_ours_ci_high"])
    assert low < 70.0 < high and high - low == pytest.approx(2 * 1.96 * (0.21 / N_VAL) ** 0.5 * 100, rel=0.25)
    assert ours["top1_resolved_vs_scratch"] == "yes"
    assert _row(t2, method="MixMIM", pretrain_epochs_paper="300")["top1_ours"].startswith("— (no run of ours at 0.5x")
    assert "GFLOPs (paper's model)" in t2.columns and "GFLOPs (our model)" in t2.columns


def test_calibration_table(built: Mapping[str, Any]) -> None:
    cal = _table(built, "calibration")
    assert list(cal.task) == ["imagenet", "inat2018", "inat2019", "places205", "places365", "coco", "ade20k"]
    for column in ("task", "metric", "pretrained", "pretrained_ci_low", "pretrained_ci_high", "scratch",
                   "scratch_ci_low", "scratch_ci_high", "resolved", "p_value", "n_val", "knn_pretrained",
                   "linear_pretrained"):
        assert column in cal.columns, column
    imagenet, coco, ade = _row(cal, task="imagenet"), _row(cal, task="coco"), _row(cal, task="ade20k")
    assert (imagenet["pretrained"], imagenet["scratch"], imagenet["resolved"]) == ("70.0", "30.0", "yes")
    assert imagenet["knn_pretrained"] == "50.0" and imagenet["knn_random"].startswith("— (no probe_imagenet_random")
    assert coco["resolved"] == "yes" and float(coco["pretrained"]) > float(coco["scratch"])
    assert ade["resolved"] == "no"  # identical records
    inat = _row(cal, task="inat2018")
    assert inat["scratch"] == "— (no scratch_inat2018_s*.json in the default pipeline's metrics)"
    assert inat["resolved"] == "—"


def test_calibration_of_a_pipeline_without_scratch_runs_keeps_its_probes(built: Mapping[str, Any]) -> None:
    """The mid and paper reports name no scratch stem: the row says so, and its probe cells still read."""
    from mixmim.report import check_calibration

    entries = check_calibration({"imagenet": {"metric": "top1", "pretrained": "finetune_imagenet", "scratch": "",
                                              "probe_pretrained": "probe_imagenet_pretrained",
                                              "probe_random": "probe_imagenet_random"}})
    tables, _ = build_tables_from(PIPELINES, root=built["root"], calibration=entries, resamples=1000)
    cal = next(t for t in tables if t.key == "calibration").frame
    imagenet = _row(cal.astype(str), task="imagenet")
    assert imagenet["pretrained"] == "70.0" and imagenet["knn_pretrained"] == "50.0"
    assert imagenet["scratch"] == "— (no from-scratch run in this pipeline)" and imagenet["resolved"] == "—"
    assert _row(cal.astype(str), task="coco")["pretrained"].startswith("— (not in report.calibration")
    with pytest.raises(ValueError, match="imagenet.scratch=None"):
        check_calibration({"imagenet": {"metric": "top1", "pretrained": "finetune_imagenet"}})


def test_average_excludes_results_at_chance(built: Mapping[str, Any]) -> None:
    t5 = _table(built, "table5_cls_transfer")
    ours = _row(t5, backbone="MixMIM-B")
    assert ours["inat2018_ours"] == "10.0"
    assert ours["average_ours"] == "60.0 (excludes inat2018: at or below chance)"


def test_one_mapping_from_runs_to_paper_rows(built: Mapping[str, Any]) -> None:
    t9 = _table(built, "table9_epochs")
    assert _row(t9, pretrain_epochs_paper="300")["variant_ours"] == "default"
    assert _row(t9, pretrain_epochs_paper="600")["variant_ours"] == "epochs-8"  # 2x our default -> 2x 300
    assert _row(t9, pretrain_epochs_paper="900")["top1_ours"].startswith("— (no variant at 3x")
    mapping = _table(built, "run_mapping")
    default_rows = mapping[(mapping.pipeline == "ablations") & (mapping.run == "default")]
    assert set(default_rows["table"]) >= {"table6", "table7", "table9"}
    assert all("-> 1x the paper's default 300 ep" in why for why in default_rows["why"])
    t8 = _table(built, "table8_masking")
    assert _row(t8, mask_type="random", mask_ratio="0.4")["variant_ours"] == "mask-range-40-20"
    t3 = _table(built, "table3_same_encoder")
    vit = _row(t3, method="MixMIM", backbone="ViT-B")
    assert vit["top1_ours"] == "50.0" and vit["top1_resolved_vs_scratch"] in ("yes", "no")
    assert vit["scale_ours"] == ("built-in scale: vit_tiny_patch16_224 (embed_dim=48), 64 px, 4 pretrain + 3 "
                                 "finetune epochs")


def test_encoder_tables_carry_the_backbones_probes_against_random_init(built: Mapping[str, Any]) -> None:
    frame = _table(built, "table3_same_encoder")
    vit = frame[(frame["method"] == "MixMIM") & ~frame["knn_top1_ours"].str.startswith("—")]
    assert len(vit) == 1  # the other MixMIM rows (families not run) say why instead
    row = vit.iloc[0]
    assert float(row["knn_top1_ours"]) == pytest.approx(60.0, abs=1.0)
    assert float(row["linear_top1_diff_vs_random"]) == pytest.approx(40.0, abs=1.0)
    assert row["knn_top1_resolved_vs_random"] == "yes"
    supervised = frame[(frame["method"] == "Supervised") & ~frame["top1_ours"].str.startswith("—")]
    assert len(supervised) == 1 and (supervised["knn_top1_ours"] == "").all()  # no probe of a from-scratch run


def test_table4_sizes_say_whose_count(built: Mapping[str, Any]) -> None:
    t4 = _table(built, "table4_coco_ade20k")
    b = _row(t4, method="MixMIM", backbone="MixMIM-B")
    assert (b["COCO GFLOPs (paper's model)"], b["COCO GFLOPs (our model)"], b["COCO params M (our model)"]) == (
        "701", "1.3", "6.8")
    assert b["ap_box_resolved_vs_scratch"] == "yes" and b["miou_resolved_vs_scratch"] == "no"


def test_figure2_never_shares_an_axis_between_paper_and_ours() -> None:
    from mixmim.report import figures as figs

    paper = [figs.Point("MixMIM", "B", 16.3, 85.1), figs.Point("MAE", "H", 167.4, 86.9)]
    fig = figs.scaling_figure(paper, [figs.OursPoint("pretrained", 40.0, 35.0, 45.0)], "t", "paper", "ours", "y")
    left, right = fig.axes
    assert left.get_xscale() == "linear"
    assert not left.get_shared_y_axes().joined(left, right) and not left.get_shared_x_axes().joined(left, right)
    assert max(line.get_ydata().max() for line in left.lines) == pytest.approx(86.9)
    assert all(max(line.get_ydata()) < 50 for line in right.lines)


def test_figure2_paper_points_include_mae_h() -> None:
    from mixmim.report.tables import paper_table

    frame = paper_table("figure2_scaling")
    assert set(frame.model) >= {"MixMIM-B", "MixMIM-L", "MixMIM-H", "ViT-B", "ViT-L", "ViT-H"}


def test_loss_curves_band_over_seeds() -> None:
    from mixmim.report import figures as figs

    curve = figs.LossCurve("default", [([1, 2, 3], [1.0, 0.8, 0.6]), ([1, 2, 3], [1.2, 1.0, 0.8])], "ablations", 0.9)
    fig = figs.loss_curves_figure([curve])
    ax = fig.axes[0]
    assert len(ax.collections) == 1  # the band
    assert any(list(line.get_ydata()) == [0.9, 0.9] for line in ax.lines)  # the predict-the-mean level
    assert "band: min-max over seeds" in fig.get_suptitle()
    single = figs.loss_curves_figure([figs.LossCurve("default", [([1, 2, 3], [1.0, 0.8, 0.6])], "default")])
    assert "no band" in single.get_suptitle() and not single.axes[0].collections
    assert "band" not in figs.loss_curves_figure([]).get_suptitle()


def test_loss_panels_say_what_their_runs_trained() -> None:
    """The pipelines train different models and budgets: each panel title names its model, decoder width,
    batch and steps, spans where its variants differ, so no one reads two panels' curves as one experiment."""
    from mixmim.report import figures as figs

    short, long = [([10, 20, 250], [1.0, 0.8, 0.6])], [([10, 20, 750], [1.0, 0.8, 0.5])]
    fig = figs.loss_curves_figure([
        figs.LossCurve("default", [([10, 1000], [1.0, 0.4])], "default", 0.38, "mixmim_micro", 192, 16),
        figs.LossCurve("default", short, "ablations", 0.38, "mixmim_micro", 96, 16),
        figs.LossCurve("epochs-6", long, "ablations", 0.38, "mixmim_micro", 96, 16),
        figs.LossCurve("vit", short, "backbones", 0.48, "vit_tiny", None, 16),
        figs.LossCurve("swin", short, "backbones", 0.62, "swin_tiny", None, 16)])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["default pipeline\nmixmim_micro, decoder 192, batch 16, 1000 steps",
                      "ablations pipeline\nmixmim_micro, decoder 96, batch 16, 250-750 steps",
                      "backbones pipeline\n2 models, batch 16, 250 steps"]


def test_loss_levels_per_variant_when_their_tasks_differ() -> None:
    """Variants with different cell sizes have different predict-the-mean levels: each gets its own line
    in its colour; variants of one task share one black line."""
    from mixmim.report import figures as figs

    hist = [([1, 2, 3], [1.0, 0.8, 0.7])]
    fig = figs.loss_curves_figure([figs.LossCurve("vit", hist, "backbones", 0.48),
                                   figs.LossCurve("swin", hist, "backbones", 0.62),
                                   figs.LossCurve("pvt", hist, "backbones", 0.624)])
    levels = {line.get_label(): line for line in fig.axes[0].lines if "level" in line.get_label()}
    assert sorted(levels) == ["pvt, swin predict-the-mean level: 0.622", "vit predict-the-mean level: 0.480"]
    assert levels["pvt, swin predict-the-mean level: 0.622"].get_color() == "black"
    curves = {line.get_label(): line for line in fig.axes[0].lines if "level" not in line.get_label()}
    assert levels["vit predict-the-mean level: 0.480"].get_color() == curves["vit (1 seed)"].get_color()
    shared = figs.loss_curves_figure([figs.LossCurve("a", hist, "ablations", 0.383),
                                      figs.LossCurve("b", hist, "ablations", 0.386)])
    assert [line.get_color() for line in shared.axes[0].lines if "level" in line.get_label()] == ["black"]


def test_crowded_loss_panel_keeps_its_legend_off_the_curves() -> None:
    """With many variants the legend goes below the axes, so it cannot hide the curves or the y label."""
    from mixmim.report import figures as figs

    curves = [figs.LossCurve(f"v{k}", [([1, 2, 3], [1.0 + k, 0.8 + k, 0.6 + k])], "ablations", 0.4) for k in range(12)]
    fig = figs.loss_curves_figure(curves)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend, frame = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.y1 <= frame.y0  # entirely below the plotting area
    few = figs.loss_curves_figure(curves[:3])
    few.canvas.draw()
    inside = few.axes[0].get_legend().get_window_extent()
    assert few.axes[0].get_window_extent().contains(inside.x0 + 1, inside.y0 + 1)


def test_perfect_prediction_reconstructs_the_image() -> None:
    """Unnormalising with the target cell's statistics inverts norm_pix targets exactly (a check of the maths)."""
    torch.manual_seed(0)
    img = torch.randn(3, 64, 64)
    cells = patchify(img.unsqueeze(0), 32)[0]
    target = (cells - cells.mean(-1, keepdim=True)) / (cells.var(-1, keepdim=True) + 1e-6) ** 0.5
    pred = unnormalise_cells(target, img, 32, norm_pix=True)
    predicted = torch.tensor([1.0, 0.0, 0.0, 1.0])
    out = paste(torch.zeros_like(img), pred, predicted, 32, (2, 2))
    assert torch.allclose(out[:, :32, :32], img[:, :32, :32], atol=1e-4)
    assert torch.equal(out[:, :32, 32:], torch.zeros(3, 32, 32))


def test_figure_unnormalises_with_visible_cells_only() -> None:
    """Changing the hidden cells of the target does not change what the figure shows for them."""
    torch.manual_seed(0)
    img = torch.randn(3, 64, 64)
    pred = torch.randn(4, 32 * 32 * 3)
    visible = torch.tensor([0.0, 1.0, 1.0, 0.0])
    a = unnormalise_cells(pred, img, 32, True, visible=visible)
    other = img.clone()
    other[:, :32, :32] += 5.0  # cell 0 is hidden
    assert torch.equal(a, unnormalise_cells(pred, other, 32, True, visible=visible))
    with pytest.raises(ValueError, match="no visible cell"):
        unnormalise_cells(pred, img, 32, True, visible=torch.zeros(4))


def test_single_reconstruction_without_a_partner_image_drops_those_columns() -> None:
    from mixmim.report.figures import mixing_figure
    from mixmim.report.reconstruction import fixed_mask, reconstruct_pairs

    torch.manual_seed(0)
    model = build_pretrainer("mixmim_nano", fill="zero", dual=False, mask_type="block").eval()
    views = reconstruct_pairs(model, torch.randn(2, 3, 64, 64), fixed_mask(model))
    assert len(views) == 1 and views[0].original_b is None and views[0].recon_b is None
    assert len(mixing_figure(views).axes) == 3


def test_failed_build_keeps_the_previous_report(built: Mapping[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import mixmim.report.build as build

    out = built["root"] / "kept"
    out.mkdir()
    (out / "README.md").write_text("previous report\n")

    def crash(*_: Any) -> None:
        raise RuntimeError("killed mid-report")

    monkeypatch.setattr(build, "_top1_figure", crash)
    with pytest.raises(RuntimeError, match="killed mid-report"):
        build_report(PIPELINES, out_dir=out, root=built["root"], resamples=1000)
    assert [p.name for p in out.iterdir()] == ["README.md"]
    assert not list(out.parent.glob(".kept.*"))


def test_missing_pipeline_folder_gives_reasons(tmp_path: Path) -> None:
    tables, _ = build_tables_from({"default": "nowhere"}, root=tmp_path, resamples=1000)
    t6 = next(t for t in tables if t.key == "table6_filling").frame
    assert t6.iloc[0]["top1_ours"] == "— (no 'ablations' pipeline given to the report)"
    t5 = next(t for t in tables if t.key == "table5_cls_transfer").frame
    assert t5.iloc[2]["inat2018_ours"] == "— (no results of the default pipeline)"  # no params.yaml: scale unknown
    with pytest.raises(ValueError, match="unknown role 'extras'"):
        build_tables_from({"extras": "x"}, root=tmp_path)


# --------------------------------------------------------------------------- the DVC stage


def _stage_module() -> SimpleNamespace:
    path = Path(__file__).resolve().parents[1] / "stages" / "report.py"
    return SimpleNamespace(**runpy.run_path(str(path), run_name="stage_report"))


def test_stage_checks_params_and_resolves_relative_sqlite(tmp_path: Path) -> None:
    stage = _stage_module()
    params = tmp_path / "params.yaml"
    params.write_text("tracking: {uri: 'sqlite:///store/mlflow.db', experiment: x}\n"
                      "report: {out_dir: out, experiments: {default: paper}, scale_note: x,\n"
                      "         calibration: {coco: {metric: ap_box, pretrained: coco, scratch: scratch_coco}}}\n")
    checked, uri = stage.load_params(params)
    assert uri == f"sqlite:///{(tmp_path / 'store' / 'mlflow.db').resolve().as_posix()}"
    assert checked.experiments == {"default": "paper"} and checked.pipelines["default"] == "metrics"
    for text, key in (("report: {out_dir: out, colour: red}", "colour"),
                      ("report: {out_dir: 3}", "report.out_dir"),
                      ("report: {experiments: {default: 1}}", "report.experiments.default"),
                      ("report: {pipelines: {extras: x}}", "extras"),
                      ("report: {bootstrap_resamples: 10}", "bootstrap_resamples"),
                      ("report: {calibration: {coco: {metric: ap, pretrained: a, scratch: b}}}", "coco.metric"),
                      ("report: {calibration: {mnist: {metric: top1, pretrained: a, scratch: b}}}", "mnist"),
                      ("tracking: {uri: 5}\nreport: {}", "tracking.uri")):
        params.write_text(text + "\n")
        with pytest.raises(ConfigError, match=key):
            stage.load_params(params)


def test_stage_writes_the_report(built: Mapping[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    stage = _stage_module()
    monkeypatch.delenv("MIXMIM_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    pipelines = {role: str(built["root"] / folder) for role, folder in PIPELINES.items()}
    (tmp_path / "params.yaml").write_text(
        f"tracking: {{uri: '{built['uri']}'}}\n"
        f"report: {{out_dir: reports, experiments: {{default: default}}, scale_note: tiny,\n"
        f"         pipelines: {json.dumps(pipelines)}, bootstrap_resamples: 1000}}\n")
    assert stage.main(["--params", str(tmp_path / "params.yaml")]) == 0
    readme = (tmp_path / "reports" / "README.md").read_text()
    assert "mixing_reconstruction.png: not drawn (needs both pretrain_weights and sample_images" in readme
    assert "skipped mixing_reconstruction.png" in capsys.readouterr().out
    assert (tmp_path / "reports" / "tables" / "table6_filling.csv").read_bytes() == (
        built["out"] / "tables" / "table6_filling.csv").read_bytes()


def test_report_stage_declares_every_pipelines_results_and_stays_out_of_the_root_pipeline() -> None:
    """Each report stage's DVC deps cover every metrics folder it reads (the folder or one above it), its
    params cover the params file of every pipeline whose scale its labels name, and no stage of the root
    dvc.yaml depends on another pipeline's results (that would make `dvc repro` of the default pipeline
    rerun them upstream)."""
    import yaml

    from mixmim.report.results import pipeline_scale

    repo = Path(__file__).resolve().parents[1]
    folder = repo / "pipelines" / "report"
    stages = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]
    for name, params_file in (("report", "params.yaml"), ("report_paper", "paper.yaml"), ("report_mid", "mid.yaml")):
        stage = stages[name]
        deps = [(folder / d).resolve() for d in stage["deps"]]
        plain = {p for p in stage["params"] if isinstance(p, str)}
        files = {(folder / k).resolve(): set(v) for p in stage["params"] if isinstance(p, dict) for k, v in p.items()}
        assert {"report", "tracking.uri"} <= plain | files.get((folder / params_file).resolve(), set()), name
        section = yaml.safe_load((folder / params_file).read_text())["report"]
        for role, metrics in section["pipelines"].items():
            where = (folder / metrics).resolve()
            assert any(where == d or d in where.parents for d in deps), f"{name} does not declare {role}'s {metrics}"
            owner = next(p / "params.yaml" for p in [where, *where.parents][:3] if (p / "params.yaml").is_file())
            assert pipeline_scale(where) is not None
            assert "tracking.scale" in files.get(owner, set()), f"{name} does not declare {owner}'s tracking.scale"
    root_stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for name, spec in root_stages.items():
        for dep in spec.get("deps", []):
            assert not str(dep).startswith("pipelines/"), f"root stage {name} depends on {dep}"


@pytest.mark.slow
def test_committed_tables_regenerate_from_a_fresh_clone(tmp_path: Path) -> None:
    """A fresh clone of HEAD rebuilds every committed table (CSV, Markdown, LaTeX) byte for byte from the
    committed results alone: no MLflow store, no run folders, no data. Fails when a pipeline's results were
    committed without rerunning the report, or when the report stopped being a function of those files."""
    import shutil

    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("needs git and a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    code = (
        "import pathlib, yaml\n"
        "from mixmim.report.build import build_tables_from\n"
        "from mixmim.report.calibration import check_calibration\n"
        "from mixmim.report.render import write_table\n"
        "folder = pathlib.Path('pipelines/report')\n"
        "p = yaml.safe_load((folder / 'params.yaml').read_text())['report']\n"
        "tables, _ = build_tables_from(p['pipelines'], root=folder, resamples=p.get('bootstrap_resamples', 2000),\n"
        "                              calibration=check_calibration(p.get('calibration') or {}) or None)\n"
        "for t in tables: write_table(t.frame, pathlib.Path('regenerated'), t.key, t.title, t.notes)\n"
    )
    env = {"PYTHONPATH": str(clone), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], cwd=clone, env=env, check=True, capture_output=True)
    committed = {p.name: p.read_bytes() for p in (clone / "reports" / "tables").iterdir()}
    regenerated = {p.name: p.read_bytes() for p in (clone / "regenerated").iterdir()}
    assert sorted(regenerated) == sorted(committed), "the committed tables are not the ones the report writes"
    changed = [name for name in committed if committed[name] != regenerated[name]]
    assert not changed, f"committed tables differ from a fresh regeneration: {changed}"
