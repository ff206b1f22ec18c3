"""Checkpoint files: safe loading, atomic saving, and the converter for original MixMIM releases.

Loading never executes pickled code (``weights_only=True``); a file that needs it is
refused with an explanation. Saving writes a temporary file beside the target and
renames it, so an interrupted save never replaces a good checkpoint with half a file.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .io import atomic_write

# Buffers of the original implementation that this suite recomputes from the
# architecture (fixed sin-cos tables and index tables), so they are dropped.
_RECOMPUTED = re.compile(r"^(absolute_pos_embed|decoder_pos_embed|.*\.relative_position_index)$")

_RULES: list[tuple[re.Pattern[str], Any]] = [
    (re.compile(r"^patch_embed\.(proj|norm)\.(weight|bias)$"), lambda m: f"encoder.patch_embed.{m[1]}.{m[2]}"),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$"),
     lambda m: f"encoder.stages.{m[1]}.blocks.{m[2]}.attn.rel_pos_table"),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.((?:norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(?:weight|bias))$"),
     lambda m: f"encoder.stages.{m[1]}.blocks.{m[2]}.{m[3]}"),
    # The original attaches patch merging to the end of a stage; here it opens the next one.
    (re.compile(r"^layers\.(\d+)\.downsample\.norm\.(weight|bias)$"),
     lambda m: f"encoder.stages.{int(m[1]) + 1}.merge.norm.{m[2]}"),
    (re.compile(r"^layers\.(\d+)\.downsample\.reduction\.weight$"),
     lambda m: f"encoder.stages.{int(m[1]) + 1}.merge.proj.weight"),
    (re.compile(r"^norm\.(weight|bias)$"), lambda m: f"encoder.norm.{m[1]}"),
    (re.compile(r"^decoder_embed\.(weight|bias)$"), lambda m: f"decoder.embed.{m[1]}"),
    (re.compile(r"^mask_token$"), lambda m: "decoder.mask_token"),
    (re.compile(r"^decoder_blocks\.(\d+)\.(.+)$"), lambda m: f"decoder.blocks.{m[1]}.{m[2]}"),
    (re.compile(r"^decoder_norm\.(weight|bias)$"), lambda m: f"decoder.norm.{m[1]}"),
    (re.compile(r"^decoder_pred\.(weight|bias)$"), lambda m: f"decoder.pred.{m[1]}"),
    (re.compile(r"^head\.(weight|bias)$"), lambda m: f"head.{m[1]}"),
]


class UnsafeCheckpointError(ValueError):
    """The file can only be read by executing pickled code, which this suite refuses to do."""


def unwrap_state_dict(obj: Mapping[str, Any]) -> Mapping[str, Tensor]:
    """Accept a bare state dict or a checkpoint holding one under ``model`` or ``state_dict``."""
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            return obj[key]
    return obj


def convert_reference_state_dict(sd: Mapping[str, Any]) -> dict[str, Tensor]:
    """Map an original MixMIM state dict (pretraining or finetuning) onto this suite's names.

    Accepts a checkpoint dict with a ``model`` key. Recomputed buffers are dropped;
    any key the converter does not know raises a ValueError naming it.
    """
    out: dict[str, Tensor] = {}
    for key, value in unwrap_state_dict(sd).items():
        if _RECOMPUTED.match(key):
            continue
        for pattern, target in _RULES:
            match = pattern.match(key)
            if match:
                out[target(match)] = value
                break
        else:
            raise ValueError(f"unknown key {key!r} in the original checkpoint; expected MixMIM encoder, "
                             "decoder or head parameters")
    return out


def encoder_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ``encoder.*`` entries of a converted or native state dict."""
    return {k: v for k, v in sd.items() if k.startswith("encoder.")}


def resize_rel_pos_table(table: Tensor, window: tuple[int, int]) -> Tensor:
    """Bicubic resize of a ((2h-1)*(2w-1), heads) relative position table to another window.

    Tables store one bias per relative offset, so a square source table's side is
    recovered from its length; the target side comes from the model's window.
    """
    side = int(round(table.shape[0] ** 0.5))
    if side * side != table.shape[0]:
        raise ValueError(f"relative position table of {table.shape[0]} rows is not square; cannot resize it")
    heads = table.shape[1]
    grid = table.T.reshape(1, heads, side, side).float()
    out = torch.nn.functional.interpolate(grid, size=(2 * window[0] - 1, 2 * window[1] - 1), mode="bicubic",
                                          align_corners=False)
    return out.reshape(heads, -1).T.to(table.dtype).contiguous()


def adapt_rel_pos_tables(sd: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Resize every relative position table whose window differs from the model's.

    Finetuning at another resolution or window (e.g. the 16/32 windows of detection)
    keeps the learned biases by interpolation. Position embeddings need no such step:
    they are fixed sin-cos tables recomputed for the model's grid.
    """
    modules = dict(model.named_modules())
    own = model.state_dict()
    out = dict(sd)
    for key, value in sd.items():
        if key.endswith("rel_pos_table") and key in own and own[key].shape != value.shape:
            attn = modules[key.rsplit(".", 1)[0]]
            if own[key].shape[1] != value.shape[1]:
                raise ValueError(f"{key!r} has {value.shape[1]} heads; the model expects {own[key].shape[1]}")
            out[key] = resize_rel_pos_table(value, attn.window)
    return out


def load_checked(model: nn.Module, sd: Mapping[str, Tensor], allow_missing: Iterable[str] = (),
                 ignore_unexpected: Iterable[str] = ()) -> None:
    """Load a state dict whose names and shapes must match the model exactly.

    ``allow_missing`` / ``ignore_unexpected`` are name prefixes (e.g. ``head.`` when
    starting a classifier from a pretraining checkpoint, ``decoder.`` for the decoder).
    A checkpoint of another model size fails with a ValueError naming the first
    parameter whose shape differs.
    """
    allow_missing, ignore_unexpected = tuple(allow_missing), tuple(ignore_unexpected)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore_unexpected) or k in own}
    for key, value in sd.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(
                f"checkpoint parameter {key!r} has shape {tuple(value.shape)}; the model expects "
                f"{tuple(own[key].shape)} (a checkpoint of another model size or configuration?)"
            )
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(k for k in set(own) - set(sd) if not k.startswith(allow_missing))
    if unexpected or missing:
        raise ValueError(
            f"checkpoint does not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    model.load_state_dict(sd, strict=False)


def load_file(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """Read a checkpoint with ``weights_only=True``; refuse files that need pickle execution."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; expected a file written by torch.save")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds objects that only pickle code execution can rebuild, "
            "and this suite loads checkpoints with weights_only=True. Re-save it as plain tensors and "
            f"containers (e.g. torch.save({{'model': model.state_dict()}}, path)). Detail: {err}"
        ) from err


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """torch.save to a temporary file in the target's folder, fsync, then rename over the target."""
    return atomic_write(path, lambda handle: torch.save(obj, handle), binary=True)
