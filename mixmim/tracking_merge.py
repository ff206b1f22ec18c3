"""Copy the MLflow runs of one tracking store into another.

Seeds of one pipeline are often trained in several clones or on several machines at once, each
logging into its own ``sqlite:///.../mlflow.db``. The UI and the report read one store, so the
runs have to be brought together afterwards; :func:`merge_runs` does that without losing what
makes the suite's layout useful:

* **Whole runs.** Name, status, start and end time, tags, params, every step of every metric
  (with its timestamp) and the artifacts: a copied curve is the original curve.
* **Idempotent.** Each copy carries :data:`COPIED_FROM_TAG` (``<source store>#<source run id>``);
  a run already copied is skipped, so merging again after more seeds finished copies only those.
* **One group per variant.** A group run (tag :data:`~mixmim.tracking.GROUP_KEY_TAG`) whose key
  already exists in the destination experiment is not duplicated: the source's seeds become
  children of the existing group, whose ``seeds/*`` summary is then recomputed over all of them.
* **The source is only read.** A missing store is an error rather than a new empty database.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from .tracking import (
    _MAX_METRICS_PER_BATCH,
    _MAX_PARAMS_PER_BATCH,
    _PARENT_RUN_ID_TAG,
    GROUP_KEY_TAG,
    PRETRAIN_RUN_TAG,
    _chunks,
    _client,
    _file_lock,
    _get_or_create_experiment,
    _group_lock_path,
    _is_plain_path,
    _local_store_path,
    _prepare_local_store,
    _retry,
    _search_all,
    _sqlite_path,
    check_tracking_uri,
    summarize_group,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["COPIED_FROM_TAG", "MergeError", "MergeSummary", "merge_runs", "store_uri"]

#: Tag of a copied run: ``<canonical source store URI>#<source run id>``.
COPIED_FROM_TAG = "mixmim.copied_from"

# Tags whose value is the id of another run of the same store: they must name the copy, not the
# original, or the UI's parent/child tree and the lineage to the pretraining run would break.
# The parent is resolved when the run is created (parents are copied first); the others may
# point into another experiment or to a run copied later, so they are fixed after all copies.
_INVOCATION_TAG = "mixmim.invocation"
_LATE_REF_TAGS = (PRETRAIN_RUN_TAG, _INVOCATION_TAG)
_RUN_NAME_TAG = "mlflow.runName"  # set by create_run from the run name
_TERMINAL = ("FINISHED", "FAILED", "KILLED")
_ALL = sys.maxsize  # _search_all's max_results: every run, page by page


class MergeError(ValueError):
    """The merge was asked for something that does not exist or makes no sense (a user's mistake)."""


@dataclass
class MergeSummary:
    """What a merge did, so a caller can tell a no-op from a partial copy."""

    experiments: list[str] = field(default_factory=list)
    copied: int = 0  # runs created in the destination
    skipped: int = 0  # runs copied by an earlier merge
    groups_mapped: int = 0  # source group runs whose key the destination already had
    groups_summarized: int = 0  # destination groups whose seeds/* metrics were recomputed
    still_running: int = 0  # copied runs that were RUNNING in the source (copied as they were)

    def lines(self) -> list[str]:
        return [
            f"experiments: {', '.join(self.experiments) or '(none)'}",
            f"copied: {self.copied}",
            f"skipped (already copied): {self.skipped}",
            f"groups mapped onto existing ones: {self.groups_mapped}",
            f"groups re-summarised: {self.groups_summarized}",
            f"copied while still running: {self.still_running}",
        ]


def store_uri(value: str) -> str:
    """A tracking URI from ``value``: URIs pass unchanged, a plain path names a SQLite file.

    The suite's stores are ``mlflow.db`` files, so the path of one is the natural thing to type;
    MLflow itself would take a plain path for a (deprecated) file store folder instead.
    """
    if _is_plain_path(value, urlparse(value).scheme.lower()):
        return f"sqlite:///{Path(value).expanduser().absolute().as_posix()}"
    return value


def merge_runs(src_uri: str, dst_uri: str, experiments: Sequence[str] | None = None) -> MergeSummary:
    """Copy the active runs of ``src_uri``'s experiments (all, or those named) into ``dst_uri``.

    Experiments missing in the destination are created as the suite creates them (artifacts
    beside a SQLite store, training kind). A run still RUNNING in the source is copied as it is
    now and later merges skip it, so merge after the runs have ended.
    """
    _check_source(src_uri)
    origin = _canonical(src_uri)
    if origin == _canonical(dst_uri):
        raise MergeError(f"source and destination are the same store ({src_uri!r}); give two different stores")
    check_tracking_uri(dst_uri)
    _prepare_local_store(dst_uri)
    src, dst = _client(src_uri), _client(dst_uri)
    merge = _Merge(src, dst, dst_uri, origin)
    for experiment in _source_experiments(src, src_uri, experiments):
        merge.experiment(experiment, named=bool(experiments))
    merge.fix_late_refs()
    for group_id in sorted(merge.groups_with_new_children):
        summarize_group(dst_uri, group_id)
    merge.summary.groups_summarized = len(merge.groups_with_new_children)
    return merge.summary


# --------------------------------------------------------------------------- checks


def _check_source(uri: str) -> None:
    """Refuse a source that is not there: MLflow would silently create an empty one."""
    scheme = urlparse(uri).scheme.lower()
    if scheme == "sqlite":
        path = _sqlite_path(uri)
        if path is None:
            raise MergeError(f"source store {uri!r} is an in-memory database; give a sqlite:///path/to/mlflow.db")
        if not path.is_file():
            raise MergeError(f"source store {uri!r}: no database file at {path.absolute()}; "
                             "expected an existing MLflow SQLite store (mlflow.db)")
        if not _has_mlflow_tables(path):
            raise MergeError(f"source store {uri!r}: {path.absolute()} is not an MLflow database "
                             "(no experiments table)")
    elif scheme == "file" or _is_plain_path(uri, scheme):
        folder = _local_store_path(uri)
        if not folder.is_dir():
            raise MergeError(f"source store {uri!r}: no MLflow store folder at {folder.absolute()}")


def _has_mlflow_tables(path: Path) -> bool:
    """Whether the SQLite file has MLflow's tables, checked read-only: opening a foreign or empty
    file with MLflow would create its schema inside it."""
    try:
        with sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True) as conn:
            names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError:
        return False
    return {"experiments", "runs"} <= names


