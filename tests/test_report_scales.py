"""The report names the scale of what it shows, places every model size, and fills from files named as the
pipelines name them.

* The scale in labels comes from the results: a metrics JSON's own ``scale``, else ``tracking.scale`` of the
  pipeline's params file above its metrics folder; never a fixed word.
* The paper report's size roles (pipelines/report/paper.yaml: base -> default, large, huge) put MixMIM-L's
  results beside the paper's MixMIM-L rows of Tables 4 and 5, with the same interval, n, chance and test
  columns and run_mapping entries, and draw every size in Figure 2's ours panel.
* A pipeline that has not run says so in every cell (with its scale); synthetic results named as the
  ablations and backbones pipelines name them (their own params: variants x seeds, families x seeds) then
  fill every paper row they stand beside, with no code change.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from mixmim import stats
from mixmim.records import write_classification_records, write_segmentation_records
from mixmim.report.build import _dense_figure, _top1_figure, build_tables_from
from mixmim.report.render import display_frame
from mixmim.report.results import load_results, pipeline_scale
from mixmim.report.tables import Context, build_tables

REPO = Path(__file__).resolve().parents[1]
N_VAL = 60
LABELS = [i % 6 for i in range(N_VAL)]  # 6 balanced classes: chance = 16.7%
RESAMPLES = 1000


def _write(folder: Path, stem: str, **values: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **values}, sort_keys=True) + "\n")


def _cls(folder: Path, stem: str, accuracy: float, rng: int, suffix: str = "", key: str = "top1",
         **extra: Any) -> None:
    right = np.random.default_rng(rng).permutation(N_VAL) < round(accuracy * N_VAL)
    preds = [y if ok else (y + 1) % 6 for y, ok in zip(LABELS, right)]
    folder.mkdir(parents=True, exist_ok=True)
    write_classification_records(folder / f"{stem}{suffix}_preds.json", LABELS, preds)
    _write(folder, stem, **{key: 100.0 * float(right.mean()), "n_val": N_VAL, **extra})


def _seg(folder: Path, stem: str, quality: float, rng_seed: int, **extra: Any) -> None:
    rng = np.random.default_rng(rng_seed)
    union = rng.integers(50, 100, size=(8, 3))
    inter = (union * np.clip(quality + rng.normal(0, 0.05, size=union.shape), 0, 1)).astype(int)
    folder.mkdir(parents=True, exist_ok=True)
    write_segmentation_records(folder / f"{stem}_preds.json", inter.tolist(), union.tolist(), list("abc"))
    _write(folder, stem, miou=stats.miou_from_counts(inter, union), n_val=8, baseline_miou=0.1, **extra)


def _params(folder: Path, scale: str | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text("tracking: {scale: %s}\n" % scale if scale else "seeds: [0]\n")


def _frame(tables: list, key: str) -> pd.DataFrame:
    return next(t for t in tables if t.key == key).frame


def _row(frame: pd.DataFrame, **match: str) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    for column, value in match.items():
        mask &= frame[column] == value
    assert mask.sum() == 1, match
    return frame[mask].iloc[0]


def _number(cell: str) -> float:
    return float(cell)  # a bare number: a value, never "— (reason)"


# --------------------------------------------------------------------------- the scale comes from the results


def test_pipeline_scale_is_read_from_the_params_file_above_the_metrics(tmp_path: Path) -> None:
    _params(tmp_path / "pipelines" / "paper", "paper")
    _params(tmp_path / "plain", None)  # a params file without tracking.scale: the stages' default
    (tmp_path / "pipelines" / "paper" / "metrics" / "large").mkdir(parents=True)
    assert pipeline_scale(tmp_path / "pipelines" / "paper" / "metrics" / "large") == "paper"
    assert pipeline_scale(tmp_path / "plain" / "metrics") == "builtin"
    assert pipeline_scale(tmp_path / "nowhere" / "metrics") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "params.yaml").write_text("tracking: {scale: 3}\n")
    with pytest.raises(ValueError, match="tracking.scale=3"):
        pipeline_scale(tmp_path / "bad")


def _figure_titles(root: Path, pipelines: dict[str, str]) -> tuple[str, str, list[str]]:
    ctx = Context(load_results(pipelines, root), RESAMPLES)
    fig = _top1_figure(ctx)
    _, ours = fig.axes
    return ours.get_title(), ours.get_ylabel(), [t.get_text() for t in ours.get_xticklabels()]


@pytest.mark.parametrize("scale, says, never", [
    ("builtin", ("built-in scale", "the ImageNet-1K stand-in"), ("paper scale", "mid scale")),
    ("paper", ("paper scale", "ImageNet-1K"), ("stand-in", "built-in")),
    ("mid", ("mid scale", "ImageNet-100"), ("stand-in", "built-in", "paper scale")),
])
def test_ours_panel_names_the_scale_of_the_results(tmp_path: Path, scale: str, says: tuple[str, ...],
                                                   never: tuple[str, ...]) -> None:
    _params(tmp_path, scale)
    _write(tmp_path / "metrics", "pretrain_s0", epochs=4, seed=0)
    _cls(tmp_path / "metrics", "finetune_imagenet_s0", 0.6, 1, model="mixmim_base", img_size=224, epochs=3)
    title, ylabel, ticks = _figure_titles(tmp_path, {"default": "metrics"})
    for word in says:
        assert word in title + ylabel, (word, title, ylabel)
    for word in never:
        assert word not in title + ylabel, (word, title, ylabel)
    assert ticks == [f"MixMIM-B\npretrained\n(n={N_VAL}, 1 seed)"]


def test_a_metrics_files_own_scale_wins_over_its_pipelines(tmp_path: Path) -> None:
    _params(tmp_path, "builtin")
    _cls(tmp_path / "metrics", "finetune_imagenet_s0", 0.6, 1, model="mixmim_base", scale="paper")
    title, _, _ = _figure_titles(tmp_path, {"default": "metrics"})
    assert "paper scale" in title and "built-in" not in title


def test_dense_panels_name_the_scale_too(tmp_path: Path) -> None:
    _params(tmp_path, "paper")
    _write(tmp_path / "metrics", "pretrain_s0", epochs=4, seed=0)
    _seg(tmp_path / "metrics", "ade20k_s0", 0.7, 2, model="mixmim_base", img_size=512, model_gflops=302.0)
    ctx = Context(load_results({"default": "metrics"}, tmp_path), RESAMPLES)
    fig = _dense_figure(ctx, "ade20k", "miou", "ade_flops_g", "miou", "t", "mIoU (%)", "UperNet")
    paper, ours = fig.axes
    assert "paper scale" in ours.get_title() and "stand-in" not in ours.get_title() + ours.get_ylabel()
    assert not paper.get_shared_y_axes().joined(paper, ours)


# --------------------------------------------------------------------------- the paper report's size roles


def _paper_tree(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The paper pipeline's layout under tmp_path, with the committed paper.yaml's role -> folder map."""
    report = tmp_path / "pipelines" / "report"
    report.mkdir(parents=True)
    _params(tmp_path / "pipelines" / "paper", "paper")
    pipelines = yaml.safe_load((REPO / "pipelines" / "report" / "paper.yaml").read_text())["report"]["pipelines"]
    sizes = {"base": ("mixmim_base", 0.70), "large": ("mixmim_large", 0.80), "huge": ("mixmim_huge", 0.85)}
    for k, (size, (model, acc)) in enumerate(sizes.items()):
        folder = tmp_path / "pipelines" / "paper" / "metrics" / size
        _write(folder, "pretrain_s0", epochs=600, seed=0, model=model)
        _cls(folder, "finetune_imagenet_s0", acc, 10 + k, seed=0, model=model, img_size=224, epochs=50)
        if size == "huge":
            continue  # MixMIM-H: ImageNet-1K only (Figure 2), as in the paper pipeline
        for j, dataset in enumerate(("inat2018", "inat2019", "places205", "places365")):
            _cls(folder, f"finetune_{dataset}_s0", acc - 0.05 * j, 20 + 5 * k + j, seed=0, model=model,
                 img_size=224, epochs=100)
        _seg(folder, "ade20k_s0", acc - 0.2, 30 + k, model=model, img_size=512, max_iters=160000)
    return report, pipelines


