"""What ran, read from the committed results: metrics JSON and per-image records of every pipeline.

The tables are a function of these files alone (never of the MLflow store), so a fresh
clone regenerates them exactly. Each pipeline writes, per stage and seed,
``<metrics dir>/<stage>[_<key>]_s<seed>.json`` and beside it the per-image records
``..._s<seed>_preds.json`` (:mod:`mixmim.records`; probes write ``_knn_preds`` and
``_linear_preds``). Files without the ``_s<seed>`` suffix (written before seeds were a
pipeline dimension) count as seed 0.

Values and intervals (:func:`estimate`): a variant's value is the mean over its seeds
with a Student-t interval when two or more seeds ran, otherwise the single run's value
with a percentile bootstrap over validation images (the metric recomputed on each
resample: accuracy, mIoU from intersection/union counts, COCO AP from match records).
Comparisons (:func:`compare`) pair two variants on the shared validation images: an
exact McNemar test for one seed each of top-1, otherwise a paired bootstrap of the
seed-averaged metric.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import stats
from ..records import RECORDS_SUFFIX, read_records

__all__ = [
    "Comparison", "Estimate", "MEASURES", "Measure", "Result", "Results", "SCALE_NAMES", "compare", "estimate",
    "load_results", "pipeline_scale", "scale_name",
]

STAGES = ("pretrain", "finetune", "scratch", "probe", "reconstruction", "coco", "ade20k")
_SEED = re.compile(r"^(?P<stem>.+?)_s(?P<seed>\d+)$")


@dataclass(frozen=True)
class Result:
    """One stage run of one seed: its metrics and (lazily) its records files."""

    role: str
    stage: str
    key: str
    seed: int
    path: Path
    metrics: Mapping[str, Any] = field(default_factory=dict)

    def value(self, name: str) -> float | None:
        """A number of the metrics JSON; a dotted name reads into nested sections (``all.structure_explained_pct``)."""
        v: Any = self.metrics.get(name)
        if v is None and "." in name:
            v = self.metrics
            for part in name.split("."):
                v = v.get(part) if isinstance(v, dict) else None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        return float(v)

    def records(self, suffix: str = "") -> dict[str, Any] | None:
        path = self.path.with_name(f"{self.path.stem}{suffix}{RECORDS_SUFFIX}.json")
        return _read_records_cached(path) if path.is_file() else None


_RECORDS_CACHE: dict[Path, dict[str, Any]] = {}


def _read_records_cached(path: Path) -> dict[str, Any]:
    if path not in _RECORDS_CACHE:
        _RECORDS_CACHE[path] = read_records(path)
    return _RECORDS_CACHE[path]


_AP_CACHE: dict[int, tuple[Any, stats.CocoAP]] = {}


def _coco_ap(images: Any) -> stats.CocoAP:
    """One :class:`~mixmim.stats.CocoAP` per records list (records are read once per file), so
    its memo of resampled APs serves every table and figure that bootstraps this detector."""
    hit = _AP_CACHE.get(id(images))
    if hit is None or hit[0] is not images:
        hit = _AP_CACHE[id(images)] = (images, stats.CocoAP(images))
    return hit[1]


def parse_name(stem: str) -> tuple[str, str, int] | None:
    """``finetune_imagenet_s2`` -> ('finetune', 'imagenet', 2); None for a name of no known stage."""
    match = _SEED.match(stem)
    base, seed = (match["stem"], int(match["seed"])) if match else (stem, 0)
    for stage in sorted(STAGES, key=len, reverse=True):
        if base == stage:
            return stage, "", seed
        if base.startswith(stage + "_"):
            return stage, base[len(stage) + 1:], seed
    return None


#: How a pipeline's scale (``tracking.scale`` of its params file, or ``scale`` in a metrics JSON) reads in labels.
SCALE_NAMES = {"builtin": "built-in scale", "mid": "mid scale", "paper": "paper scale"}


#: How a role reads in a cell when it has no results (the size roles are folders of one pipeline, not pipelines).
ROLE_WORDS = {"large": "MixMIM-L (role large)", "huge": "MixMIM-H (role huge)"}


def scale_name(scale: str | None) -> str:
    """``builtin`` -> 'built-in scale'; an unknown name -> '<name> scale'; None -> 'an unrecorded scale'."""
    if not scale:
        return "an unrecorded scale"
    return SCALE_NAMES.get(scale, f"{scale} scale")


def pipeline_scale(folder: Path, levels: int = 2) -> str | None:
    """The scale of the pipeline that writes into a metrics folder: ``tracking.scale`` of the nearest
    ``params.yaml`` in the folder or up to ``levels`` folders above it (``metrics/`` -> the root
    params.yaml, ``pipelines/paper/metrics/base/`` -> pipelines/paper/params.yaml). A params file
    without it means ``builtin`` (the default of :class:`mixmim.params.TrackingParams`); no params
    file at all gives None."""
    import yaml

    from ..params import TrackingParams

    here = Path(folder).resolve()
    for candidate in [here, *here.parents][: levels + 1]:
        path = candidate / "params.yaml"
        if path.is_file():
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            tracking = data.get("tracking") if isinstance(data, Mapping) else None
            scale = tracking.get("scale") if isinstance(tracking, Mapping) else None
            if scale is not None and not isinstance(scale, str):
                raise ValueError(f"{path}: tracking.scale={scale!r}; expected a name such as 'builtin'")
            return scale or TrackingParams.scale
    return None


class Results:
    """Every result of every pipeline, grouped by (role, stage, key) over seeds.

    ``scales`` maps a role to the scale its pipeline runs at (:func:`pipeline_scale`); a metrics
    JSON with its own ``scale`` overrides it for that result (:meth:`scale_of`).
    """

    def __init__(self, results: Iterable[Result], pipelines: Mapping[str, str],
                 scales: Mapping[str, str | None] | None = None) -> None:
        self.pipelines = dict(pipelines)
        self.scales = dict(scales or {})
        self.all = sorted(results, key=lambda r: (r.role, r.stage, r.key, r.seed))

    def scale_of(self, group: Iterable[Result] = (), role: str | None = None) -> str | None:
        """The scale of some results (their own ``scale``, else their pipeline's), or of a role's pipeline."""
        found = []
        for r in group:
            own = r.metrics.get("scale")
            found.append(own if isinstance(own, str) and own else self.scales.get(r.role))
        if role is not None and not found:
            found.append(self.scales.get(role))
        named = list(dict.fromkeys(s for s in found if s))
        return "+".join(named) if named else None

    def scale_label(self, group: Iterable[Result] = (), role: str | None = None) -> str:
        return scale_name(self.scale_of(group, role))

    def group(self, role: str, stage: str, key: str = "") -> list[Result]:
        """The seeds of one variant, in seed order (empty when it did not run)."""
        return [r for r in self.all if r.role == role and r.stage == stage and r.key == key]

    def keys(self, role: str, stage: str) -> list[str]:
        return sorted({r.key for r in self.all if r.role == role and r.stage == stage})

    def absent(self, role: str) -> str:
        """Why a whole pipeline has no results ('' when it has some): not given, or not run at its scale."""
        if role not in self.pipelines:
            return f"no '{role}' pipeline given to the report"
        if any(r.role == role for r in self.all):
            return ""
        scale = self.scales.get(role)
        who = ROLE_WORDS.get(role, f"{role} pipeline")
        if scale:
            return f"{who} not run at {scale_name(scale)}: no results in its metrics folder"
        return f"no results of the {who}"

    def reason(self, role: str, stage: str, key: str = "") -> str:
        """Why :meth:`group` is empty, for a table cell."""
        name = f"{stage}_{key}" if key else stage
        return self.absent(role) or f"no {name}_s*.json in the {role} pipeline's metrics"


def load_results(pipelines: Mapping[str, str | Path], root: str | Path = ".") -> Results:
    """Read ``<metrics dir>/*.json`` (records files excluded) of every pipeline, dirs relative to ``root``."""
    found: list[Result] = []
    for role, folder in pipelines.items():
        base = Path(root) / folder
        if not base.is_dir():
            continue
        for path in sorted(base.glob("*.json")):
            if path.stem.endswith(RECORDS_SUFFIX):
                continue
            parsed = parse_name(path.stem)
            if parsed is None:
                continue
            try:
                metrics = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from err
            stage, key, seed = parsed
            if isinstance(metrics.get("seed"), int):
                seed = metrics["seed"]
            found.append(Result(role, stage, key, seed, path, metrics))
    scales = {role: pipeline_scale(Path(root) / folder) for role, folder in pipelines.items()}
    return Results(found, {role: str(folder) for role, folder in pipelines.items()}, scales)


# --------------------------------------------------------------------------- measures


@dataclass(frozen=True)
class Measure:
    """A metric of a metrics JSON (``key``, shown times ``scale``) and how to recompute it from records."""

    key: str
    label: str
    scale: float = 1.0
    records_suffix: str = ""
    kind: str = "classification"  # classification | segmentation | detection-box | detection-mask | loss | heldout
    digits: int = 1  # decimals shown

    @property
    def per_image(self) -> bool:
        """Whether runs keep per-image records of it; a loss, or a held-out share of a run, has one value per
        run, so seeds are its only sample."""
        return self.kind not in ("loss", "heldout")

    def per_item(self, record: Mapping[str, Any]) -> np.ndarray | None:
        """0/1 correctness per image (classification only)."""
        if self.kind != "classification":
            return None
        return (np.asarray(record["pred"]) == np.asarray(record["label"])).astype(np.float64)

    def function(self, record: Mapping[str, Any]) -> Callable[[np.ndarray], float]:
        """The metric (shown units) of a resample of images, computed from one records file."""
        if self.kind == "classification":
            correct = self.per_item(record)
            assert correct is not None
            return lambda idx: 100.0 * float(correct[idx].mean())
        if self.kind == "segmentation":
            inter, union = np.asarray(record["intersection"]), np.asarray(record["union"])
            return lambda idx: 100.0 * stats.miou_from_counts(inter, union, idx)
        ap = _coco_ap(record["box" if self.kind == "detection-box" else "mask"])
        return lambda idx: 100.0 * ap(idx)


MEASURES: dict[str, Measure] = {
    "top1": Measure("top1", "top-1 (%)"),
    "knn_top1": Measure("knn_top1", "k-NN top-1 (%)", records_suffix="_knn"),
    "linear_top1": Measure("linear_top1", "linear-probe top-1 (%)", records_suffix="_linear"),
    "miou": Measure("miou", "mIoU (%)", 100.0, kind="segmentation"),
    "ap_box": Measure("ap_box", "AP box (%)", 100.0, kind="detection-box"),
    "ap_mask": Measure("ap_mask", "AP mask (%)", 100.0, kind="detection-mask"),
    # The last epoch's mean reconstruction loss on the variant's own masked cells; its "chance"
    # level is the predict-the-mean loss (each masked cell filled with its true mean colour).
    "pretrain_loss": Measure("train_loss", "pretraining loss", kind="loss", digits=3),
    # The share of the predict-the-mean reference's structure error that the pretrained model removes on
    # held-out images (stages/reconstruction.py, pooled over domains); the reference itself scores 0.
    "structure_explained": Measure("all.structure_explained_pct", "held-out structure explained (%)",
                                   kind="heldout"),
}


@dataclass(frozen=True)
class Estimate:
    """A variant's value with its 95% interval (NaN bounds: no interval could be computed)."""

    value: float
    low: float
    high: float
    n_val: int | None
    n_seeds: int
    method: str
    digits: int = 1

    def cell(self) -> str:
        return f"{self.value:.{self.digits}f}"

    def interval(self) -> str:
        if math.isnan(self.low) or math.isnan(self.high):
            return "no interval"
        return f"{self.low:.{self.digits}f}–{self.high:.{self.digits}f}"

    def display(self) -> str:
        return f"{self.cell()} ({self.interval()})"


def _records_of(group: list[Result], measure: Measure) -> list[dict[str, Any]] | None:
    records = [r.records(measure.records_suffix) for r in group]
    if not records or any(rec is None for rec in records):
        return None
    return records  # type: ignore[return-value]


def estimate(group: list[Result], measure: Measure, resamples: int = stats.DEFAULT_RESAMPLES) -> Estimate | None:
    """Mean over seeds (t interval, >= 2 seeds) or the single run (bootstrap over images); None if no value."""
    values = [r.value(measure.key) for r in group]
    values_ok = [v * measure.scale for v in values if v is not None]
    if not values_ok:
        return None
    records = _records_of(group, measure) if measure.per_image else None
    n_val = int(records[0]["n_val"]) if records else _n_val(group) if measure.per_image else None
    digits = measure.digits
    if len(values_ok) >= 2:
        ci = stats.t_interval(values_ok)
        return Estimate(ci.value, ci.low, ci.high, n_val, len(values_ok), ci.method, digits)
    if records is None:
        why = "one seed, no per-image records" if measure.per_image else "one seed (one value per run)"
        return Estimate(values_ok[0], math.nan, math.nan, n_val, 1, why, digits)
    ci = stats.bootstrap_interval(measure.function(records[0]), n=int(records[0]["n_val"]), resamples=resamples)
    return Estimate(values_ok[0], ci.low, ci.high, n_val, 1, f"bootstrap over {ci.n} images", digits)


def _n_val(group: list[Result]) -> int | None:
    n = group[0].metrics.get("n_val") if group else None
    return int(n) if isinstance(n, int) else None


@dataclass(frozen=True)
class Comparison:
    """``a - b`` on the shared validation images, with a two-sided p-value (None: not testable, why)."""

    diff: float | None
    p_value: float | None
    method: str
    digits: int = 1
    #: With two or more shared seeds: a paired t test of the per-seed values (training randomness),
    #: which the image-level test of the seed-averaged metric does not see.
    p_seeds: float | None = None

    @property
    def resolved(self) -> str:
        """yes when the paired test is below 5% and, with two or more shared seeds, so is the per-seed test."""
        if self.p_value is None:
            return "—"
        return "yes" if self.p_value < 0.05 and (self.p_seeds is None or self.p_seeds < 0.05) else "no"

    def p_seeds_cell(self) -> str:
        return "" if self.p_seeds is None else f"{self.p_seeds:.3g}"

    def p_cell(self) -> str:
        if self.p_value is None:
            return f"— ({self.method})"
        return f"{self.p_value:.3g}"

    def diff_cell(self) -> str:
        return "—" if self.diff is None else f"{self.diff:+.{self.digits}f}"


def compare(a: list[Result], b: list[Result], measure: Measure,
            resamples: int = stats.DEFAULT_RESAMPLES) -> Comparison:
    """Paired test of variant ``a`` against ``b`` (McNemar for one seed each of top-1, else paired bootstrap)."""
    ea, eb = estimate(a, measure, resamples), estimate(b, measure, resamples)
    diff = ea.value - eb.value if ea is not None and eb is not None else None
    if ea is None or eb is None:
        return Comparison(None, None, "needs both results")
    if not measure.per_image:
        return _compare_by_seed(a, b, measure, diff)
    ra, rb = _records_of(a, measure), _records_of(b, measure)
    if ra is None or rb is None:
        return Comparison(diff, None, "no per-image records")
    n = int(ra[0]["n_val"])
    if any(int(r["n_val"]) != n for r in [*ra, *rb]):
        return Comparison(diff, None, "validation sets differ in size")
    if measure.kind == "classification":
        labels = ra[0]["label"]
        if any(r["label"] != labels for r in [*ra, *rb]):
            return Comparison(diff, None, "validation labels differ")
        if len(ra) == 1 and len(rb) == 1:
            test = stats.mcnemar_exact(measure.per_item(ra[0]) > 0, measure.per_item(rb[0]) > 0)
            return Comparison(diff, test.p_value, "exact McNemar")
        mean_a = np.mean([measure.per_item(r) for r in ra], axis=0) * 100
        mean_b = np.mean([measure.per_item(r) for r in rb], axis=0) * 100
        test = stats.paired_bootstrap_test(mean_a, mean_b, resamples=resamples)
        return Comparison(diff, test.p_value, "paired bootstrap over images", p_seeds=_seed_p(a, b, measure))
    fa = [measure.function(r) for r in ra]
    fb = [measure.function(r) for r in rb]
    test = stats.paired_bootstrap_test(lambda idx: float(np.mean([f(idx) for f in fa])),
                                       lambda idx: float(np.mean([f(idx) for f in fb])), n=n, resamples=resamples)
    return Comparison(diff, test.p_value, "paired bootstrap over images", p_seeds=_seed_p(a, b, measure))


def _seed_values(a: list[Result], b: list[Result], measure: Measure) -> tuple[list[float], list[float]]:
    """The values of the seeds both variants ran, in seed order (shown units)."""
    va = {r.seed: r.value(measure.key) for r in a}
    vb = {r.seed: r.value(measure.key) for r in b}
    seeds = sorted(s for s in va if s in vb and va[s] is not None and vb[s] is not None)
    return [va[s] * measure.scale for s in seeds], [vb[s] * measure.scale for s in seeds]  # type: ignore[operator]


def _seed_p(a: list[Result], b: list[Result], measure: Measure) -> float | None:
    """Paired t over shared seeds (None with fewer than two): a difference that one lucky seed makes
    looks resolved to the image-level test of the seed-averaged metric, not to this one."""
    xa, xb = _seed_values(a, b, measure)
    return stats.paired_t_test(xa, xb).p_value if len(xa) >= 2 else None


def _compare_by_seed(a: list[Result], b: list[Result], measure: Measure, diff: float) -> Comparison:
    """A value with no per-item records (a loss): paired t over the seeds both variants ran."""
    xa, xb = _seed_values(a, b, measure)
    if len(xa) < 2:
        return Comparison(diff, None, f"{len(xa)} shared seed(s): no test without per-item records",
                          measure.digits)
    test = stats.paired_t_test(xa, xb)
    return Comparison(diff, test.p_value, test.method, measure.digits)


def chance_level(group: list[Result], measure: Measure) -> float | None:
    """The best constant predictor's score: most frequent validation class (top-1), majority-class mIoU, AP 0."""
    if not group:
        return None
    if measure.kind == "classification":
        record = group[0].records(measure.records_suffix)
        if record is None:
            return None
        _, counts = np.unique(np.asarray(record["label"]), return_counts=True)
        return 100.0 * float(counts.max()) / float(counts.sum())
    if measure.kind == "segmentation":
        base = group[0].value("baseline_miou")
        return None if base is None else 100.0 * base
    if measure.kind == "loss":
        levels = [v for v in (r.value("mean_loss_baseline") for r in group) if v is not None]
        return sum(levels) / len(levels) if levels else None
    return 0.0