def _canonical(uri: str) -> str:
    """One spelling per store (absolute path, no query), so a store reached by another relative
    path or with ``?timeout=`` is still recognised as the origin of earlier copies."""
    scheme = urlparse(uri).scheme.lower()
    if scheme == "sqlite":
        path = _sqlite_path(uri)
        return uri if path is None else f"sqlite:///{path.expanduser().resolve().as_posix()}"
    if scheme == "file" or _is_plain_path(uri, scheme):
        return _local_store_path(uri).resolve().as_uri()
    return uri.rstrip("/")


def _source_experiments(src: MlflowClient, uri: str, names: Sequence[str] | None) -> list[Any]:
    active = {e.name: e for e in src.search_experiments()}
    if not names:
        return sorted(active.values(), key=lambda e: e.name)
    missing = [n for n in dict.fromkeys(names) if n not in active]
    if missing:
        raise MergeError(f"experiment {', '.join(map(repr, missing))} not in source store {uri!r}; "
                         f"expected one of: {', '.join(sorted(active)) or '(none)'}")
    return [active[n] for n in dict.fromkeys(names)]


# --------------------------------------------------------------------------- copying


class _Merge:
    """State shared by the experiments of one merge: the source -> destination id map."""

    def __init__(self, src: MlflowClient, dst: MlflowClient, dst_uri: str, origin: str) -> None:
        self.src, self.dst, self.dst_uri, self.origin = src, dst, dst_uri, origin
        self.summary = MergeSummary()
        self.id_map: dict[str, str] = {}
        self.dst_groups: set[str] = set()
        self.groups_with_new_children: set[str] = set()
        self._new: list[tuple[Any, str]] = []  # (source run, id of its copy)

    def experiment(self, experiment: Any, named: bool) -> None:
        """Copy one experiment's runs; an empty one (every store's ``Default``) only when named."""
        runs = _search_all(self.src, experiment.experiment_id, "", None, _ALL)
        if not runs and not named:
            return
        self.summary.experiments.append(experiment.name)
        exp_id = _get_or_create_experiment(self.dst, self.dst_uri, experiment.name)
        self._copy_experiment_tags(experiment, exp_id)
        present = self._copies_present(exp_id)
        for run in _parents_first(runs):
            src_id = run.info.run_id
            key = run.data.tags.get(GROUP_KEY_TAG)
            if src_id in present:
                self.id_map[src_id] = present[src_id]
                self.summary.skipped += 1
            elif key is not None:
                self._group(run, exp_id, key)
            else:
                self._copy(run, exp_id)
            if key is not None:
                self.dst_groups.add(self.id_map[src_id])

    def _copy_experiment_tags(self, experiment: Any, exp_id: str) -> None:
        """Tags the destination experiment lacks (its description, for one); its own win."""
        have = self.dst.get_experiment(exp_id).tags
        for key, value in experiment.tags.items():
            if key not in have:
                _retry(self.dst.set_experiment_tag, exp_id, key, value)

    def _copies_present(self, exp_id: str) -> dict[str, str]:
        """Source run id -> destination id of the runs an earlier merge from this store copied."""
        prefix = f"{self.origin}#"
        found = {}
        for run in _search_all(self.dst, exp_id, "", None, _ALL):
            mark = run.data.tags.get(COPIED_FROM_TAG, "")
            if mark.startswith(prefix):
                found[mark[len(prefix):]] = run.info.run_id
        return found

    def _group(self, run: Any, exp_id: str, key: str) -> None:
        """Map the group onto the destination's group of the same key, else copy it; under the
        lock that ensure_group_run takes, so a stage starting meanwhile cannot make a second one."""
        with _file_lock(_group_lock_path(self.dst_uri)):
            flt = f"tags.`{GROUP_KEY_TAG}` = '{key}'"
            existing = _search_all(self.dst, exp_id, flt, ["attributes.start_time ASC"], 1)
            if existing:
                self.id_map[run.info.run_id] = existing[0].info.run_id
                self.summary.groups_mapped += 1
            else:
                self._copy(run, exp_id)

    def _copy(self, run: Any, exp_id: str) -> None:
        info, data = run.info, run.data
        tags = {k: v for k, v in data.tags.items() if k != _RUN_NAME_TAG}
        tags[COPIED_FROM_TAG] = f"{self.origin}#{info.run_id}"
        parent = tags.get(_PARENT_RUN_ID_TAG)
        if parent in self.id_map:
            tags[_PARENT_RUN_ID_TAG] = self.id_map[parent]
            if self.id_map[parent] in self.dst_groups:
                self.groups_with_new_children.add(self.id_map[parent])
        new_id = _retry(self.dst.create_run, exp_id, start_time=info.start_time, tags=tags,
                        run_name=info.run_name).info.run_id
        self.id_map[info.run_id] = new_id
        self._copy_params(data.params, new_id)
        self._copy_metrics(info.run_id, data.metrics, new_id)
        self._copy_artifacts(info.run_id, new_id)
        if info.status in _TERMINAL:
            _retry(self.dst.set_terminated, new_id, status=info.status, end_time=info.end_time)
        else:
            self.summary.still_running += 1
        self._new.append((run, new_id))
        self.summary.copied += 1

    def _copy_params(self, params: dict[str, str], new_id: str) -> None:
        from mlflow.entities import Param

        entries = [Param(k, v) for k, v in params.items()]
        for chunk in _chunks(entries, _MAX_PARAMS_PER_BATCH):
            _retry(self.dst.log_batch, new_id, params=chunk)

    def _copy_metrics(self, src_id: str, latest: Iterable[str], new_id: str) -> None:
        """Every logged value of every metric, not only the latest the run shows."""
        from mlflow.entities import Metric

        # rebuilt rather than passed on: MLflow 3 metrics may name the source's models and run
        history = [Metric(m.key, m.value, m.timestamp, m.step)
                   for key in latest for m in self.src.get_metric_history(src_id, key)]
        for chunk in _chunks(history, _MAX_METRICS_PER_BATCH):
            _retry(self.dst.log_batch, new_id, metrics=chunk)

    def _copy_artifacts(self, src_id: str, new_id: str) -> None:
        if not self.src.list_artifacts(src_id):
            return
        with tempfile.TemporaryDirectory(prefix="mixmim-merge-") as tmp:
            local = self.src.download_artifacts(src_id, "", dst_path=tmp)
            _retry(self.dst.log_artifacts, new_id, local)

    def fix_late_refs(self) -> None:
        """Point the lineage tags of the new copies at copies, once every run has its new id."""
        for run, new_id in self._new:
            for tag in _LATE_REF_TAGS:
                old = run.data.tags.get(tag)
                if old in self.id_map:
                    _retry(self.dst.set_tag, new_id, tag, self.id_map[old])


def _parents_first(runs: Sequence[Any]) -> list[Any]:
    """``runs`` reordered so that a run's parent (when among them) comes before it."""
    by_id = {run.info.run_id: run for run in runs}
    ordered: list[Any] = []
    placed: set[str] = set()
    for run in runs:
        chain: list[Any] = []
        current: Any = run
        while current is not None and current.info.run_id not in placed:
            placed.add(current.info.run_id)  # also guards against a cycle of parent tags
            chain.append(current)
            current = by_id.get(current.data.tags.get(_PARENT_RUN_ID_TAG, ""))
        ordered.extend(reversed(chain))
    return ordered
