"""The stage layer: what every DVC stage script calls (stages/*.py are argument parsing only).

One stage run, for every kind of stage (pretraining, finetuning / scratch, COCO, ADE20K):

1. :func:`load_params` reads the pipeline's params file (the only params loader);
2. the named sections are merged (later ones override) and the values the stage itself owns
   (dataset root, output folder, seed, init, tracking layout) are added *before* the engine
   config is built, so :func:`~mixmim.engine.config.from_mapping` checks all of them at once:
   an unknown key or a wrong type fails before any work, naming the key;
3. the run is filed in MLflow as ``<stage>/<variant>/s<seed>`` under a per-variant group run
   (``<stage>/<variant>``; its children are the seeds), tagged with the seed, the pipeline,
   the pipeline invocation (``MIXMIM_PARENT_RUN_ID``) and the DVC experiment, if any;
4. the engine runs and the stage writes its metrics JSON and plot CSV through :mod:`mixmim.io`;
5. the run's resume state is deleted (:func:`drop_resume_state`): only a killed stage needs it.

:func:`stage_main` turns a user's mistake (an unknown key, a missing dataset root, a corrupt
image, an unreachable tracking store) into one line on stderr and exit status 2; a traceback
is left for bugs.

Relative paths in a params file (dataset roots, ``sqlite:///`` tracking stores) are relative
to that file's folder, which is also where DVC runs the stage. A SQLite store inside a DVC
experiment workspace (``dvc exp run --temp`` / ``--queue`` copy the project to
``.dvc/tmp/exps/...``) resolves to the project's own store, and ``MIXMIM_TRACKING_URI``
overrides every pipeline's store (e.g. a tracking server).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from .engine.config import ConfigError, FinetuneConfig, PretrainConfig, from_mapping
from .io import write_csv_atomic, write_json_atomic
from .params import (
    TRACKING_URI_ENV, DatasetRootError, Params, TrackingParams, is_user_error, load_params, merged, stage_main,
)

__all__ = [
    "GROUP_STAGE", "PARENT_RUN_ENV", "STAGE_KEYS", "TRACKING_URI_ENV",
    "DatasetRootError", "Params", "TrackingParams", "drop_resume_state", "finetune_stage", "is_user_error",
    "load_params", "merged", "pretrain_stage", "run_under_parent", "stage_config", "stage_main", "stage_parser",
    "tracking_fields", "write_metrics", "write_plot_csv",
]

PARENT_RUN_ENV = "MIXMIM_PARENT_RUN_ID"
STANDARD_DATASETS = ("imagenet", "inat2018", "inat2019", "places205", "places365", "coco", "ade20k")

#: Config keys the stage layer sets from the command line and the params file's other sections;
#: a stage's own section may not set them (the value would be silently replaced).
STAGE_KEYS = ("data_root", "output_dir", "tracking_uri", "experiment", "run_name", "parent_run_id", "tags")
GROUP_STAGE = "group"  # mixmim.stage of the per-variant group runs (the seeds are their children)


def tracking_fields(params: Params, stage: str, variant: str, dataset: str, model: str,
                    stage_params: Mapping[str, Any], seed: int | None = None) -> dict[str, Any]:
    """Engine config fields that place the run in the pipeline's tracking layout."""
    t = params.tracking()
    dvc_params = json.dumps(dict(stage_params), sort_keys=True, default=str)
    tags = {"mixmim.pipeline": t.pipeline, "mixmim.stage": stage, "mixmim.variant": variant,
            "mixmim.dataset": dataset, "mixmim.model": model, "mixmim.scale": t.scale,
            "mixmim.dvc_params": dvc_params[:5000]}
    invocation = os.environ.get(PARENT_RUN_ENV)
    if invocation:
        tags["mixmim.invocation"] = invocation
    for env, tag in (("DVC_EXP_NAME", "mixmim.dvc_exp"), ("DVC_STAGE", "mixmim.dvc_stage")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    name = f"{stage}/{variant}"
    if seed is not None:
        tags["mixmim.seed"] = str(seed)
        name += f"/s{seed}"
    return {"tracking_uri": params.tracking_uri(), "experiment": t.experiment, "run_name": name,
            "parent_run_id": None, "tags": tags}


def is_main_process() -> bool:
    """Rank 0 under torchrun (or the only process) writes the stage's outs."""
    return int(os.environ.get("RANK", "0")) == 0


# --------------------------------------------------------------------------- outputs
def write_metrics(path: str | os.PathLike[str], metrics: Mapping[str, Any]) -> Path:
    return write_json_atomic(path, dict(metrics))


def write_plot_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """One row per epoch; the columns are the union of the rows' keys in first-seen order."""
    return write_csv_atomic(path, rows)


def drop_resume_state(run_dir: str | os.PathLike[str]) -> bool:
    """Delete a finished stage's resume state (``<run_dir>/checkpoint-last.pt``); True if there was one.

    The checkpoint is kept across invocations so that a killed stage resumes. Once the stage has
    written its weights and metrics nothing reads it: a rerun starts afresh, because a finished
    run's checkpoint is never resumed (:func:`mixmim.engine.loop.resume_blocker`). It holds the
    optimiser's two moments beside the weights, three times the model's size, for every stage and
    seed. Called last, so a stage killed before it ends keeps the state it may resume from.
    """
    from .engine.state import LAST

    path = Path(run_dir) / LAST
    if not path.is_file():
        return False
    path.unlink()
    return True


# --------------------------------------------------------------------------- checked configs
def _stage_seed(stage_params: Mapping[str, Any], seed: int | None, where: str) -> int:
    """The run's seed: the pipeline's (``--seed``, from its ``seeds`` list), else the section's, else 0."""
    if seed is None:
        return stage_params.get("seed", 0)
    if "seed" in stage_params and stage_params["seed"] != seed:
        raise ConfigError(f"{where}: seed={stage_params['seed']!r} in the section, but the pipeline runs seed "
                          f"{seed} (its `seeds` list); remove seed from the section")
    return seed


def stage_config(cls: type, params: Params, sections: Sequence[str], stage: str, variant: str, dataset: str,
                 run_dir: str, seed: int | None, owned: Mapping[str, Any] | None = None,
                 from_section: Sequence[str] = (), root: str | None = None,
                 check: Callable[[Any, str], None] | None = None) -> Any:
    """The engine config of one stage run, checked as a whole.

    ``owned`` holds the values the stage sets itself (dataset, init; ``from_section`` names those
    already derived from the section's own value, which are then allowed there); with the dataset root,
    output folder, seed and tracking layout they join the sections' values before
    :func:`from_mapping` sees them. The per-variant group run is created only after that
    check passed (a malformed section leaves the store untouched), and the config is built
    again, checked again, with the group as its MLflow parent.
    """
    stage_params = merged(params, sections)
    where = f"{params.path}: {' + '.join(sections)}"
    taken = sorted(set(stage_params) & ((set(STAGE_KEYS) | set(owned or {})) - set(from_section)))
    if taken:
        raise ConfigError(f"{where}: {taken[0]!r} is set by the stage (command line and params file layout); "
                          "remove it from the section")
    seed = _stage_seed(stage_params, seed, where)
    model = stage_params.get("model", "")
    values = {**stage_params, **(owned or {}), "seed": seed, "output_dir": params.resolve_path(run_dir),
              **tracking_fields(params, stage, variant, dataset, str(model), stage_params, seed)}
    cfg = from_mapping(cls, values, where=where)
    if check is not None:
        check(cfg, where)
    values["data_root"] = params.dataset_root(root or dataset, must_exist=True)  # root: a roots key other than the dataset's
    if isinstance(values.get("class_list"), str):  # a class-list file, like a root, is relative to the params file
        values["class_list"] = params.resolve_path(values["class_list"])
    parent = _group_run(params, stage, variant, dataset, str(model))
    cfg = from_mapping(cls, {**values, "parent_run_id": parent}, where=where)
    if check is not None:
        check(cfg, where)
    return cfg


def summarize_seeds(cfg: Any) -> None:
    """After a seed's run: refresh its group run's mean over the finished seeds (main process)."""
    if is_main_process() and cfg.parent_run_id and cfg.tracking_uri:
        from .tracking import summarize_group

        summarize_group(cfg.tracking_uri, cfg.parent_run_id)


def _group_run(params: Params, stage: str, variant: str, dataset: str, model: str) -> str | None:
    """The MLflow group run of (pipeline, stage, variant); its children are the seeds' runs."""
    if not is_main_process():
        return None
    from .tracking import check_tracking_uri, ensure_group_run

    t = params.tracking()
    uri = params.tracking_uri()
    check_tracking_uri(uri)
    tags = {"mixmim.pipeline": t.pipeline, "mixmim.stage": GROUP_STAGE, "mixmim.group_stage": stage,
            "mixmim.variant": variant, "mixmim.dataset": dataset, "mixmim.model": model, "mixmim.scale": t.scale}
    return ensure_group_run(uri, t.experiment, f"{stage}/{variant}", f"{t.pipeline}/{stage}/{variant}", tags)


# --------------------------------------------------------------------------- stages
def pretrain_stage(params: Params, sections: Sequence[str], variant: str, run_dir: str, metrics_path: str,
                   plots_path: str, seed: int | None = None) -> dict[str, Any]:
    """Pretrain on the section's dataset (root from ``roots``) and write metrics and curves.

    The weights (``<run_dir>/pretrain.pt``) and their run reference (``mlflow_run.json``) are
    what later stages read; the resume state (``checkpoint-last.pt``) is deleted once they are written."""
    from .engine.engine_pretrain import pretrain

    dataset = merged(params, sections).get("dataset", "imagenet")
    # `roots.pretrain`, when present, holds the (unlabeled) pretraining images in `dataset`'s layout:
    # the built-in pipeline pretrains on a set larger than its labeled stand-ins, as the paper does on ImageNet
    root = "pretrain" if "pretrain" in (params.data.get("roots") or {}) else None
    # the online k-NN reads a labelled dataset: `knn_dataset` (its root from `roots`), never unlabeled images
    section = merged(params, sections)
    knn_dataset = section.get("knn_dataset") if section.get("knn_every") else None
    if section.get("knn_every") and root and not knn_dataset:
        raise ConfigError(f"{params.path}: knn_every={section['knn_every']} with pretraining images from "
                          "roots.pretrain (unlabeled); set knn_dataset to a labelled dataset named in roots")
    owned = {"knn_data_root": params.dataset_root(str(knn_dataset))} if knn_dataset else None
    cfg = stage_config(PretrainConfig, params, sections, "pretrain", variant, str(dataset), run_dir, seed, owned,
                       root=root)
    result = pretrain(cfg)
    if not is_main_process():
        return result
    summarize_seeds(cfg)
    history = result["history"]
    write_plot_csv(plots_path, [{k: h[k] for k in ("epoch", "train_loss", "knn_top1") if k in h} for h in history])
    extra = {k: result[k] for k in ("mask_cells", "mean_loss_baseline") if k in result}
    knn = [h["knn_top1"] for h in history if "knn_top1" in h]
    if knn:
        extra["knn_top1"] = knn[-1]  # the online k-NN of the last epoch
    write_metrics(metrics_path, {"train_loss": history[-1]["train_loss"], "epochs": len(history),
                                 "steps": history[-1]["step"], "run_id": result["run_id"], "seed": cfg.seed, **extra})
    drop_resume_state(cfg.output_dir)
    return result


def finetune_stage(params: Params, sections: Sequence[str], stage: str, variant: str, dataset: str,
                   init: str | None, run_dir: str, metrics_path: str, plots_path: str,
                   seed: int | None = None) -> dict[str, Any]:
    """Finetune (or train from scratch when ``init`` is None) and write metrics and curves."""
    from .engine.engine_finetune import finetune, input_size
    from .records import records_path, write_classification_records

    owned = {"dataset": dataset, "init": params.resolve_path(init) if init else None}
    cfg = stage_config(FinetuneConfig, params, sections, stage, variant, dataset, run_dir, seed, owned)
    result = finetune(cfg)
    if not is_main_process():
        return result
    summarize_seeds(cfg)
    keys = ("epoch", "train_loss", "val_top1", "val_top5", "val_loss")
    write_plot_csv(plots_path, [{k: h[k] for k in keys if k in h} for h in result["history"]])
    # the reported numbers are the last epoch's; the per-image records beside them back the report's intervals
    write_classification_records(records_path(metrics_path), result["val_labels"], result["val_preds"])
    write_metrics(metrics_path, {"top1": result["top1"], "top5": result["top5"], "best_top1": result["best_top1"],
                                 "init": "pretrained" if init else "scratch", "run_id": result["run_id"],
                                 "n_val": result["n_val"], "model": cfg.model, "epochs": cfg.epochs,
                                 "img_size": input_size(cfg), "seed": cfg.seed,
                                 "model_kwargs": dict(cfg.model_kwargs)})
    drop_resume_state(cfg.output_dir)
    return result


def field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


# --------------------------------------------------------------------------- stage scripts
def stage_parser(description: str | None, sections: Sequence[str] | None) -> argparse.ArgumentParser:
    """The options every training stage script takes; scripts add their own (dataset, init, ...)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--sections", nargs="+", default=list(sections) if sections else None,
                   required=sections is None, help="params sections, later ones override")
    p.add_argument("--variant", default=None, help="run name suffix")
    p.add_argument("--seed", type=int, default=None,
                   help="the run's seed (data order, masks, initialisation, augmentation); default: the section's or 0")
    p.add_argument("--run-dir", required=True, help="checkpoints and weights (kept across kills to resume)")
    p.add_argument("--metrics", required=True)
    p.add_argument("--plots", required=True)
    return p


def run_under_parent(params_path: str | os.PathLike[str], command: Sequence[str]) -> int:
    """Run ``command`` (e.g. ``dvc repro pipelines/ablations/dvc.yaml``) inside one parent MLflow
    run of the pipeline's experiment; every stage it starts tags its run with it.

    The parent is passed through ``MIXMIM_PARENT_RUN_ID`` rather than a DVC param, so one
    invocation groups its runs without invalidating any stage. Opening it also closes the
    runs of earlier invocations whose process died without closing them (SIGKILL).
    """
    import subprocess

    from .tracking import Tracker, check_tracking_uri

    params = load_params(params_path)
    t = params.tracking()
    uri = params.tracking_uri()
    check_tracking_uri(uri)
    tags = {"mixmim.pipeline": t.pipeline, "mixmim.stage": "pipeline", "mixmim.scale": t.scale,
            "mixmim.command": " ".join(command)}
    with Tracker(uri, t.experiment, f"pipeline/{t.pipeline}", tags=tags) as parent:
        env = {**os.environ, PARENT_RUN_ENV: parent.run_id or ""}
        code = subprocess.call(list(command), env=env)
        if code != 0:
            raise RuntimeError(f"{' '.join(command)} exited with status {code}")
    return code
