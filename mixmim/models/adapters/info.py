"""Parameters and FLOPs of a timm model by name, counted as ``mixmim.flops`` counts (issue 6)."""

from __future__ import annotations

import timm
import torch

from ...flops import ModelInfo, count_flops, count_params
from ..registry import MODEL_SIZES
from .builder import create_timm_model


def timm_model_info(name: str, img_size: int | None = None, num_classes: int = 1000) -> ModelInfo | None:
    """Counts for ``timm.create_model(name)`` with its classifier head, built on the meta device.

    None when ``name`` is a registered MixMIM size or not a timm model. The resolution is
    ``img_size`` or the model's default input size (timm's pretrained config).
    """
    if name in MODEL_SIZES or not timm.is_model(name):
        return None
    try:
        with torch.device("meta"):
            model, _ = create_timm_model(name, img_size, num_classes=num_classes)
        size = img_size or int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        in_chans = int(model.pretrained_cfg.get("input_size", (3,))[0])
        flops = count_flops(model, size, in_chans)
    except (AssertionError, RuntimeError, TypeError) as err:
        raise ValueError(f"{name} at {img_size or 'its default size'}: {err}") from err
    return ModelInfo(name, size, count_params(model) / 1e6, flops / 1e9)
