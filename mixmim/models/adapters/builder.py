"""``build_adapter``: a timm model name in, the MixMIM adapter of its family out."""

from __future__ import annotations

from typing import Any

import timm
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from timm.models.resnet import ResNet
from timm.models.resnetv2 import ResNetV2
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .base import TimmMixMIMAdapter
from .pvt import PVTv2Adapter
from .resnet import ResNetAdapter
from .swin import SwinAdapter
from .vit import ViTAdapter

# Checked in order with isinstance, so subclasses of a family class (DeiT's distilled
# ViT, say) use the family's adapter.
FAMILIES: tuple[tuple[tuple[type, ...], type[TimmMixMIMAdapter]], ...] = (
    ((VisionTransformer,), ViTAdapter),
    ((SwinTransformer,), SwinAdapter),
    ((PyramidVisionTransformerV2,), PVTv2Adapter),
    ((ResNet, ResNetV2), ResNetAdapter),
)

ADAPTER_OPTIONS = (
    "mask_ratio", "range_mask_ratio", "mask_type", "dual", "norm_pix_loss", "restrict", "decoder_dim",
    "decoder_depth", "decoder_num_heads", "decoder_mlp_ratio",
)


def create_timm_model(name: str, img_size: int | None = None, **timm_kwargs: Any) -> tuple[nn.Module, bool]:
    """``timm.create_model(name, **timm_kwargs)``, with ``img_size`` if the model takes one.

    Returns the model and whether it took ``img_size`` (ViT and Swin do; ResNets and PVT v2
    accept any input size and have no such argument).
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}")
    if img_size is None:
        return timm.create_model(name, **timm_kwargs), False
    try:
        return timm.create_model(name, img_size=img_size, **timm_kwargs), True
    except TypeError as err:
        if "img_size" not in str(err):
            raise
    return timm.create_model(name, **timm_kwargs), False


def adapter_class(model: nn.Module) -> type[TimmMixMIMAdapter]:
    """The adapter of a timm model's family, chosen from the model's class."""
    for classes, adapter in FAMILIES:
        if isinstance(model, classes):
            return adapter
    supported = ", ".join(c.__module__ + "." + c.__name__ for classes, _ in FAMILIES for c in classes)
    raise NotImplementedError(f"no MixMIM adapter for {type(model).__name__}; supported: {supported}")


def build_adapter(timm_name: str, img_size: int | None = None, **kwargs: Any) -> TimmMixMIMAdapter:
    """MixMIM pretraining model on the timm encoder ``timm_name``.

    ``kwargs`` holds the MixMIM options (``mask_ratio``, ``range_mask_ratio``,
    ``mask_type``, ``dual``, ``norm_pix_loss``, ``restrict``, ``decoder_dim``,
    ``decoder_depth``, ``decoder_num_heads``, ``decoder_mlp_ratio``); everything else goes
    to ``timm.create_model`` (so ``timm.create_model(timm_name, **those)``, plus
    ``img_size`` where the model takes it, builds the matching plain model).
    ``img_size`` defaults to 224 (to the model's own for ViT/Swin, which are built for it).
    The weights are timm's random initialisation; ``pretrained=True`` is never implied.
    """
    options = {k: kwargs.pop(k) for k in ADAPTER_OPTIONS if k in kwargs}
    encoder, took_size = create_timm_model(timm_name, img_size, **kwargs)
    cls = adapter_class(encoder)
    if not took_size and cls in (PVTv2Adapter, ResNetAdapter):
        options["img_size"] = 224 if img_size is None else img_size
    return cls(encoder, timm_name, **options)
