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


# --------------------------------------------------------------------------- lifecycle (issue 14)
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import yaml  # noqa: E402

from mixmim.tracking import (  # noqa: E402
    EXPERIMENT_KIND, PID_TAG, client_uri, close_stale_runs, mark_training_experiments, project_path,
)

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_experiments_are_created_as_training_experiments(store: tuple[str, MlflowClient]) -> None:
    uri, client = store
    with Tracker(uri, "kind-new", "run"):
        pass
    assert client.get_experiment_by_name("kind-new").tags["mlflow.experimentKind"] == EXPERIMENT_KIND
    old = client.create_experiment("kind-old")  # made by something else, without the tag
    assert "kind-old" in mark_training_experiments(uri)
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_sigterm_ends_the_run_killed(store: tuple[str, MlflowClient]) -> None:
    uri, client = store
    proc = _python("""
        import sys, time
        from mixmim.tracking import Tracker
        with Tracker(sys.argv[1], "sigterm", "long") as t:
            print(t.run_id, flush=True)
            time.sleep(60)
    """, uri)
    run_id = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.end_time is not None


def test_a_run_whose_process_died_is_closed_killed_by_the_next_run(store: tuple[str, MlflowClient]) -> None:
    uri, client = store
    proc = _python("""
        import os, signal, sys
        from mixmim.tracking import Tracker
        t = Tracker(sys.argv[1], "stale", "doomed").__enter__()
        print(t.run_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """, uri)
    run_id = proc.stdout.readline().strip()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody could close it
    with Tracker(uri, "stale", "next") as live:
        assert client.get_run(run_id).info.status == "KILLED"
        assert close_stale_runs(uri, "stale") == []  # the live run (this process) is left alone
    assert client.get_run(live.run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.tags[PID_TAG] == str(proc.pid)


def test_resume_run_id_reopens_an_interrupted_run_but_not_a_finished_one(store: tuple[str, MlflowClient]) -> None:
    uri, client = store
    with pytest.raises(KeyboardInterrupt):
        with Tracker(uri, "reopen", "first") as first:
            first.log_params({"lr": 0.1, "workers": 2})
            first.log_metrics({"loss": 1.0}, step=1)
            raise KeyboardInterrupt
    with Tracker(uri, "reopen", "first", resume_run_id=first.run_id) as again:
        again.log_params({"lr": 0.1, "workers": 4, "new": 1})  # a changed value keeps the first one
        again.log_metrics({"loss": 0.5}, step=2)
    assert again.run_id == first.run_id and again.resumed
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mixmim.resumed"] == "1"
    assert run.data.params == {"lr": "0.1", "workers": "2", "new": "1"}
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2]
    with Tracker(uri, "reopen", "first", resume_run_id=first.run_id) as third:
        pass
    assert third.run_id != first.run_id and not third.resumed


def test_two_processes_log_to_one_sqlite_store_at_once(tmp_path: Path) -> None:
    """Two queued DVC experiments (`dvc queue start -j 2`) write to the project's store together."""
    uri = default_tracking_uri(tmp_path)
    assert client_uri(uri).endswith("?timeout=60")
    MlflowClient(uri).search_experiments()  # migrations once, as a prior run would have done
    code = """
        import sys
        from mixmim.tracking import Tracker
        with Tracker(sys.argv[1], "concurrent", sys.argv[2]) as t:
            for step in range(150):
                t.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
                t.set_tags({"last": str(step)})
    """
    procs = [_python(code, uri, name) for name in ("a", "b")]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert "locked" not in err
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["a", "b"]
    assert all(len(client.get_metric_history(r.info.run_id, "loss")) == 150 for r in runs)


def test_a_store_inside_a_dvc_experiment_workspace_maps_to_the_project(tmp_path: Path) -> None:
    workspace = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc"
    (workspace / ".dvc").mkdir(parents=True)
    assert project_path(workspace / "mlflow.db") == tmp_path / "project" / "mlflow.db"
    assert project_path(workspace / "pipelines" / "x" / "y.db") == tmp_path / "project" / "pipelines" / "x" / "y.db"
    assert project_path(tmp_path / "elsewhere" / "mlflow.db") == tmp_path / "elsewhere" / "mlflow.db"


def test_a_killed_and_resumed_pretraining_is_one_finished_run(tmp_path: Path) -> None:
    """SIGKILL mid-run, then the same stage again: one MLflow run, FINISHED, with every step once
    before the kill's checkpoint and the rest after it (a continuous curve)."""
    from mixmim.data.builtin import write_imagenet

    write_imagenet(tmp_path / "imagenet", seed=0, image_size=64, num_classes=2, train_per_class=8, val_per_class=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "roots": {"imagenet": "imagenet"},
        "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "resume", "pipeline": "tests"},
        "pretrain": {"model": "mixmim_nano", "epochs": 2, "warmup_epochs": 0, "batch_size": 4, "num_workers": 0,
                     "log_every_steps": 1, "progress": False},
    }))
    argv = [sys.executable, str(REPO / "stages" / "pretrain.py"), "--params", "params.yaml", "--seed", "0",
            "--run-dir", "runs/pre", "--metrics", "m.json", "--plots", "p.csv"]
    env = {**os.environ, "MIXMIM_PARENT_RUN_ID": ""}
    killed = subprocess.run(argv, cwd=tmp_path, env={**env, "MIXMIM_KILL_AT_STEP": "6"}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id],
                              "attributes.run_name = 'pretrain/default/s0'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["mixmim.resumed"] == "1"
    assert json.loads((tmp_path / "m.json").read_text())["run_id"] == run.info.run_id
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(set(steps)) == list(range(1, 9))  # 2 epochs x 4 steps, none missing
    # steps 5-6 ran before the kill and again after the resume from the epoch-1 checkpoint
    assert sorted(steps) == [1, 2, 3, 4, 5, 5, 6, 6, 7, 8]
