"""MixMIM pretraining on timm encoders (issue 6; paper Table 3 and section 9, Table 13).

One adapter per family wraps the unmodified timm model as ``adapter.encoder``:

====================  =========================================  ======  =====================================
family                timm class                                 stride  group restriction
====================  =========================================  ======  =====================================
``ViTAdapter``        vision_transformer.VisionTransformer        patch   -inf attention bias; class token
                                                                          copied per group
``SwinAdapter``       swin_transformer.SwinTransformer            32      group bias added to the (shifted)
                                                                          window mask
``PVTv2Adapter``      pvt_v2.PyramidVisionTransformerV2           32      spatial reduction per group; mixed
                                                                          patch-embed / depthwise convs
``ResNetAdapter``     resnet.ResNet, resnetv2.ResNetV2 (BiT)      32      mixed convolution, pooling,
                                                                          GroupNorm per group
====================  =========================================  ======  =====================================

``build_adapter("vit_base_patch16_224", decoder_depth=8)`` picks the family from the
model's class. ``adapter.encoder.state_dict()`` loads with ``strict=True`` into
``timm.create_model`` of the same name and arguments, so a pretrained encoder finetunes
as a plain timm model.
"""

from .base import GroupContext, TimmMixMIMAdapter
from .builder import ADAPTER_OPTIONS, FAMILIES, adapter_class, build_adapter, create_timm_model
from .pvt import PVTv2Adapter
from .resnet import ResNetAdapter
from .swin import SwinAdapter
from .vit import ViTAdapter

__all__ = [
    "ADAPTER_OPTIONS", "FAMILIES", "GroupContext", "PVTv2Adapter", "ResNetAdapter", "SwinAdapter",
    "TimmMixMIMAdapter", "ViTAdapter", "adapter_class", "build_adapter", "create_timm_model",
]
