"""Smoke mode: every DVC pipeline of the repository, end to end on the CPU in minutes.

Each pipeline (the root ``dvc.yaml`` is ``default``; every ``pipelines/<name>/dvc.yaml`` is
``<name>``) has a *smoke overlay*, ``smoke.yaml`` beside its ``params.yaml``. The overlay is
merged over the params (:func:`deep_merge`), so the pipeline keeps its stages, its commands
and its code paths (``torchrun`` included, with ``launch.nproc_per_node: 2`` CPU processes
over gloo) and changes only budgets, model sizes and dataset roots: the roots point at the
built-in stand-ins that ``stages/prepare_data.py`` writes in the official on-disk layouts.

The run happens in a temporary copy of the working tree (the files ``git`` would put in a
clone, plus untracked files that are not ignored), with every ``dvc.lock`` removed, so the
repository's own locks, metrics and MLflow store are never touched::

    python -m mixmim.smoke                      # every pipeline
    python -m mixmim.smoke paper mid --keep     # some of them; keep the copy for a look
    python -m mixmim.smoke --list

Which stages run: every stage that is not a ``foreach``/``matrix`` entry, and of each
``foreach`` group the first ``sample`` entries (a stage's upstream stages run with it, as in
any ``dvc repro`` of a target). An overlay may carry a ``smoke:`` section, read here and
never merged into the params: ``{full: true}`` runs every stage, ``{sample: N}`` changes N
(default 1), ``{include: [stage@key, ...]}`` adds entries, ``{single_item: true}`` runs the
targets without their upstream stages (the report, whose deps are the other pipelines' results). The entries left out share their
stage's command, code and hand-offs with the ones that run and differ only in params, which
the suite's params tests check. A pipeline passes when ``mixmim pipeline -- dvc repro
<targets>`` exits 0 and ``dvc status`` then reports every target up to date (each ran and
wrote its outs).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .engine.config import ConfigError

__all__ = ["OVERLAY_NAME", "SMOKE_KEY", "WILDCARD", "SmokeSettings", "select_targets", "read_overlay", "Pipeline", "SmokeResult", "apply_overlays", "deep_merge",
           "discover_pipelines", "main", "make_copy", "run_pipeline", "stage_names", "MIN_FREE_GIB", "check_free_space"]

OVERLAY_NAME = "smoke.yaml"
SMOKE_KEY = "smoke"  # an overlay's runner settings (full / sample / include), not merged into the params
WILDCARD = "*"  # an overlay key that applies its mapping to every entry of the params mapping beside it
REPO = Path(__file__).resolve().parents[1]
#: Folders never copied: outputs of earlier runs and environments (a fresh clone has none of them).
SKIP_PARTS = {".git", ".venv", "runs", "mlruns", "mlartifacts", "__pycache__", ".pytest_cache", ".dvc_cache"}


@dataclass(frozen=True)
class Pipeline:
    """One DVC pipeline: its name and its folder relative to the repository root."""

    name: str
    folder: str  # "." for the root pipeline

    @property
    def dvc_yaml(self) -> str:
        return "dvc.yaml" if self.folder == "." else f"{self.folder}/dvc.yaml"

    @property
    def params(self) -> str:
        return "params.yaml" if self.folder == "." else f"{self.folder}/params.yaml"

    @property
    def overlay(self) -> str:
        return OVERLAY_NAME if self.folder == "." else f"{self.folder}/{OVERLAY_NAME}"


@dataclass(frozen=True)
class SmokeSettings:
    """An overlay's ``smoke:`` section: which stages the smoke run reproduces."""

    full: bool = False
    sample: int = 1
    include: tuple[str, ...] = ()
    single_item: bool = False  # dvc repro --single-item: upstream stages of other pipelines are not run


@dataclass
class SmokeResult:
    pipeline: str
    seconds: float
    stages: int  # stages in the pipeline
    ran: int  # stages this smoke run reproduced (targets and their upstream stages)
    log: str


