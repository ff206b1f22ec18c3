"""``build_report``: the paper's tables and figures regenerated from the runs in an MLflow store.

Everything is written into a hidden staging folder beside ``out_dir`` and moved into
place only when the whole report is done (:func:`mixmim.data.builtin.staged_dir`), so a
stage killed half-way leaves the previous report intact and never a half-written table.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from ..data.builtin import staged_dir
from . import figures as figs
from .reconstruction import find_sample_images, fixed_mask, load_images, load_pretrainer, reconstruct_pairs
from .render import write_table
from .runs import ROLES, Run, RunIndex, load_runs, metric_history, stage_runs
from .tables import Table, build_tables, image_size, paper_table

__all__ = ["FIGURES", "Report", "build_report"]

#: Figure file -> the README line saying what it shows.
FIGURES: dict[str, str] = {
    "figure2_flops_vs_top1.png": "Figure 2 (left): ImageNet top-1 vs GFLOPs, the paper's MixMIM and MAE models "
                                 "with our pretrained and from-scratch runs on their own axis",
    "figure2_flops_vs_coco_ap.png": "Figure 2 (middle): COCO AP box vs detector GFLOPs (paper, Table 4) with ours",
    "figure2_flops_vs_ade_miou.png": "Figure 2 (right): ADE20K mIoU vs segmentor GFLOPs (paper, Table 4) with ours",
    "pretrain_loss_curves.png": "pretraining loss per optimiser step of every pretraining run found "
                                "(default, ablation variants, backbones)",
    "mixing_reconstruction.png": "Figures 1/3: pairs of images, their mixed input, and the pretrained model's "
                                 "reconstruction of each (predicted cells only; visible cells from the input)",
}


@dataclass
class Report:
    """What :func:`build_report` wrote: paths under ``out_dir`` and figures it could not draw (with why)."""

    out_dir: Path
    tables: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


@functools.lru_cache(maxsize=None)
def _gflops(model: str, img_size: int | None) -> float | None:
    """Encoder+head GFLOPs as the paper counts them; None for a model the counter cannot build."""
    from ..flops import model_info

    try:
        return model_info(model, img_size).gflops
    except (ValueError, RuntimeError, NotImplementedError, TypeError):
        return None


def _run_gflops(run: Run) -> float | None:
    return _gflops(run.model, image_size(run)) if run.model else None


def _scale_words(run: Run) -> str:
    return {"builtin": "built-in", "paper": "paper-scale"}.get(run.scale, run.scale or "our")


def _top1_figure(index: RunIndex) -> Figure:
    """Figure 2 (left): paper top-1 vs GFLOPs, with our pretrained and scratch ImageNet runs."""
    paper = figs.paper_points(paper_table("figure2_scaling"), "flops_g", "top1", "method", "model")
    ours, notes = [], []
    for stage, marker, what in (("finetune", "*", "MixMIM-pretrained"), ("scratch", "X", "from scratch")):
        run = index.find("default", stage, dataset="imagenet")
        value = run.metric("final/top1") if run else None
        gflops = _run_gflops(run) if run else None
        if run is None or value is None or gflops is None:
            continue
        ours.append(figs.Point("ours", f"{run.model} {what}", gflops, value, marker))
        notes.append(f"{run.model}: {gflops:.3g} GFLOPs at {image_size(run)} px")
    dataset = "ImageNet-1K stand-in" if any(r.scale == "builtin" for r in index.select("default")) else "ImageNet-1K"
    note = ("ours: encoder+head FLOPs counted by mixmim.flops (multiply-adds): " + "; ".join(dict.fromkeys(notes))
            if notes else "")
    return figs.scaling_figure(paper, ours, "Top-1 vs FLOPs", "ImageNet-1K top-1 (%) — paper",
                               f"ours: top-1 on {dataset} (%)", note)


def _dense_figure(index: RunIndex, stage: str, metric: str, paper_x: str, paper_y: str, title: str,
                  paper_label: str, ours_label: str) -> Figure:
    """Figure 2 (middle/right): a dense task's paper points (Table 4) and our run."""
    paper = figs.paper_points(paper_table("table4_coco_ade20k"), paper_x, paper_y, "method", "backbone")
    run = index.find("default", stage)
    ours, note = [], ""
    value = run.metric(metric) if run else None
    if run is not None and value is not None:
        gflops = run.metric("model/gflops")
        source = f"{stage} model GFLOPs at {image_size(run)} px, as the run logged them"
        if gflops is None:  # a run from before the dense engines logged their size
            gflops, source = _run_gflops(run), "encoder-only GFLOPs at classification size (run logged no model/gflops)"
        if gflops is not None:
            ours.append(figs.Point("ours", f"{run.model} ({_scale_words(run)})", gflops, value * 100))
            note = f"ours: {source}: {gflops:.3g}"
    return figs.scaling_figure(paper, ours, title, paper_label, ours_label, note)


def _loss_curves(tracking_uri: str, index: RunIndex) -> list[figs.LossCurve]:
    curves = []
    for run in stage_runs(index, "pretrain"):
        points = metric_history(tracking_uri, run.run_id, "train/loss")
        if points:
            steps, values = zip(*points)
            curves.append(figs.LossCurve(f"{run.role}: {run.variant or '?'} ({run.model})", steps, values, run.role))
    return curves


