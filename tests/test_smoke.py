"""The smoke runner (mixmim.smoke): overlays, stage selection, and that every pipeline has a
smoke mode whose stages are exactly the pipeline's. `make smoke` runs the pipelines themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mixmim.engine.config import ConfigError
from mixmim.smoke import (
    SmokeSettings, apply_overlays, check_free_space, deep_merge, discover_pipelines, main, make_copy, merged_params,
    read_overlay, select_targets,
)

REPO = Path(__file__).resolve().parents[1]


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2}
    out = deep_merge(base, {"a": {"y": [3], "z": 4}, "b": None})
    assert out == {"a": {"x": 1, "y": [3], "z": 4}, "b": None}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 2}  # the input is left alone


def test_wildcard_applies_to_every_entry_then_explicit_keys_win():
    variants = {"default": {}, "fill-zero": {"fill": "zero"}, "epochs-10": {"epochs": 10, "warmup": 1}}
    out = deep_merge(variants, {"*": {"epochs": 1}, "fill-zero": {"epochs": 2}})
    assert out == {"default": {"epochs": 1}, "fill-zero": {"fill": "zero", "epochs": 2},
                   "epochs-10": {"epochs": 1, "warmup": 1}}
    with pytest.raises(ConfigError, match="needs a mapping"):
        deep_merge({"seeds": [0, 1]}, {"seeds": {"*": {"x": 1}}})


def test_overlay_sections_must_exist_in_the_params():
    with pytest.raises(ConfigError, match="'pretrian' is not in the pipeline's params"):
        merged_params({"pretrain": {}}, {"pretrian": {"epochs": 1}}, "smoke.yaml")


def test_read_overlay_splits_off_runner_settings(tmp_path):
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump({"smoke": {"sample": 2, "include": ["a@x"]}, "pretrain": {"epochs": 1}}))
    overlay, settings = read_overlay(path)
    assert overlay == {"pretrain": {"epochs": 1}} and settings == SmokeSettings(False, 2, ("a@x",), False)
    for bad, match in (({"sample": 0}, "at least 1"), ({"full": "yes"}, "true or false"),
                       ({"every": True}, "keys full, sample, include"), ({"include": "a@x"}, "list of stage"),
                       ({"single_item": 1}, "true or false")):
        path.write_text(yaml.safe_dump({"smoke": bad}))
        with pytest.raises(ConfigError, match=match):
            read_overlay(path)


def test_select_targets_takes_plain_stages_the_first_of_each_group_and_includes():
    stages = ["prepare", "pre@a", "pre@b", "pre@c", "ft@a", "ft@b", "report"]
    assert select_targets(stages, SmokeSettings()) == ["prepare", "pre@a", "ft@a", "report"]
    assert select_targets(stages, SmokeSettings(sample=2, include=("pre@c",))) == [
        "prepare", "pre@a", "pre@b", "pre@c", "ft@a", "ft@b", "report"]
    assert select_targets(stages, SmokeSettings(full=True)) == stages
    with pytest.raises(ConfigError, match="'pre@z', which is not a stage"):
        select_targets(stages, SmokeSettings(include=("pre@z",)))


def test_every_pipeline_has_a_smoke_overlay_that_merges():
    pipelines = discover_pipelines(REPO)
    names = {p.name for p in pipelines}
    assert {"default", "ablations", "backbones", "paper", "mid"} <= names
    for p in pipelines:
        overlay, _ = read_overlay(REPO / p.overlay)
        params = yaml.safe_load((REPO / p.params).read_text())
        merged = merged_params(params, overlay, p.overlay)
        if "launch" in params:  # torchrun pipelines: two CPU processes over gloo
            assert merged["launch"]["nproc_per_node"] == 2, p.name
        for name, root in merged.get("roots", {}).items():
            resolved = ((REPO / p.params).parent / root).resolve()
            assert REPO in resolved.parents, f"{p.name}: smoke root {name} = {root} is not a generated stand-in"


def _stage_names(root: Path, dvc_yaml: str) -> set[str]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {s.addressing.rsplit(":", 1)[-1] for s in repo.index.stages
                if Path(s.path).resolve() == (root / dvc_yaml).resolve()}


def test_smoke_copies_have_exactly_the_pipelines_stages(tmp_path):
    """The overlay changes values only: DVC expands the same stages from the smoke params."""
    copy = make_copy(tmp_path / "copy", REPO)
    assert not list(copy.rglob("dvc.lock")) and not (copy / ".git").exists()
    with pytest.raises(ConfigError, match="not empty"):
        make_copy(copy, REPO)
    for p in discover_pipelines(REPO):
        assert _stage_names(copy, p.dvc_yaml) == _stage_names(REPO, p.dvc_yaml), p.name
        smoke_params = yaml.safe_load((copy / p.params).read_text())
        assert smoke_params != yaml.safe_load((REPO / p.params).read_text()), f"{p.name}: overlay changed nothing"


def test_apply_overlays_refuses_a_pipeline_without_one(tmp_path):
    (tmp_path / "pipelines" / "x").mkdir(parents=True)
    (tmp_path / "pipelines" / "x" / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "pipelines" / "x" / "params.yaml").write_text("a: 1\n")
    with pytest.raises(ConfigError, match="pipelines/x/smoke.yaml"):
        apply_overlays(tmp_path, discover_pipelines(tmp_path))


def test_a_smoke_run_refuses_to_start_on_a_full_disk(tmp_path, capsys):
    """Too little free space is said before any copy is made, naming what was found and what is needed."""
    free = check_free_space(tmp_path / "not" / "yet", 0.0)  # an absent folder is measured at its parent
    assert free > 0
    with pytest.raises(ConfigError, match=r"GiB free under .*needs at least 1000000\.0 GiB"):
        check_free_space(tmp_path, 1e6)
    workdir = tmp_path / "copy"
    with pytest.raises(SystemExit) as stop:
        main(["default", "--workdir", str(workdir), "--min-free-gib", "1e6"])
    assert stop.value.code == 2
    assert "needs at least 1000000.0 GiB" in capsys.readouterr().err
    assert not workdir.exists()
