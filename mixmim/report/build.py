"""``build_report``: the paper's tables and figures regenerated from the committed results.

Tables are a function of the metrics JSON and per-image records of every pipeline
(:mod:`.results`), so a fresh clone rebuilds them byte for byte. The MLflow store is
read only for the loss curves (per-step histories). Everything is written into a hidden
staging folder beside ``out_dir`` and moved into place only when the whole report is done
(:func:`mixmim.data.standin.staged_dir`), so a killed stage leaves the previous report.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from ..data.standin import staged_dir
from ..stats import DEFAULT_RESAMPLES
from . import figures as figs
from .calibration import CalibrationEntry, calibration_table
from .reconstruction_table import reconstruction_table
from .reconstruction import find_sample_images, fixed_mask, load_images, load_pretrainer, reconstruct_pairs
from .render import write_table
from .results import MEASURES, Measure, Result, Results, load_results, scale_name
from .tables import SIZE_ROLES, Context, Table, _gflops, build_tables, paper_backbone, paper_table

__all__ = ["FIGURES", "ROLES", "Report", "build_report"]

ROLES = ("default", "large", "huge", "ablations", "backbones")

#: Figure file -> the README line saying what it shows.
FIGURES: dict[str, str] = {
    "figure2_flops_vs_top1.png": "Figure 2 (left): the paper's ImageNet top-1 vs GFLOPs (linear axis; MixMIM-B/L/H, "
                                 "MAE ViT-B/L/H) and, in a separate panel titled with the scale they ran at, our "
                                 "pretrained and from-scratch runs of every model size with 95% intervals",
    "figure2_flops_vs_coco_ap.png": "Figure 2 (middle): the paper's COCO AP box vs detector GFLOPs (Table 4); ours in a "
                                    "separate panel titled with their scale",
    "figure2_flops_vs_ade_miou.png": "Figure 2 (right): the paper's ADE20K mIoU vs segmentor GFLOPs (Table 4); ours in "
                                     "a separate panel titled with their scale",
    "pretrain_loss_curves.png": "pretraining loss per step from MLflow, smoothed (centred mean over 10% of the "
                                "logged points), one curve per variant (band: min-max over seeds), one panel per "
                                "pipeline, with the predict-the-mean level (flat cells of each cell's mean colour)",
    "mixing_reconstruction.png": "Figures 1/3: pairs of images, their mixed input, and the pretrained model's "
                                 "reconstruction of each (model output in the hidden cells only)",
}


@dataclass
class Report:
    """What :func:`build_report` wrote: paths under ``out_dir`` and figures it could not draw (with why)."""

    out_dir: Path
    tables: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


#: The data a task's results were measured on, by scale (the built-in pipelines use generated stand-ins; the
#: mid pipeline finetunes on the ImageNet-100 classes of ImageNet-1K, pipelines/mid/params.yaml).
TASK_DATA = {"imagenet": "ImageNet-1K", "coco": "COCO", "ade20k": "ADE20K"}
SCALE_DATA = {("builtin", "imagenet"): "the ImageNet-1K stand-in", ("builtin", "coco"): "the COCO stand-in",
              ("builtin", "ade20k"): "the ADE20K stand-in", ("mid", "imagenet"): "ImageNet-100"}


def data_name(task: str, scale: str | None) -> str:
    """What a task's results were measured on at a scale (``imagenet`` at ``builtin``: the ImageNet-1K stand-in)."""
    return SCALE_DATA.get((scale or "", task), TASK_DATA.get(task, task))


def _model_name(group: list[Result]) -> str:
    model = str(group[0].metrics.get("model", "model ?"))
    return paper_backbone(model) or model


def _ours(ctx: Context, items: list[tuple[str, list[Result]]], measure: Measure) -> list[figs.OursPoint]:
    points = []
    for label, group in items:
        est = ctx.estimate(group, measure) if group else None
        if est is not None:
            seeds = f"{est.n_seeds} seed{'s' if est.n_seeds != 1 else ''}"
            points.append(figs.OursPoint(f"{label}\n(n={est.n_val or '?'}, {seeds})", est.value, est.low, est.high))
    return points


