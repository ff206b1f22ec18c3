"""The suite's MLflow layer: one MLflow run per training run, as a context manager.

Training code talks to MLflow only through this module, for three reasons:

* **Fail fast.** A training job that discovers after hours that it cannot log is a
  wasted job, so :func:`check_tracking_uri` probes the store before anything else.
* **No global state.** Every call goes through an explicit ``MlflowClient(uri)``, never
  through ``mlflow.set_tracking_uri``/``mlflow.start_run``, so several trackers (a parent
  and its children, or parallel tests) cannot leak into each other.
* **Rank-safe.** ``Tracker(..., enabled=False)`` (non-zero distributed ranks) is a
  complete no-op that never touches the network or the disk.

Lineage between stages (pretraining -> finetuning -> dense transfer) is kept with a small
JSON *run reference* written beside each checkpoint (:func:`write_run_ref`); the next
stage reads it and tags its own run with :data:`PRETRAIN_RUN_TAG`.

Lifecycle: a run ends ``FINISHED``, ``FAILED`` (an exception) or ``KILLED`` (Ctrl-C,
SIGTERM). A process killed outright (SIGKILL, OOM killer) cannot close its run, so every
new run first marks the experiment's ``RUNNING`` runs of this host whose process is gone
as ``KILLED`` (:func:`close_stale_runs`); a training run resumed from its checkpoint
reopens the same MLflow run (``Tracker(resume_run_id=...)``), so its curve stays one.
"""

from __future__ import annotations

import getpass
import json
import os
import signal
import socket
import subprocess
import threading
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:  # mlflow and pandas are imported lazily: disabled trackers never pay for them
    import pandas
    from mlflow import MlflowClient

__all__ = [
    "PRETRAIN_RUN_TAG",
    "GIT_COMMIT_TAG",
    "GIT_DIRTY_TAG",
    "TrackingUnavailableError",
    "Tracker",
    "check_tracking_uri",
    "default_tracking_uri",
    "resolve_tracking_uri",
    "flatten_params",
    "find_runs",
    "write_run_ref",
    "read_run_ref",
    "run_ref_path",
    "lineage_tags",
    "is_rank_zero",
    "close_stale_runs",
    "project_path",
    "ensure_group_run",
    "summarize_group",
    "EXPERIMENT_KIND",
    "Terminated",
    "client_uri",
    "mark_training_experiments",
]

#: Tag a finetuning / transfer run carries: the run id of the pretraining run it started from.
PRETRAIN_RUN_TAG = "mixmim.parent_pretrain_run"
GIT_COMMIT_TAG = "mixmim.git_commit"
GIT_DIRTY_TAG = "mixmim.git_dirty"
ERROR_TAG = "mixmim.error"
HOST_TAG = "mixmim.host"
PID_TAG = "mixmim.pid"
RESUMED_TAG = "mixmim.resumed"  # how many times the run was reopened after an interruption
GROUP_KEY_TAG = "mixmim.group_key"

#: ``mlflow.experimentKind``: MLflow 3's UI opens an experiment of this kind on its runs
#: (training), not on the GenAI overview of traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

#: SQLite waits this long for a lock held by another process (two queued DVC experiments
#: logging at once) before it reports "database is locked"; on top, writes are retried.
SQLITE_BUSY_TIMEOUT_S = 60
_LOCK_RETRIES = 8

# MLflow's own tag names (mlflow.utils.mlflow_tags); spelled out because they are part of
# the UI's contract and importing them would load mlflow even for disabled trackers.
_PARENT_RUN_ID_TAG = "mlflow.parentRunId"
_SOURCE_NAME_TAG = "mlflow.source.name"
_SOURCE_TYPE_TAG = "mlflow.source.type"
_SOURCE_GIT_COMMIT_TAG = "mlflow.source.git.commit"
_USER_TAG = "mlflow.user"

# Batch limits of MLflow's REST API (mlflow.utils.validation), mirrored as fallbacks.
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_FALLBACK_PARAM_VAL_LENGTH = 6000
_FALLBACK_TAG_VAL_LENGTH = 8000