# --------------------------------------------------------------------------- overlays
def deep_merge(base: Any, overlay: Any, where: str = "") -> Any:
    """``overlay`` merged over ``base``: mappings merge key by key, anything else replaces.

    The key ``"*"`` in an overlay mapping is merged into every entry of the base mapping
    at that level (applied before the overlay's explicit keys), so one overlay line can
    shrink every variant of a ``foreach`` however many variants the pipeline has.
    """
    if not isinstance(overlay, Mapping):
        return copy.deepcopy(overlay)
    if not isinstance(base, Mapping):
        if WILDCARD in overlay:
            raise ConfigError(f"smoke overlay {where or '<top>'}: '*' needs a mapping to apply to, got {base!r}")
        return copy.deepcopy(dict(overlay))
    out = copy.deepcopy(dict(base))
    if WILDCARD in overlay:
        for key, value in out.items():
            if not isinstance(value, Mapping) and value is not None:
                raise ConfigError(f"smoke overlay {where}.*: entry {key!r} is {value!r}, not a mapping")
            out[key] = deep_merge(value or {}, overlay[WILDCARD], f"{where}.{key}".lstrip("."))
    for key, value in overlay.items():
        if key != WILDCARD:
            out[key] = deep_merge(out.get(key), value, f"{where}.{key}".lstrip("."))
    return out


def merged_params(params: Mapping[str, Any], overlay: Mapping[str, Any], overlay_path: str) -> dict[str, Any]:
    """Merge one overlay; a top-level section the params lack is a typo, not a new section."""
    unknown = sorted(set(overlay) - set(params))
    if unknown:
        raise ConfigError(f"{overlay_path}: section {unknown[0]!r} is not in the pipeline's params "
                          f"(expected one of {sorted(params)})")
    return deep_merge(params, overlay)


def _read_yaml(path: Path) -> dict[str, Any]:
    """A params-style YAML file (a mapping at the top level), read by the suite's one params loader."""
    from .params import load_params

    return dict(load_params(path).data)


def read_overlay(path: Path) -> tuple[dict[str, Any], SmokeSettings]:
    """An overlay file: (params overlay, runner settings from its ``smoke:`` section)."""
    data = _read_yaml(path)
    raw = data.pop(SMOKE_KEY, None) or {}
    where = f"{path}: {SMOKE_KEY}"
    if not isinstance(raw, Mapping) or set(raw) - {"full", "sample", "include", "single_item"}:
        raise ConfigError(f"{where}={raw!r}: expected a mapping with keys full, sample, include, single_item")
    full, sample, include = raw.get("full", False), raw.get("sample", 1), raw.get("include", [])
    single_item = raw.get("single_item", False)
    for key, value in (("full", full), ("single_item", single_item)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}.{key}={value!r}: expected true or false")
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise ConfigError(f"{where}.sample={sample!r}: expected an integer of at least 1")
    if not isinstance(include, list) or not all(isinstance(n, str) for n in include):
        raise ConfigError(f"{where}.include={include!r}: expected a list of stage names (stage@key)")
    settings = SmokeSettings(full, sample, tuple(include), single_item)
    return data, settings


def select_targets(stages: Sequence[str], settings: SmokeSettings, where: str = "smoke overlay") -> list[str]:
    """Stage names to reproduce: all non-foreach stages, the first ``sample`` of each group, ``include``."""
    if settings.full:
        return list(stages)
    missing = [name for name in settings.include if name not in stages]
    if missing:
        raise ConfigError(f"{where}: smoke.include names {missing[0]!r}, which is not a stage of the pipeline "
                          f"(its stages: {', '.join(stages[:8])}{', ...' if len(stages) > 8 else ''})")
    taken: dict[str, int] = {}
    chosen = []
    for name in stages:
        group = name.split("@", 1)[0] if "@" in name else None
        if group is None or taken.get(group, 0) < settings.sample or name in settings.include:
            chosen.append(name)
            if group is not None:
                taken[group] = taken.get(group, 0) + 1
    return chosen


def discover_pipelines(root: Path = REPO) -> list[Pipeline]:
    """The root pipeline (``default``) and every ``pipelines/<name>/dvc.yaml``, in that order."""
    found = [Pipeline("default", ".")] if (root / "dvc.yaml").is_file() else []
    found += [Pipeline(p.parent.name, f"pipelines/{p.parent.name}")
              for p in sorted((root / "pipelines").glob("*/dvc.yaml"))]
    return found


