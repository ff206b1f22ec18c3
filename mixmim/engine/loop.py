"""The training loop shared by pretraining and finetuning, readable top to bottom.

One epoch: set the data order for (seed, epoch), run micro-batches under autocast,
accumulate gradients, step the optimiser and the per-iteration schedule, log, and
checkpoint atomically every ``ckpt_every_steps`` optimiser steps and at the end of
the epoch. A non-finite loss stops the run before it can touch the weights, so the
last checkpoint on disk is the last good one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.scheduler.scheduler import Scheduler
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoint import load_file
from .loaders import ResumableSampler, SeededDataset
from .distributed import DistInfo, all_reduce_mean, all_reduce_sum, barrier
from .optim import current_lr
from .state import LAST, Position, load_training_state, save_training_state

#: ``loss_fn(model, batch)`` gets the loader's batch (already on the device) without its
#: trailing bad-image count, and returns the mean loss over the batch.
LossFn = Callable[[nn.Module, Any], Tensor]
EvalFn = Callable[[nn.Module], dict[str, float]]

logger = logging.getLogger("mixmim.engine")

#: Test hook: the process SIGKILLs itself right after this optimiser step (and its checkpoint).
KILL_AT_STEP_ENV = "MIXMIM_KILL_AT_STEP"


#: Checkpoint ``extra`` key: the MLflow run writing it, reopened when the run resumes.
RUN_ID_KEY = "mlflow_run_id"

#: Config keys that may change between a run and its resumption without changing its result.
RESUME_IGNORED = frozenset({
    "resume", "progress", "num_workers", "log_every_steps", "ckpt_every_steps", "tracking_uri", "experiment",
    "run_name", "parent_run_id", "tags", "output_dir", "device", "compile",
})


def resume_blocker(saved: dict[str, Any], config: dict[str, Any], finished: bool) -> str | None:
    """Why a checkpoint must not be resumed (None when it may): another config, or a finished run.

    Pipelines keep checkpoints across invocations so that a killed stage resumes; a stage
    rerun because its params or code changed must start afresh instead.
    """
    for key in sorted(set(saved) | set(config)):
        if key not in RESUME_IGNORED and saved.get(key) != config.get(key):
            return f"it was written with {key}={saved.get(key)!r}, this run has {config.get(key)!r}"
    if finished:
        return "its run had already finished"
    return None


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops with the last good checkpoint intact."""


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {sorted(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is torch.float16 and device.type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA GPU (it trains with a gradient scaler); use bf16 on CPU")
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16 support; use precision='fp16'")
    return dtype


def to_device(obj: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Tensors anywhere in lists, tuples and dicts moved to ``device`` (4-D images channels-last if asked)."""
    if isinstance(obj, Tensor):
        obj = obj.to(device, non_blocking=True)
        if channels_last and obj.ndim == 4:
            obj = obj.contiguous(memory_format=torch.channels_last)
        return obj
    if isinstance(obj, dict):
        return {k: to_device(v, device, channels_last) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, channels_last) for v in obj)
    return obj


@dataclass
class Loop:
    """Everything one run of the loop needs; built by the pretraining / finetuning engines."""

    model: nn.Module  # the bare model (what checkpoints hold)
    train_model: nn.Module  # what the forward pass calls: DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    loader: DataLoader
    sampler: ResumableSampler
    dataset: SeededDataset
    loss_fn: LossFn
    epochs: int
    batches_per_epoch: int
    info: DistInfo
    output_dir: Path
    config: dict[str, Any]
    tracker: Any
    precision: str = "fp32"
    accum_iter: int = 1
    clip_grad: float | None = None
    ckpt_every_steps: int = 0
    log_every_steps: int = 10
    channels_last: bool = False
    progress: bool = True
    evaluate: EvalFn | None = None
    resume: bool = True
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / LAST

    def _save(self, position: Position, scaler: torch.amp.GradScaler) -> None:
        if self.info.is_main:
            save_training_state(self.checkpoint_path, self.model, self.optimizer, scaler, position, self.config,
                                extra={"history": self.history, RUN_ID_KEY: getattr(self.tracker, "run_id", None)})

    def run(self) -> list[dict[str, float]]:
        device = self.info.device
        dtype = autocast_dtype(self.precision, device)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
        position = Position()
        if self.resume and self.checkpoint_path.is_file():
            saved = load_file(self.checkpoint_path)
            blocker = resume_blocker(saved.get("config", {}), self.config, saved["position"]["epoch"] >= self.epochs)
            if blocker is None:
                position, extra = load_training_state(self.checkpoint_path, self.model, self.optimizer, scaler)
                self.history = list(extra.get("history", []))
                logger.info("resuming from %s at epoch %d, batch %d", self.checkpoint_path, position.epoch + 1,
                            position.batch)
            else:
                logger.warning("not resuming from %s: %s; starting afresh", self.checkpoint_path, blocker)
        self.scheduler.step_update(position.step)
        kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0"))
        bad_images = 0  # counted in this process since it started (a resumed run counts from the resume)

        for epoch in range(position.epoch, self.epochs):
            start_batch = position.batch if epoch == position.epoch else 0
            self.sampler.set_epoch(epoch, start_batch)
            self.dataset.set_epoch(epoch)
            self.train_model.train()
            bar = tqdm(total=self.batches_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{self.epochs}",
                       disable=not (self.progress and self.info.is_main and sys.stderr.isatty()),
                       dynamic_ncols=True, leave=False)
            window_loss, window_count, window_imgs, tick = 0.0, 0, 0, time.perf_counter()
            epoch_loss, epoch_count = 0.0, 0
            for batch_idx, batch in enumerate(self.loader, start=start_batch):
                if batch_idx >= self.batches_per_epoch:
                    break
                *payload, bad = batch
                bad_images += bad
                payload = to_device(payload, device, self.channels_last)
                num_images = len(payload[0])
                boundary = (batch_idx + 1) % self.accum_iter == 0
                sync = contextlib.nullcontext()
                if self.info.distributed and not boundary:
                    sync = self.train_model.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                        loss = self.loss_fn(self.train_model, payload)
                    loss_value = all_reduce_mean(loss.item(), self.info)
                    if not math.isfinite(loss_value):
                        raise NonFiniteLossError(
                            f"loss is {loss_value} at optimiser step {position.step + 1} (epoch {epoch + 1}, batch "
                            f"{batch_idx + 1}); stopping. The last good checkpoint is {self.checkpoint_path}"
                        )
                    scaler.scale(loss / self.accum_iter).backward()
                window_loss += loss_value
                window_count += 1
                window_imgs += num_images * self.info.world_size
                epoch_loss += loss_value
                epoch_count += 1
                bar.update(1)
                if not boundary:
                    continue

                if self.clip_grad is not None:
                    scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
                scaler.step(self.optimizer)
                scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                position = Position(epoch, batch_idx + 1, position.step + 1)
                self.scheduler.step_update(position.step)

                if position.step % self.log_every_steps == 0 or position.batch == self.batches_per_epoch:
                    elapsed = time.perf_counter() - tick
                    metrics = {"train/loss": window_loss / window_count, "train/lr": current_lr(self.optimizer),
                               "train/images_per_s": window_imgs / max(elapsed, 1e-9),
                               "train/epoch": epoch + position.batch / self.batches_per_epoch}
                    self.tracker.log_metrics(metrics, step=position.step)
                    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}",
                                    img_s=f"{metrics['train/images_per_s']:.1f}")
                    window_loss, window_count, window_imgs, tick = 0.0, 0, 0, time.perf_counter()
                if self.ckpt_every_steps and position.step % self.ckpt_every_steps == 0 \
                        and position.batch < self.batches_per_epoch:
                    self._save(position, scaler)
                if kill_at and position.step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            bar.close()

            record: dict[str, float] = {"epoch": epoch + 1, "step": position.step,
                                        "train_loss": epoch_loss / max(epoch_count, 1),
                                        "lr": current_lr(self.optimizer)}
            if self.evaluate is not None:
                record.update(self.evaluate(self.model))
            self.history.append(record)
            self.tracker.log_metrics({f"epoch/{k}": v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
            position = Position(epoch + 1, 0, position.step)
            self._save(position, scaler)

        total_bad = int(all_reduce_sum(torch.tensor([bad_images]), self.info).item())
        self.tracker.log_metrics({"data/bad_images": total_bad}, step=position.step)
        barrier(self.info)
        return self.history
