"""The calibration table: for every task, MixMIM-pretrained against the same model from random initialisation.

One row per task, read from the default pipeline's metrics files named in the report's
``calibration`` map (params.yaml ``report.calibration``); a missing file gives ``—`` and
the reason. A pipeline without from-scratch runs (mid, paper) names no scratch stem and keeps
the rows of its probes, whose random-init encoder is a control that costs no training.
``resolved`` is ``yes`` when pretraining is ahead and the paired test on the shared validation
images gives p < 0.05 (with two or more seeds, and the paired t test over the seeds too, as in
every table), or (no per-image records) when the two 95% intervals do not overlap; ``no``
otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from .results import MEASURES, Estimate, Result, chance_level
from .tables import Context, Table, missing, standard_note

__all__ = ["CALIBRATION_TASKS", "DEFAULT_CALIBRATION", "CalibrationEntry", "calibration_table", "check_calibration"]

CALIBRATION_TASKS = ("imagenet", "inat2018", "inat2019", "places205", "places365", "coco", "ade20k")
TITLE = ("calibration", "Calibration: MixMIM pretraining vs random initialisation on every task",
         "per task, the pretrained and the from-scratch result with 95% intervals, the paired test, and frozen-"
         "feature probes")


@dataclass(frozen=True)
class CalibrationEntry:
    """Which results a task's row reads (metrics file stems in the default pipeline, without ``_s<seed>``)."""

    metric: str
    pretrained: str
    scratch: str
    probe_pretrained: str = ""
    probe_random: str = ""


def _entry(task: str, metric: str, pretrained: str) -> CalibrationEntry:
    probes = ("", "") if metric not in ("top1",) else (f"probe_{task}_pretrained", f"probe_{task}_random")
    return CalibrationEntry(metric, pretrained, f"scratch_{task}", *probes)


DEFAULT_CALIBRATION: dict[str, CalibrationEntry] = {
    **{t: _entry(t, "top1", f"finetune_{t}") for t in CALIBRATION_TASKS[:5]},
    "coco": _entry("coco", "ap_box", "coco"), "ade20k": _entry("ade20k", "miou", "ade20k"),
}


def check_calibration(section: Mapping[str, object], where: str = "report.calibration") -> dict[str, CalibrationEntry]:
    """The params map task -> {metric, pretrained, scratch[, probe_pretrained, probe_random]}, checked."""
    out: dict[str, CalibrationEntry] = {}
    for task, spec in section.items():
        if task not in CALIBRATION_TASKS:
            raise ValueError(f"{where}: unknown task {task!r}; expected some of {list(CALIBRATION_TASKS)}")
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}.{task}={spec!r}: expected a mapping with metric, pretrained, scratch")
        unknown = set(spec) - set(CalibrationEntry.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{where}.{task}: unknown key {sorted(unknown)[0]!r}; expected "
                             f"{list(CalibrationEntry.__dataclass_fields__)}")
        for key in ("metric", "pretrained"):
            if not isinstance(spec.get(key), str) or not spec.get(key):
                raise ValueError(f"{where}.{task}.{key}={spec.get(key)!r}: expected a non-empty string")
        # scratch "" says the pipeline has no from-scratch run; its probes may still have a random-init control
        if not isinstance(spec.get("scratch"), str):
            raise ValueError(f"{where}.{task}.scratch={spec.get('scratch')!r}: expected a metrics file stem, "
                             "or '' for a pipeline without a from-scratch run")
        if spec["metric"] not in MEASURES:
            raise ValueError(f"{where}.{task}.metric={spec['metric']!r}: expected one of {sorted(MEASURES)}")
        out[task] = CalibrationEntry(**{k: str(v) for k, v in spec.items()})  # type: ignore[arg-type]
    return out


def _group(ctx: Context, stem: str) -> list[Result]:
    """The seeds of a default-pipeline result named by its file stem (``finetune_imagenet``)."""
    from .results import parse_name

    parsed = parse_name(stem)
    if parsed is None:
        return []
    stage, key, _ = parsed
    return ctx.results.group("default", stage, key)


def _value_cells(prefix: str, est: Estimate | None, why: str) -> dict[str, str]:
    if est is None:
        return {prefix: missing(why), f"{prefix}_ci_low": "", f"{prefix}_ci_high": ""}
    fmt = (lambda v: "" if math.isnan(v) else f"{v:.1f}")
    return {prefix: est.cell(), f"{prefix}_ci_low": fmt(est.low), f"{prefix}_ci_high": fmt(est.high)}


def _why(ctx: Context, stem: str) -> str:
    return f"no {stem}_s*.json in the default pipeline's metrics"


def calibration_table(ctx: Context, entries: Mapping[str, CalibrationEntry] | None = None) -> Table:
    entries = dict(DEFAULT_CALIBRATION if entries is None else entries)
    rows = []
    for task in CALIBRATION_TASKS:
        entry = entries.get(task)
        if entry is None:
            rows.append({"task": task, "metric": "", "pretrained": missing("not in report.calibration"),
                         "resolved": "—"})
            continue
        measure = MEASURES[entry.metric]
        pre, scr = _group(ctx, entry.pretrained), _group(ctx, entry.scratch)
        ep, es = ctx.estimate(pre, measure) if pre else None, ctx.estimate(scr, measure) if scr else None
        row = {"task": task, "metric": entry.metric}
        row.update(_value_cells("pretrained", ep, _why(ctx, entry.pretrained)))
        row.update(_value_cells("scratch", es, _why(ctx, entry.scratch) if entry.scratch
                                else "no from-scratch run in this pipeline"))
        test = ctx.compare(pre, scr, measure)
        row["diff"] = test.diff_cell()
        row["p_value"] = test.p_cell()
        if ep is None or es is None:
            resolved = "—"
        elif test.p_value is not None:
            resolved = "yes" if ep.value > es.value and test.resolved == "yes" else "no"  # both tests with seeds
        elif not (math.isnan(ep.low) or math.isnan(es.high)):
            resolved = "yes" if ep.low > es.high else "no"
        else:
            resolved = "—"
        row["resolved"] = resolved
        row["test"] = test.method
        row["n_val"] = str((ep or es).n_val or "") if (ep or es) else ""
        row["n_seeds"] = " / ".join(str(e.n_seeds) if e else "0" for e in (ep, es))
        chance = chance_level(pre or scr, measure)
        row["chance"] = "" if chance is None else f"{chance:.1f}"
        for probe, stem in (("pretrained", entry.probe_pretrained), ("random", entry.probe_random)):
            for kind in ("knn", "linear"):
                prefix = f"{kind}_{probe}"
                if not stem:
                    row.update({prefix: "", f"{prefix}_ci_low": "", f"{prefix}_ci_high": ""})
                    continue
                group = _group(ctx, stem)
                est = ctx.estimate(group, MEASURES[f"{kind}_top1"]) if group else None
                row.update(_value_cells(prefix, est, _why(ctx, stem)))
        rows.append(row)
    notes = ("pretrained / scratch: the same model and budget from MixMIM pretraining and from random "
             "initialisation (recipe fit for random init). resolved = yes when pretraining is ahead and the paired "
             "test gives p < 0.05 (or, without per-image records, the intervals do not overlap). knn_* / linear_*: "
             "k-NN (k=20) and linear-probe top-1 on frozen features of the pretrained and of a random encoder. "
             "chance: most frequent validation class (top-1), majority-class mIoU (ADE20K), 0 (COCO AP).",
             standard_note(ctx))
    return Table(TITLE[0], TITLE[1], TITLE[2], pd.DataFrame(rows), notes)