def apply_overlays(root: Path, pipelines: Sequence[Pipeline]) -> None:
    """Rewrite each pipeline's params.yaml under ``root`` (a copy!) with its smoke overlay merged in."""
    for p in pipelines:
        overlay_path = root / p.overlay
        if not overlay_path.is_file():
            raise ConfigError(f"pipeline {p.name!r} has no smoke overlay: expected {p.overlay}")
        params_path = root / p.params
        merged = merged_params(_read_yaml(params_path), read_overlay(overlay_path)[0], p.overlay)
        tmp = params_path.with_name(f".{params_path.name}.tmp")
        tmp.write_text(f"# {p.params} with {p.overlay} merged in (mixmim.smoke)\n"
                       + yaml.safe_dump(merged, sort_keys=False, width=120))
        os.replace(tmp, params_path)


# --------------------------------------------------------------------------- the copy
def _source_files(root: Path) -> list[str]:
    """What a clone holds plus untracked, unignored files; without git, everything not skipped."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True, timeout=60).stdout.decode()
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    return [n for n in names if not SKIP_PARTS.intersection(Path(n).parts) and (root / n).is_file()]


def make_copy(dest: Path, root: Path = REPO, pipelines: Sequence[Pipeline] | None = None) -> Path:
    """Copy the working tree to ``dest`` (absent or empty: never mixed with an earlier run's results), drop
    every dvc.lock, apply the smoke overlays, set DVC to no-SCM."""
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError(f"smoke copy {dest} is not empty; expected a new or empty folder")
    dest.mkdir(parents=True, exist_ok=True)
    for name in _source_files(root):
        if Path(name).name == "dvc.lock":
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    apply_overlays(dest, discover_pipelines(dest) if pipelines is None else pipelines)
    config = dest / ".dvc" / "config"
    config.parent.mkdir(exist_ok=True)
    text = config.read_text() if config.is_file() else ""
    if "no_scm" not in text:
        config.write_text(text + ("" if text.endswith("\n") or not text else "\n") + "[core]\n    no_scm = True\n")
    return dest


# --------------------------------------------------------------------------- disk
#: Free space a smoke run of every pipeline needs where it makes its copy: its copy (checkpoints of
#: the real timm encoders, the DVC cache, MLflow stores) peaked at 2.2 GiB on the development VM;
#: the rest is margin. A run that fills the disk fails deep inside ``torch.save`` in some stage, so
#: the runner checks first and says what it found.
MIN_FREE_GIB = 3.0


def check_free_space(folder: Path, min_free_gib: float = MIN_FREE_GIB) -> float:
    """Free GiB on the file system of ``folder`` (or of its nearest existing parent); raise when
    it is below ``min_free_gib``."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**30
    if free < min_free_gib:
        raise ConfigError(f"only {free:.1f} GiB free under {probe}; a smoke run needs at least {min_free_gib:.1f} "
                          "GiB for its copy (use --workdir on a larger disk, or --min-free-gib to change the check)")
    return free


# --------------------------------------------------------------------------- running
def smoke_env(bin_dir: Path, copy_root: Path | None = None) -> dict[str, str]:
    """The venv first on PATH (``python``, ``torchrun``, ``dvc`` in stage commands), the copy's ``mixmim``
    package first on the import path (the code DVC hashes is the code that runs), one thread per process."""
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    if copy_root is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(copy_root), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("MIXMIM_PARENT_RUN_ID", None)
    return env


def _run(cmd: Sequence[str], cwd: Path, env: Mapping[str, str], log: Path) -> None:
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        code = subprocess.call(list(cmd), cwd=cwd, env=dict(env), stdout=fh, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-60:])
        raise RuntimeError(f"{' '.join(cmd)} exited with status {code} in {cwd}; last lines of {log}:\n{tail}")


def stage_names(root: Path, dvc_yaml: str, bin_dir: Path) -> list[str]:
    """Stage names of one dvc.yaml after DVC's interpolation (``foreach`` expanded)."""
    out = subprocess.run([str(bin_dir / "dvc"), "stage", "list", "--name-only", "--fail", dvc_yaml], cwd=root,
                         capture_output=True, text=True, env=smoke_env(bin_dir), timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"dvc stage list {dvc_yaml} failed in {root}:\n{out.stderr}")
    # a dvc.yaml outside the root lists its stages as "<path>/dvc.yaml:<name>"
    return [line.strip().rsplit(":", 1)[-1] for line in out.stdout.splitlines() if line.strip()]


