"""The report's figures, drawn with matplotlib's object API (no pyplot, no global backend state).

``matplotlib.figure.Figure`` renders PNGs through the Agg canvas without touching
pyplot, so the report works on headless machines and never changes the backend of a
process that imported it (a notebook, a test session).

Figure 2 of the paper plots FLOPs (linear axis) against accuracy. The paper's points are
drawn as the paper draws them, in their own panel; this suite's runs go in a separate panel
titled with the scale they ran at (read from the results: built-in stand-ins, mid or paper
scale), never on an axis shared with the paper's numbers: even at paper scale they are one
seed of another implementation, and at the smaller scales they are not comparable at all.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .reconstruction import PairView

__all__ = ["LossCurve", "OursPoint", "Point", "loss_curves_figure", "mixing_figure", "save", "scaling_figure",
           "smooth"]

PAPER_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink")
OURS_COLOUR = "tab:red"


@dataclass(frozen=True)
class Point:
    """One labelled point of a FLOPs plot; ``series`` joins points of one method with a line."""

    series: str
    label: str
    gflops: float
    value: float
    marker: str = "o"


@dataclass(frozen=True)
class OursPoint:
    """One result of this suite with its 95% interval (NaN bounds: none)."""

    label: str
    value: float
    low: float = float("nan")
    high: float = float("nan")


@dataclass(frozen=True)
class LossCurve:
    """A variant's loss histories, one (steps, values) pair per seed; ``group`` is its pipeline; ``level``
    its predict-the-mean loss (mean over seeds), which depends on the variant's cell size."""

    label: str
    seeds: Sequence[tuple[Sequence[int], Sequence[float]]]
    group: str = ""
    level: float | None = None
    model: str = ""  # what the run trained: the model, its decoder width (MixMIM) and its effective batch,
    decoder_dim: int | None = None  # so a panel title can say what its curves ran (the pipelines differ)
    batch: int | None = None


def _span(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high}"


def panel_configuration(curves: Sequence[LossCurve]) -> str:
    """What a panel's runs trained, e.g. ``mixmim_micro, decoder 192, batch 16, 1000 steps``: pipelines run
    different models and budgets, so two panels' curves are not to be read against each other."""
    parts = []
    models = sorted({c.model for c in curves if c.model})
    if models:
        parts.append(models[0] if len(models) == 1 else f"{len(models)} models")
    decoders = [c.decoder_dim for c in curves if c.decoder_dim is not None]
    if decoders:
        parts.append(f"decoder {_span(decoders)}")
    batches = [c.batch for c in curves if c.batch is not None]
    if batches:
        parts.append(f"batch {_span(batches)}")
    steps = [max(s[-1] for s, _ in c.seeds if len(s)) for c in curves if any(len(s) for s, _ in c.seeds)]
    if steps:
        parts.append(f"{_span(steps)} steps")
    return ", ".join(parts)


LEVEL_SPREAD = 0.01
"""Levels of one panel within this of each other are one task's level (seeds draw different baseline
images) and are drawn as one line; a panel whose variants differ more (ViT's 16 cells against 4 for the
32-stride encoders) draws one line per task, labelled with its variants (a lone variant's in its colour),
so no curve is read against another task's floor."""