def test_large_results_stand_beside_the_papers_large_rows(tmp_path: Path) -> None:
    report, pipelines = _paper_tree(tmp_path)
    assert {"default", "large", "huge"} <= set(pipelines)
    tables, results = build_tables_from(pipelines, root=report, resamples=RESAMPLES)
    assert results.scale_of(role="large") == "paper"
    t4, t5 = _frame(tables, "table4_coco_ade20k"), _frame(tables, "table5_cls_transfer")
    for frame, metric in ((t4, "miou"), (t5, "inat2018"), (t5, "places365")):
        b, large = _row(frame, method="MixMIM", backbone="MixMIM-B"), _row(frame, method="MixMIM", backbone="MixMIM-L")
        assert _number(large[f"{metric}_ours"]) > _number(b[f"{metric}_ours"])  # each size its own results
        low, high = _number(large[f"{metric}_ours_ci_low"]), _number(large[f"{metric}_ours_ci_high"])
        assert low < _number(large[f"{metric}_ours"]) < high
        assert large[f"{metric}_n_seeds"] == "1" and large[f"{metric}_n_val"] in (str(N_VAL), "8")
        assert _number(large[f"{metric}_chance"]) > 0
        assert large[f"{metric}_p_vs_scratch"] == "— (needs both results)"  # the paper pipeline has no scratch
        assert large["scale_ours"].startswith("paper scale: mixmim_large, ")
        assert "600 pretrain" in large["scale_ours"]
    large = _row(t5, method="MixMIM", backbone="MixMIM-L")
    values = [_number(large[f"{d}_ours"]) for d in ("inat2018", "inat2019", "places205", "places365")]
    assert _number(large["average_ours"]) == pytest.approx(sum(values) / 4, abs=0.051)
    # COCO did not run for either size: the cell says which file is missing, at the size's own row
    assert _row(t4, backbone="MixMIM-L")["ap_box_ours"] == "— (no coco_s*.json in the large pipeline's metrics)"
    mapping = _frame(tables, "run_mapping")
    large_rows = mapping[mapping.pipeline == "large"]
    assert set(large_rows.table) == {"table4", "table5"}
    assert set(large_rows["paper row"]) == {"MixMIM-L, 600 epochs"}
    assert set(mapping[mapping.pipeline == "default"]["paper row"]) == {"MixMIM-B, 600 epochs"}
    # Figure 2 (left): every size's ImageNet-1K result in the ours panel, labelled with the paper scale
    ctx = Context(results, RESAMPLES)
    _, ours = _top1_figure(ctx).axes
    ticks = [t.get_text().rsplit("\n", 1)[0] for t in ours.get_xticklabels()]
    assert ticks == ["MixMIM-B\npretrained", "MixMIM-L\npretrained", "MixMIM-H\npretrained"]
    assert "paper scale" in ours.get_title() and "stand-in" not in ours.get_title()


