"""`make status` (mixmim.pipeline_status): each pipeline's `dvc status`, sorted into what a user should expect."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mixmim.pipeline_status import (
    NEVER_RUN, OUTS_MISSING, STALE, UP_TO_DATE, classify, describe, main, pipeline_files, pipeline_status,
)


def test_classify_sorts_stages_by_lock_and_status():
    stages = ["prep", "pretrain@0", "finetune@a-0", "finetune@b-0", "report"]
    locked = {"prep", "pretrain@0", "finetune@a-0", "finetune@b-0"}
    status = {
        "pretrain@0": [{"changed outs": {"runs/pretrain/s0/pretrain.pt": "not in cache"}}],
        "finetune@a-0": [{"changed deps": {"runs/pretrain/s0/pretrain.pt": "deleted"}}],
        "finetune@b-0": [{"changed deps": {"mixmim/engine": "modified",
                                           "params.yaml": {"finetune.common.epochs": "modified"}}}],
        "report": [{"changed deps": {"metrics": "modified"}}, {"changed outs": {"reports": "deleted"}}],
    }
    got = classify("dvc.yaml", stages, locked, status)
    assert got.groups[UP_TO_DATE] == ["prep"]
    assert got.groups[OUTS_MISSING] == ["pretrain@0", "finetune@a-0"]  # own or upstream outs absent
    assert got.groups[STALE] == ["finetune@b-0"]
    assert got.changed_deps["finetune@b-0"] == ["mixmim/engine", "params.yaml"]
    assert got.groups[NEVER_RUN] == ["report"]  # no lock entry: DVC's "modified" deps mean nothing
    assert got.total == 5


def test_classify_reads_prefixed_stage_keys_and_changed_command():
    got = classify("pipelines/x/dvc.yaml", ["a", "b"], {"a", "b"},
                   {"pipelines/x/dvc.yaml:a": ["changed command"]})
    assert got.groups[STALE] == ["a"] and got.groups[UP_TO_DATE] == ["b"]
    lines = describe(got)
    assert lines[0] == "pipelines/x/dvc.yaml: 2 stages: 1 up to date, 1 stale"
    assert any("stale a: changed changed command" in line for line in lines)
    assert lines[-1].endswith("dvc repro pipelines/x/dvc.yaml reruns the stale stages")


def test_describe_names_the_make_target_of_a_pipeline_that_never_ran():
    got = classify("pipelines/ablations/dvc.yaml", ["a", "b"], set(), {"a": [{"changed deps": {"x": "modified"}}],
                                                                       "b": [{"changed outs": {"y": "deleted"}}]})
    lines = describe(got)
    assert lines[0] == "pipelines/ablations/dvc.yaml: 2 stages: 2 never run here"
    assert "expected until it runs: make ablations" in lines[1]


@pytest.mark.skipif(shutil.which("dvc", path=str(Path(sys.executable).parent)) is None, reason="dvc not installed")
def test_status_of_a_small_repository(tmp_path, capsys):
    """A repository with a pipeline that ran (then one input changed, one out removed) and one that never ran."""
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  a:\n    cmd: echo hi > a.txt\n    deps: [in.txt]\n    outs: [a.txt]\n"
        "  b:\n    cmd: cp a.txt b.txt\n    deps: [a.txt]\n    outs: [b.txt]\n"
        "  c:\n    cmd: cp in2.txt c.txt\n    deps: [in2.txt]\n    outs: [c.txt]\n")
    (tmp_path / "pipelines" / "other").mkdir(parents=True)
    (tmp_path / "pipelines" / "other" / "dvc.yaml").write_text(
        "stages:\n  d:\n    matrix:\n      k: [1, 2]\n    cmd: echo ${item.k} > d${item.k}.txt\n"
        "    outs:\n      - d${item.k}.txt\n")
    (tmp_path / "in.txt").write_text("x\n")
    (tmp_path / "in2.txt").write_text("x\n")
    subprocess.run([dvc, "repro", "-q", "dvc.yaml"], cwd=tmp_path, check=True)
    (tmp_path / "in2.txt").write_text("changed\n")  # c is stale
    (tmp_path / "a.txt").unlink()  # a's out gone, b's dep gone: a clone without the cache

    assert pipeline_files(tmp_path) == ["dvc.yaml", "pipelines/other/dvc.yaml"]
    root = pipeline_status(tmp_path, "dvc.yaml")
    assert root.groups[OUTS_MISSING] == ["a", "b"] and root.groups[STALE] == ["c"]
    assert root.changed_deps["c"] == ["in2.txt"]
    other = pipeline_status(tmp_path, "pipelines/other/dvc.yaml")
    assert other.groups[NEVER_RUN] == ["d@1", "d@2"]

    assert main(["--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dvc.yaml: 3 stages: 2 outs not in this clone, 1 stale" in out
    assert "pipelines/other/dvc.yaml: 2 stages: 2 never run here" in out


def test_describe_names_the_never_run_stages_of_a_partly_run_pipeline():
    got = classify("pipelines/report/dvc.yaml", ["report", "report_mid"], {"report"},
                   {"report_mid": [{"changed outs": {"pipelines/mid/reports": "deleted"}}]})
    lines = describe(got)
    assert lines[0] == "pipelines/report/dvc.yaml: 2 stages: 1 up to date, 1 never run here"
    assert lines[1].startswith("  never run here (report_mid): ")
    assert "dvc repro --single-item pipelines/report/dvc.yaml:<stage>" in lines[1]
