"""The MLflow layer on a real SQLite store (one per module: its first use runs migrations)."""

from __future__ import annotations

import http.server
import json
import math
import socket
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from mixmim.tracking import (
    GIT_COMMIT_TAG,
    GIT_DIRTY_TAG,
    PRETRAIN_RUN_TAG,
    Tracker,
    TrackingUnavailableError,
    check_tracking_uri,
    default_tracking_uri,
    find_runs,
    flatten_params,
    lineage_tags,
    read_run_ref,
    resolve_tracking_uri,
    run_ref_path,
    write_run_ref,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, MlflowClient]:
    """A migrated SQLite store shared by the module; each test uses its own experiment."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = default_tracking_uri(folder)
    client = MlflowClient(tracking_uri=uri)
    client.search_experiments()  # runs the migrations once
    return uri, client


def _experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    return experiment.experiment_id


def test_run_records_name_tags_params_metrics_and_artifacts(store: tuple[str, MlflowClient]) -> None:
    uri, client = store
    config = {"model": {"embed_dim": 96, "depths": [2, 2, 6, 2]}, "lr": 1.5e-4, "note": "x" * 7000}
    with Tracker(uri, "pretrain", "mixmim-b", tags={"stage": "pretrain"}) as tracker:
        tracker.log_params(config)
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "skipped": None}, step=step)
        tracker.log_dict({"a": 1}, "config.yaml")
        tracker.log_text("hello", "notes/readme.txt")
        run_id = tracker.run_id

    run = client.get_run(run_id)
    assert run.info.experiment_id == _experiment(client, "pretrain")
    assert run.info.run_name == "mixmim-b"
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "pretrain"
    assert run.data.tags[GIT_COMMIT_TAG]
    assert run.data.tags[GIT_DIRTY_TAG] in {"true", "false", "unknown"}
    assert "mlflow.source.name" in run.data.tags
    params = run.data.params
    assert params["model.embed_dim"] == "96"
    assert params["model.depths.2"] == "6"
    assert params["lr"] == "0.00015"
    assert len(params["note"]) == 6000 and params["note"].endswith("...")
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert client.get_metric_history(run_id, "skipped") == []
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert artifacts == {"config.yaml", "notes"}
    # Artifacts live beside the database, not in the working directory.
    db_folder = Path(uri.removeprefix("sqlite:///")).parent
    assert (db_folder / "mlartifacts").is_dir()
    assert run.info.artifact_uri.startswith(db_folder.as_uri())


def test_many_params_are_batched_and_nan_metrics_kept(store: tuple[str, MlflowClient]) -> None:
    uri, client = store
    with Tracker(uri, "batching", "wide") as tracker:
        tracker.log_params({f"p{i}": i for i in range(250)})
        tracker.log_metrics({"nan": float("nan"), "ok": 2.0})
    data = client.get_run(tracker.run_id).data
    assert len(data.params) == 250
    assert math.isnan(data.metrics["nan"]) and data.metrics["ok"] == 2.0


def test_exception_marks_run_failed_and_propagates(store: tuple[str, MlflowClient]) -> None:
    uri, client = store
    with pytest.raises(ValueError, match="diverged"):
        with Tracker(uri, "failures", "boom") as tracker:
            raise ValueError("loss diverged")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert "diverged" in run.data.tags["mixmim.error"]


def test_keyboard_interrupt_marks_run_killed(store: tuple[str, MlflowClient]) -> None:
    uri, client = store
    with pytest.raises(KeyboardInterrupt):
        with Tracker(uri, "failures", "ctrl-c") as tracker:
            raise KeyboardInterrupt
    assert client.get_run(tracker.run_id).info.status == "KILLED"


def test_child_run_is_nested_under_parent(store: tuple[str, MlflowClient]) -> None:
    uri, client = store
    with Tracker(uri, "nesting", "sweep") as parent:
        with Tracker(uri, "nesting", "trial-0", parent_run_id=parent.run_id) as child:
            child.log_metrics({"acc": 0.5})
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert "mlflow.parentRunId" not in client.get_run(parent.run_id).data.tags


def test_disabled_tracker_does_nothing(tmp_path: Path) -> None:
    db = tmp_path / "store" / "mlflow.db"
    for uri in (f"sqlite:///{db}", f"http://127.0.0.1:{_free_port()}"):
        with Tracker(uri, "x", "rank1", enabled=False) as tracker:
            tracker.log_params({"a": {"b": 1}})
            tracker.log_metrics({"loss": 1.0}, step=1)
            tracker.set_tags({"t": "v"})
            tracker.log_dict({"a": 1}, "a.json")
            tracker.log_text("t", "t.txt")
            tracker.log_artifact(tmp_path)
        assert tracker.run_id is None
        assert write_run_ref(tmp_path / "ref.json", tracker) is None
    assert list(tmp_path.iterdir()) == []


def test_logging_outside_the_with_block_is_an_error(store: tuple[str, MlflowClient]) -> None:
    with pytest.raises(RuntimeError, match="not open"):
        Tracker(store[0], "x", "y").log_metrics({"loss": 1.0})


def test_unreachable_server_fails_fast_naming_the_uri() -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=uri.replace(".", r"\.")):
        check_tracking_uri(uri, timeout=2.0)
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize(("code", "ok"), [(200, True), (503, False)])
def test_server_health_endpoint_decides(code: int, ok: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with _health_server(code) as uri:
        if ok:
            check_tracking_uri(uri + "/")
        else:
            with pytest.raises(TrackingUnavailableError, match="HTTP 503"):
                check_tracking_uri(uri)


def test_local_store_locations_are_checked_without_creating_them(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(TrackingUnavailableError, match="is a file"):
        check_tracking_uri(f"sqlite:///{blocker}/mlflow.db")
    with pytest.raises(TrackingUnavailableError, match="not a folder"):
        check_tracking_uri(f"file://{blocker}")
    check_tracking_uri(f"sqlite:///{tmp_path}/new/deeper/mlflow.db")
    check_tracking_uri(str(tmp_path / "mlruns"))
    check_tracking_uri("postgresql://user@db.invalid/mlflow")  # other backends: MLflow's call
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_tracking_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == default_tracking_uri(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == default_tracking_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(None) == "http://mlflow.example:5000"
    assert resolve_tracking_uri("sqlite:////x/mlflow.db") == "sqlite:////x/mlflow.db"


def test_flatten_params() -> None:
    flat = flatten_params({"a": {"b": 1, "c": [True, None]}, "d": {}, "e": [], "f": Path("x")})
    assert flat == {"a.b": "1", "a.c.0": "True", "a.c.1": "None", "d": "{}", "e": "[]", "f": "x"}
    with pytest.raises(ValueError, match="twice"):
        flatten_params({"a.b": 1, "a": {"b": 2}})


def test_run_ref_round_trip_and_lineage(store: tuple[str, MlflowClient], tmp_path: Path) -> None:
    uri, client = store
    checkpoint = tmp_path / "ckpt" / "pretrain.pth"
    with Tracker(uri, "lineage", "pretrain") as pretrain:
        written = write_run_ref(run_ref_path(checkpoint), pretrain)
    assert written == tmp_path / "ckpt" / "pretrain.pth.run.json"
    assert [p.name for p in written.parent.iterdir()] == [written.name]  # no temporary left behind
    ref = read_run_ref(written)
    assert ref == {
        "run_id": pretrain.run_id,
        "experiment_id": pretrain.experiment_id,
        "tracking_uri": uri,
        "run_name": "pretrain",
    }
    with Tracker(uri, "lineage", "finetune", tags=lineage_tags(ref)) as finetune:
        pass
    assert client.get_run(finetune.run_id).data.tags[PRETRAIN_RUN_TAG] == pretrain.run_id

    written.write_text(json.dumps({"run_id": "abc"}))
    with pytest.raises(ValueError, match="experiment_id"):
        read_run_ref(written)


def test_find_runs_returns_a_dataframe(store: tuple[str, MlflowClient]) -> None:
    uri, _ = store
    with Tracker(uri, "searching", "a") as first:
        first.log_params({"model": {"size": "base"}})
        first.log_metrics({"top1": 83.2})
    with Tracker(uri, "searching", "b"):
        pass
    frame = find_runs(uri, "searching", filter_string="params.`model.size` = 'base'")
    assert isinstance(frame, pd.DataFrame)
    assert frame["run_id"].tolist() == [first.run_id]
    assert frame.loc[0, "metrics.top1"] == pytest.approx(83.2)
    assert frame.loc[0, "run_name"] == "a" and frame.loc[0, "status"] == "FINISHED"
    assert len(find_runs(uri, "searching")) == 2
    empty = find_runs(uri, "no-such-experiment")
    assert empty.empty and "run_id" in empty.columns


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Health(http.server.BaseHTTPRequestHandler):
    code = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = b"OK" if self.path == "/health" and self.code == 200 else b"no"
        self.send_response(self.code if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _health_server:  # noqa: N801 - used like a function
    """A local server answering ``/health`` with a fixed status code."""

    def __init__(self, code: int) -> None:
        handler = type("Handler", (_Health,), {"code": code})
        self._server = http.server.HTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