def test_without_large_results_the_large_rows_say_why(tmp_path: Path) -> None:
    report, pipelines = _paper_tree(tmp_path)
    for path in (tmp_path / "pipelines" / "paper" / "metrics" / "large").iterdir():
        path.unlink()
    tables, _ = build_tables_from(pipelines, root=report, resamples=RESAMPLES)
    large = _row(_frame(tables, "table5_cls_transfer"), method="MixMIM", backbone="MixMIM-L")
    assert large["inat2018_ours"] == "— (MixMIM-L not run at paper scale)"
    assert _number(_row(_frame(tables, "table5_cls_transfer"), backbone="MixMIM-B")["inat2018_ours"]) > 0


# --------------------------------------------------------------------------- pipelines not run, then run


def _default_results(root: Path) -> None:
    d = root / "metrics"
    _write(d, "pretrain_s0", epochs=4, seed=0)
    _cls(d, "finetune_imagenet_s0", 0.5, 1, seed=0, model="mixmim_micro", img_size=56, epochs=8)


def _epochs(params: dict, variant: str) -> float:
    return float({**params["pretrain"], **(params["variants"][variant] or {})}["epochs"])


def _run_ablations(folder: Path, params: dict, dense: bool = True) -> None:
    """Results of every variant x seed of pipelines/ablations/params.yaml, named as its dvc.yaml names them
    (``dense=False``: pretraining and finetuning only, as the mid pipeline runs them)."""
    for v, variant in enumerate(params["variants"]):
        for seed in params["seeds"]:
            acc = 0.5 + 0.02 * v + 0.01 * seed
            model = params["finetune"]["model"]
            _write(folder, f"pretrain_{variant}_s{seed}", epochs=_epochs(params, variant), seed=seed,
                   model=params["pretrain"]["model"])
            _cls(folder, f"finetune_{variant}_s{seed}", acc, 100 * v + seed, seed=seed, model=model, img_size=56,
                 epochs=params["finetune"]["epochs"])
            if not dense:
                continue
            _seg(folder, f"ade20k_{variant}_s{seed}", acc, 100 * v + seed, seed=seed, model=model)
            _cls(folder, f"probe_{variant}_s{seed}", acc - 0.1, 100 * v + seed, "_knn", key="knn_top1", seed=seed)
            _cls(folder, f"probe_{variant}_s{seed}", acc - 0.05, 100 * v + seed, "_linear", key="linear_top1",
                 seed=seed)


