"""Optimiser, parameter groups and the per-iteration learning-rate schedule.

Weight decay and layer-wise lr decay come from timm's parameter-group helpers; the
models say which parameters are exempt (``no_weight_decay``) and, for finetuning,
the depth of each parameter (``group_matcher``).
"""

from __future__ import annotations

import typing
from collections.abc import Iterable

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from .config import AdamWKernel


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The linear scaling rule of section 8: lr = base_lr * batch / 256."""
    return base_lr * effective_batch / 256


#: PyTorch's AdamW implementations a run may choose (the engine configs' ``adamw_kernel``).
#: ``default`` leaves the choice to PyTorch: on the CPU a loop over the parameters, which every
#: recorded result of this suite used, on CUDA its multi-tensor kernel. ``fused`` is PyTorch's
#: single-pass kernel: about 3x faster on MixMIM-B's parameters on the CPU
#: (``benchmarks/optimizer_step.py``), equal to the loop up to rounding but not bit for bit, so
#: choosing it moves a run's numbers slightly and a pipeline that switches reruns its stages.
ADAMW_KERNELS: tuple[str, ...] = typing.get_args(AdamWKernel)


def adamw(groups: list[dict] | Iterable[nn.Parameter], lr: float, betas: tuple[float, float],
          kernel: str = "default") -> torch.optim.AdamW:
    """PyTorch's AdamW over ``groups`` with the named kernel (one of :data:`ADAMW_KERNELS`)."""
    if kernel not in ADAMW_KERNELS:
        raise ValueError(f"adamw_kernel={kernel!r}: expected one of {', '.join(ADAMW_KERNELS)}")
    if kernel == "fused":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                layer_decay: float | None = None, kernel: str = "default") -> torch.optim.AdamW:
    """AdamW with no decay on norms, biases and the model's listed tables and tokens.

    ``layer_decay`` scales each depth's lr by ``layer_decay ** (max_depth - depth)``
    (the group's ``lr_scale``, applied by the scheduler); ``kernel`` is the config's
    ``adamw_kernel`` (:data:`ADAMW_KERNELS`).
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
    return adamw(groups, lr, betas, kernel)


def build_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                          min_lr: float) -> CosineLRScheduler:
    """Linear warmup from 0, then cosine decay to ``min_lr``, updated every optimiser step."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return CosineLRScheduler(
        optimizer, t_initial=max(total_steps - warmup_steps, 1), lr_min=min_lr, warmup_t=warmup_steps,
        warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False,
    )


def build_schedule(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int,
                   warmup_lr_init: float, milestones: tuple[int, ...] | list[int] = (), gamma: float = 0.1,
                   power: float = 1.0, min_lr: float = 0.0) -> Scheduler:
    """timm's per-iteration schedule of ``kind`` over the whole run (detection and segmentation):
    a linear warmup from ``warmup_lr_init`` to each group's base lr over ``warmup_steps``, then

    * ``step``: the lr times ``gamma`` at each optimiser step in ``milestones`` (ViTDet, detectron2),
    * ``poly``: ``(lr - min_lr) * (1 - t / total) ** power + min_lr`` (mmcv's poly, as BEiT),
    * ``cosine``: from lr to ``min_lr``.

    Warmup steps count towards ``total_steps`` and the milestones (``warmup_prefix=False``).
    Group lrs must hold the base lr; the scheduler multiplies each by the group's ``lr_scale``.
    """
    if kind not in ("step", "poly", "cosine"):
        raise ValueError(f"schedule {kind!r}; expected step, poly or cosine")
    total = max(int(total_steps), 1)
    common = dict(warmup_t=max(int(warmup_steps), 0), warmup_lr_init=warmup_lr_init, warmup_prefix=False,
                  t_in_epochs=False)
    if kind == "step":
        # timm decays once t + 1 reaches a milestone; + 1 makes step m the first at the lower lr
        return MultiStepLRScheduler(optimizer, decay_t=sorted(int(m) + 1 for m in milestones), decay_rate=gamma,
                                    **common)
    if kind == "poly":
        return PolyLRScheduler(optimizer, t_initial=total, power=power, lr_min=min_lr, **common)
    return CosineLRScheduler(optimizer, t_initial=total, lr_min=min_lr, **common)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest group lr (the head's / undecayed groups')."""
    return max(g["lr"] for g in optimizer.param_groups)
