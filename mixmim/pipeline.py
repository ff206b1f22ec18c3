"""Glue between DVC stages and the engines.

A stage script names its params.yaml sections; this module turns them into a checked
engine config (an unknown key or a wrong type fails before any work, naming the key),
adds the tracking layout (experiment per pipeline, run ``<stage>/<variant>``, tags for
stage, pipeline, variant, dataset, scale, git commit and the stage's DVC params, and the
pipeline invocation's parent run from ``MIXMIM_PARENT_RUN_ID``), runs the engine and
writes the stage's metrics JSON and plot CSV atomically.

Relative paths in a params file (dataset roots, ``sqlite:///`` tracking stores) are
relative to that file's folder, which is also where DVC runs the stage.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .engine.config import ConfigError, FinetuneConfig, PretrainConfig, from_mapping

PARENT_RUN_ENV = "MIXMIM_PARENT_RUN_ID"
STANDARD_DATASETS = ("imagenet", "inat2018", "inat2019", "places205", "places365", "coco", "ade20k")


@dataclass
class TrackingParams:
    """The ``tracking`` section."""

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "default"
    pipeline: str = "default"
    scale: str = "builtin"


@dataclass
class Params:
    """A loaded params file and where it lives."""

    data: dict[str, Any]
    path: Path

    @property
    def folder(self) -> Path:
        return self.path.resolve().parent

    def get(self, dotted: str) -> Any:
        """``params.get("finetune.datasets.imagenet")``; a missing key names itself and the file."""
        node: Any = self.data
        walked = []
        for part in dotted.split("."):
            walked.append(part)
            if not isinstance(node, Mapping) or part not in node:
                raise ConfigError(f"{self.path}: missing key {'.'.join(walked)!r}")
            node = node[part]
        return node

    def section(self, dotted: str) -> dict[str, Any]:
        value = self.get(dotted)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self.path}: {dotted} must be a mapping of keys to values, got {value!r}")
        return dict(value)

    def resolve_path(self, value: str) -> str:
        """A path relative to the params file's folder, made absolute."""
        path = Path(value)
        return str(path if path.is_absolute() else (self.folder / path).resolve())

    def resolve_uri(self, uri: str) -> str:
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
            return prefix + self.resolve_path(uri[len(prefix):])
        return uri

    def tracking(self) -> TrackingParams:
        return from_mapping(TrackingParams, self.section("tracking"), where=f"{self.path}: tracking")

    def dataset_root(self, name: str) -> str:
        root = self.get(f"roots.{name}")
        if not isinstance(root, str) or not root:
            raise ConfigError(f"{self.path}: roots.{name}={root!r}; expected the path of the {name} dataset")
        return self.resolve_path(root)