def _run_backbones(folder: Path, params: dict) -> None:
    for f, family in enumerate(params["families"]):
        model = params["families"][family]["finetune"]["model"]
        for seed in params["seeds"]:
            _write(folder, f"pretrain_{family}_s{seed}", epochs=params["pretrain"]["epochs"], seed=seed, model=model)
            for stage, acc in (("finetune", 0.6), ("scratch", 0.4)):
                _cls(folder, f"{stage}_{family}_s{seed}", acc + 0.02 * f, 200 + 10 * f + seed, seed=seed,
                     model=model, img_size=64, epochs=params["finetune"]["epochs"])


ABLATION_TABLES = ("table6_filling", "table7_dual", "table8_masking", "table9_epochs", "table10_unmixing")
ENCODER_TABLES = ("table3_same_encoder", "table13_convnets")


def test_unrun_pipelines_say_why_then_fill_without_code_changes(tmp_path: Path) -> None:
    pipelines = {"default": "metrics", "ablations": "pipelines/ablations/metrics",
                 "backbones": "pipelines/backbones/metrics"}
    _params(tmp_path, "builtin")
    for name in ("ablations", "backbones"):
        _params(tmp_path / "pipelines" / name, "builtin")
        (tmp_path / "pipelines" / name / "metrics").mkdir()
    _default_results(tmp_path)
    tables, _ = build_tables_from(pipelines, root=tmp_path, resamples=RESAMPLES)
    for key, role in [(k, "ablations") for k in ABLATION_TABLES] + [(k, "backbones") for k in ENCODER_TABLES]:
        frame = _frame(tables, key)
        why = f"— ({role} pipeline not run at built-in scale: no results in its metrics folder)"
        ours = [c for c in frame.columns if f"{c}_ci_low" in frame.columns]
        if "method" in frame:  # the rows of methods this suite runs (not MAE, BEiT, ... or BiT-M)
            frame = frame[frame["method"].isin(["MixMIM", "Supervised", "BiT-S"])]
        cells = frame[ours].to_numpy().ravel()
        assert len(cells) and all(cell == why for cell in cells), (key, set(cells))
        notes = next(t for t in tables if t.key == key).notes
        assert any(f"no result of ours ({role} pipeline not run at built-in scale" in n for n in notes), key

    ablations = yaml.safe_load((REPO / "pipelines" / "ablations" / "params.yaml").read_text())
    backbones = yaml.safe_load((REPO / "pipelines" / "backbones" / "params.yaml").read_text())
    _run_ablations(tmp_path / pipelines["ablations"], ablations)
    _run_backbones(tmp_path / pipelines["backbones"], backbones)
    tables, _ = build_tables_from(pipelines, root=tmp_path, resamples=RESAMPLES)

    shown: set[str] = set()
    for key in ABLATION_TABLES:
        frame = _frame(tables, key)
        filled = frame[frame["variant_ours"] != ""]
        shown |= set(filled["variant_ours"])
        for _, row in filled.iterrows():
            for metric in ("top1", "miou", "knn_top1", "linear_top1"):
                if f"{metric}_ours" not in frame:
                    continue
                assert _number(row[f"{metric}_ours"]) > 0, (key, row["variant_ours"], metric)
                assert row[f"{metric}_n_seeds"] == str(len(ablations["seeds"]))
                assert not math.isnan(_number(row[f"{metric}_ours_ci_low"]))
                if row["variant_ours"] != "default":
                    assert row[f"{metric}_resolved_vs_default"] in ("yes", "no")
    assert shown == set(ablations["variants"]), "every variant of the ablations pipeline shows in a table"
    for key in ("table6_filling", "table7_dual", "table8_masking", "table10_unmixing"):
        frame = _frame(tables, key)
        assert (frame["variant_ours"] != "").all(), f"{key}: a paper row without its variant"
    t9 = _frame(tables, "table9_epochs")
    assert _row(t9, pretrain_epochs_paper="300")["variant_ours"] == "default"
    for paper_epochs in ("600", "900"):  # the pipeline's epoch variants at 2x and 3x its default budget
        ratio = int(paper_epochs) // 300
        variant = _row(t9, pretrain_epochs_paper=paper_epochs)["variant_ours"]
        assert _epochs(ablations, variant) == ratio * _epochs(ablations, "default"), (paper_epochs, variant)

    placed = 0
    for key in ENCODER_TABLES:
        frame = _frame(tables, key)
        filled = frame[~frame["top1_ours"].str.startswith("—")]
        placed += len(filled)
        for _, row in filled.iterrows():
            assert _number(row["top1_ours"]) > 0 and row["top1_n_seeds"] == str(len(backbones["seeds"]))
            if row["method"] == "MixMIM":
                assert row["top1_resolved_vs_scratch"] in ("yes", "no")
    assert placed == 2 * len(backbones["families"]), "each family's MixMIM and from-scratch rows are filled"
    mapping = _frame(tables, "run_mapping")
    assert set(mapping[mapping.pipeline == "ablations"].run) == set(ablations["variants"])
    assert {r.split("_", 1)[1] for r in mapping[mapping.pipeline == "backbones"].run} == set(backbones["families"])


