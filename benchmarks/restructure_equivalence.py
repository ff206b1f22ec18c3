"""Equivalence check: the same small configuration through two source trees, compared bit for bit.

Issue 14 asks that the restructuring leave ``make repro`` metrics unchanged. This script runs one
small configuration through the stage layer and engines of two or more checkouts (e.g. the commit
before the restructuring, commits in between, HEAD) and compares everything each run leaves behind:

* **pretrain**: ``stages/pretrain.py`` (a few steps of mixmim_nano on a small ImageNet-layout set);
* **finetune_ld1** and **finetune_ld075**: ``stages/finetune.py`` from the same initial weights with
  ``layer_decay`` 1.0 (the layer-decay rule cannot matter) and 0.75 (where the deliberate rule change
  of 2d12beb shows: a patch merging now joins the block it feeds);
* **probe**: :func:`mixmim.probes.run_probe` (k-NN and linear probe) on that initial encoder;
* **coco** and **ade20k**: ``stages/coco.py`` / ``stages/ade20k.py``, a few iterations.

Every downstream job starts from one shared initial checkpoint (the first tree's pretraining
weights), so a difference in pretraining cannot hide or cause one downstream. All trees read one
data folder written by the last tree's ``stages/prepare_data.py``. For each job the script
compares, exactly (``==`` on floats, ``torch.equal`` on tensors):

* the metrics JSON (keys in both files; keys in one file only are listed as additions/removals),
* the plot CSV (columns in both), the per-image records files,
* every MLflow metric series the two runs both logged (each (step, value) pair),
* the final weights and the whole resume checkpoint (model, optimiser state, step position,
  random states), except its ``config``/``extra`` (paths and run ids),
* the engine config saved with the weights (values that differ; paths and tracking fields left out).

Usage (single-threaded; about 80 s per tree on the 2-core development VM)::

    git worktree add --detach /tmp/pre-restructure d28937b
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/restructure_equivalence.py \\
        --trees /tmp/pre-restructure . --work /tmp/equivalence

With more trees (oldest first) each consecutive pair is compared, and the first with the last,
which tells which commit range a difference comes from. The exit status is 0 when every compared
value is identical, 1 otherwise; ``--json`` writes the full comparison. Each tree runs with ``PYTHONPATH=<tree>`` and this interpreter, so the venv's
packages are shared and only the suite's code differs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

DATASETS = ("imagenet", "coco", "ade20k")
DATA_ARGS = ["--image-size", "64", "--num-classes", "4", "--train-per-class", "8", "--val-per-class", "6",
             "--dense-image-size", "64", "--dense-train", "8", "--dense-val", "4"]

# One configuration, written identically for both trees: keys both trees' configs accept.
PARAMS: dict[str, Any] = {
    "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "equivalence", "pipeline": "equivalence",
                 "scale": "equivalence"},
    "pretrain": {"model": "mixmim_nano", "dataset": "imagenet", "epochs": 2, "warmup_epochs": 1, "batch_size": 8,
                 "base_lr": 1.5e-3, "num_workers": 0, "log_every_steps": 1},
    "finetune": {
        "common": {"model": "mixmim_nano", "epochs": 2, "warmup_epochs": 1, "batch_size": 8, "base_lr": 2.0e-3,
                   "drop_path": 0.1, "num_workers": 0, "log_every_steps": 1},
        "ld1": {"layer_decay": 1.0},
        "ld075": {"layer_decay": 0.75},
    },
    "coco": {"model": "mixmim_nano", "img_size": 64, "detection_windows": False, "batch_size": 2, "epochs": 2,
             "lr": 2.0e-3, "lsj_scale": [0.8, 1.25], "fpn_channels": 16, "representation_size": 32,
             "detector_kwargs": {"rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
                                 "rpn_batch_size_per_image": 32, "box_batch_size_per_image": 16,
                                 "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20,
                                 "box_score_thresh": 0.001},
             "num_workers": 0, "log_every_steps": 1, "eval_every": 1},
    "ade20k": {"model": "mixmim_nano", "img_size": 64, "detection_windows": False, "batch_size": 2, "lr": 1.0e-3,
               "max_iters": 4, "iters_per_epoch": 2, "warmup_iters": 1, "train_scale": [256, 64],
               "test_scale": [256, 64], "eval_stride": 43, "head_channels": 16, "aux_channels": 8,
               "num_workers": 0, "log_every_steps": 1, "eval_every": 1},
}
PROBE = {"model": "mixmim_nano", "batch_size": 16, "knn_k": 5, "knn_temperature": 0.07, "linear_steps": 20,
         "linear_weight_decay": 1.0e-3, "num_workers": 0}

# Config fields that name paths or the tracking layout: they differ between the two work folders by design.
JOBS = ("pretrain", "finetune_ld1", "finetune_ld075", "probe", "coco", "ade20k")
# MLflow metrics that measure wall-clock speed, not the computation: left out of the comparison.
TIMING_METRICS = ("train/images_per_s",)
CONFIG_SKIP = {"data_root", "output_dir", "init", "tracking_uri", "experiment", "run_name", "parent_run_id", "tags",
               "arch_from"}

# Runs the probe through the engine function (the pre-restructure tree has no probe stage script).
PROBE_DRIVER = """
import json, sys
from mixmim.probes import ProbeConfig, run_probe
from mixmim.engine.config import from_mapping
spec = json.loads(sys.argv[1])
r = run_probe(from_mapping(ProbeConfig, spec["config"], where="probe"))
out = {k: r[k] for k in ("knn_top1", "linear_top1", "n_val", "n_train", "feature_dim", "num_classes")}
for name in ("knn", "linear"):
    out[name + "_preds"] = r[name].preds.tolist()
    out[name + "_labels"] = r[name].labels.tolist()