_DB_FILE_NAME = "mlflow.db"
_ARTIFACTS_DIR_NAME = "mlartifacts"
_RUN_REF_KEYS = ("run_id", "experiment_id", "tracking_uri", "run_name")
_ADVICE = (
    "Start the MLflow server (e.g. `mlflow server --host 127.0.0.1 --port 5000`), or point the "
    "run at another store: set the tracking URI in the config or the MLFLOW_TRACKING_URI "
    "environment variable (a local store is `sqlite:////abs/path/mlflow.db`)."
)


class TrackingUnavailableError(RuntimeError):
    """The tracking store cannot be reached or written; raised before any training starts."""


# --------------------------------------------------------------------------- tracking URIs


def default_tracking_uri(root: Path | str | None = None) -> str:
    """The suite's default store: ``sqlite:///<abs root>/mlflow.db``.

    SQLite rather than MLflow's file store because the file store is deprecated and slow
    to search; the path is absolute so the URI means the same thing from every stage's
    working directory.
    """
    base = Path.cwd() if root is None else Path(root).expanduser()
    return f"sqlite:///{(base.resolve() / _DB_FILE_NAME).as_posix()}"


def resolve_tracking_uri(configured: str | None, root: Path | str | None = None) -> str:
    """Pick the URI a run logs to: the configured one, else ``$MLFLOW_TRACKING_URI``, else the default.

    The environment variable comes second so that a shared cluster setting can redirect
    every stage without editing configs, while an explicit config still wins.
    """
    if configured:
        return configured
    from_env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return from_env or default_tracking_uri(root)


_DVC_EXPS = (".dvc", "tmp", "exps")


