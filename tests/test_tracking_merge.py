"""merge_runs on tiny SQLite stores: what a copy keeps, how groups of seeds join, what it refuses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from mixmim.cli import main
from mixmim.tracking import (
    _PARENT_RUN_ID_TAG,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    GROUP_KEY_TAG,
    PRETRAIN_RUN_TAG,
    ensure_group_run,
)
from mixmim.tracking_merge import COPIED_FROM_TAG, MergeError, merge_runs, store_uri

EXP = "ablations"


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One freshly created MLflow database: creating its schema takes seconds, copying it none."""
    folder = tmp_path_factory.mktemp("template")
    MlflowClient(_uri(folder)).search_experiments()
    return folder / "mlflow.db"


@pytest.fixture
def stores(tmp_path: Path, empty_db: Path) -> tuple[str, str]:
    """Source and destination stores (``a/`` and ``b/`` below tmp_path), empty but existing."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copyfile(empty_db, tmp_path / name / "mlflow.db")
    return _uri(tmp_path / "a"), _uri(tmp_path / "b")


def _uri(folder: Path) -> str:
    return f"sqlite:///{(folder / 'mlflow.db').as_posix()}"


def _experiment_id(client: MlflowClient, name: str = EXP) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


def _seed_run(uri: str, parent: str, seed: int, top1: float, experiment: str = EXP) -> str:
    """A finished seed run under ``parent`` with a final/top1 metric, as a pipeline stage leaves it."""
    client = MlflowClient(uri)
    run = client.create_run(_experiment_id(client, experiment), run_name=f"finetune/v/s{seed}",
                            tags={_PARENT_RUN_ID_TAG: parent, "mixmim.seed": str(seed)})
    client.log_metric(run.info.run_id, "final/top1", top1)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _runs(uri: str, experiment: str = EXP) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], max_results=1000)


def test_copy_keeps_history_params_tags_and_artifacts(tmp_path: Path, stores: tuple[str, str]) -> None:
    src, dst = stores
    client = MlflowClient(src)
    run = client.create_run(_experiment_id(client), start_time=1_000, run_name="pretrain/default/s0",
                            tags={"mixmim.stage": "pretrain"})
    run_id = run.info.run_id
    # 1200 values of one metric: more than one log_batch of 1000, steps not starting at 0
    history = [Metric("loss", 1.0 / (i + 1), 5_000 + i, 10 + 2 * i) for i in range(1200)]
    client.log_batch(run_id, metrics=history[:1000])
    client.log_batch(run_id, metrics=history[1000:])
    client.log_metric(run_id, "final/top1", 42.5, timestamp=9_000, step=3)
    client.log_param(run_id, "lr", "0.001")
    client.log_param(run_id, "model", "mixmim_b")
    client.log_text(run_id, "hello", "notes/readme.txt")
    client.set_terminated(run_id, "FAILED", end_time=20_000)

    summary = merge_runs(src, dst)

    assert (summary.copied, summary.skipped, summary.experiments) == (1, 0, [EXP])
    dst_client = MlflowClient(dst)
    experiment = dst_client.get_experiment_by_name(EXP)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    [copy] = _runs(dst)
    assert copy.info.run_id != run_id
    assert (copy.info.run_name, copy.info.status) == ("pretrain/default/s0", "FAILED")
    assert (copy.info.start_time, copy.info.end_time) == (1_000, 20_000)
    assert copy.data.params == {"lr": "0.001", "model": "mixmim_b"}
    assert copy.data.tags["mixmim.stage"] == "pretrain"
    assert copy.data.tags[COPIED_FROM_TAG].endswith(f"#{run_id}")
    for key in ("loss", "final/top1"):
        before = [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)]
        after = [(m.step, m.value, m.timestamp) for m in dst_client.get_metric_history(copy.info.run_id, key)]
        assert sorted(after) == sorted(before)
    assert len(dst_client.get_metric_history(copy.info.run_id, "loss")) == 1200
    local = dst_client.download_artifacts(copy.info.run_id, "notes/readme.txt", str(tmp_path / "dl"))
    assert Path(local).read_text() == "hello"


def test_groups_join_existing_ones_and_are_resummarised(stores: tuple[str, str]) -> None:
    src, dst = stores
    # the destination already has variant v with seed 0; the source has seeds 1 of v and of w
    dst_group = ensure_group_run(dst, EXP, "finetune/v", "p/finetune/v", {})
    _seed_run(dst, dst_group, 0, 10.0)
    src_v = ensure_group_run(src, EXP, "finetune/v", "p/finetune/v", {})
    src_w = ensure_group_run(src, EXP, "finetune/w", "p/finetune/w", {})
    child_v = _seed_run(src, src_v, 1, 20.0)
    child_w = _seed_run(src, src_w, 1, 30.0)
    # a later stage's lineage tag names the source's pretraining run
    client = MlflowClient(src)
    client.set_tag(child_w, PRETRAIN_RUN_TAG, child_v)

    summary = merge_runs(src, dst)

    assert (summary.copied, summary.groups_mapped, summary.groups_summarized) == (3, 1, 2)
    runs = _runs(dst)
    groups = {r.data.tags[GROUP_KEY_TAG]: r for r in runs if GROUP_KEY_TAG in r.data.tags}
    assert sorted(groups) == ["p/finetune/v", "p/finetune/w"]  # v not duplicated
    assert groups["p/finetune/v"].info.run_id == dst_group
    by_source = {r.data.tags[COPIED_FROM_TAG].rsplit("#", 1)[1]: r for r in runs if COPIED_FROM_TAG in r.data.tags}
    assert set(by_source) == {src_w, child_v, child_w}
    assert by_source[child_v].data.tags[_PARENT_RUN_ID_TAG] == dst_group
    assert by_source[child_w].data.tags[_PARENT_RUN_ID_TAG] == by_source[src_w].info.run_id
    assert by_source[child_w].data.tags[PRETRAIN_RUN_TAG] == by_source[child_v].info.run_id
    metrics = MlflowClient(dst).get_run(dst_group).data.metrics
    assert metrics["seeds/n"] == 2.0
    assert metrics["seeds/top1"] == pytest.approx(15.0)
    assert MlflowClient(dst).get_run(by_source[src_w].info.run_id).data.metrics["seeds/n"] == 1.0


def test_second_merge_copies_nothing(stores: tuple[str, str]) -> None:
    src, dst = stores
    group = ensure_group_run(src, EXP, "finetune/v", "p/finetune/v", {})
    _seed_run(src, group, 0, 10.0)
    first = merge_runs(src, dst)
    # the same store spelled with a query string is still recognised as the origin
    second = merge_runs(f"{src}?timeout=5", dst)

    assert (first.copied, first.skipped) == (2, 0)
    assert (second.copied, second.skipped, second.groups_summarized) == (0, 2, 0)
    assert len(_runs(dst)) == 2


def test_named_experiment_only(stores: tuple[str, str]) -> None:
    src, dst = stores
    _seed_run(src, "none", 0, 1.0, experiment="default")
    _seed_run(src, "none", 0, 2.0, experiment=EXP)

    summary = merge_runs(src, dst, [EXP])

    assert (summary.copied, summary.experiments) == (1, [EXP])
    assert len(_runs(dst)) == 1
    assert MlflowClient(dst).get_experiment_by_name("default") is None


def test_missing_source_is_an_error_and_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "clone" / "mlflow.db"
    with pytest.raises(MergeError, match="no database file at .*clone/mlflow.db"):
        merge_runs(_uri(tmp_path / "clone"), _uri(tmp_path / "b"))
    assert not missing.exists()
    assert not (tmp_path / "b").exists()  # nothing written before the source was checked


def test_foreign_sqlite_file_is_refused_untouched(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    other.write_bytes(b"")
    with pytest.raises(MergeError, match="not an MLflow database"):
        merge_runs(store_uri(str(other)), _uri(tmp_path / "b"))
    assert other.read_bytes() == b""


def test_unknown_experiment_names_the_choices(stores: tuple[str, str]) -> None:
    src, dst = stores
    _seed_run(src, "none", 0, 1.0)
    with pytest.raises(MergeError, match=r"experiment 'nope' not in source store .* expected one of: .*ablations"):
        merge_runs(src, dst, ["nope"])


def test_same_store_is_refused(tmp_path: Path, stores: tuple[str, str]) -> None:
    src = stores[0]
    _seed_run(src, "none", 0, 1.0)
    with pytest.raises(MergeError, match="same store"):
        merge_runs(src, store_uri(str(tmp_path / "a" / "mlflow.db")))


def test_cli_takes_db_paths(tmp_path: Path, stores: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    src_db, dst_db = tmp_path / "a" / "mlflow.db", tmp_path / "b" / "mlflow.db"
    _seed_run(stores[0], "none", 0, 1.0)

    assert main(["merge-runs", str(src_db), str(dst_db), "--experiment", EXP]) == 0
    assert "copied: 1" in capsys.readouterr().out
    assert len(_runs(_uri(tmp_path / "b"))) == 1

    assert main(["merge-runs", str(tmp_path / "none.db"), str(dst_db)]) == 2
    assert "none.db" in capsys.readouterr().err