json.dump(out, open(spec["out"], "w"), indent=1, sort_keys=True)
"""


# --------------------------------------------------------------------------- running one tree
def tree_env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MIXMIM_", "DVC_", "MLFLOW_")) and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    return env


def run(cmd: Sequence[str], tree: Path, cwd: Path, log: Path) -> float:
    start = time.perf_counter()
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        code = subprocess.call(list(cmd), cwd=cwd, env=tree_env(tree), stdout=fh, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{' '.join(cmd)} (tree {tree}) exited with {code}; see {log}:\n{tail}")
    return time.perf_counter() - start


def stage_cmd(tree: Path, script: str, *args: str) -> list[str]:
    return [sys.executable, str(tree / "stages" / script), "--params", "params.yaml", *args]


def job_commands(tree: Path, init: Path) -> dict[str, list[str]]:
    """The stage invocations, in the form both trees' stage scripts accept (no ``--seed``: seed 0)."""
    ft = ["--stage", "finetune", "--dataset", "imagenet", "--init", str(init)]
    return {
        "pretrain": stage_cmd(tree, "pretrain.py", "--sections", "pretrain", "--variant", "eq",
                              "--run-dir", "runs/pretrain", "--metrics", "metrics/pretrain.json",
                              "--plots", "plots/pretrain.csv"),
        "finetune_ld1": stage_cmd(tree, "finetune.py", "--sections", "finetune.common", "finetune.ld1", *ft,
                                  "--variant", "ld1", "--run-dir", "runs/finetune_ld1",
                                  "--metrics", "metrics/finetune_ld1.json", "--plots", "plots/finetune_ld1.csv"),
        "finetune_ld075": stage_cmd(tree, "finetune.py", "--sections", "finetune.common", "finetune.ld075", *ft,
                                    "--variant", "ld075", "--run-dir", "runs/finetune_ld075",
                                    "--metrics", "metrics/finetune_ld075.json",
                                    "--plots", "plots/finetune_ld075.csv"),
        "coco": stage_cmd(tree, "coco.py", "--sections", "coco", "--variant", "eq", "--init", str(init),
                          "--run-dir", "runs/coco", "--metrics", "metrics/coco.json", "--plots", "plots/coco.csv"),
        "ade20k": stage_cmd(tree, "ade20k.py", "--sections", "ade20k", "--variant", "eq", "--init", str(init),
                            "--run-dir", "runs/ade20k", "--metrics", "metrics/ade20k.json",
                            "--plots", "plots/ade20k.csv"),
    }