def test_table9_places_budgets_by_their_ratio_to_the_default(tmp_path: Path) -> None:
    """The one mapping rule: 2x and 3x our default pretraining stand beside 600 and 900 (2x and 3x the paper's
    300-epoch ablation default); any other budget gets its own row marked as not in the paper."""
    _params(tmp_path, "builtin")
    folder = tmp_path / "abl"
    params = {"pretrain": {"epochs": 2}, "variants": {"default": {}, "epochs-4": {"epochs": 4},
                                                       "epochs-6": {"epochs": 6}, "epochs-1": {"epochs": 1}},
              "seeds": [0], "finetune": {"model": "mixmim_micro", "epochs": 8}}
    params["pretrain"]["model"] = "mixmim_micro"
    _run_ablations(folder, params)
    tables = build_tables(load_results({"ablations": "abl"}, tmp_path), RESAMPLES)
    t9 = _frame(tables, "table9_epochs")
    assert list(t9.variant_ours) == ["default", "epochs-4", "epochs-6", "epochs-1"]
    assert list(t9.pretrain_epochs_paper)[:3] == ["300", "600", "900"]
    assert t9.iloc[3]["pretrain_epochs_paper"].startswith("— (not in the paper)")


def test_a_value_without_an_interval_says_so(tmp_path: Path) -> None:
    """A single run without per-image records has no interval: its cell says that, never a bare number."""
    _params(tmp_path, "builtin")
    _write(tmp_path / "metrics", "pretrain_s0", epochs=4, seed=0)
    _write(tmp_path / "metrics", "finetune_imagenet_s0", top1=40.0, n_val=100, seed=0, model="mixmim_micro")
    _cls(tmp_path / "metrics", "finetune_inat2019_s0", 0.5, 3, seed=0, model="mixmim_micro")
    tables = build_tables(load_results({"default": "metrics"}, tmp_path), RESAMPLES)
    t2 = _row(_frame(tables, "table2_in1k_mim"), method="MixMIM", pretrain_epochs_paper="600")
    assert (t2["top1_ours"], t2["top1_ours_ci_low"], t2["top1_n_val"], t2["top1_n_seeds"]) == ("40.0", "", "100", "1")
    table = next(t for t in tables if t.key == "table2_in1k_mim")
    shown = display_frame(table.frame)
    assert "40.0 (no interval)" in list(shown["top1_ours"])  # Markdown and LaTeX never show it bare
    assert "values shown with 'no interval': one seed, no per-image records" in table.notes[0]
    t5 = _row(_frame(tables, "table5_cls_transfer"), backbone="MixMIM-B")
    assert _number(t5["inat2019_ours"]) == 50.0 and _number(t5["inat2019_ours_ci_low"]) < 50.0
    assert t5["average_ours"] == "50.0 (excludes inat2018, places205, places365: not run)"


def test_readme_lists_each_pipelines_scale_and_why_it_is_empty(tmp_path: Path) -> None:
    from mixmim.report import build_report

    _params(tmp_path, "builtin")
    _params(tmp_path / "abl", "mid")
    _default_results(tmp_path)
    build_report({"default": "metrics", "ablations": "abl/metrics"}, out_dir=tmp_path / "out", root=tmp_path,
                 resamples=RESAMPLES)
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "- default: `metrics` (built-in scale), 2 result file(s)" in readme
    assert ("- ablations: `abl/metrics` (mid scale), 0 result file(s); ablations pipeline not run at mid scale"
            in readme)