def _mixing_figure(weights: Path, images: Path) -> Figure:
    model, config = load_pretrainer(weights)
    paths = find_sample_images(images, count=4)
    imgs = load_images(paths, model.encoder.img_size[0])
    views = reconstruct_pairs(model, imgs, fixed_mask(model))
    caption = (f"{config.get('model')}: fill={model.fill}, dual={model.dual}, unmix={model.unmix}, "
               f"mask={model.mask_type} {model.mask_ratio:g} ({weights.name})")
    return figs.mixing_figure(views, caption)


def _readme(tables: list[Table], drawn: list[str], skipped: Mapping[str, str], index: RunIndex,
            scale_note: str) -> str:
    """The report's index: one line per table and figure, the scale note and what was read."""
    lines = ["# MixMIM reproduction report", "",
             "Generated by `stages/report.py` (`mixmim.report.build_report`) from the MLflow runs; "
             "regenerate rather than edit.", ""]
    lines += ["## Scale", "", scale_note.strip() or "(no scale note given)", ""]
    lines += ["Experiments read (finished runs; the latest run of each stage/variant/dataset counts):", ""]
    for role in ROLES:
        if role in index.experiments:
            count = len(index.select(role))
            lines.append(f"- {role}: experiment `{index.experiments[role]}`, {count} run(s) used")
        else:
            lines.append(f"- {role}: not given")
    lines += ["", "Columns `X (paper)` hold the paper's numbers as printed; `X (ours)` this suite's measured "
              "value, or `—` with the reason it is missing; `scale (ours)` says what ran (data, model, input "
              "size, budget). Top-1 is the final epoch's; COCO AP and ADE20K mIoU are shown in percent.", ""]
    lines += ["## Tables", ""]
    for table in tables:
        stem = f"tables/{table.key}"
        lines.append(f"- [{table.title}]({stem}.md) ([csv]({stem}.csv), [tex]({stem}.tex)): {table.description}")
    lines += ["", "## Figures", ""]
    for name, description in FIGURES.items():
        if name in drawn:
            lines.append(f"- [{name}](figures/{name}): {description}")
        else:
            lines.append(f"- {name}: not drawn ({skipped.get(name, 'unknown reason')})")
    return "\n".join(lines) + "\n"


def _check_inputs(experiments: Mapping[str, str], pretrain_weights: Path | None, sample_images: Path | None) -> None:
    unknown = sorted(set(experiments) - set(ROLES))
    if unknown:
        raise ValueError(f"experiments: unknown role {unknown[0]!r}; expected some of {list(ROLES)}")
    for role, name in experiments.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"experiments.{role}={name!r}: expected an experiment name")
    if pretrain_weights is not None and not Path(pretrain_weights).is_file():
        raise FileNotFoundError(f"pretrain_weights: {pretrain_weights} is not a file")
    if sample_images is not None and not Path(sample_images).is_dir():
        raise FileNotFoundError(f"sample_images: {sample_images} is not a folder")


def build_report(
    tracking_uri: str,
    experiments: Mapping[str, str],
    out_dir: str | os.PathLike[str] = "reports",
    pretrain_weights: str | os.PathLike[str] | None = None,
    sample_images: str | os.PathLike[str] | None = None,
    scale_note: str = "",
) -> Report:
    """Write ``out_dir/{tables,figures,README.md}`` from the finished runs of ``experiments``.

    ``experiments`` maps a role (``default``, ``ablations``, ``backbones``) to the MLflow
    experiment that pipeline logged to; a role left out is reported as not run. The
    reconstruction figure needs both ``pretrain_weights`` (a pretraining checkpoint) and
    ``sample_images`` (a folder of images); without them it is skipped and the README
    says so. The previous contents of ``out_dir`` are replaced as a whole.
    """
    weights = Path(pretrain_weights) if pretrain_weights is not None else None
    images = Path(sample_images) if sample_images is not None else None
    _check_inputs(experiments, weights, images)
    index = load_runs(tracking_uri, experiments)
    tables = build_tables(index)
    out = Path(out_dir)
    report = Report(out)
    drawn: list[str] = []
    with staged_dir(out) as root:
        for table in tables:
            written = write_table(table.frame, root / "tables", table.key, table.title)
            report.tables += [out / p.relative_to(root) for p in written]
        plots = {
            "figure2_flops_vs_top1.png": lambda: _top1_figure(index),
            "figure2_flops_vs_coco_ap.png": lambda: _dense_figure(
                index, "coco", "final/ap_box", "coco_flops_g", "ap_box", "COCO AP box vs FLOPs",
                "COCO AP box — paper", "ours: AP box (%)"),
            "figure2_flops_vs_ade_miou.png": lambda: _dense_figure(
                index, "ade20k", "final/miou", "ade_flops_g", "miou", "ADE20K mIoU vs FLOPs",
                "ADE20K mIoU — paper", "ours: mIoU (%)"),
            "pretrain_loss_curves.png": lambda: figs.loss_curves_figure(_loss_curves(tracking_uri, index)),
        }
        if weights is not None and images is not None:
            plots["mixing_reconstruction.png"] = lambda: _mixing_figure(weights, images)
        else:
            given = [name for name, value in (("pretrain_weights", weights), ("sample_images", images)) if value]
            report.skipped["mixing_reconstruction.png"] = (
                f"needs both pretrain_weights and sample_images; given: {', '.join(given) or 'neither'}")
        for name, draw in plots.items():
            figs.save(draw(), root / "figures" / name)
            drawn.append(name)
            report.figures.append(out / "figures" / name)
        (root / "README.md").write_text(_readme(tables, drawn, report.skipped, index, scale_note), encoding="utf-8")
    return report