def run_tree(tree: Path, folder: Path, data: Path, init: Path | None, jobs: Sequence[str]) -> dict[str, float]:
    """Every job of ``jobs`` (pretraining first) through ``tree`` in ``folder``. ``init`` None: this
    tree's pretraining weights become the shared initial checkpoint ``folder.parent / 'init.pt'``."""
    folder.mkdir(parents=True, exist_ok=True)
    params = {**PARAMS, "roots": {name: str(data / name) for name in DATASETS}}
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = folder / "log.txt"
    shared = folder.parent / "init.pt"
    commands = job_commands(tree, shared)
    seconds: dict[str, float] = {}
    for job in jobs:
        if job == "pretrain":
            seconds[job] = run(commands[job], tree, folder, log)
            if init is None:
                shutil.copyfile(folder / "runs/pretrain/pretrain.pt", shared)
        elif job == "probe":
            spec = {"config": {**PROBE, "dataset": "imagenet", "data_root": str(data / "imagenet"),
                               "init": str(shared), "seed": 0, "device": "cpu"},
                    "out": str(folder / "metrics/probe.json")}
            (folder / "metrics").mkdir(exist_ok=True)
            seconds[job] = run([sys.executable, "-c", PROBE_DRIVER, json.dumps(spec)], tree, folder, log)
        else:
            seconds[job] = run(commands[job], tree, folder, log)
    return seconds


# --------------------------------------------------------------------------- comparing
def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists/tuples flattened to ``a.b.0`` keys; tensors and scalars are leaves."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(flat(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: obj}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and bool(torch.equal(a, b)))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def max_abs(a: Any, b: Any) -> float | None:
    try:
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
            return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        return abs(float(a) - float(b))
    except (TypeError, ValueError):
        return None


def compare_leaves(a: Mapping[str, Any], b: Mapping[str, Any], skip: Sequence[str] = ()) -> dict[str, Any]:
    """Counts of identical and differing leaves in both, the keys in one only, the largest differences."""
    keys_a = {k for k in a if not k.startswith(tuple(skip))}
    keys_b = {k for k in b if not k.startswith(tuple(skip))}
    common = sorted(keys_a & keys_b)
    diff = [k for k in common if not same(a[k], b[k])]
    worst = sorted(((max_abs(a[k], b[k]) or 0.0, k) for k in diff), reverse=True)[:5]
    return {"compared": len(common), "differ": len(diff), "only_before": sorted(keys_a - keys_b),
            "only_after": sorted(keys_b - keys_a), "largest": [{"key": k, "max_abs": d} for d, k in worst],
            "first": diff[:5]}


def load_pt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_csv(path: Path) -> dict[str, Any]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return flat({str(i): row for i, row in enumerate(rows)})


def mlflow_series(folder: Path, run_id: str | None) -> dict[str, Any]:
    """Every (metric, step) -> value the run logged, read from the folder's SQLite store."""
    db = folder / "mlflow.db"
    if not run_id or not db.is_file():
        return {}
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT key, step, value FROM metrics WHERE run_uuid = ?", (run_id,)).fetchall()
    return {f"{key}@{step}": float(value) for key, step, value in rows if key not in TIMING_METRICS}


def job_files(folder: Path, job: str) -> dict[str, Path]:
    """The files a job leaves: metrics JSON, records, plot CSV, run folder's weights and checkpoint."""
    out: dict[str, Path] = {}
    metrics = folder / "metrics"
    for path in sorted(metrics.glob(f"{job}*.json")):
        out[f"json:{path.name}"] = path
    plot = folder / "plots" / f"{job}.csv"
    if plot.is_file():
        out[f"csv:{plot.name}"] = plot
    run_dir = folder / "runs" / job
    for path in sorted(run_dir.glob("*.pt")) if run_dir.is_dir() else []:
        out[f"pt:{path.name}"] = path
    return out


def compare_job(before: Path, after: Path, job: str) -> dict[str, Any]:
    fa, fb = job_files(before, job), job_files(after, job)
    result: dict[str, Any] = {"files_only_before": sorted(set(fa) - set(fb)),
                              "files_only_after": sorted(set(fb) - set(fa)), "files": {}}
    run_ids: dict[str, str | None] = {}
    for name in sorted(set(fa) & set(fb)):
        kind = name.split(":", 1)[0]
        if kind == "json":
            ja, jb = json.loads(fa[name].read_text()), json.loads(fb[name].read_text())
            if name == f"json:{job}.json":
                run_ids = {"before": ja.get("run_id"), "after": jb.get("run_id")}
            result["files"][name] = compare_leaves(flat(ja), flat(jb), skip=("run_id",))
        elif kind == "csv":
            result["files"][name] = compare_leaves(read_csv(fa[name]), read_csv(fb[name]))
        else:
            sa, sb = load_pt(fa[name]), load_pt(fb[name])
            result["files"][name] = compare_leaves(flat(sa), flat(sb), skip=("config.", "extra.", "kind"))
            if "config" in sa and "config" in sb:
                ca, cb = sa["config"], sb["config"]
                keys = sorted((set(ca) | set(cb)) - CONFIG_SKIP)
                result.setdefault("config", {
                    "differ": {k: [ca.get(k, "<absent>"), cb.get(k, "<absent>")] for k in keys
                               if ca.get(k, "<absent>") != cb.get(k, "<absent>")}})
    if run_ids:
        result["files"]["mlflow:metrics"] = compare_leaves(mlflow_series(before, run_ids["before"]),
                                                           mlflow_series(after, run_ids["after"]))
    return result