def test_an_empty_size_role_names_its_model(tmp_path: Path) -> None:
    report, pipelines = _paper_tree(tmp_path)
    for path in (tmp_path / "pipelines" / "paper" / "metrics" / "large").iterdir():
        path.unlink()
    results = load_results(pipelines, report)
    assert results.reason("large", "coco") == "MixMIM-L (role large) not run at paper scale: no results in its metrics folder"
    assert results.reason("default", "coco") == "no coco_s*.json in the default pipeline's metrics"


def test_loss_curves_are_smoothed_even_when_logged_sparsely() -> None:
    from mixmim.report.figures import smooth

    noisy = np.tile([1.0, 0.0], 25)  # 50 logged points alternating: unsmoothed spread 1
    out = smooth(noisy)
    assert np.ptp(out[5:-5]) < 0.25 and out.mean() == pytest.approx(0.5, abs=0.05)
    assert list(smooth([3.0])) == [3.0] and len(smooth([])) == 0
    assert smooth(np.arange(1000.0))[500] == pytest.approx(500.0, abs=1.0)  # centred: no lag (a trailing one: 50)


def test_mid_report_reads_the_mid_layout_and_names_its_scale(tmp_path: Path) -> None:
    """pipelines/report/mid.yaml over results laid out as pipelines/mid/dvc.yaml writes them."""
    report = tmp_path / "pipelines" / "report"
    report.mkdir(parents=True)
    _params(tmp_path / "pipelines" / "mid", "mid")
    section = yaml.safe_load((REPO / "pipelines" / "report" / "mid.yaml").read_text())["report"]
    base = tmp_path / "pipelines" / "mid" / "metrics" / "base"
    _write(base, "pretrain_s0", epochs=150, seed=0, model="mixmim_base")
    _cls(base, "finetune_imagenet_s0", 0.8, 1, seed=0, model="mixmim_base", img_size=224, epochs=100)
    tables, results = build_tables_from(section["pipelines"], root=report, resamples=RESAMPLES)
    row = _row(_frame(tables, "table2_in1k_mim"), method="MixMIM", pretrain_epochs_paper="600")
    assert _number(row["top1_ours"]) == 80.0
    assert row["scale_ours"] == "mid scale: mixmim_base, 224 px, 150 pretrain + 100 finetune epochs"
    assert _row(_frame(tables, "table6_filling"), fill="mix")["top1_ours"] == (
        "— (ablations pipeline not run at mid scale: no results in its metrics folder)")
    title, ylabel, _ = _figure_titles(report, section["pipelines"])
    assert "mid scale: ImageNet-100" in title and "ImageNet-100" in ylabel


def test_mid_ablations_fill_tables_6_to_10_with_table9_by_budget_ratio(tmp_path: Path) -> None:
    """The mid pipeline's ablation variants x seeds (pipelines/mid/params.yaml), named as pipelines/mid/dvc.yaml
    names them, fill every paper row of Tables 6-10; its 80 and 120 epochs (2x, 3x its 40) stand beside 600
    and 900."""
    report = tmp_path / "pipelines" / "report"
    report.mkdir(parents=True)
    _params(tmp_path / "pipelines" / "mid", "mid")
    mid = yaml.safe_load((REPO / "pipelines" / "mid" / "params.yaml").read_text())
    params = {**mid["ablations"], "seeds": mid["seeds"]}
    section = yaml.safe_load((REPO / "pipelines" / "report" / "mid.yaml").read_text())["report"]
    _run_ablations(report / section["pipelines"]["ablations"], params, dense=False)
    tables, _ = build_tables_from(section["pipelines"], root=report, resamples=RESAMPLES)
    for key in ABLATION_TABLES:
        frame = _frame(tables, key)
        assert (frame["variant_ours"] != "").all(), key
        for cell, seeds in zip(frame["top1_ours"], frame["top1_n_seeds"]):
            assert _number(cell) > 0 and seeds == str(len(mid["seeds"])), key
        assert all(c.startswith("— (no ade20k_") for c in frame["miou_ours"] if "miou_ours" in frame), key
    t9 = _frame(tables, "table9_epochs")
    assert list(zip(t9.pretrain_epochs_paper, t9.variant_ours)) == [
        ("300", "default"), ("600", "epochs-80"), ("900", "epochs-120")]
