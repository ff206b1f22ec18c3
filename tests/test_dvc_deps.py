"""Every stage of every pipeline declares what it reads, so DVC reruns it when that changes.

For each stage of each dvc.yaml (matrix / foreach expanded by DVC itself):

* the code: the stage script and every module of the ``mixmim`` package it imports,
  transitively, found by a static scan of the import statements (including the imports
  inside functions, which a stage may reach), must lie under one of its deps;
* the params: every section the command names (``--sections``) and the tracking section;
* the data: the checkpoint it starts from (``--init``) and, for a dataset root inside the
  repository (the built-in stand-ins), that folder, with ``roots.<dataset>`` as a param.

A module added to a stage's import graph without a matching dep fails here, naming both.
"""

from __future__ import annotations

import ast
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "mixmim"


# --------------------------------------------------------------------------- static import scan
def module_file(name: str) -> Path | None:
    """The file of module ``name`` in this repository (a package's ``__init__.py``), or None."""
    base = REPO.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def imported_names(path: Path, package: str) -> set[str]:
    """Dotted names a file imports (absolute, and relative ones resolved against ``package``);
    ``from a import b`` yields ``a`` and ``a.b`` (b may be a submodule)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(parts + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] == PACKAGE}


@cache
def import_closure(script: Path) -> frozenset[Path]:
    """Every file of the package that ``script`` imports, directly or through other modules."""
    seen: set[Path] = set()
    todo = [(script, "")]
    while todo:
        path, package = todo.pop()
        for name in imported_names(path, package):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, ...
                prefix = ".".join(parts[:i])
                found = module_file(prefix)
                if found is None or found in seen:
                    continue
                seen.add(found)
                todo.append((found, prefix if found.name == "__init__.py" else ".".join(parts[: i - 1])))
    return frozenset(seen)


def test_the_scan_follows_relative_and_lazy_imports():
    closure = import_closure(REPO / "stages" / "finetune.py")
    assert REPO / "mixmim" / "pipeline.py" in closure  # direct
    assert REPO / "mixmim" / "engine" / "engine_finetune.py" in closure  # imported inside a function
    assert REPO / "mixmim" / "data" / "datasets.py" in closure  # through engine/loaders.py, relative
    assert REPO / "mixmim" / "report" / "build.py" not in closure


# --------------------------------------------------------------------------- the pipelines' stages
def dvc_files() -> list[Path]:
    return [REPO / "dvc.yaml", *sorted((REPO / "pipelines").glob("*/dvc.yaml"))]


@cache
def all_stages() -> tuple:
    from dvc.repo import Repo

    return tuple(Repo(str(REPO)).index.stages)


def stages_of(dvc_file: Path) -> Iterator:
    return (s for s in all_stages() if Path(s.path) == dvc_file)


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in deps)


def option(argv: list[str], name: str) -> list[str]:
    """The values after ``--name`` up to the next option."""
    if name not in argv:
        return []
    values = []
    for token in argv[argv.index(name) + 1:]:
        if token.startswith("--"):
            break
        values.append(token)
    return values


def section_covered(section: str, params: set[str]) -> bool:
    return any(section == p or section.startswith(p + ".") for p in params)


@pytest.mark.parametrize("dvc_file", dvc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_stage_declares_its_code_params_and_data(dvc_file: Path):
    problems: list[str] = []
    stages = list(stages_of(dvc_file))
    assert stages, f"{dvc_file}: no stages"
    params_file = dvc_file.parent / "params.yaml"
    roots = (yaml.safe_load(params_file.read_text()) or {}).get("roots", {})
    for stage in stages:
        wdir = Path(stage.wdir)
        deps = [Path(d.fs_path) for d in stage.deps if type(d).__name__ == "Dependency"]
        params = {p for d in stage.deps if type(d).__name__ == "ParamsDependency" for p in d.params}
        argv = shlex.split(stage.cmd if isinstance(stage.cmd, str) else " ".join(stage.cmd))
        scripts = [(wdir / t).resolve() for t in argv if t.endswith(".py") and "stages/" in t]
        if not scripts:
            problems.append(f"{stage.addressing}: no stages/*.py script in its command")
        for script in scripts:
            for needed in sorted({script, *import_closure(script)}):
                if not covered(needed, deps):
                    problems.append(f"{stage.addressing}: runs {needed.relative_to(REPO)} but no dep covers it")
        if "--params" not in argv:
            continue
        training = any(s.name in ("pretrain.py", "finetune.py", "coco.py", "ade20k.py") for s in scripts)
        sections = option(argv, "--sections") + (["tracking"] if training else [])
        for section in sections:
            if not section_covered(section, params):
                problems.append(f"{stage.addressing}: reads params section {section!r} but does not declare it")
        for init in option(argv, "--init"):
            if not covered((wdir / init).resolve(), deps):
                problems.append(f"{stage.addressing}: starts from {init} but does not declare it as a dep")
        dataset = (option(argv, "--dataset") or [None])[0]
        if dataset is None and any(s.name in ("coco.py", "ade20k.py") for s in scripts):
            dataset = scripts[0].stem
        if dataset is None and any(s.name == "pretrain.py" for s in scripts):
            dataset = "imagenet"  # the pretraining sections of every pipeline read the ImageNet root
        if dataset is None:
            continue
        if not section_covered(f"roots.{dataset}", params):
            problems.append(f"{stage.addressing}: reads dataset {dataset} but not the param roots.{dataset}")
        root = roots.get(dataset)
        if isinstance(root, str):
            root_path = (params_file.parent / root).resolve()
            if REPO in root_path.parents and not covered(root_path, deps):
                problems.append(f"{stage.addressing}: reads {root} but does not declare it as a dep")
    assert not problems, "\n".join(problems)


def test_checkpoints_that_later_stages_read_are_cached_outs():
    """An experiment that changes a finetuning parameter must not re-pretrain: every file a stage
    starts from (``--init``) is a cached out of another stage, never a cache: false run folder."""
    problems = []
    for stage in all_stages():
        argv = shlex.split(stage.cmd if isinstance(stage.cmd, str) else " ".join(stage.cmd))
        for init in option(argv, "--init"):
            path = (Path(stage.wdir) / init).resolve()
            producers = [(s, o) for s in all_stages() for o in s.outs if Path(o.fs_path) == path]
            if len(producers) != 1 or not producers[0][1].use_cache:
                problems.append(f"{stage.addressing}: {init} is not one stage's cached out")
    for stage in all_stages():
        for out in stage.outs:
            if not out.use_cache and out.persist:
                problems.append(f"{stage.addressing}: {out} is persist + cache: false (missing in a DVC "
                                "experiment workspace, so the stage would always rerun there)")
    assert not problems, "\n".join(problems)


def test_every_pretraining_is_probed_in_every_pipeline():
    """Item 4 of the probes issue: every pretraining checkpoint of every pipeline is read by a probe stage
    (stages/probe.py --weights pretrained --checkpoint <it>) that declares it as a dep, so the representation
    is measured without finetuning noise wherever something is pretrained."""
    probed: dict[Path, list[str]] = {}
    problems = []
    for stage in all_stages():
        argv = shlex.split(stage.cmd if isinstance(stage.cmd, str) else " ".join(stage.cmd))
        if not any(t.endswith("stages/probe.py") for t in argv):
            continue
        deps = [Path(d.fs_path) for d in stage.deps if type(d).__name__ == "Dependency"]
        for ckpt in option(argv, "--checkpoint"):
            path = (Path(stage.wdir) / ckpt).resolve()
            if not covered(path, deps):
                problems.append(f"{stage.addressing}: reads {ckpt} but does not declare it as a dep")
            if option(argv, "--weights") == ["pretrained"]:
                probed.setdefault(path, []).append(stage.addressing)
    pretrainings = 0
    for stage in all_stages():
        argv = shlex.split(stage.cmd if isinstance(stage.cmd, str) else " ".join(stage.cmd))
        if not any(t.endswith("stages/pretrain.py") for t in argv):
            continue
        pretrainings += 1
        weights = [Path(o.fs_path) for o in stage.outs if Path(o.fs_path).name == "pretrain.pt"]
        if len(weights) != 1 or weights[0] not in probed:
            problems.append(f"{stage.addressing}: no probe stage reads its pretrain.pt with --weights pretrained")
    assert pretrainings > 100  # every pipeline's pretraining stages were found (mid and paper included)
    assert not problems, "\n".join(problems)