def _size_items(res: Results, stage: str, key: str = "") -> tuple[list[tuple[str, list[Result]]], list[Result]]:
    """(label, group) of every size role's pretrained and from-scratch results of a stage, and all of them."""
    items, every = [], []
    for role in SIZE_ROLES:
        for label, group in (("pretrained", res.group(role, stage, key)), ("from scratch",
                                                                          res.group(role, "scratch", key or stage))):
            if group:
                items.append((f"{_model_name(group)}\n{label}", group))
                every += group
    return items, every


def _scale_title(res: Results, group: list[Result], task: str, head: str = "") -> str:
    """The ours panel's title: the scale of the results it draws (from them), the data, models and input sizes."""
    scale = res.scale_of(group, role="default")
    what = data_name(task, scale) + (f", {head}" if head else "")
    if not group:
        return f"this suite at {scale_name(scale)}: {what} (no run)"
    models = []
    for r in group:
        size = r.value("img_size")
        models.append(str(r.metrics.get("model", "model ?")) + (f" at {size:g} px" if size else ""))
    return f"this suite at {scale_name(scale)}: {what}, {', '.join(dict.fromkeys(models))}"


def _ylabel(res: Results, group: list[Result], task: str, metric: str) -> str:
    return f"{metric} on {data_name(task, res.scale_of(group, role='default'))}"


def _top1_figure(ctx: Context) -> Figure:
    res = ctx.results
    paper = figs.paper_points(paper_table("figure2_scaling"), "flops_g", "top1", "method", "model")
    items, every = _size_items(res, "finetune", "imagenet")
    ours = _ours(ctx, items, MEASURES["top1"])
    counts = []
    for role in SIZE_ROLES:
        pre = res.group(role, "finetune", "imagenet")
        if pre:
            img = pre[0].value("img_size")
            gf = _gflops(str(pre[0].metrics.get("model", "")), int(img) if img else None)
            if gf:
                counts.append(f"{pre[0].metrics.get('model')} {gf:.3g}")
    note = f"ours, GFLOPs counted by mixmim.flops: {'; '.join(counts)}" if counts else ""
    return figs.scaling_figure(paper, ours, "Figure 2 (left): top-1 vs FLOPs", "ImageNet-1K top-1 (%)",
                               _scale_title(res, every, "imagenet"), _ylabel(res, every, "imagenet", "top-1 (%)"),
                               note)


def _dense_figure(ctx: Context, stage: str, measure: str, paper_x: str, paper_y: str, title: str, ylabel: str,
                  head: str) -> Figure:
    res = ctx.results
    paper = figs.paper_points(paper_table("table4_coco_ade20k"), paper_x, paper_y, "method", "backbone")
    items, every = _size_items(res, stage)
    ours = _ours(ctx, items, MEASURES[measure])
    counts = [f"{g[0].metrics.get('model')} {g[0].value('model_gflops'):.3g}" for role in SIZE_ROLES
              for g in [res.group(role, stage)] if g and g[0].value("model_gflops") is not None]
    note = f"ours: the {head} counts GFLOPs at its input size: {'; '.join(counts)}" if counts else ""
    return figs.scaling_figure(paper, ours, title, ylabel, _scale_title(res, every, stage, head),
                               _ylabel(res, every, stage, ylabel), note)