def identical(result: Mapping[str, Any]) -> bool:
    return all(c["differ"] == 0 for c in result["files"].values())


def summary_lines(job: str, result: Mapping[str, Any]) -> list[str]:
    lines = [f"{job}: {'IDENTICAL' if identical(result) else 'DIFFERENT'}"]
    for name, c in result["files"].items():
        line = f"  {name}: {c['compared']} values compared, {c['differ']} differ"
        if c["differ"]:
            worst = ", ".join(f"{w['key']} ({w['max_abs']:.3g})" for w in c["largest"][:3])
            line += f"; largest |diff|: {worst}"
        lines.append(line)
        extra = [f"only before: {c['only_before'][:6]}" if c["only_before"] else "",
                 f"only after: {c['only_after'][:6]}" if c["only_after"] else ""]
        if any(extra):
            lines.append("    " + "; ".join(e for e in extra if e)
                         + (" ..." if len(c["only_before"]) > 6 or len(c["only_after"]) > 6 else ""))
    for key in ("files_only_before", "files_only_after"):
        if result[key]:
            lines.append(f"  {key.replace('_', ' ')}: {result[key]}")
    if result.get("config", {}).get("differ"):
        lines.append(f"  saved config values that differ (before, after): {result['config']['differ']}")
    return lines


def git_describe(tree: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", type=Path, nargs="+", required=True,
                   help="source trees, oldest first (at least two); each consecutive pair is compared, and the "
                        "first with the last")
    p.add_argument("--work", type=Path, default=Path("/tmp/restructure-equivalence"),
                   help="scratch folder (data, one run folder per tree); must be new or empty")
    p.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS),
                   help="jobs to run (pretraining always runs: its first tree's weights start every other job)")
    p.add_argument("--json", type=Path, default=None, help="write the full comparison here")
    a = p.parse_args(argv)
    trees = [t.resolve() for t in a.trees]
    if len(trees) < 2:
        p.error("--trees needs at least two source trees")
    for tree in trees:
        if not (tree / "mixmim" / "__init__.py").is_file():
            p.error(f"{tree} is not a source tree of this suite (no mixmim/__init__.py)")
    if a.work.exists() and any(a.work.iterdir()):
        p.error(f"--work {a.work} is not empty; give a new or empty folder")
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = [f"t{i}" for i in range(len(trees))]
    for name, tree in zip(names, trees):
        print(f"{name}: {tree} ({git_describe(tree)})")
    data = work / "data"
    run([sys.executable, str(trees[-1] / "stages/prepare_data.py"), "--out", str(data), "--seed", "0",
         "--datasets", *DATASETS, *DATA_ARGS], trees[-1], work, work / "prepare_data.log")
    jobs = list(dict.fromkeys(["pretrain", *a.jobs]))
    timing = {name: run_tree(tree, work / name, data, None if i == 0 else work / "init.pt", jobs)
              for i, (name, tree) in enumerate(zip(names, trees))}
    pairs = list(zip(names, names[1:])) + ([(names[0], names[-1])] if len(names) > 2 else [])
    results: dict[str, dict[str, Any]] = {}
    for x, y in pairs:
        print(f"\n=== {x} -> {y}")
        results[f"{x}->{y}"] = {job: compare_job(work / x, work / y, job) for job in jobs}
        for job, result in results[f"{x}->{y}"].items():
            print("\n".join(summary_lines(job, result)))
    print("\nseconds per job (" + " / ".join(names) + "): "
          + ", ".join(f"{j} " + "/".join(f"{timing[n][j]:.0f}" for n in names) for j in jobs))
    if a.json:
        a.json.write_text(json.dumps({"trees": {n: str(t) for n, t in zip(names, trees)}, "results": results,
                                      "seconds": timing}, indent=1, default=str) + "\n")
    return 0 if all(identical(r) for pair in results.values() for r in pair.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
