"""The MixMIM encoder as a dense-prediction backbone (sections 3 and 8: COCO, ADE20K).

Design decisions:

* **Fixed build size, padded inputs.** The encoder is built for one ``img_size``
  (its sin-cos position table and every block's window depend on the token grid).
  Dense heads see many image sizes (COCO images are resized to a longest side of
  1024, sliding windows at image borders are smaller than the crop), so the
  backbone pads any input of at most ``img_size`` with zeros at the bottom/right --
  zero is the mean pixel after normalisation, the same padding ViTDet/MAE use for
  large-scale jitter -- and crops each output map back to ``ceil(size / stride)``.
* **One LayerNorm per output.** Hierarchical ViT backbones for detection (Swin's
  mmdet backbone, ViTDet) normalise every stage output they hand to a neck; the
  encoder's own final norm only served the pooled classification feature. That
  final norm is therefore removed from the encoder and its pretrained weights
  initialise the stage-4 output norm (it was trained on exactly that tensor); the
  other three start as identity maps.
* **Paper windows.** :func:`detection_window_sizes` gives 16x16 windows everywhere
  and 32x32 windows in blocks 6, 12 and 18 of stage 3 (section 3, "Finetuning on
  COCO"; the ADE20K setting reuses it). Pretrained relative position tables are
  resized to the new windows by bicubic interpolation on loading.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mixmim.checkpoint import (
    adapt_rel_pos_tables,
    convert_reference_state_dict,
    load_checked,
    load_file,
    unwrap_state_dict,
)
from mixmim.models.encoder import MixMIMEncoder, encoder_layer_id
from mixmim.models.layers import Size2, to_2tuple
from mixmim.models.registry import MODEL_SIZES

__all__ = [
    "MixMIMBackbone",
    "backbone_state_dict",
    "build_backbone",
    "detection_window_sizes",
    "encoder_config",
    "find_backbone",
    "load_backbone_checkpoint",
    "param_groups_layer_decay",
]

# Registry fields that only the pretraining model (decoder) or bookkeeping use.
_NOT_ENCODER = ("decoder_dim", "decoder_depth", "decoder_num_heads", "notes", "norm_pix_loss", "num_classes")

WindowSpec = int | Sequence[int | Sequence[int]]


def detection_window_sizes(
    depths: Sequence[int], base: int = 16, global_blocks: Iterable[int] = (6, 12, 18), big: int = 32,
    stage: int = 3,
) -> tuple[int | list[int], ...]:
    """Per-stage windows of the dense-transfer setting: ``base`` everywhere, ``big`` for the
    listed 1-based blocks of ``stage`` (1-based), ignoring blocks the stage does not have.

    Why: 16 divides every grid of a 1024 (or 512) input, and a few large-window blocks
    give the cross-window interaction the non-shifted windows lack (paper section 3).
    """
    depths = [int(d) for d in depths]
    if not 1 <= stage <= len(depths):
        raise ValueError(f"stage {stage} does not exist in a {len(depths)}-stage encoder; expected 1..{len(depths)}")
    windows: list[int | list[int]] = [base] * len(depths)
    blocks = [base] * depths[stage - 1]
    for k in global_blocks:
        if 1 <= k <= len(blocks):
            blocks[k - 1] = big
    windows[stage - 1] = blocks
    return tuple(windows)


def encoder_config(name_or_kwargs: str | Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """Encoder constructor arguments from a registered size name or an explicit dict."""
    if isinstance(name_or_kwargs, str):
        if name_or_kwargs not in MODEL_SIZES:
            raise ValueError(f"unknown model {name_or_kwargs!r}; expected one of {sorted(MODEL_SIZES)}")
        config = asdict(MODEL_SIZES[name_or_kwargs])
    else:
        config = dict(name_or_kwargs)
    config.update(overrides)
    return {k: v for k, v in config.items() if k not in _NOT_ENCODER}


class MixMIMBackbone(nn.Module):
    """Encoder stages as an ``OrderedDict`` of (B, C_s, H_s, W_s) maps named ``"0".."3"``.

    ``out_channels`` lists each map's width and ``strides`` its stride (4, 8, 16, 32 for
    the paper's four stages); these are what a neck (FPN) or head (UperNet) needs.
    """

    def __init__(self, **encoder_kwargs: Any) -> None:
        super().__init__()
        self.encoder = MixMIMEncoder(**encoder_kwargs)
        self.encoder.norm = nn.Identity()  # replaced by the per-output norms (module docstring)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in self.encoder.dims)
        self.out_channels: list[int] = list(self.encoder.dims)
        self.strides: list[int] = [self.encoder.patch_size * 2**i for i in range(self.encoder.num_stages)]
        self.depths: list[int] = [len(stage.blocks) for stage in self.encoder.stages]

    @property
    def img_size(self) -> Size2:
        return self.encoder.img_size

    @property
    def num_layers(self) -> int:
        """Layer ids run from 0 (patch embedding) to ``num_layers - 1`` (output norms)."""
        return sum(self.depths) + 2

    def _pad(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        full_h, full_w = self.img_size
        if h > full_h or w > full_w:
            raise ValueError(
                f"input of size {h}x{w} exceeds the backbone's build size {full_h}x{full_w}; build the backbone "
                f"with an img_size that covers the largest (padded) input"
            )
        return F.pad(x, (0, full_w - w, 0, full_h - h)) if (h, w) != (full_h, full_w) else x

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        h, w = x.shape[-2:]
        enc = self.encoder
        outs = enc.forward_stages(enc.embed(self._pad(x)))
        maps: OrderedDict[str, Tensor] = OrderedDict()
        for i, (tokens, grid, norm, stride) in enumerate(zip(outs, enc.grids, self.norms, self.strides)):
            fmap = norm(tokens).transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
            maps[str(i)] = fmap[..., : math.ceil(h / stride), : math.ceil(w / stride)]
        return maps

    def layer_id(self, name: str) -> int:
        """Layer-decay depth of a parameter name relative to this module.

        Encoder parameters follow the classifier's rule,
        :func:`~mixmim.models.encoder.encoder_layer_id` (patch embedding 0, block ``k`` of
        the flattened list ``k + 1``, a patch merging with the block it feeds, as the
        authors' ``util/lr_decay.py``); the output norms take the last id.
        """
        if name.startswith("encoder."):
            layer = encoder_layer_id(name[len("encoder."):], self.depths)
            if layer is not None:
                return layer
        if name.startswith(("norms.", "encoder.norm.")):
            return self.num_layers - 1
        raise ValueError(f"no layer id for backbone parameter {name!r}; expected encoder or output-norm parameters")

    def no_weight_decay(self) -> set[str]:
        return {"encoder." + n for n in self.encoder.no_weight_decay()}


# --------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------- #
def backbone_state_dict(obj: Mapping[str, Any], num_stages: int) -> dict[str, Tensor]:
    """Backbone entries of a checkpoint of this suite or of an original MixMIM release.

    Accepts pretraining, classifier or backbone state dicts, bare or under ``model`` /
    ``state_dict``. Decoder, head and mixing parameters are dropped; the encoder's final
    norm becomes the stage-4 output norm.
    """
    sd = dict(unwrap_state_dict(obj))
    if not any(k.startswith("encoder.") for k in sd):
        if any(k.startswith(("patch_embed.", "layers.")) for k in sd):
            sd = convert_reference_state_dict(sd)
        else:
            raise ValueError(
                "checkpoint holds no encoder parameters; expected 'encoder.*' keys (this suite) or "
                f"'patch_embed.*'/'layers.*' keys (original MixMIM); first keys: {list(sd)[:5]}"
            )
    out = {k: v for k, v in sd.items() if k.startswith(("encoder.", "norms."))}
    last = num_stages - 1
    for part in ("weight", "bias"):
        value = out.pop(f"encoder.norm.{part}", None)
        if value is not None:
            out.setdefault(f"norms.{last}.{part}", value)
    return out


def load_backbone_checkpoint(backbone: MixMIMBackbone, checkpoint: str | os.PathLike[str] | Mapping[str, Any]) -> None:
    """Load encoder weights into ``backbone``, resizing relative position tables to its windows.

    Output norms missing from the checkpoint keep their identity initialisation; any
    other missing or mis-shaped parameter is an error (via ``load_checked``).
    """
    obj = checkpoint if isinstance(checkpoint, Mapping) else load_file(checkpoint)
    sd = backbone_state_dict(obj, backbone.encoder.num_stages)
    load_checked(backbone, adapt_rel_pos_tables(sd, backbone), allow_missing=("norms.",))


def build_backbone(
    name_or_kwargs: str | Mapping[str, Any],
    img_size: int | Size2,
    window_size: WindowSpec | None = None,
    checkpoint: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    **overrides: Any,
) -> MixMIMBackbone:
    """A backbone of a registered size (or explicit encoder arguments) built for ``img_size``.

    ``window_size`` defaults to the paper's dense-transfer windows
    (:func:`detection_window_sizes`); ``overrides`` reach the encoder (e.g.
    ``drop_path_rate``, ``use_checkpoint``). ``checkpoint`` is a path or a loaded dict.
    """
    config = encoder_config(name_or_kwargs, **overrides)
    config["img_size"] = to_2tuple(img_size)
    config["window_size"] = window_size if window_size is not None else detection_window_sizes(config["depths"])
    backbone = MixMIMBackbone(**config)
    if checkpoint is not None:
        load_backbone_checkpoint(backbone, checkpoint)
    return backbone


# --------------------------------------------------------------------------- #
# Layer-wise learning-rate decay
# --------------------------------------------------------------------------- #
def find_backbone(model: nn.Module) -> str:
    """The name prefix (ending in '.') of the only MixMIMBackbone inside ``model``."""
    names = [n for n, m in model.named_modules() if isinstance(m, MixMIMBackbone)]
    if len(names) != 1:
        raise ValueError(f"expected exactly one MixMIMBackbone in the model, found {len(names)}; pass backbone_prefix")
    return names[0] + "." if names[0] else ""


def _no_decay(name: str, param: Tensor) -> bool:
    """Norm weights, biases and relative position tables are not decayed (BEiT/MAE practice)."""
    return param.ndim <= 1 or name.endswith("rel_pos_table")


def param_groups_layer_decay(
    model: nn.Module, base_lr: float, weight_decay: float, layer_decay: float, backbone_prefix: str | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise lr decay on the backbone, heads at full rate.

    A backbone parameter of layer id ``i`` gets ``base_lr * layer_decay ** (L - 1 - i)``
    with ``L = backbone.num_layers``, so the output norms train at ``base_lr`` and the
    patch embedding at the smallest rate; every other parameter (neck, heads) gets
    ``base_lr``. Each group carries ``lr_scale`` (for schedulers that rescale a base
    rate), ``layer_id`` (None for heads) and ``param_names``.
    """
    prefix = find_backbone(model) if backbone_prefix is None else backbone_prefix
    backbone = model.get_submodule(prefix.rstrip(".")) if prefix else model
    if not isinstance(backbone, MixMIMBackbone):
        raise ValueError(f"{prefix!r} does not name a MixMIMBackbone inside the model")
    groups: dict[tuple[Any, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(prefix):
            layer = backbone.layer_id(name[len(prefix):])
            scale = layer_decay ** (backbone.num_layers - 1 - layer)
        else:
            layer, scale = None, 1.0
        no_decay = _no_decay(name, param)
        group = groups.setdefault((layer, no_decay), {
            "params": [], "param_names": [], "lr": base_lr * scale, "lr_scale": scale,
            "weight_decay": 0.0 if no_decay else weight_decay, "layer_id": layer,
        })
        group["params"].append(param)
        group["param_names"].append(name)
    order = sorted(groups, key=lambda k: (k[0] is None, -1 if k[0] is None else k[0], k[1]))
    return [groups[k] for k in order]
