"""Optimiser, parameter groups and the per-iteration learning-rate schedule.

Weight decay and layer-wise lr decay come from timm's parameter-group helpers; the
models say which parameters are exempt (``no_weight_decay``) and, for finetuning,
the depth of each parameter (``group_matcher``).
"""

from __future__ import annotations

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The linear scaling rule of section 8: lr = base_lr * batch / 256."""
    return base_lr * effective_batch / 256


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                layer_decay: float | None = None) -> torch.optim.AdamW:
    """AdamW with no decay on norms, biases and the model's listed tables and tokens.

    ``layer_decay`` scales each depth's lr by ``layer_decay ** (max_depth - depth)``
    (the group's ``lr_scale``, applied by the scheduler).
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if layer_decay is not None and layer_decay != 1.0:
        groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    for group in groups:
        # The base lr only: timm's scheduler multiplies by the group's lr_scale when it sets
        # each step's lr, so scaling here as well would apply the decay twice.
        group.setdefault("lr_scale", 1.0)
        group["lr"] = lr
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def build_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                          min_lr: float) -> CosineLRScheduler:
    """Linear warmup from 0, then cosine decay to ``min_lr``, updated every optimiser step."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return CosineLRScheduler(
        optimizer, t_initial=max(total_steps - warmup_steps, 1), lr_min=min_lr, warmup_t=warmup_steps,
        warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False,
    )


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest group lr (the head's / undecayed groups')."""
    return max(g["lr"] for g in optimizer.param_groups)