def _loss_curves(tracking_uri: str, experiments: Mapping[str, str], results: Results) -> list[figs.LossCurve]:
    """Per-step pretraining losses from MLflow, grouped by (pipeline, variant) with one history per seed,
    each with its variant's predict-the-mean level from the committed pretraining metrics."""
    from mlflow import MlflowClient

    from ..models.registry import MODEL_SIZES
    from .runs import metric_history, pretrain_runs

    curves = []
    first: dict[str, str] = {}  # an experiment named by several roles (the paper pipeline's) is read once
    for role, experiment in experiments.items():
        first.setdefault(experiment, role)
    unique = {role: experiment for experiment, role in first.items()}
    for (role, variant), runs in pretrain_runs(tracking_uri, unique).items():
        seeds = []
        for run_id in runs:
            points = metric_history(tracking_uri, run_id, "train/loss")
            if points:
                steps, values = zip(*points)
                seeds.append((steps, values))
        if seeds:
            label = variant or "?"
            levels = [r.value("mean_loss_baseline")
                      for r in results.group(role, "pretrain", "" if label == "default" else label)
                      or results.group(role, "pretrain", label)]
            levels = [v for v in levels if v is not None]
            params = MlflowClient(tracking_uri=tracking_uri).get_run(runs[0]).data.params
            model = params.get("model", "")
            decoder = params.get("model_kwargs.decoder_dim") or (
                MODEL_SIZES[model].decoder_dim if model in MODEL_SIZES else None)
            batch = params.get("derived.effective_batch")
            curves.append(figs.LossCurve(label, seeds, role, sum(levels) / len(levels) if levels else None, model,
                                         int(decoder) if decoder else None, int(batch) if batch else None))
    order = {role: i for i, role in enumerate(ROLES)}
    return sorted(curves, key=lambda c: (order.get(c.group, len(order)), c.label != "default", c.label))


def _shown(path: Path) -> str:
    """``path`` relative to the working folder, so a README written in any clone reads the same."""
    return os.path.relpath(path)


def _missing_store(tracking_uri: str | None) -> str | None:
    """Why a SQLite store cannot be read (the file does not exist: reading must not create it), else None."""
    prefix = "sqlite:///"
    if tracking_uri and tracking_uri.startswith(prefix):
        path = Path(tracking_uri[len(prefix):].partition("?")[0])
        if not path.is_file():
            return f"no MLflow store at {path}"
    return None


def _mixing_figure(weights: Path, images: Path) -> Figure:
    model, config = load_pretrainer(weights)
    paths = find_sample_images(images, count=4)
    imgs = load_images(paths, model.encoder.img_size[0])
    views = reconstruct_pairs(model, imgs, fixed_mask(model))
    caption = (f"{config.get('model')}: fill={model.fill}, dual={model.dual}, unmix={model.unmix}, "
               f"mask={model.mask_type} {model.mask_ratio:g} ({weights.name})")
    return figs.mixing_figure(views, caption)


def _readme(tables: list[Table], drawn: list[str], skipped: Mapping[str, str], results: Results,
            scale_note: str) -> str:
    lines = ["# MixMIM reproduction report", "",
             "Generated by `stages/report.py` (`mixmim.report.build_report`) from the committed metrics JSON and "
             "per-image records of every pipeline; regenerate rather than edit. Tables do not read MLflow; "
             "only the loss-curve figure does.", ""]
    lines += ["## Scale", "", scale_note.strip() or "(no scale note given)", ""]
    lines += ["Results read (one metrics file per stage and seed):", ""]
    for role, folder in results.pipelines.items():
        count = len([r for r in results.all if r.role == role])
        lines.append(f"- {role}: `{folder}` ({results.scale_label(role=role)}), {count} result file(s)"
                     + (f"; {results.absent(role)}" if not count else ""))
    lines += ["", "Policy: every value is the last epoch's (never the best epoch's). Columns `<m>_paper` hold the "
              "paper's numbers as printed; `<m>_ours` this suite's value with its 95% interval "
              "(`_ci_low`/`_ci_high` in the CSV, in brackets in Markdown/LaTeX), `n_val` validation images and "
              "`n_seeds` seeds; `— (reason)` when missing. Comparisons carry a paired-test p-value and "
              "`resolved` (yes/no at 5%). COCO AP and ADE20K mIoU are in percent. Which paper row each run "
              "stands beside, and why: [run_mapping](tables/run_mapping.md).", ""]
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


