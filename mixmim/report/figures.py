"""The report's figures, drawn with matplotlib's object API (no pyplot, no global backend state).

``matplotlib.figure.Figure`` renders PNGs through the Agg canvas without touching
pyplot, so the report works on headless machines and never changes the backend of a
process that imported it (a notebook, a test session).

Figure 2 of the paper plots FLOPs against accuracy. This suite's runs usually sit far
from the paper's points (a 64-px CPU model has a thousandth of MixMIM-B's FLOPs and is
scored on stand-in data), so the x axis is logarithmic and our values get their own
y axis on the right: the two are not comparable, and a shared axis would pretend they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .reconstruction import PairView

__all__ = ["LossCurve", "Point", "loss_curves_figure", "mixing_figure", "save", "scaling_figure"]

PAPER_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink")
OURS_COLOUR = "tab:red"


@dataclass(frozen=True)
class Point:
    """One labelled point of a FLOPs plot; ``series`` joins points of one method with a line."""

    series: str
    label: str
    gflops: float
    value: float
    marker: str = "*"


@dataclass(frozen=True)
class LossCurve:
    """One run's loss history; curves of one ``group`` (pipeline) share a line style."""

    label: str
    steps: Sequence[int]
    values: Sequence[float]
    group: str = ""


def save(fig: Figure, path: Path) -> Path:
    """Write a figure as PNG (the folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
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


def scaling_figure(paper: Sequence[Point], ours: Sequence[Point], title: str, paper_ylabel: str,
                   ours_ylabel: str, note: str = "") -> Figure:
    """Paper points per method (lines, left axis) and ours (red markers, right axis) over log GFLOPs."""
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xscale("log")
    handles: list[Line2D] = []
    for k, series in enumerate(dict.fromkeys(p.series for p in paper)):
        pts = sorted((p for p in paper if p.series == series), key=lambda p: p.gflops)
        colour = PAPER_COLOURS[k % len(PAPER_COLOURS)]
        (line,) = ax.plot([p.gflops for p in pts], [p.value for p in pts], marker="o", color=colour,
                          label=f"{series} (paper)")
        handles.append(line)
        for p in pts:
            ax.annotate(p.label, (p.gflops, p.value), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=colour)
    ax.set_xlabel("GFLOPs (log scale)")
    ax.set_ylabel(paper_ylabel)
    ax.grid(True, which="both", alpha=0.25)
    right = ax.twinx()
    right.set_ylabel(ours_ylabel, color=OURS_COLOUR)
    right.tick_params(axis="y", colors=OURS_COLOUR)
    for p in ours:
        (mark,) = right.plot([p.gflops], [p.value], linestyle="none", marker=p.marker, markersize=13,
                             color=OURS_COLOUR, markerfacecolor=OURS_COLOUR if p.marker == "*" else "none",
                             label=f"ours: {p.label}")
        handles.append(mark)
        right.annotate(f"{p.label}\n{p.value:.1f}", (p.gflops, p.value), textcoords="offset points",
                       xytext=(8, -4), fontsize=7, color=OURS_COLOUR)
    if ours:
        values = [p.value for p in ours]
        low, high = min(values), max(values)
        pad = max(2.0, 0.15 * (high - low))
        right.set_ylim(low - pad, high + pad)
    else:
        right.set_yticks([])
        ax.text(0.02, 0.04, "no run of ours to plot", transform=ax.transAxes, color=OURS_COLOUR, fontsize=8)
    xs = [p.gflops for p in [*paper, *ours] if p.gflops > 0]
    if xs:
        ax.set_xlim(min(xs) / 2.5, max(xs) * 2.5)
    # Legend and note outside the axes: our points and the paper's can sit anywhere inside.
    fig.legend(handles=handles, fontsize=7, loc="outside lower center", ncol=min(4, max(1, len(handles))))
    fig.suptitle(title, fontsize=10)
    if note:
        ax.set_title(note, fontsize=6.5, color="dimgray", wrap=True)
    return fig


def loss_curves_figure(curves: Sequence[LossCurve], title: str = "Pretraining loss (train/loss per step)") -> Figure:
    """Every pretraining run's per-step loss on one axis: a colour per run, a line style per pipeline."""
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab10" if len(curves) <= 10 else "tab20"]
    styles = dict(zip(dict.fromkeys(c.group for c in curves), ("-", "--", ":", "-.")))
    for k, curve in enumerate(curves):
        ax.plot(curve.steps, curve.values, color=cmap(k % cmap.N), linestyle=styles.get(curve.group, "-"),
                linewidth=1.2, label=curve.label)
    if curves:
        ax.legend(fontsize=7, ncol=2 if len(curves) > 8 else 1, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no pretraining run with a train/loss history", transform=ax.transAxes,
                ha="center", va="center")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("reconstruction loss (normalised pixels)")
    ax.grid(True, alpha=0.25)
    ax.set_title(title, fontsize=10)
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
    if caption:
        fig.suptitle(caption, fontsize=8)
    return fig

