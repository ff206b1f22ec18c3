"""MixMIM on timm's ResNets with mixed convolution (section 9, Figure 4, Table 13).

Two timm families, one adapter:

- ``timm.models.resnet.ResNet`` (BatchNorm, e.g. ``resnet50``, ``resnet50d``); a width
  multiplier is the ``channels`` argument (``channels=(192, 384, 768, 1536)`` for x3 in
  the bottleneck widths; the stem stays 64 wide);
- ``timm.models.resnetv2.ResNetV2``, which is BiT's architecture (pre-activation,
  weight-standardised convolutions, GroupNorm): ``resnetv2_50x3_bit`` and
  ``resnetv2_101x3_bit`` are exactly the Res50x3 / Res101x3 that Table 13 compares with
  BiT, and the default choice for the paper's ConvNet experiments.

Output stride 32. Every convolution whose windows can straddle mask cells becomes a
mixed convolution, max and average pooling are taken per group, GroupNorm statistics
are taken per group, and the BiT stem's constant padding records its group map (see
``mixed_ops``). 1x1 convolutions (also strided ones) and BatchNorm need nothing in eval
mode; in training, BatchNorm's batch statistics are shared by both groups.

Blocks that pool globally inside the trunk (squeeze-excitation and similar attention
modules) or blur-pool would let the groups meet; such models are refused.
"""

from __future__ import annotations

from timm.models.resnet import ResNet
from timm.models.resnetv2 import ResNetV2
from torch import Tensor, nn

from .base import TimmMixMIMAdapter, to_tokens
from .mixed_ops import make_mixed


HEAD_MODULES = ("fc", "head", "global_pool")  # after forward_features: never run mixed


def _cross_group_modules(encoder: nn.Module) -> list[str]:
    """Names of trunk modules that would mix the groups and that no mixed operator covers."""
    bad = []
    for name, mod in encoder.named_modules():
        if name.split(".")[0] in HEAD_MODULES:
            continue
        for attr in ("se", "attn", "aa"):
            sub = getattr(mod, attr, None)
            if isinstance(sub, nn.Module) and not isinstance(sub, nn.Identity):
                bad.append(f"{name}.{attr} ({type(sub).__name__})")
    return bad


class ResNetAdapter(TimmMixMIMAdapter):
    family = "resnet"

    def __init__(self, encoder: ResNet | ResNetV2, timm_name: str, img_size: int = 224, **options) -> None:
        bad = _cross_group_modules(encoder)
        if bad:
            raise NotImplementedError(
                f"{timm_name}: these modules pool across positions and would mix the two images: "
                f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; use a ResNet without attention or "
                "anti-aliasing blocks"
            )
        info = encoder.feature_info[-1]
        in_chans = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d)).in_channels
        super().__init__(encoder, timm_name, stride=info["reduction"], num_features=encoder.num_features,
                         img_size=img_size, in_chans=in_chans, **options)
        self.mixed_modules: list[str] = []
        for name, child in encoder.named_children():
            if name not in HEAD_MODULES:
                self.mixed_modules += [f"{name}.{s}" if s else name for s in make_mixed(child, self.ctx)]

    def _encode(self, x: Tensor, restrict: bool) -> Tensor:
        return to_tokens(self.encoder.forward_features(x))