def run_pipeline(copy_root: Path, pipeline: Pipeline, bin_dir: Path) -> SmokeResult:
    """``mixmim pipeline -- dvc repro`` one pipeline in the copy, then check every stage is up to date."""
    log = copy_root / f"smoke-{pipeline.name}.log"
    env = smoke_env(bin_dir, copy_root)
    stages = stage_names(copy_root, pipeline.dvc_yaml, bin_dir)
    settings = read_overlay(copy_root / pipeline.overlay)[1]
    targets = [f"{pipeline.dvc_yaml}:{name}" for name in select_targets(stages, settings, pipeline.overlay)]
    start = time.perf_counter()
    _run([str(bin_dir / "mixmim"), "pipeline", "--params", pipeline.params, "--",
          str(bin_dir / "dvc"), "repro", *(["--single-item"] if settings.single_item else []), *targets],
         copy_root, env, log)
    seconds = time.perf_counter() - start
    status = subprocess.run([str(bin_dir / "dvc"), "status", "--json", *targets], cwd=copy_root,
                            capture_output=True, text=True, env=env, timeout=300)
    stale = json.loads(status.stdout or "{}") if status.returncode == 0 else None
    if stale != {}:
        raise RuntimeError(f"{pipeline.name}: after dvc repro, dvc status is not clean: "
                           f"{status.stdout or status.stderr}")
    ran = sum(line.startswith("Running stage") for line in log.read_text().splitlines())
    return SmokeResult(pipeline.name, seconds, len(stages), ran, str(log))


def prepare_data(copy_root: Path, bin_dir: Path) -> float:
    """The root pipeline's ``prepare_data`` stage (smoke sizes): the stand-ins every pipeline reads."""
    start = time.perf_counter()
    _run([str(bin_dir / "dvc"), "repro", "prepare_data"], copy_root, smoke_env(bin_dir, copy_root),
         copy_root / "smoke-prepare_data.log")
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    available = discover_pipelines(REPO)
    by_name = {p.name: p for p in available}
    parser = argparse.ArgumentParser(prog="python -m mixmim.smoke", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="*", help=f"default: all of {', '.join(by_name)}")
    parser.add_argument("--workdir", type=Path, default=None, help="where to make the copy (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the copy afterwards")
    parser.add_argument("--timings", type=Path, default=None, help="write {pipeline: seconds, ...} JSON here")
    parser.add_argument("--min-free-gib", type=float, default=MIN_FREE_GIB,
                        help=f"refuse to start with less free disk where the copy goes (default {MIN_FREE_GIB})")
    parser.add_argument("--list", action="store_true", help="list the pipelines and exit")
    args = parser.parse_args(argv)
    if args.list:
        for p in available:
            print(f"{p.name:12s} {p.dvc_yaml}")
        return 0
    unknown = [n for n in args.pipelines if n not in by_name]
    if unknown:
        parser.error(f"unknown pipeline {unknown[0]!r}; expected one of {', '.join(by_name)}")
    chosen = [by_name[n] for n in args.pipelines] or available
    bin_dir = Path(sys.executable).parent
    try:
        check_free_space(args.workdir or Path(tempfile.gettempdir()), args.min_free_gib)
    except ConfigError as err:
        parser.error(str(err))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mixmim-smoke-"))
    # the root pipeline's overlay always applies: its prepare_data writes the stand-ins for everyone
    overlaid = [p for p in available if p.name == "default" or p in chosen]
    copy_root = make_copy(work / "repo" if args.workdir is None else work, pipelines=overlaid)
    print(f"smoke copy: {copy_root}", flush=True)
    timings: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs", "pipelines": {}}
    try:
        timings["prepare_data_s"] = round(prepare_data(copy_root, bin_dir), 1)
        print(f"prepare_data       {timings['prepare_data_s']:7.1f}s", flush=True)
        for p in chosen:
            result = run_pipeline(copy_root, p, bin_dir)
            timings["pipelines"][p.name] = {"seconds": round(result.seconds, 1), "stages": result.stages,
                                            "ran": result.ran}
            print(f"{p.name:18s} {result.seconds:7.1f}s  ran {result.ran} of {result.stages} stages  ok", flush=True)
    finally:
        if args.timings:
            args.timings.parent.mkdir(parents=True, exist_ok=True)
            args.timings.write_text(json.dumps(timings, indent=2) + "\n")
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
