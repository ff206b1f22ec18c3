"""Training state that survives a kill: what a checkpoint holds and how it is restored.

A checkpoint holds the model, optimiser, gradient scaler, position in the run (epoch,
batches done in that epoch, optimiser steps), the random states of torch, CUDA, numpy
and Python, and the config. The data order needs nothing more: it is a function of
(seed, epoch) and the position. Everything is plain tensors and containers so that
``torch.load(weights_only=True)`` can read it back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_file, save_atomic

LAST = "checkpoint-last.pt"


@dataclass
class Position:
    epoch: int = 0  # epoch in progress
    batch: int = 0  # batches of that epoch already consumed
    step: int = 0  # optimiser steps taken in the whole run


def rng_state() -> dict[str, Any]:
    """Random states as tensors and plain containers (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler | None, position: Position, config: dict[str, Any],
                        extra: dict[str, Any] | None = None) -> Path:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "position": {"epoch": position.epoch, "batch": position.batch, "step": position.step},
        "rng": rng_state(),
        "config": config,
        "extra": extra or {},
    }
    return save_atomic(state, path)


def load_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler | None) -> tuple[Position, dict[str, Any]]:
    """Restore everything ``save_training_state`` wrote; returns the position and ``extra``."""
    state = load_file(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    pos = state["position"]
    return Position(pos["epoch"], pos["batch"], pos["step"]), state.get("extra", {})
