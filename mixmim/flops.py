"""Parameter and FLOP counts of the encoders, counted the way the paper reports them.

The paper (and fvcore, which it follows) counts one fused multiply-add as one FLOP.
PyTorch's FlopCounterMode counts two FLOPs per multiply-add, so its totals are halved.
It knows matmuls, convolutions and the fused attention kernels of CUDA; the CPU's
fused attention kernel and LayerNorm are registered here (LayerNorm at fvcore's
estimate of 5 operations per element), so the count does not depend on the device.
Other element-wise work (GELU, softmax, additions) is not counted, as in fvcore.

The counting itself (:func:`count_params`, :func:`count_flops`) needs nothing of the suite;
:func:`model_info` builds a model of either family through
:func:`mixmim.models.registry.create_model` and counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _layer_norm_flops(input_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * 5 * prod(input_shape)  # doubled: the total is halved to multiply-adds


CUSTOM_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    aten.native_layer_norm: _layer_norm_flops,
}


@dataclass(frozen=True)
class ModelInfo:
    model: str
    img_size: int
    params_m: float
    gflops: float

    def as_dict(self) -> dict[str, object]:
        return {"model": self.model, "img_size": self.img_size, "params_m": round(self.params_m, 2),
                "gflops": round(self.gflops, 2)}


def count_params(model: nn.Module) -> int:
    """Parameters plus fixed position tables.

    The original implementation stores its sin-cos position embedding as a frozen
    parameter and counts it; this suite keeps it as a recomputed buffer, so it is
    added here to report the same figure.
    """
    fixed = sum(b.numel() for n, b in model.named_buffers() if n.endswith("pos_embed"))
    return sum(p.numel() for p in model.parameters()) + fixed


def count_flops(model: nn.Module, img_size: int | tuple[int, int], in_chans: int = 3) -> int:
    """Multiply-adds of one forward pass on one image (on the model's device; meta works)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.zeros(1, in_chans, h, w, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def model_info(name: str, img_size: int | None = None, num_classes: int = 1000) -> ModelInfo:
    """Counts for the finetuning form (encoder + ``num_classes`` head), as the paper tabulates,
    of a MixMIM size or a timm model (at ``img_size``, else the model's own resolution: the
    registered size's, or timm's pretrained config's).

    The model is built on the meta device: shapes are all a count needs, so even
    MixMIM-H is counted in well under a second without allocating its weights.
    """
    from .models.registry import create_model, model_family

    family = model_family(name)
    kwargs = {} if img_size is None else {"img_size": img_size}
    try:
        with torch.device("meta"):
            model = create_model(name, "classifier", num_classes=num_classes, **kwargs)
        if family == "mixmim":
            size, in_chans = model.encoder.img_size, 3
        else:
            default = model.pretrained_cfg.get("input_size", (3, 224, 224))
            size, in_chans = img_size or int(default[-1]), int(default[0])
        flops = count_flops(model, size, in_chans)
    except (AssertionError, RuntimeError, TypeError) as err:
        raise ValueError(f"{name} at {img_size or 'its default size'}: {err}") from err
    size = size[0] if isinstance(size, tuple) else size
    return ModelInfo(name, int(size), count_params(model) / 1e6, flops / 1e9)