def save(fig: Figure, path: Path) -> Path:
    """Write a figure as PNG (the folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, metadata={"Software": None})
    return path


def paper_points(frame: pd.DataFrame, x: str, y: str, series: str, label: str) -> list[Point]:
    """Points from a transcribed paper table, skipping rows without both numbers."""
    points = []
    for _, row in frame.iterrows():
        try:
            points.append(Point(str(row[series]), str(row[label]), float(row[x]), float(row[y]), "o"))
        except ValueError:
            continue
    return points


def scaling_figure(paper: Sequence[Point], ours: Sequence[OursPoint], title: str, paper_ylabel: str,
                   ours_title: str, ours_ylabel: str, note: str = "") -> Figure:
    """Left: the paper's methods over a linear GFLOPs axis. Right: this suite's results (own axes, intervals)."""
    fig = Figure(figsize=(11.0, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.6, 1.0])
    for k, series in enumerate(dict.fromkeys(p.series for p in paper)):
        pts = sorted((p for p in paper if p.series == series), key=lambda p: p.gflops)
        colour = PAPER_COLOURS[k % len(PAPER_COLOURS)]
        left.plot([p.gflops for p in pts], [p.value for p in pts], marker="o", color=colour, label=series)
        for p in pts:
            left.annotate(p.label, (p.gflops, p.value), textcoords="offset points", xytext=(4, -10), fontsize=7,
                          color=colour)
    xs = [p.gflops for p in paper]
    if xs:
        left.set_xlim(0, max(xs) * 1.12)
    left.set_xlabel("GFLOPs (linear scale)")
    left.set_ylabel(paper_ylabel)
    left.grid(True, alpha=0.25)
    left.legend(fontsize=8, loc="best")
    left.set_title("the paper's numbers (its models and datasets, as printed)", fontsize=9)
    if ours:
        xpos = np.arange(len(ours))
        values = np.array([p.value for p in ours])
        lows = np.array([p.low for p in ours])
        highs = np.array([p.high for p in ours])
        has = ~(np.isnan(lows) | np.isnan(highs))
        if has.any():
            right.errorbar(xpos[has], values[has], yerr=[values[has] - lows[has], highs[has] - values[has]],
                           fmt="o", color=OURS_COLOUR, capsize=5, markersize=7, label="value, 95% interval")
        if (~has).any():
            right.plot(xpos[~has], values[~has], "x", color=OURS_COLOUR, markersize=8, label="value (no interval)")
        for x, p in zip(xpos, ours):
            right.annotate(f"{p.value:.1f}", (x, p.value), textcoords="offset points", xytext=(8, -3), fontsize=8,
                           color=OURS_COLOUR)
        right.set_xticks(xpos, [p.label for p in ours], fontsize=8)
        right.set_xlim(-0.6, len(ours) - 0.4)
        right.legend(fontsize=7, loc="best")
    else:
        right.text(0.5, 0.5, "no result of ours to plot", transform=right.transAxes, ha="center", va="center")
        right.set_xticks([])
    right.set_ylabel(ours_ylabel, color=OURS_COLOUR)
    right.grid(True, axis="y", alpha=0.25)
    right.set_title(ours_title, fontsize=8, color=OURS_COLOUR, wrap=True)
    fig.suptitle(title, fontsize=10)
    if note:
        right.set_xlabel(textwrap.fill(note, 75), fontsize=7, color="dimgray")
    return fig


def smooth(values: Sequence[float], fraction: float = 0.1, least: int = 5) -> np.ndarray:
    """A centred moving average over ``fraction`` of the series, at least ``least`` points (never more than
    the series): a run logged every few steps has few points, and 10% of 50 would hardly smooth at all."""
    v = np.asarray(values, dtype=np.float64)
    window = min(len(v), max(least, int(round(len(v) * fraction)))) if len(v) else 1
    return pd.Series(v).rolling(window, min_periods=1, center=True).mean().to_numpy()


def loss_curves_figure(curves: Sequence[LossCurve],
                       title: str = "Pretraining loss per optimiser step (smoothed)") -> Figure:
    """One panel per pipeline, one smoothed curve per variant (mean over seeds, band = min-max over seeds),
    and the predict-the-mean loss as a dashed level: one line when the panel's variants share it, else
    one per variant in its colour. Panels keep their own y axes and say in their titles what they trained:
    the pipelines train different models with different budgets."""
    groups = list(dict.fromkeys(c.group for c in curves)) or [""]
    crowded = max((sum(c.group == g for c in curves) for g in groups), default=0) > 8
    # A panel with many variants puts its legend below the axes: inside, it would hide the curves' start.
    fig = Figure(figsize=(5.2 * len(groups), 6.4 if crowded else 4.6), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, group in zip(axes, groups):
        members = [c for c in curves if c.group == group]
        colours: dict[str, Any] = {}
        # tab10 colours, and past ten a second line style: tab20's light/dark pairs would make
        # unrelated neighbours in the legend look like one family of variants.
        cmap = matplotlib.colormaps["tab10"]
        for k, curve in enumerate(members):
            steps = sorted(set.intersection(*(set(s) for s, _ in curve.seeds))) if curve.seeds else []
            if not steps:
                continue
            stack = np.array([smooth([dict(zip(s, v))[t] for t in steps]) for s, v in curve.seeds])
            colours[curve.label] = colour = cmap(k % cmap.N)
            label = f"{curve.label} ({len(curve.seeds)} seed{'s' if len(curve.seeds) > 1 else ''})"
            ax.plot(steps, stack.mean(0), color=colour, linewidth=1.3, label=label,
                    linestyle=("-", "-.", ":")[min(k // cmap.N, 2)])
            if len(curve.seeds) > 1:
                ax.fill_between(steps, stack.min(0), stack.max(0), color=colour, alpha=0.2, linewidth=0)
        levels = sorted((c.level, c.label) for c in members if c.level is not None and c.label in colours)
        clusters: list[list[tuple[float, str]]] = []
        for level, name in levels:  # levels within LEVEL_SPREAD of their neighbour are one task's level
            if clusters and level - clusters[-1][-1][0] <= LEVEL_SPREAD:
                clusters[-1].append((level, name))
            else:
                clusters.append([(level, name)])
        for cluster in clusters:
            level = float(np.mean([lv for lv, _ in cluster]))
            names = sorted(name for _, name in cluster)
            if len(clusters) == 1:
                colour, label = "black", f"predict-the-mean level (flat cells of each cell's true mean colour): {level:.3f}"
            else:
                colour = colours[names[0]] if len(names) == 1 else "black"
                label = f"{', '.join(names)} predict-the-mean level: {level:.3f}"
            ax.axhline(level, color=colour, linestyle="--", linewidth=1.0, label=label)
        if members and len(members) > 8:
            ax.legend(fontsize=6.5, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13))
        elif members:
            ax.legend(fontsize=6.5, loc="upper right")
        else:
            ax.text(0.5, 0.5, "no pretraining run with a train/loss history", transform=ax.transAxes,
                    ha="center", va="center")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("reconstruction loss (normalised pixels)")
        ax.grid(True, alpha=0.25)
        config = panel_configuration(members)
        ax.set_title((f"{group} pipeline" if group else "") + (f"\n{config}" if config else ""), fontsize=9)
    banded = any(len(c.seeds) > 1 for c in curves)
    fig.suptitle(title + ("\nband: min-max over seeds" if banded else "\none seed per variant (no band)" if curves
                          else "\nno run"), fontsize=10)  # two lines: a one-panel figure is too narrow for both on one
    return fig


def mixing_figure(views: Sequence[PairView], caption: str = "") -> Figure:
    """Rows of (original A, original B, mixed input, reconstruction of A, reconstruction of B).

    Columns that do not apply (no partner image for a non-mix fill, no second
    reconstruction without dual) are dropped, so every panel shows a real picture.
    """
    columns: list[tuple[str, str]] = [("original_a", "image A")]
    if any(v.original_b is not None for v in views):
        columns.append(("original_b", "image B"))
    columns.append(("mixed", "mixed input (A visible, B in masked cells)" if len(columns) == 2
                    else "input (masked cells filled)"))
    columns.append(("recon_a", "reconstruction of A"))
    if any(v.recon_b is not None for v in views):
        columns.append(("recon_b", "reconstruction of B"))
    fig = Figure(figsize=(2.0 * len(columns), 2.1 * len(views) + 0.5), layout="constrained")
    axes = fig.subplots(len(views), len(columns), squeeze=False)
    for r, view in enumerate(views):
        for c, (attr, title) in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(getattr(view, attr), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
    explain = ("Reconstructions: each hidden cell is model output (per-cell normalised pixels, rescaled by one mean "
               "and one spread\npooled over the pixels of that image's cells the model was given); every other "
               "cell is that image's input pixels.")
    fig.suptitle(f"{caption}\n{explain}" if caption else explain, fontsize=7.5)
    return fig

