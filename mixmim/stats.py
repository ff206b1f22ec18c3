"""Intervals and paired tests for the report: small, pure functions over arrays.

* :func:`t_interval` - mean over seeds with a Student-t interval (two or more seeds).
* :func:`bootstrap_interval` - percentile bootstrap of any statistic over validation items.
* :func:`paired_bootstrap_test` - two systems scored on the same items: interval of the
  difference and a two-sided p-value from the bootstrap distribution shifted to the null.
* :func:`mcnemar_exact` - exact McNemar test for paired top-1 correctness.
* :func:`paired_t_test` - two variants run with the same seeds (same initialisation, data
  order and masks per seed): Student t on the per-seed differences, for values that have no
  per-item records (a pretraining loss).
* :func:`miou_from_counts` / :func:`coco_ap_from_records` - mIoU and COCO AP recomputed exactly
  from per-image records, so the bootstrap can resample images and recompute the metric.

Every bootstrap is seeded (``seed``) and draws the same index matrix for both systems of a
paired test, so results are reproducible and the pairing is respected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as _sp

__all__ = [
    "COCO_IOU_THRESHOLDS", "COCO_RECALL_POINTS", "CocoAP", "Interval", "PairedTest", "bootstrap_indices",
    "bootstrap_interval", "coco_ap_from_records", "mcnemar_exact", "miou_from_counts", "paired_bootstrap_test",
    "paired_t_test", "t_interval",
]

DEFAULT_RESAMPLES = 2000
MIN_RESAMPLES = 1000
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
COCO_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval; ``method`` says how it was obtained."""

    value: float
    low: float
    high: float
    n: int
    method: str
    confidence: float = 0.95


@dataclass(frozen=True)
class PairedTest:
    """Difference ``a - b`` on shared items, its interval and a two-sided p-value."""

    diff: float
    low: float
    high: float
    p_value: float
    n: int
    method: str

    def resolved(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r}: expected a number strictly between 0 and 1")


def _check_resamples(resamples: int) -> None:
    if not isinstance(resamples, int) or resamples < MIN_RESAMPLES:
        raise ValueError(f"resamples={resamples!r}: expected an integer >= {MIN_RESAMPLES}")


