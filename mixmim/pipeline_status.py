"""``make status``: what ``dvc status`` means for each pipeline of this checkout, in one line each.

Plain ``dvc status`` checks every ``dvc.yaml`` in the repository at once. On a fresh clone after
``make repro`` the default pipeline is up to date, but the other pipelines' stages are listed as
changed for reasons a user should not have to decode from DVC's output:

* a pipeline that never ran in this checkout has no ``dvc.lock`` entries, so DVC reports every dep
  as "modified" and every out as "deleted" (the ablations and backbones pipelines until
  ``make ablations`` / ``make backbones``; the paper and mid pipelines need real data and GPUs);
* a stage that did run elsewhere has its lock entry and committed metrics, but its cached outs
  (pretraining weights), or the upstream outs it reads, are not in the clone, because the project
  has no DVC remote: ``dvc repro`` would run it again;
* a stage whose code, data or params changed since its lock entry is stale: it reruns.

This module runs ``dvc status --json <file>`` for each pipeline file and sorts its stages into
those groups (plus "up to date"), with the command that brings the pipeline up to date.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# How each known pipeline is brought up to date (others: `dvc repro <file>`).
HOW = {
    "dvc.yaml": "make repro",
    "pipelines/ablations/dvc.yaml": "make ablations",
    "pipelines/backbones/dvc.yaml": "make backbones",
    "pipelines/report/dvc.yaml": "dvc repro --single-item pipelines/report/dvc.yaml:<stage> (make report: the report stage)",
    "pipelines/paper/dvc.yaml": "dvc repro pipelines/paper/dvc.yaml on the real datasets and GPUs (README, Pipelines)",
    "pipelines/mid/dvc.yaml": "dvc repro pipelines/mid/dvc.yaml on ImageNet-100 and a GPU (README, Pipelines)",
}

UP_TO_DATE, NEVER_RUN, OUTS_MISSING, STALE = "up to date", "never run here", "outs not in this clone", "stale"


@dataclass
class PipelineStatus:
    """One pipeline file's stages, by group (stage names in each)."""

    path: str
    groups: dict[str, list[str]] = field(default_factory=dict)
    changed_deps: dict[str, list[str]] = field(default_factory=dict)  # stale stage -> its changed deps

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.groups.values())


def pipeline_files(root: Path) -> list[str]:
    """The repository's pipeline files, relative to ``root``: ``dvc.yaml`` first, then ``pipelines/*/dvc.yaml``."""
    files = [p for p in [root / "dvc.yaml", *sorted((root / "pipelines").glob("*/dvc.yaml"))] if p.is_file()]
    return [p.relative_to(root).as_posix() for p in files]


def stage_names(root: Path, path: str) -> list[str]:
    """Every stage of a pipeline file as DVC names it (``name``, or ``name@key`` for matrix/foreach stages),
    from ``dvc stage list`` (which expands matrices with the params file's values)."""
    out = _dvc(root, ["stage", "list", "--name-only", path])
    return [line.split(":", 1)[-1].strip() for line in out.splitlines() if line.strip()]


def locked_stages(root: Path, path: str) -> set[str]:
    """Stages with an entry in the pipeline's ``dvc.lock`` (run at least once where the lock was written)."""
    lock = (root / path).with_name("dvc.lock")
    if not lock.is_file():
        return set()
    data = yaml.safe_load(lock.read_text()) or {}
    return set((data.get("stages") or {}).keys())


def classify(path: str, stages: Sequence[str], locked: set[str],
             status: Mapping[str, Sequence[Any]]) -> PipelineStatus:
    """Sort ``stages`` by ``status`` (``dvc status --json`` of the file: ``{"<file>:<stage>": [...]}``,
    stages absent from it are up to date) and ``locked`` (the stage names in ``dvc.lock``)."""
    result = PipelineStatus(path, {UP_TO_DATE: [], NEVER_RUN: [], OUTS_MISSING: [], STALE: []})
    by_stage = {key.split(":", 1)[-1] if key.startswith(f"{path}:") else key: value for key, value in status.items()}
    for stage in stages:
        entries = by_stage.get(stage)
        if not entries:
            result.groups[UP_TO_DATE].append(stage)
        elif stage not in locked:
            result.groups[NEVER_RUN].append(stage)
        else:
            # a dep "deleted" is an upstream out missing from this clone, like the stage's own outs;
            # anything else (modified code, data or params; a changed command) makes the stage stale
            deps = [name for entry in entries if isinstance(entry, Mapping)
                    for kind, changed in entry.items() if kind in ("changed deps", "changed params")
                    for name, how in changed.items() if how != "deleted"]
            other = [entry for entry in entries if not isinstance(entry, Mapping)]  # e.g. "changed command"
            if deps or other:
                result.groups[STALE].append(stage)
                result.changed_deps[stage] = deps + [str(o) for o in other]
            else:
                result.groups[OUTS_MISSING].append(stage)
    return result


def describe(status: PipelineStatus) -> list[str]:
    """Lines for one pipeline: its counts by group, what each group means, the command that updates it."""
    how = HOW.get(status.path, f"dvc repro {status.path}")
    counts = ", ".join(f"{len(v)} {k}" for k, v in status.groups.items() if v)
    lines = [f"{status.path}: {status.total} stages: {counts or 'none'}"]
    never = status.groups[NEVER_RUN]
    if never:
        which = "" if len(never) == status.total else f" ({', '.join(never[:4])}{' ...' if len(never) > 4 else ''})"
        lines.append(f"  never run here{which}: no dvc.lock entry, so plain `dvc status` lists every dep as modified "
                     f"and every out as deleted; expected until it runs: {how}")
    if status.groups[OUTS_MISSING]:
        names = ", ".join(status.groups[OUTS_MISSING][:4]) + (" ..." if len(status.groups[OUTS_MISSING]) > 4 else "")
        lines.append(f"  outs not in this clone ({names}): ran where dvc.lock was written (results committed), but "
                     f"its cached outs or those it reads are absent (no DVC remote); {how} rebuilds them")
    for stage in status.groups[STALE][:4]:
        deps = status.changed_deps[stage]
        lines.append(f"  stale {stage}: changed {', '.join(deps[:5])}{' ...' if len(deps) > 5 else ''}")
    if len(status.groups[STALE]) > 4:
        lines.append(f"  ... and {len(status.groups[STALE]) - 4} more stale stages; {how} reruns them")
    elif status.groups[STALE]:
        lines.append(f"  {how} reruns the stale stages")
    return lines


def _dvc(root: Path, args: Sequence[str]) -> str:
    dvc = Path(sys.executable).with_name("dvc")
    cmd = [str(dvc) if dvc.is_file() else "dvc", *args]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def pipeline_status(root: Path, path: str) -> PipelineStatus:
    raw = _dvc(root, ["status", "--json", path]).strip()
    return classify(path, stage_names(root, path), locked_stages(root, path), json.loads(raw or "{}"))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="pipeline files (default: dvc.yaml and pipelines/*/dvc.yaml)")
    p.add_argument("--root", type=Path, default=Path("."), help="the repository root")
    a = p.parse_args(argv)
    root = a.root.resolve()
    for path in a.files or pipeline_files(root):
        print("\n".join(describe(pipeline_status(root, path))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
