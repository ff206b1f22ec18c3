"""What every engine shares, so each reads top to bottom as set up -> build -> loop -> evaluate -> save:

* **set up**: :func:`engine_run` joins the process group (torchrun) or describes one process, makes
  the output folder, and leaves the group at the end; :meth:`EngineRun.build` builds the model under
  the run's seed (identical initial weights on every rank) and then seeds each rank's own randomness;
  :meth:`EngineRun.tracking` opens the MLflow run (reopening an interrupted one on resume) and logs
  the config and derived values;
* **loop**: :func:`train_data` (seeded dataset, resumable sampler, loader), :func:`wrap_model`
  (DDP / channels-last / compile), :func:`build_loop`, :func:`periodic` evaluation;
* **save**: :func:`save_final` (weights and the MLflow run reference beside them).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..tracking import (
    PRETRAIN_RUN_TAG, Tracker, check_tracking_uri, read_run_ref, resolve_tracking_uri, write_run_ref,
)
from .config import RuntimeConfig, to_dict
from .loaders import ResumableSampler, SeededDataset, make_loader
from .distributed import DistInfo, cleanup, init_distributed, resolve_device
from ..checkpoint import load_file, save_atomic
from .loop import RUN_ID_KEY, EvalFn, Loop, resume_blocker
from .state import LAST

#: The MLflow run reference written beside a run's final weights (:func:`save_final`).
RUN_REF = "mlflow_run.json"

logger = logging.getLogger("mixmim.engine")

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def per_rank_seed(seed: int, info: DistInfo) -> int:
    """Model-side randomness (masks, drop path) differs per rank; the data order does not."""
    return seed + 1000 * info.rank


def wrap_model(model: nn.Module, cfg: RuntimeConfig, info: DistInfo) -> nn.Module:
    """DDP over ranks, channels-last and torch.compile as configured; returns what to call."""
    model.to(info.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    train_model: nn.Module = model
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        train_model = torch.compile(train_model)
    return train_model


@dataclass
class TrainData:
    dataset: SeededDataset
    sampler: ResumableSampler
    loader: torch.utils.data.DataLoader
    batches_per_epoch: int
    accum: int = 1

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch // self.accum


def train_data(dataset: Any, cfg: RuntimeConfig, batch_size: int, info: DistInfo,
               collate_fn: Any = None) -> TrainData:
    """Seeded dataset, resumable sampler and loader (``collate_fn`` for dense batches); the epoch
    length respects the step cap."""
    if cfg.accum_iter < 1:
        raise ValueError(f"accum_iter={cfg.accum_iter}; expected a positive integer")
    seeded = SeededDataset(dataset, cfg.seed)
    sampler = ResumableSampler(len(seeded), batch_size, cfg.seed, info.rank, info.world_size)
    batches = sampler.batches_per_epoch
    if cfg.max_steps_per_epoch is not None:
        batches = min(batches, cfg.max_steps_per_epoch * cfg.accum_iter)
    batches -= batches % cfg.accum_iter
    if batches == 0:
        raise ValueError(f"an epoch has fewer than accum_iter={cfg.accum_iter} batches of {batch_size}; "
                         "lower batch_size or accum_iter")
    loader = make_loader(seeded, sampler, batch_size, cfg.num_workers, info.device.type == "cuda", drop_last=True,
                         collate_fn=collate_fn)
    return TrainData(seeded, sampler, loader, batches, cfg.accum_iter)


def build_loop(cfg: RuntimeConfig, *, model: nn.Module, train_model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any, data: TrainData, info: DistInfo, out: Path, tracker: Tracker, loss_fn: Any,
               epochs: int, evaluate: Any = None) -> Loop:
    """A :class:`Loop` with every runtime option (precision, accumulation, clipping,
    checkpoint and log cadence, channels-last, progress, resume) taken from ``cfg``."""
    return Loop(model=model, train_model=train_model, optimizer=optimizer, scheduler=scheduler,
                loader=data.loader, sampler=data.sampler, dataset=data.dataset, loss_fn=loss_fn, epochs=epochs,
                batches_per_epoch=data.batches_per_epoch, info=info, output_dir=out, config=to_dict(cfg),
                tracker=tracker, precision=cfg.precision, accum_iter=cfg.accum_iter, clip_grad=cfg.clip_grad,
                ckpt_every_steps=cfg.ckpt_every_steps, log_every_steps=cfg.log_every_steps,
                channels_last=cfg.channels_last, progress=cfg.progress, resume=cfg.resume, evaluate=evaluate)


def periodic(evaluate: EvalFn, every: int, epochs: int, loop: Callable[[], Loop]) -> EvalFn | None:
    """The loop's evaluation hook: ``evaluate`` after every ``every``-th epoch but the last (the
    engine evaluates the final weights after the loop), nothing on other epochs; None when
    ``every`` is 0. ``loop()`` returns the loop whose epoch is being closed."""
    if every <= 0:
        return None

    def run(model: nn.Module) -> dict[str, float]:
        epoch = len(loop().history) + 1
        return evaluate(model) if epoch % every == 0 and epoch < epochs else {}

    return run


def close_last_epoch(history: list[dict[str, Any]], final: dict[str, Any], tracker: Tracker) -> None:
    """The final evaluation is the last epoch's (the loop does not evaluate it twice: :func:`periodic`):
    it joins that epoch's history row (the plot CSV) and MLflow's ``epoch/*`` curves at that epoch."""
    if history:
        history[-1].update(final)
        tracker.log_metrics({f"epoch/{k}": v for k, v in final.items()}, step=int(history[-1]["epoch"]))


def init_tags(cfg: RuntimeConfig, stage: str, dataset: str) -> dict[str, str]:
    """Tags of a run that starts from ``cfg.init``: stage, model, dataset, init, and the MLflow
    run of the pretraining that wrote it (its run reference beside the weights), if any."""
    init = getattr(cfg, "init", None)
    tags = {"mixmim.stage": stage, "mixmim.model": getattr(cfg, "model", ""), "mixmim.dataset": dataset,
            "mixmim.init": init or "scratch"}
    ref = Path(init).parent / RUN_REF if init else None
    if ref is not None and ref.is_file():
        try:
            tags[PRETRAIN_RUN_TAG] = read_run_ref(ref)["run_id"]
        except (ValueError, KeyError) as err:
            logger.warning("ignoring the run reference %s: %s", ref, err)
    return tags


def save_final(model: nn.Module, cfg: RuntimeConfig, path: Path, kind: str, tracker: Tracker, info: DistInfo,
               **extra: Any) -> None:
    """The trained weights (with the config, ``kind`` and ``extra``) written atomically to ``path``
    and the run reference beside them, by the main rank: what later stages and reports read."""
    if info.is_main:
        save_atomic({"model": model.state_dict(), "config": to_dict(cfg), "kind": kind, **extra}, path)
        write_run_ref(path.parent / RUN_REF, tracker)


def interrupted_run_id(cfg: RuntimeConfig, epochs: int | None) -> str | None:
    """The MLflow run of the checkpoint this run is about to resume, or None when it starts afresh
    (no checkpoint, ``resume=false``, another config, or a finished run: :func:`resume_blocker`)."""
    path = Path(cfg.output_dir) / LAST
    if not cfg.resume or not path.is_file():
        return None
    saved = load_file(path)
    finished = epochs is not None and saved["position"]["epoch"] >= epochs
    if resume_blocker(saved.get("config", {}), to_dict(cfg), finished) is not None:
        return None
    return (saved.get("extra") or {}).get(RUN_ID_KEY)


def open_tracker(cfg: RuntimeConfig, info: DistInfo, default_name: str, tags: dict[str, str],
                 parent_run_id: str | None = None, epochs: int | None = None) -> Tracker:
    """The run's tracker; the store is checked now, before any training (rank 0 only).

    A run resuming from its checkpoint reopens the MLflow run that wrote it (``epochs``, the
    loop's length, tells a finished checkpoint from an interrupted one; default ``cfg.epochs``)."""
    uri = resolve_tracking_uri(cfg.tracking_uri)
    resume_id = None
    if info.is_main:
        check_tracking_uri(uri)
        resume_id = interrupted_run_id(cfg, epochs if epochs is not None else getattr(cfg, "epochs", None))
    return Tracker(uri, cfg.experiment, cfg.run_name or default_name, tags={**tags, **cfg.tags},
                   parent_run_id=parent_run_id or cfg.parent_run_id, enabled=info.is_main, resume_run_id=resume_id)


def run_params(cfg: RuntimeConfig, derived: dict[str, Any]) -> dict[str, Any]:
    return {**to_dict(cfg), **{f"derived.{k}": v for k, v in derived.items()}}


def log_run_config(tracker: Tracker, cfg: RuntimeConfig, derived: dict[str, Any]) -> None:
    """A run's start in MLflow: the config and ``derived`` values (lr, steps, sizes) as params,
    the config as ``config.yaml``."""
    tracker.log_params(run_params(cfg, derived))
    tracker.log_dict(to_dict(cfg), "config.yaml")


def output_dir(cfg: RuntimeConfig) -> Path:
    path = Path(cfg.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class EngineRun:
    """An engine's set-up (:func:`engine_run`): the config, the process layout and the output folder."""

    cfg: Any
    info: DistInfo
    output: Path | None

    @property
    def out(self) -> Path:
        """The output folder (``cfg.output_dir``, created by :func:`engine_run`)."""
        if self.output is None:
            raise RuntimeError("this engine run was set up without an output folder (engine_run(outputs=False))")
        return self.output

    def build(self, factory: Callable[[], T]) -> T:
        """``factory()`` under ``cfg.seed`` (the same initial weights on every rank); afterwards each
        rank's model-side randomness (masks, drop path, augmentation) is seeded apart (:func:`per_rank_seed`)."""
        seed_everything(self.cfg.seed)
        built = factory()
        seed_everything(per_rank_seed(self.cfg.seed, self.info))
        return built

    @contextmanager
    def tracking(self, default_name: str, tags: dict[str, str], derived: dict[str, Any],
                 epochs: int | None = None) -> Iterator[Tracker]:
        """The run's MLflow run (:func:`open_tracker`; ``epochs``: the loop's length when it is not
        ``cfg.epochs``) with the config and ``derived`` values logged (:func:`log_run_config`)."""
        with open_tracker(self.cfg, self.info, default_name, tags, epochs=epochs) as tracker:
            log_run_config(tracker, self.cfg, derived)
            yield tracker


@contextmanager
def engine_run(cfg: Any, distributed: bool = True, outputs: bool = True) -> Iterator[EngineRun]:
    """The set-up every engine starts with: the process group under torchrun (one process
    otherwise; ``distributed=False``: always one process on ``cfg.device``), the output folder
    ``cfg.output_dir`` (``outputs=False``: none), and the group left again when the engine ends."""
    info = init_distributed(cfg.device) if distributed else DistInfo(device=resolve_device(cfg.device, 0))
    try:
        yield EngineRun(cfg, info, output_dir(cfg) if outputs else None)
    finally:
        cleanup(info)