def load_params(path: str | os.PathLike[str] = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return Params(dict(data), path)


def merged(params: Params, sections: Sequence[str]) -> dict[str, Any]:
    """Later sections override earlier ones (e.g. ``finetune.common`` then ``finetune.datasets.x``)."""
    out: dict[str, Any] = {}
    for name in sections:
        out.update(params.section(name))
    return out


def tracking_fields(params: Params, stage: str, variant: str, dataset: str, model: str,
                    stage_params: Mapping[str, Any]) -> dict[str, Any]:
    """Engine config fields that place the run in the pipeline's tracking layout."""
    t = params.tracking()
    dvc_params = json.dumps(stage_params, sort_keys=True, default=str)
    return {
        "tracking_uri": params.resolve_uri(t.uri),
        "experiment": t.experiment,
        "run_name": f"{stage}/{variant}",
        "parent_run_id": os.environ.get(PARENT_RUN_ENV) or None,
        "tags": {"mixmim.pipeline": t.pipeline, "mixmim.stage": stage, "mixmim.variant": variant,
                 "mixmim.dataset": dataset, "mixmim.model": model, "mixmim.scale": t.scale,
                 "mixmim.dvc_params": dvc_params[:5000]},
    }


def is_main_process() -> bool:
    """Rank 0 under torchrun (or the only process) writes the stage's outs."""
    return int(os.environ.get("RANK", "0")) == 0


# --------------------------------------------------------------------------- outputs
def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_metrics(path: str | os.PathLike[str], metrics: Mapping[str, Any]) -> Path:
    return write_text_atomic(path, json.dumps(dict(metrics), indent=2, sort_keys=True) + "\n")


def write_plot_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """One row per epoch; the columns are the union of the rows' keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- stages
def pretrain_stage(params: Params, sections: Sequence[str], variant: str, run_dir: str, metrics_path: str,
                   plots_path: str) -> dict[str, Any]:
    """Pretrain on the section's dataset (root from ``roots``) and write metrics and curves."""
    from .engine.pretrain import pretrain

    stage_params = merged(params, sections)
    cfg = from_mapping(PretrainConfig, stage_params, where=f"{params.path}: {' + '.join(sections)}")
    cfg.data_root = params.dataset_root(cfg.dataset)
    cfg.output_dir = params.resolve_path(run_dir)
    for key, value in tracking_fields(params, "pretrain", variant, cfg.dataset, cfg.model, stage_params).items():
        setattr(cfg, key, value)
    result = pretrain(cfg)
    if not is_main_process():
        return result
    history = result["history"]
    write_plot_csv(plots_path, [{"epoch": h["epoch"], "train_loss": h["train_loss"]} for h in history])
    write_metrics(metrics_path, {"train_loss": history[-1]["train_loss"], "epochs": len(history),
                                 "steps": history[-1]["step"], "run_id": result["run_id"]})
    return result


def finetune_stage(params: Params, sections: Sequence[str], stage: str, variant: str, dataset: str,
                   init: str | None, run_dir: str, metrics_path: str, plots_path: str) -> dict[str, Any]:
    """Finetune (or train from scratch when ``init`` is None) and write metrics and curves."""
    from .engine.finetune import finetune

    stage_params = merged(params, sections)
    cfg = from_mapping(FinetuneConfig, stage_params, where=f"{params.path}: {' + '.join(sections)}")
    cfg.dataset = dataset
    cfg.data_root = params.dataset_root(dataset)
    cfg.init = params.resolve_path(init) if init else None
    cfg.output_dir = params.resolve_path(run_dir)
    for key, value in tracking_fields(params, stage, variant, dataset, cfg.model, stage_params).items():
        setattr(cfg, key, value)
    result = finetune(cfg)
    if not is_main_process():
        return result
    keys = ("epoch", "train_loss", "val_top1", "val_top5", "val_loss")
    write_plot_csv(plots_path, [{k: h[k] for k in keys if k in h} for h in result["history"]])
    from .engine.finetune import input_size
    from .records import records_path, write_classification_records

    # the reported numbers are the last epoch's; the per-image records beside them back the report's intervals
    write_classification_records(records_path(metrics_path), result["val_labels"], result["val_preds"])
    write_metrics(metrics_path, {"top1": result["top1"], "top5": result["top5"], "best_top1": result["best_top1"],
                                 "init": "pretrained" if init else "scratch", "run_id": result["run_id"],
                                 "n_val": result["n_val"], "model": cfg.model, "epochs": cfg.epochs,
                                 "img_size": input_size(cfg), "seed": cfg.seed})
    return result


def field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def run_under_parent(params_path: str | os.PathLike[str], command: Sequence[str]) -> int:
    """Run ``command`` (e.g. ``dvc repro pipelines/ablations/dvc.yaml``) inside one parent MLflow
    run of the pipeline's experiment; every stage it starts files its run as a child.

    The parent is passed through ``MIXMIM_PARENT_RUN_ID`` rather than a DVC param, so one
    invocation groups its runs without invalidating any stage.
    """
    import subprocess

    from .tracking import Tracker, check_tracking_uri

    params = load_params(params_path)
    t = params.tracking()
    uri = params.resolve_uri(t.uri)
    check_tracking_uri(uri)
    tags = {"mixmim.pipeline": t.pipeline, "mixmim.stage": "pipeline", "mixmim.scale": t.scale,
            "mixmim.command": " ".join(command)}
    with Tracker(uri, t.experiment, f"pipeline/{t.pipeline}", tags=tags) as parent:
        env = {**os.environ, PARENT_RUN_ENV: parent.run_id or ""}
        code = subprocess.call(list(command), env=env)
        if code != 0:
            raise RuntimeError(f"{' '.join(command)} exited with status {code}")
    return code