def t_interval(values: Sequence[float], confidence: float = 0.95, unit: str = "seeds") -> Interval:
    """Mean of ``values`` (e.g. one score per seed) with a Student-t interval on n-1 degrees of freedom.

    ``unit`` names what one value stands for (seeds, images) in the method string."""
    _check_confidence(confidence)
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"t_interval: expected at least 2 values (one per {unit.rstrip('s')}), "
                         f"got {len(x) if x.ndim else 0}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"t_interval: values must be finite, got {x.tolist()}")
    mean = float(x.mean())
    half = float(_sp.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return Interval(mean, mean - half, mean + half, len(x), f"Student t over {len(x)} {unit}", confidence)


def bootstrap_indices(n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """A (resamples, n) matrix of item indices drawn with replacement, reproducible from ``seed``."""
    _check_resamples(resamples)
    if n < 1:
        raise ValueError(f"n={n!r}: the bootstrap needs at least one item")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _statistic(data: Any) -> Callable[[np.ndarray], float]:
    """``data`` as a function of an index array: a callable is used as is, an array is averaged."""
    if callable(data):
        return data
    x = np.asarray(data, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"expected a non-empty 1-D array of per-item values, got shape {x.shape}")
    return lambda idx: float(x[idx].mean())


def _size(data: Any, n: int | None) -> int:
    if n is not None:
        return n
    if callable(data):
        raise ValueError("a statistic given as a function needs n (the number of items)")
    return len(np.asarray(data))


def bootstrap_interval(data: Any, n: int | None = None, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                       confidence: float = 0.95) -> Interval:
    """Percentile bootstrap over items.

    ``data`` is either per-item values (the statistic is their mean, e.g. 0/1 correctness
    -> accuracy) or a function ``f(indices) -> float`` that recomputes the statistic on a
    resample of item indices (then ``n`` is the number of items).
    """
    _check_confidence(confidence)
    stat = _statistic(data)
    size = _size(data, n)
    idx = bootstrap_indices(size, resamples, seed)
    full = float(stat(np.arange(size)))
    draws = np.array([stat(row) for row in idx], dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail]) if len(draws) else (math.nan, math.nan)
    return Interval(full, float(low), float(high), size, f"percentile bootstrap over {size} items, "
                    f"{resamples} resamples", confidence)


def paired_bootstrap_test(a: Any, b: Any, n: int | None = None, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                          confidence: float = 0.95) -> PairedTest:
    """Paired bootstrap of ``stat(a) - stat(b)`` over shared items.

    ``a`` and ``b`` are per-item values in the same item order or functions of an index
    array (as in :func:`bootstrap_interval`); both are evaluated on the same resamples.
    The p-value is two-sided against "no difference": the share of resampled differences
    at least as far from the observed one as the observed one is from zero
    (``(1 + #{|d* - d| >= |d|}) / (B + 1)``), so identical systems get p = 1.
    """
    _check_confidence(confidence)
    stat_a, stat_b = _statistic(a), _statistic(b)
    size = _size(a, n)
    if n is None and not callable(b) and len(np.asarray(b)) != size:
        raise ValueError(f"paired test: a has {size} items and b {len(np.asarray(b))}; they must share items")
    idx = bootstrap_indices(size, resamples, seed)
    full = np.arange(size)
    diff = float(stat_a(full) - stat_b(full))
    draws = np.array([stat_a(row) - stat_b(row) for row in idx], dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    extreme = int(np.count_nonzero(np.abs(draws - diff) >= abs(diff) - 1e-12))
    p_value = (1 + extreme) / (len(draws) + 1)
    return PairedTest(diff, float(low), float(high), float(min(1.0, p_value)), size,
                      f"paired bootstrap over {size} items, {resamples} resamples")


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> PairedTest:
    """Exact (binomial) McNemar test on paired correctness; the difference is in percentage points.

    Only discordant items count: ``n01`` (a right, b wrong) and ``n10`` (a wrong, b right);
    under the null each discordant item is a fair coin, p = P(Binomial(n01+n10, 1/2) as
    extreme as observed), two-sided. The interval is Wald's on the paired difference.
    """
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"mcnemar_exact: expected two equal-length non-empty 1-D arrays, got {a.shape} and {b.shape}")
    n01 = int(np.count_nonzero(a & ~b))
    n10 = int(np.count_nonzero(~a & b))
    n = len(a)
    p_value = 1.0 if n01 + n10 == 0 else float(_sp.binomtest(n01, n01 + n10, 0.5).pvalue)
    diff = (n01 - n10) / n
    var = ((n01 + n10) / n - diff**2) / n
    half = float(_sp.norm.ppf(0.975) * math.sqrt(max(var, 0.0)))
    return PairedTest(100 * diff, 100 * (diff - half), 100 * (diff + half), min(1.0, p_value), n,
                      f"exact McNemar on {n} paired items ({n01} vs {n10} discordant)")


def paired_t_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95,
                  unit: str = "seeds") -> PairedTest:
    """Paired Student t test of ``a - b`` where ``a[i]`` and ``b[i]`` share seed ``i`` (or image ``i``:
    ``unit`` names what is paired, in the method string).

    For a value with no per-item records, the seeds are the only replication; pairing them
    removes what a seed shares across variants (initialisation, data order). Needs two or
    more pairs; identical pairs give p = 1 (no difference to test) rather than NaN.
    """
    _check_confidence(confidence)
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"paired_t_test: expected two equal-length 1-D sequences of at least 2 values (one per "
                         f"seed), got shapes {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"paired_t_test: values must be finite, got {x.tolist()} and {y.tolist()}")
    d = x - y
    n = len(d)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    # Differences that agree up to floating-point rounding (0.7 - 0.6 vs 0.6 - 0.5) are one
    # constant shift: scipy would warn about catastrophic cancellation and return a p value
    # computed from rounding noise, so they are treated exactly like an sd of zero.
    rounding = 64 * np.finfo(np.float64).eps * max(float(np.abs(x).max()), float(np.abs(y).max()))
    if sd <= rounding:
        p_value = 1.0 if abs(mean) <= rounding else 0.0
        return PairedTest(mean, mean, mean, p_value, n, f"paired t over {n} {unit} (constant difference)")
    half = float(_sp.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))
    p_value = float(_sp.ttest_rel(x, y).pvalue)
    return PairedTest(mean, mean - half, mean + half, p_value, n, f"paired t over {n} {unit}")


# --------------------------------------------------------------------------- dense metrics


def miou_from_counts(intersection: np.ndarray, union: np.ndarray, idx: np.ndarray | None = None) -> float:
    """mIoU of a multiset of images from per-image per-class intersection and union pixel counts.

    Counts are summed over the images in ``idx`` (repeats count twice) before dividing, as
    the dataset-level confusion matrix does; classes with an empty union are left out.
    """
    inter = np.asarray(intersection, dtype=np.float64)
    uni = np.asarray(union, dtype=np.float64)
    if inter.shape != uni.shape or inter.ndim != 2:
        raise ValueError(f"intersection {inter.shape} and union {uni.shape}: expected equal (images, classes) shapes")
    if idx is not None:
        inter, uni = inter[idx], uni[idx]
    i, u = inter.sum(0), uni.sum(0)
    keep = u > 0
    return float((i[keep] / u[keep]).mean()) if keep.any() else math.nan