def project_path(path: Path | str) -> Path:
    """``path``, or where it lies in the project when it lies in a DVC experiment workspace.

    ``dvc exp run --temp`` and queued experiments (``dvc exp run --queue``, ``dvc queue start``)
    run the pipeline in a copy of the project below ``<project>/.dvc/tmp/exps/``. A path that
    a params file gives relative to itself (the SQLite tracking store) would then name a file
    in the throw-away copy; this maps it back to the same place in the project, so every
    experiment logs to the project's store.
    """
    path = Path(path).absolute()
    parts = path.parts
    for i in range(len(parts) - len(_DVC_EXPS)):
        if parts[i:i + len(_DVC_EXPS)] != _DVC_EXPS:
            continue
        project, exps = Path(*parts[:i]), Path(*parts[:i + len(_DVC_EXPS)])
        workspace = path.parent
        while workspace != exps and not (workspace / ".dvc").is_dir():
            workspace = workspace.parent
        if workspace != exps:
            return project / path.relative_to(workspace)
    return path


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingUnavailableError` unless ``uri`` looks usable.

    * ``http(s)://``: ``GET <uri>/health`` must answer 200 within ``timeout`` seconds.
    * ``sqlite:///path``: the database's folder must exist or be creatable, and be writable.
    * ``file:`` URIs and plain paths: the store folder likewise.
    * Any other scheme (``postgresql://``, ``databricks``, ...) is accepted unchecked: MLflow
      supports many backends and a wrong guess here would block a valid setup; MLflow itself
      reports problems with those when the run is created.
    """
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_http(uri, timeout)
    elif scheme == "sqlite":
        db_path = _sqlite_path(uri)
        if db_path is not None:
            _check_writable_location(uri, db_path, expect="file")
    elif scheme == "file" or _is_plain_path(uri, scheme):
        _check_writable_location(uri, _local_store_path(uri), expect="dir")


def client_uri(uri: str) -> str:
    """The URI a client connects with: a SQLite store gets a busy timeout (``?timeout=``)
    unless it names one, so concurrent writers wait for each other instead of failing."""
    if urlparse(uri).scheme.lower() != "sqlite" or _sqlite_path(uri) is None or "timeout=" in uri:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}timeout={SQLITE_BUSY_TIMEOUT_S}"


def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=client_uri(uri))


def _retry(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; retry with backoff while the store reports a lock held by another writer."""
    for attempt in range(_LOCK_RETRIES):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - MlflowException or the driver's OperationalError
            if "locked" not in str(err).lower() or attempt == _LOCK_RETRIES - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)
    raise AssertionError("unreachable")


def _unavailable(uri: str, reason: str) -> TrackingUnavailableError:
    return TrackingUnavailableError(f"MLflow tracking URI {uri!r} is not usable: {reason}. {_ADVICE}")


def _check_http(uri: str, timeout: float) -> None:
    """An MLflow server answers ``OK`` on ``/health``; anything else means it is not one, or is down."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as err:
        raise _unavailable(uri, f"GET {url} answered HTTP {err.code}") from err
    except (urllib.error.URLError, OSError) as err:  # refused, DNS, TLS, timeout
        reason = getattr(err, "reason", err)
        raise _unavailable(uri, f"GET {url} failed ({reason}) within {timeout:g} s") from err
    if status != 200:
        raise _unavailable(uri, f"GET {url} answered HTTP {status}")


def _is_plain_path(uri: str, scheme: str) -> bool:
    """No scheme, or a Windows drive letter (``C:\\...`` parses as scheme ``c``)."""
    return scheme == "" or (len(scheme) == 1 and scheme.isalpha() and len(uri) > 1 and uri[1] == ":")


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite://`` URI, or None for an in-memory database."""
    rest = uri[len("sqlite://"):].split("?", 1)[0]
    if rest in ("", "/", "/:memory:"):
        return None
    return Path(unquote(rest[1:] if rest.startswith("/") else rest))


def _local_store_path(uri: str) -> Path:
    """The folder of a ``file:`` URI or plain-path store."""
    parsed = urlparse(uri)
    if parsed.scheme.lower() == "file":
        return Path(urllib.request.url2pathname(unquote(parsed.path)))
    return Path(uri).expanduser()


def _check_writable_location(uri: str, path: Path, expect: str) -> None:
    """``path`` (a file or folder MLflow will create) must be creatable and writable.

    Nothing is created: the nearest existing ancestor is probed with a temporary file,
    which (unlike ``os.access``) also catches read-only mounts when running as root.
    """
    path = path.absolute()
    if path.exists():
        if expect == "dir" and not path.is_dir():
            raise _unavailable(uri, f"{path} exists and is not a folder")
        if expect == "file" and path.is_dir():
            raise _unavailable(uri, f"{path} is a folder, not a database file")
    folder = path if expect == "dir" else path.parent
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise _unavailable(uri, f"{folder} cannot be created because {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise _unavailable(uri, f"{existing} is not writable ({err.strerror or err})") from err


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


# --------------------------------------------------------------------------- parameters


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested configs to MLflow params: ``{"model": {"embed_dim": 96}}`` -> ``{"model.embed_dim": "96"}``.

    MLflow params are flat strings; dotted keys keep the config structure searchable
    (``params.model.embed_dim = '96'``). List items get their index as key part, empty
    containers are kept as ``"{}"``/``"[]"`` so that their presence is still recorded.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        _flatten_into(flat, f"{prefix}{key}", value)
    return flat


def _flatten_into(flat: dict[str, str], key: str, value: Any) -> None:
    children: Iterator[tuple[Any, Any]] | None = None
    if isinstance(value, Mapping) and value:
        children = iter(value.items())
    elif isinstance(value, (list, tuple)) and value:
        children = iter(enumerate(value))
    if children is None:
        if key in flat:
            raise ValueError(f"parameter {key!r} appears twice after flattening nested keys")
        flat[key] = _param_string(value)
        return
    for child_key, child in children:
        _flatten_into(flat, f"{key}.{child_key}", child)


def _param_string(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, (list, tuple)):
        return "[]"
    return str(value)


def _truncate(value: str, limit: int) -> str:
    """Cut a value to MLflow's limit ourselves: MLflow 3 truncates with a warning per value,
    older clients and servers reject the whole batch; a visible ``...`` marks the cut."""
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _mlflow_limit(name: str, fallback: int) -> int:
    try:
        from mlflow.utils import validation
    except ImportError:  # pragma: no cover - layout of mlflow internals changed
        return fallback
    return int(getattr(validation, name, fallback))


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --------------------------------------------------------------------------- run context


def _git(*args: str) -> str | None:
    """Output of a git command in the working directory, or None where git is unavailable."""
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _context_tags() -> dict[str, str]:
    """Tags every run gets: the code version (commit and dirtiness) and the entry point."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain") if commit != "unknown" else None
    dirty = "unknown" if status is None else str(bool(status)).lower()
    source = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else "unknown"
    tags = {
        GIT_COMMIT_TAG: commit,
        GIT_DIRTY_TAG: dirty,
        _SOURCE_NAME_TAG: source,
        _SOURCE_TYPE_TAG: "LOCAL",
        _USER_TAG: _user(),
    }
    if commit != "unknown":
        tags[_SOURCE_GIT_COMMIT_TAG] = commit  # shown natively by the MLflow UI
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def is_rank_zero() -> bool:
    """Whether this process should track: rank 0 of torch.distributed, or of ``$RANK`` before init.

    Pass it as ``Tracker(..., enabled=is_rank_zero())`` so only one process per job logs.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0").strip() in ("", "0")


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a SQLite store keeps artifacts: beside the database.

    MLflow's default for a SQLite store is ``./mlruns`` relative to the *current working
    directory*, which scatters artifacts over wherever each stage happened to be started.
    """
    if urlparse(uri).scheme.lower() != "sqlite":
        return None  # servers and file stores choose well themselves
    db_path = _sqlite_path(uri)
    if db_path is None:
        return None
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment) or "default"
    return (db_path.absolute().parent / _ARTIFACTS_DIR_NAME / slug).as_uri()


# --------------------------------------------------------------------------- tracker


class Tracker:
    """One MLflow run, open for the duration of a ``with`` block.

    >>> with Tracker(uri, "pretrain", "mixmim-b-300ep", enabled=is_rank_zero()) as t:
    ...     t.log_params(config)
    ...     for step, loss in enumerate(losses):
    ...         t.log_metrics({"loss": loss}, step=step)

    The run ends ``FINISHED`` when the block completes, ``KILLED`` on Ctrl-C and ``FAILED``
    on any other exception, which still propagates. With ``enabled=False`` every method
    does nothing and :attr:`run_id` is None.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        enabled: bool = True,
        resume_run_id: str | None = None,
    ) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.enabled = enabled
        self._tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self._parent_run_id = parent_run_id
        self._resume_run_id = resume_run_id
        self._client: MlflowClient | None = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._previous_sigterm: Any = None
        self.resumed = False

    # -- properties

    @property
    def run_id(self) -> str | None:
        """The MLflow run id while (and after) the run is open; None when disabled."""
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    @property
    def active(self) -> bool:
        """True between entering and leaving the ``with`` block of an enabled tracker."""
        return self._client is not None

    # -- lifecycle

    def __enter__(self) -> Tracker:
        if not self.enabled:
            return self
        if self._run_id is not None:
            raise RuntimeError("a Tracker opens one run; create a new Tracker for another run")
        check_tracking_uri(self.uri)
        _prepare_local_store(self.uri)
        client = _client(self.uri)
        self._experiment_id = _get_or_create_experiment(client, self.uri, self.experiment)
        close_stale_runs(self.uri, self.experiment, client=client)
        tags = {**_context_tags(), **self._tags, **_process_tags()}
        if self._parent_run_id is not None:
            client.get_run(self._parent_run_id)  # a wrong parent id fails now, not in the UI later
            tags[_PARENT_RUN_ID_TAG] = self._parent_run_id
        run_id = self._reopen(client, tags)
        if run_id is None:
            run_id = _retry(client.create_run, self._experiment_id, tags=tags, run_name=self.run_name).info.run_id
        self._run_id = run_id
        self._client = client
        self._catch_sigterm()
        return self

    def _reopen(self, client: MlflowClient, tags: Mapping[str, str]) -> str | None:
        """Reopen ``resume_run_id`` (a run interrupted before it finished) as RUNNING; None when
        there is no such run in this experiment, or it finished, or it was deleted."""
        if not self._resume_run_id:
            return None
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(self._resume_run_id)
        except MlflowException:
            return None
        info = run.info
        if (info.experiment_id != self._experiment_id or info.lifecycle_stage != "active"
                or info.status == "FINISHED"):
            return None
        count = int(run.data.tags.get(RESUMED_TAG, "0") or 0) + 1
        entries = [RunTag(k, v) for k, v in {**tags, RESUMED_TAG: str(count)}.items()]
        for chunk in _chunks(entries, _MAX_PARAMS_PER_BATCH):
            _retry(client.log_batch, info.run_id, tags=chunk)
        _retry(client.update_run, info.run_id, status="RUNNING")
        self.resumed = True
        return info.run_id

    def _catch_sigterm(self) -> None:
        """SIGTERM (``kill``, a scheduler's preemption, ``dvc queue kill``) ends the run KILLED
        like Ctrl-C does, instead of leaving it RUNNING; main thread only (Python's rule)."""
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
        except ValueError:  # pragma: no cover - not the main interpreter
            self._previous_sigterm = None

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        client, self._client = self._client, None
        self._restore_sigterm()
        if client is None or self._run_id is None:
            return False
        status = _final_status(exc_type)
        try:
            if exc is not None:
                _retry(client.set_tag, self._run_id, ERROR_TAG, _truncate(f"{exc_type.__name__}: {exc}", 500))
            _retry(client.set_terminated, self._run_id, status=status)
        except Exception as err:  # noqa: BLE001 - never mask the training error with a logging error
            if exc is None:
                raise
            print(f"mixmim.tracking: could not mark run {self._run_id} {status}: {err}", file=sys.stderr)
        return False

    # -- logging

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (nested) config as flat, stringified params, in batches MLflow accepts."""
        client = self._require()
        if client is None:
            return
        from mlflow.entities import Param

        limit = _mlflow_limit("MAX_PARAM_VAL_LENGTH", _FALLBACK_PARAM_VAL_LENGTH)
        entries = [Param(k, _truncate(v, limit)) for k, v in flatten_params(params).items()]
        if self.resumed:  # MLflow params are write-once: keep the first value of the interrupted run
            logged = client.get_run(self._run_id).data.params
            changed = sorted(e.key for e in entries if e.key in logged and logged[e.key] != e.value)
            if changed:
                print(f"mixmim.tracking: resumed run {self._run_id} keeps its first value of {', '.join(changed)}",
                      file=sys.stderr)
            entries = [e for e in entries if e.key not in logged]
        for chunk in _chunks(entries, _MAX_PARAMS_PER_BATCH):
            _retry(client.log_batch, self._run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log metric values at ``step`` (0 when None); None values are skipped, NaN/inf kept.

        Values may be anything ``float()`` accepts (Python numbers, 0-d tensors, NumPy scalars),
        so a training loop can pass ``loss.detach()`` directly.
        """
        client = self._require()
        if client is None:
            return
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = [
            Metric(str(key), float(value), timestamp, 0 if step is None else int(step))
            for key, value in metrics.items()
            if value is not None
        ]
        for chunk in _chunks(entries, _MAX_METRICS_PER_BATCH):
            _retry(client.log_batch, self._run_id, metrics=chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Add or overwrite run tags (values stringified and truncated to MLflow's limit)."""
        client = self._require()
        if client is None or not tags:
            return
        from mlflow.entities import RunTag

        limit = _mlflow_limit("MAX_TAG_VAL_LENGTH", _FALLBACK_TAG_VAL_LENGTH)
        entries = [RunTag(str(k), _truncate(str(v), limit)) for k, v in tags.items()]
        for chunk in _chunks(entries, _MAX_PARAMS_PER_BATCH):
            _retry(client.log_batch, self._run_id, tags=chunk)

    def log_dict(self, obj: Mapping[str, Any], artifact_file: str) -> None:
        """Store ``obj`` as an artifact: YAML for ``.yaml``/``.yml`` files, JSON otherwise."""
        client = self._require()
        if client is not None:
            client.log_dict(self._run_id, dict(obj), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        client = self._require()
        if client is not None:
            client.log_text(self._run_id, text, artifact_file)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy a local file or folder into the run's artifacts (under ``artifact_path``)."""
        client = self._require()
        if client is not None:
            client.log_artifact(self._run_id, os.fspath(path), artifact_path)

    def _require(self) -> MlflowClient | None:
        """The client, None when disabled; logging outside the ``with`` block is a bug."""
        if not self.enabled:
            return None
        if self._client is None:
            raise RuntimeError("Tracker is not open: log inside `with Tracker(...) as tracker:`")
        return self._client


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM while a run is open: the run ends KILLED."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"terminated by signal {signal.Signals(signum).name}")


def _process_tags() -> dict[str, str]:
    """Which process holds the run, so a later run can tell whether it is still alive."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def close_stale_runs(uri: str, experiment: str, client: MlflowClient | None = None) -> list[str]:
    """Mark ``KILLED`` the RUNNING runs of ``experiment`` whose process (this host's ``mixmim.pid``)
    no longer exists: what a SIGKILL, an OOM kill or a power cut leaves behind. Runs of other
    hosts and runs without a recorded process are left alone. Returns the ids it closed."""
    client = client or _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    host = socket.gethostname()
    closed = []
    for run in _search_all(client, found.experiment_id, "attributes.status = 'RUNNING'", None, 10_000):
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if tags.get(HOST_TAG) != host or not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        _retry(client.set_tag, run.info.run_id, ERROR_TAG, f"process {pid} on {host} ended without closing the run")
        _retry(client.set_terminated, run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


def ensure_group_run(uri: str, experiment: str, run_name: str, key: str, tags: Mapping[str, str]) -> str:
    """The id of the experiment's group run identified by ``key`` (e.g. one variant of a pipeline,
    whose seeds are its child runs), created FINISHED if missing.

    Stages of one DVC invocation may run at once (``dvc queue start -j 2``); a lock file beside a
    SQLite store (else in the temp folder) makes find-or-create atomic on this machine.
    """
    _prepare_local_store(uri)
    client = _client(uri)
    experiment_id = _get_or_create_experiment(client, uri, experiment)
    lock = _group_lock_path(uri)
    with _file_lock(lock):
        flt = f"tags.`{GROUP_KEY_TAG}` = '{key}'"
        existing = _search_all(client, experiment_id, flt, ["attributes.start_time ASC"], 1)
        if existing:
            return existing[0].info.run_id
        all_tags = {**{str(k): str(v) for k, v in tags.items()}, GROUP_KEY_TAG: key, **_context_tags()}
        run = _retry(client.create_run, experiment_id, tags=all_tags, run_name=run_name)
        _retry(client.set_terminated, run.info.run_id, status="FINISHED")
        return run.info.run_id


def summarize_group(uri: str, group_run_id: str) -> dict[str, float]:
    """Log on a group run the mean and sample standard deviation over its FINISHED children (the
    seeds) of each ``final/*`` metric, as ``seeds/<name>`` and ``seeds/<name>_std``, and their
    number as ``seeds/n``: the group's row in the runs table compares variants across seeds."""
    import statistics

    client = _client(uri)
    group = client.get_run(group_run_id)
    flt = f"tags.`{_PARENT_RUN_ID_TAG}` = '{group_run_id}' and attributes.status = 'FINISHED'"
    children = _search_all(client, group.info.experiment_id, flt, None, 10_000)
    values: dict[str, list[float]] = {}
    for child in children:
        for key, value in child.data.metrics.items():
            if key.startswith("final/"):
                values.setdefault(key[len("final/"):], []).append(value)
    summary: dict[str, float] = {"seeds/n": float(len(children))}
    for key, vals in values.items():
        summary[f"seeds/{key}"] = statistics.fmean(vals)
        summary[f"seeds/{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    _retry(client.log_batch, group_run_id, metrics=[Metric(k, v, stamp, 0) for k, v in summary.items()])
    return summary


def _group_lock_path(uri: str) -> Path:
    db = _sqlite_path(uri) if urlparse(uri).scheme.lower() == "sqlite" else None
    if db is not None:
        return db.absolute().with_name(db.name + ".groups.lock")
    import hashlib

    digest = hashlib.sha1(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mixmim-groups-{digest}.lock"


class _file_lock:
    """An exclusive ``flock`` on ``path`` for the ``with`` block (POSIX; elsewhere no lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: Any = None

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a")  # noqa: SIM115 - closed in __exit__
        try:
            import fcntl

            fcntl.flock(self._fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows
            pass

    def __exit__(self, *exc: Any) -> None:
        self._fh.close()  # releases the lock


def _final_status(exc_type: type[BaseException] | None) -> str:
    if exc_type is None:
        return "FINISHED"
    if issubclass(exc_type, KeyboardInterrupt):
        return "KILLED"
    return "FAILED"


def _prepare_local_store(uri: str) -> None:
    """Create the folder of a SQLite database; SQLite itself refuses a missing folder."""
    if urlparse(uri).scheme.lower() == "sqlite":
        db_path = _sqlite_path(uri)
        if db_path is not None:
            db_path.absolute().parent.mkdir(parents=True, exist_ok=True)


def _get_or_create_experiment(client: MlflowClient, uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing (tolerating a concurrent creator)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return _retry(client.create_experiment, name, artifact_location=_artifact_location(uri, name),
                          tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # another rank/job created it first
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingUnavailableError(
            f"MLflow experiment {name!r} in {uri!r} is deleted; restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or use another name"
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # a store created before the kind was set
        _retry(client.set_experiment_tag, experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def mark_training_experiments(uri: str) -> list[str]:
    """Give every active experiment of the store that has no kind yet the training kind, so the
    UI opens on its runs; returns the names it tagged (``make mlflow-ui`` calls this first)."""
    client = _client(uri)
    tagged = []
    for experiment in client.search_experiments():
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            _retry(client.set_experiment_tag, experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            tagged.append(experiment.name)
    return tagged


# --------------------------------------------------------------------------- lineage


def find_runs(
    uri: str,
    experiment: str,
    filter_string: str = "",
    order_by: Sequence[str] | None = None,
    max_results: int = 1000,
) -> pandas.DataFrame:
    """Runs of ``experiment`` as a DataFrame, in the column layout of ``mlflow.search_runs``.

    ``mlflow.search_runs`` has no tracking-URI argument (it reads the global one), so the
    pages come from an explicit ``MlflowClient(uri)`` and are tabulated here: columns
    ``run_id, run_name, experiment_id, status, artifact_uri, start_time, end_time`` plus
    ``metrics.*``, ``params.*`` and ``tags.*``. An unknown experiment gives an empty frame.
    """
    import pandas as pd

    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    runs = [] if found is None else _search_all(client, found.experiment_id, filter_string, order_by, max_results)
    rows = [_run_row(run) for run in runs]
    columns = ["run_id", "run_name", "experiment_id", "status", "artifact_uri", "start_time", "end_time"]
    frame = pd.DataFrame(rows, columns=None if rows else columns)
    for column in ("start_time", "end_time"):
        frame[column] = pd.to_datetime(frame[column], unit="ms", utc=True)
    return frame


def _search_all(
    client: MlflowClient, experiment_id: str, filter_string: str, order_by: Sequence[str] | None, max_results: int
) -> list[Any]:
    runs: list[Any] = []
    token: str | None = None
    while len(runs) < max_results:
        page = client.search_runs(
            [experiment_id], filter_string, max_results=min(1000, max_results - len(runs)),
            order_by=list(order_by) if order_by else None, page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def _run_row(run: Any) -> dict[str, Any]:
    info, data = run.info, run.data
    row: dict[str, Any] = {
        "run_id": info.run_id,
        "run_name": info.run_name,
        "experiment_id": info.experiment_id,
        "status": info.status,
        "artifact_uri": info.artifact_uri,
        "start_time": info.start_time,
        "end_time": info.end_time,
    }
    row.update({f"metrics.{k}": v for k, v in data.metrics.items()})
    row.update({f"params.{k}": v for k, v in data.params.items()})
    row.update({f"tags.{k}": v for k, v in data.tags.items()})
    return row


def run_ref_path(checkpoint: str | os.PathLike[str]) -> Path:
    """Where the run reference of ``checkpoint`` lives: ``<checkpoint>.run.json`` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".run.json")


def write_run_ref(path: str | os.PathLike[str], tracker: Tracker) -> Path | None:
    """Record which run produced a checkpoint, so later stages can link their runs to it.

    Written atomically (temporary file, then ``os.replace``) so a crash never leaves a
    half-written reference. A disabled tracker (non-zero rank) writes nothing and returns None.
    """
    if not tracker.enabled:
        return None
    if tracker.run_id is None:
        raise RuntimeError("write_run_ref needs a tracker whose run has been started")
    ref = {
        "run_id": tracker.run_id,
        "experiment_id": tracker.experiment_id,
        "tracking_uri": tracker.uri,
        "run_name": tracker.run_name,
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(ref, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_run_ref(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a run reference written by :func:`write_run_ref`; a malformed one is a ValueError."""
    try:
        ref = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"run reference {path} is not valid JSON: {err}") from err
    missing = [key for key in _RUN_REF_KEYS if not isinstance(ref, dict) or not ref.get(key)]
    if missing:
        raise ValueError(f"run reference {path} lacks {', '.join(missing)}")
    return {key: str(ref[key]) for key in _RUN_REF_KEYS}


def lineage_tags(pretrain_ref: Mapping[str, str]) -> dict[str, str]:
    """Tags that link a finetuning/transfer run to the pretraining run of its checkpoint."""
    return {PRETRAIN_RUN_TAG: pretrain_ref["run_id"]}
