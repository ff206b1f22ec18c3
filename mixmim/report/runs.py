"""What ran: the finished MLflow runs of each pipeline, indexed the way the report asks for them.

The report never reads MLflow directly elsewhere; everything it needs about a run (its
stage, variant, dataset, model, scale, params and final metrics) is copied here into a
small immutable :class:`Run`, so the table builders are pure functions of a
:class:`RunIndex` and can be tested without a store.

Rules of the data contract applied here, once:

* only runs with status ``FINISHED`` count (a failed or killed run has no final metrics
  anyone should quote);
* if several finished runs share (stage, variant, dataset) within a pipeline, the most
  recently started one wins (a rerun supersedes the earlier attempt);
* a ``finetune`` run without a pretrained initialisation (``mixmim.init == "scratch"``,
  the engine's own tag) is a ``scratch`` run, so it can never pose as a pretrained result.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..tracking import PRETRAIN_RUN_TAG, find_runs

if TYPE_CHECKING:
    import pandas

__all__ = [
    "ROLES", "STAGES", "Run", "RunIndex", "latest_per_key", "load_runs", "metric_history", "runs_from_frame",
    "stage_runs",
]

#: The pipelines the report knows, by the role they play in it.
ROLES = ("default", "ablations", "backbones")
STAGES = ("pretrain", "finetune", "scratch", "linear_probe", "coco", "ade20k")

STAGE_TAG = "mixmim.stage"
VARIANT_TAG = "mixmim.variant"
DATASET_TAG = "mixmim.dataset"
MODEL_TAG = "mixmim.model"
SCALE_TAG = "mixmim.scale"
PIPELINE_TAG = "mixmim.pipeline"
INIT_TAG = "mixmim.init"


@dataclass(frozen=True)
class Run:
    """One finished run, reduced to what the report reads."""

    run_id: str
    role: str
    experiment: str
    stage: str
    variant: str
    dataset: str
    model: str
    scale: str
    start_time: float = 0.0  # ms since the epoch; orders reruns
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    parent_pretrain: str | None = None

    def metric(self, key: str) -> float | None:
        """A final metric, or None when it was not logged (or is NaN)."""
        value = self.metrics.get(key)
        if value is None or math.isnan(value):
            return None
        return float(value)

    def param(self, key: str) -> str | None:
        """A config value as MLflow stored it (a string); None for missing or ``None``."""
        value = self.params.get(key)
        return None if value in (None, "", "None") else str(value)

    def number(self, key: str) -> float | None:
        """A numeric config value, or None when absent or not a number."""
        value = self.param(key)
        try:
            return None if value is None else float(value)
        except ValueError:
            return None


def _text(value: Any) -> str:
    """A tag or param cell of the runs frame as text ('' for a missing one: NaN/None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _stage_of(tags: Mapping[str, str]) -> str:
    stage = tags.get(STAGE_TAG, "")
    if stage == "finetune" and tags.get(INIT_TAG) == "scratch":
        return "scratch"
    return stage


def runs_from_frame(frame: pandas.DataFrame, role: str, experiment: str) -> list[Run]:
    """The FINISHED runs of a :func:`mixmim.tracking.find_runs` frame as :class:`Run` records."""
    if frame.empty or "status" not in frame:
        return []
    runs: list[Run] = []
    for record in frame[frame["status"] == "FINISHED"].to_dict("records"):
        tags = {k[5:]: _text(v) for k, v in record.items() if k.startswith("tags.") and _text(v)}
        params = {k[7:]: _text(v) for k, v in record.items() if k.startswith("params.") and _text(v)}
        metrics = {k[8:]: float(v) for k, v in record.items()
                   if k.startswith("metrics.") and v is not None and not _is_nan(v)}
        start = record.get("start_time")
        runs.append(Run(
            run_id=str(record["run_id"]), role=role, experiment=experiment, stage=_stage_of(tags),
            variant=tags.get(VARIANT_TAG, ""), dataset=tags.get(DATASET_TAG, ""),
            model=tags.get(MODEL_TAG, params.get("model", "")), scale=tags.get(SCALE_TAG, ""),
            start_time=_millis(start), params=params, metrics=metrics,
            parent_pretrain=tags.get(PRETRAIN_RUN_TAG) or None,
        ))
    return runs


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _millis(value: Any) -> float:
    """A start time (pandas Timestamp, number or missing) as milliseconds; 0 when unknown."""
    if value is None or _is_nan(value):
        return 0.0
    if hasattr(value, "timestamp"):
        try:
            return float(value.timestamp()) * 1000.0
        except ValueError:  # NaT
            return 0.0
    return float(value)


def latest_per_key(runs: Iterable[Run]) -> list[Run]:
    """Keep the most recent run of every (role, stage, variant, dataset); on a tie the first seen wins
    (MLflow lists newest first)."""
    best: dict[tuple[str, str, str, str], Run] = {}
    for run in runs:
        key = (run.role, run.stage, run.variant, run.dataset)
        if key not in best or run.start_time > best[key].start_time:
            best[key] = run
    return list(best.values())


class RunIndex:
    """Look-ups over the latest finished runs of each role, with reasons for what is missing."""

    def __init__(self, runs: Iterable[Run], experiments: Mapping[str, str]) -> None:
        self.experiments = dict(experiments)
        self.all_finished = list(runs)
        self.runs = latest_per_key(self.all_finished)
        self._by_id = {run.run_id: run for run in self.all_finished}

    def select(self, role: str, stage: str | None = None, *, variant: str | None = None,
               dataset: str | None = None) -> list[Run]:
        """Latest runs of ``role`` matching every given criterion, most recent first."""
        found = [r for r in self.runs if r.role == role and (stage is None or r.stage == stage)
                 and (variant is None or r.variant == variant) and (dataset is None or r.dataset == dataset)]
        return sorted(found, key=lambda r: r.start_time, reverse=True)

    def find(self, role: str, stage: str, *, variant: str | None = None, dataset: str | None = None) -> Run | None:
        """The most recent matching run, or None."""
        found = self.select(role, stage, variant=variant, dataset=dataset)
        return found[0] if found else None

    def variants(self, role: str, stage: str | None = None) -> list[str]:
        """Variant names present in ``role`` (optionally for one stage), sorted."""
        return sorted({r.variant for r in self.select(role, stage) if r.variant})

    def by_id(self, run_id: str) -> Run | None:
        return self._by_id.get(run_id)

    def pretrain_for(self, run: Run) -> Run | None:
        """The pretraining a run started from: its lineage tag, else the same variant's, else 'default'.

        The tag is authoritative; the fallbacks cover stores written before lineage was
        tagged, where the pipeline's naming (variant per ablation, 'default' otherwise)
        still identifies the checkpoint.
        """
        if run.stage == "pretrain":
            return run
        if run.stage == "scratch":
            return None
        if run.parent_pretrain:
            parent = self.by_id(run.parent_pretrain)
            if parent is not None:
                return parent
        return self.find(run.role, "pretrain", variant=run.variant) or self.find(run.role, "pretrain",
                                                                                variant="default")

    def reason(self, role: str, stage: str, *, variant: str | None = None, dataset: str | None = None) -> str:
        """Why :meth:`find` with these arguments found nothing, in a few words for a table cell."""
        if role not in self.experiments:
            return f"no '{role}' experiment given to the report"
        name = self.experiments[role]
        if not self.select(role):
            return f"no finished runs in experiment '{name}'"
        what = f"no finished {stage} run"
        if variant is not None:
            what += f" of '{variant}'"
        if dataset is not None:
            what += f" on {dataset}"
        return f"{what} in '{name}'"


def load_runs(tracking_uri: str, experiments: Mapping[str, str]) -> RunIndex:
    """Read every role's experiment from the store; an absent experiment simply has no runs."""
    runs: list[Run] = []
    for role, experiment in experiments.items():
        frame = find_runs(tracking_uri, experiment, max_results=100_000)
        runs.extend(runs_from_frame(frame, role, experiment))
    return RunIndex(runs, experiments)


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of a metric's full history, ordered by step."""
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri=tracking_uri).get_metric_history(run_id, key)
    points = sorted((int(m.step), float(m.value)) for m in history)
    return points


def stage_runs(index: RunIndex, stage: str, roles: Sequence[str] = ROLES) -> list[Run]:
    """Every latest run of one stage across roles, in role then variant order."""
    order = {role: i for i, role in enumerate(roles)}
    found = [r for r in index.runs if r.stage == stage and r.role in order]
    return sorted(found, key=lambda r: (order[r.role], r.variant, r.dataset))
