"""The MLflow side of the report: per-step histories for the loss-curve figure, nothing else.

Tables never come from here (they are built from the committed metrics files, see
:mod:`.results`). Rules applied to the runs read:

* only ``FINISHED`` pretraining runs count (``mixmim.stage == "pretrain"``; the per-variant
  group runs, ``mixmim.stage == "group"``, are skipped);
* runs are grouped by (pipeline role, ``mixmim.variant``), one per ``mixmim.seed`` (a run
  without the tag is seed 0); of reruns of the same seed the most recently started wins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..tracking import find_runs

__all__ = ["metric_history", "pretrain_runs"]


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def pretrain_runs(tracking_uri: str, experiments: Mapping[str, str]) -> dict[tuple[str, str], list[str]]:
    """(role, variant) -> run ids of its finished pretraining runs, one per seed, in seed order."""
    out: dict[tuple[str, str], dict[str, tuple[Any, str]]] = {}
    for role, experiment in experiments.items():
        frame = find_runs(tracking_uri, experiment, max_results=100_000)
        if frame.empty or "status" not in frame or "tags.mixmim.stage" not in frame:
            continue
        for record in frame[(frame["status"] == "FINISHED") & (frame["tags.mixmim.stage"] == "pretrain")].to_dict(
                "records"):
            variant = _text(record.get("tags.mixmim.variant"))
            seed = _text(record.get("tags.mixmim.seed")) or "0"
            start = record.get("start_time")
            seeds = out.setdefault((role, variant), {})
            if seed not in seeds or (start is not None and seeds[seed][0] is not None and start > seeds[seed][0]):
                seeds[seed] = (start, str(record["run_id"]))
    return {key: [seeds[s][1] for s in sorted(seeds, key=lambda s: (len(s), s))]
            for key, seeds in sorted(out.items())}


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of a metric's full history, ordered by step."""
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri=tracking_uri).get_metric_history(run_id, key)
    return sorted((int(m.step), float(m.value)) for m in history)