class CocoAP:
    """COCO AP (IoU 0.5:0.95, all areas, 100 detections) of any multiset of images, from per-image match records.

    Each image record holds ``gt``: {category: number of non-ignored ground truths} and
    ``dets``: [[category, score, matched_bits, ignored_bits], ...] where bit t says whether
    the detection matched a ground truth (or matched an ignored one) at the t-th IoU
    threshold, as ``COCOeval.evaluateImg`` decided. Matching is per image, so the AP of a
    multiset of images follows from their records alone by repeating ``COCOeval.accumulate``:
    detections in stable score order (images in record order), cumulative TP/FP, precision
    made monotone, sampled at 101 recall points, averaged over thresholds and the categories
    with ground truth. Records are sorted once here; an image drawn k times weighs its
    detections and ground truths k times, which gives the same curve as k copies of the
    image (a repeated true positive only adds a point that the next copy dominates), up to
    the order of detections with exactly equal scores.
    """

    def __init__(self, images: Sequence[Mapping[str, Any]], thresholds: int = len(COCO_IOU_THRESHOLDS)) -> None:
        self.n = len(images)
        self.thresholds = thresholds
        bits = 1 << np.arange(thresholds)
        cats = sorted({int(c) for im in images for c in im["gt"]} | {int(d[0]) for im in images for d in im["dets"]})
        self.cats = []
        for cat in cats:
            gt = np.array([int(im["gt"].get(str(cat), im["gt"].get(cat, 0))) for im in images], dtype=np.float64)
            rows = [(i, float(d[1]), int(d[2]), int(d[3])) for i, im in enumerate(images) for d in im["dets"]
                    if int(d[0]) == cat]
            image = np.array([r[0] for r in rows], dtype=np.int64)
            score = np.array([r[1] for r in rows], dtype=np.float64)
            order = np.argsort(-score, kind="mergesort")
            matched = (np.array([r[2] for r in rows], dtype=np.int64)[:, None] & bits) > 0
            ignored = (np.array([r[3] for r in rows], dtype=np.int64)[:, None] & bits) > 0
            tp = (matched & ~ignored)[order].astype(np.float64).reshape(len(rows), thresholds)
            fp = (~matched & ~ignored)[order].astype(np.float64).reshape(len(rows), thresholds)
            self.cats.append((gt, image[order], tp, fp))
        # AP by resample: a report evaluates one detector on the same bootstrap resamples in
        # several tables (the resamples are a function of n and the seed), and each AP costs
        # about 2 ms, so a value is computed once per distinct multiset of images.
        self._memo: dict[bytes, float] = {}

    def __call__(self, idx: Sequence[int] | np.ndarray | None = None) -> float:
        weight = np.ones(self.n) if idx is None else np.bincount(np.asarray(idx, dtype=np.int64), minlength=self.n)
        key = weight.astype(np.int64).tobytes()
        if key not in self._memo:
            self._memo[key] = self._ap(weight)
        return self._memo[key]

    def _ap(self, weight: np.ndarray) -> float:
        per_cat = []
        for gt, image, tp, fp in self.cats:
            n_gt = float(gt @ weight)
            if n_gt == 0:
                continue
            precision = np.zeros((self.thresholds, len(COCO_RECALL_POINTS)))
            w = weight[image]
            keep = w > 0
            if keep.any():
                tps = np.cumsum(tp[keep] * w[keep, None], axis=0)
                fps = np.cumsum(fp[keep] * w[keep, None], axis=0)
                for t in range(self.thresholds):
                    recall = tps[:, t] / n_gt
                    prec = tps[:, t] / (tps[:, t] + fps[:, t] + np.spacing(1))
                    prec = np.maximum.accumulate(prec[::-1])[::-1]
                    where = np.searchsorted(recall, COCO_RECALL_POINTS, side="left")
                    ok = where < len(prec)
                    precision[t, ok] = prec[where[ok]]
            per_cat.append(precision)
        return float(np.mean(per_cat)) if per_cat else math.nan


def coco_ap_from_records(images: Sequence[Mapping[str, Any]], idx: Sequence[int] | np.ndarray | None = None,
                         thresholds: int = len(COCO_IOU_THRESHOLDS)) -> float:
    """COCO AP of the images ``idx`` (repeats count again; None: all) from per-image records (:class:`CocoAP`)."""
    return CocoAP(images, thresholds)(idx)