def build_tables_from(pipelines: Mapping[str, str], root: str | os.PathLike[str] = ".",
                      calibration: Mapping[str, CalibrationEntry] | None = None,
                      resamples: int = DEFAULT_RESAMPLES) -> tuple[list[Table], Results]:
    """Every table (the paper's, the calibration and reconstruction tables, the run mapping) from the results
    on disk."""
    unknown = sorted(set(pipelines) - set(ROLES))
    if unknown:
        raise ValueError(f"pipelines: unknown role {unknown[0]!r}; expected some of {list(ROLES)}")
    results = load_results(pipelines, root)
    tables = build_tables(results, resamples, extra=[lambda ctx: calibration_table(ctx, calibration),
                                                     reconstruction_table])
    return tables, results


def build_report(
    pipelines: Mapping[str, str],
    out_dir: str | os.PathLike[str] = "reports",
    root: str | os.PathLike[str] = ".",
    calibration: Mapping[str, CalibrationEntry] | None = None,
    tracking_uri: str | None = None,
    experiments: Mapping[str, str] | None = None,
    pretrain_weights: str | os.PathLike[str] | None = None,
    sample_images: str | os.PathLike[str] | None = None,
    scale_note: str = "",
    resamples: int = DEFAULT_RESAMPLES,
) -> Report:
    """Write ``out_dir/{tables,figures,README.md}``.

    ``pipelines`` maps a role (``default``, ``ablations``, ``backbones``) to its metrics
    folder (relative to ``root``). The loss curves need ``tracking_uri`` and ``experiments``
    (role -> MLflow experiment); the reconstruction figure needs ``pretrain_weights`` and
    ``sample_images``. A figure whose inputs are missing is skipped and the README says why.
    """
    weights = Path(pretrain_weights) if pretrain_weights is not None else None
    images = Path(sample_images) if sample_images is not None else None
    tables, results = build_tables_from(pipelines, root, calibration, resamples)
    ctx = Context(results, resamples)
    out = Path(out_dir)
    report = Report(out)
    drawn: list[str] = []
    with staged_dir(out) as staging:
        for table in tables:
            written = write_table(table.frame, staging / "tables", table.key, table.title, table.notes)
            report.tables += [out / p.relative_to(staging) for p in written]
        plots = {
            "figure2_flops_vs_top1.png": lambda: _top1_figure(ctx),
            "figure2_flops_vs_coco_ap.png": lambda: _dense_figure(
                ctx, "coco", "ap_box", "coco_flops_g", "ap_box", "Figure 2 (middle): COCO AP box vs FLOPs",
                "AP box (%)", "Mask R-CNN"),
            "figure2_flops_vs_ade_miou.png": lambda: _dense_figure(
                ctx, "ade20k", "miou", "ade_flops_g", "miou", "Figure 2 (right): ADE20K mIoU vs FLOPs", "mIoU (%)",
                "UperNet"),
        }
        store = _missing_store(tracking_uri)
        if tracking_uri and experiments and store is None:
            plots["pretrain_loss_curves.png"] = lambda: figs.loss_curves_figure(
                _loss_curves(tracking_uri, experiments, results))
        else:
            report.skipped["pretrain_loss_curves.png"] = store or "needs an MLflow tracking_uri and experiments"
        if weights is not None and images is not None and weights.is_file() and images.is_dir():
            plots["mixing_reconstruction.png"] = lambda: _mixing_figure(weights, images)
        elif weights is not None and images is not None:
            report.skipped["mixing_reconstruction.png"] = (
                f"{_shown(weights)} is not a file" if not weights.is_file() else f"{_shown(images)} is not a folder")
        else:
            given = [name for name, value in (("pretrain_weights", weights), ("sample_images", images)) if value]
            report.skipped["mixing_reconstruction.png"] = (
                f"needs both pretrain_weights and sample_images; given: {', '.join(given) or 'neither'}")
        for name, draw in plots.items():
            figs.save(draw(), staging / "figures" / name)
            drawn.append(name)
            report.figures.append(out / "figures" / name)
        (staging / "README.md").write_text(_readme(tables, drawn, report.skipped, results, scale_note),
                                           encoding="utf-8")
    return report
