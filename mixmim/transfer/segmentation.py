"""UperNet on a MixMIM backbone for ADE20K (Table 4), with sliding-window evaluation.

No library in the environment provides an UperNet head (mmseg is not installable
here, timm and torchvision have none), so a compact one is written here after Xiao
et al. (2018) and mmseg's ``UPerHead``: a pyramid pooling module on the last stage,
an FPN that fuses all four stages, a 3x3 fusion conv over the concatenated levels and
a 1x1 classifier. BEiT's setting (which the paper reuses) adds an FCN auxiliary head
on stage 3 with loss weight 0.4. Widths are mmseg's Swin UperNet configs (512 for the
decode head, 256 for the auxiliary head), which give Table 4's 122M parameters for
MixMIM-B. Norms are BatchNorm (convert with ``nn.SyncBatchNorm.convert_sync_batchnorm``
for multi-GPU training, as mmseg's SyncBN).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import MixMIMBackbone, build_backbone
from ..data.ade20k import IGNORE_INDEX, ADE20KDataset
from .dense_transforms import IMAGENET_MEAN, IMAGENET_STD, keep_ratio_size
from .metrics import DenseComplexity, confusion_matrix, count_macs, count_trainable, segmentation_scores

__all__ = [
    "SEGMENTATION_BACKBONE_PREFIX",
    "FCNHead",
    "PyramidPooling",
    "UperNetHead",
    "UperNetSegmentor",
    "build_upernet",
    "evaluate_segmentation",
    "segmentor_complexity",
    "slide_inference",
    "upernet_complexity",
]

SEGMENTATION_BACKBONE_PREFIX = "backbone."


class ConvNormAct(nn.Sequential):
    """k x k conv (no bias), BatchNorm, ReLU: mmseg's ConvModule as UperNet uses it."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """Average-pool to each scale, 1x1 conv, upsample back; concatenated with the input."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(in_channels, channels, 1)) for s in scales
        )
        self.out_channels = in_channels + len(scales) * channels

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x] + [_resize(branch(x), x.shape[-2:]) for branch in self.branches], dim=1)


class _Classifier(nn.Sequential):
    """Dropout2d then a 1x1 conv to class logits, initialised small (mmseg's conv_seg)."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))
        nn.init.normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


class UperNetHead(nn.Module):
    """Logits at the resolution of the first (stride-4) map from the four stage maps."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.ppm_fuse = ConvNormAct(self.ppm.out_channels, channels, 3)
        self.laterals = nn.ModuleList(ConvNormAct(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvNormAct(len(in_channels) * channels, channels, 3)
        self.classifier = _Classifier(channels, num_classes, dropout)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        levels = [lateral(f) for lateral, f in zip(self.laterals, feats)]
        levels.append(self.ppm_fuse(self.ppm(feats[-1])))
        for i in range(len(levels) - 1, 0, -1):  # top-down pathway
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(level) for conv, level in zip(self.fpn_convs, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1))
        return self.classifier(fused)


class FCNHead(nn.Module):
    """Auxiliary head (BEiT's setting): one 3x3 ConvNormAct and a classifier on one stage."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = ConvNormAct(in_channels, channels, 3)
        self.classifier = _Classifier(channels, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.conv(x))


def _masked_cross_entropy(logits: Tensor, label: Tensor, ignore_index: int) -> Tensor:
    """Mean cross-entropy over labelled pixels; 0 (with a graph) when a batch has none."""
    loss = F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="sum")
    return loss / (label != ignore_index).sum().clamp(min=1)


class UperNetSegmentor(nn.Module):
    """Backbone + UperNet (+ auxiliary FCN on stage 3) taking [0, 1] images.

    ``forward`` returns logits at the input resolution; ``losses`` the weighted
    cross-entropies for training. Normalisation with the ImageNet statistics is done
    here so that datasets, sliding windows and padding all work in [0, 1] pixels.
    """

    def __init__(self, backbone: MixMIMBackbone, num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), aux_channels: int = 256, aux_weight: float = 0.4,
                 aux_stage: int = 2, dropout: float = 0.1, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.decode_head = UperNetHead(backbone.out_channels, num_classes, channels, pool_scales, dropout)
        self.aux_head = FCNHead(backbone.out_channels[aux_stage], num_classes, aux_channels, dropout) \
            if aux_weight > 0 else None
        self.aux_stage = aux_stage
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, img: Tensor) -> list[Tensor]:
        return list(self.backbone((img - self.pixel_mean) / self.pixel_std).values())

    @staticmethod
    def _to_input_size(logits: Tensor, img: Tensor, stride: int) -> Tensor:
        """Upsample stride-s logits by s and crop: the backbone maps cover ceil(size / s) cells
        of the (bottom/right padded) input, so this keeps logits and pixels aligned."""
        up = _resize(logits, (logits.shape[-2] * stride, logits.shape[-1] * stride))
        return up[..., : img.shape[-2], : img.shape[-1]]

    def forward(self, img: Tensor) -> Tensor:
        return self._to_input_size(self.decode_head(self.features(img)), img, self.backbone.strides[0])

    def losses(self, img: Tensor, label: Tensor) -> dict[str, Tensor]:
        """``loss_decode`` + ``aux_weight`` * ``loss_aux`` under ``loss`` (pixels == ignore skipped)."""
        feats = self.features(img)
        strides = self.backbone.strides
        label = label.to(torch.int64)
        out = {"loss_decode": _masked_cross_entropy(
            self._to_input_size(self.decode_head(feats), img, strides[0]), label, self.ignore_index)}
        total = out["loss_decode"]
        if self.aux_head is not None:
            aux = self._to_input_size(self.aux_head(feats[self.aux_stage]), img, strides[self.aux_stage])
            out["loss_aux"] = _masked_cross_entropy(aux, label, self.ignore_index)
            total = total + self.aux_weight * out["loss_aux"]
        out["loss"] = total
        return out


def build_upernet(backbone: MixMIMBackbone, num_classes: int = 150, **kwargs: Any) -> UperNetSegmentor:
    """UperNet segmentor of Table 4 (``kwargs`` reach :class:`UperNetSegmentor`)."""
    return UperNetSegmentor(backbone, num_classes, **kwargs)


# --------------------------------------------------------------------------- #
# Inference and evaluation
# --------------------------------------------------------------------------- #
def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _starts(size: int, crop: int, stride: int) -> list[int]:
    """Window starts covering ``size``; the last window is shifted back to end at the border."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, size) - crop, 0) for i in range(count)]


@torch.no_grad()
def slide_inference(model: nn.Module, img: Tensor, crop: int | Sequence[int], stride: int | Sequence[int],
                    num_classes: int) -> Tensor:
    """Average of the logits of overlapping ``crop`` windows (mmseg's "slide" mode), (B, K, H, W).

    Windows at the borders are shifted inward; an image smaller than the crop is one
    window, which the backbone pads.
    """
    (ch, cw), (sh, sw) = _pair(crop), _pair(stride)
    b, _, h, w = img.shape
    logits = img.new_zeros(b, num_classes, h, w)
    count = img.new_zeros(1, 1, h, w)
    for top in _starts(h, ch, sh):
        for left in _starts(w, cw, sw):
            window = img[:, :, top:top + ch, left:left + cw]
            out = model(window)
            if out.shape[1] != num_classes or out.shape[-2:] != window.shape[-2:]:
                raise ValueError(f"model returned {tuple(out.shape)} for a {tuple(window.shape)} window; expected "
                                 f"(B, {num_classes}, {window.shape[-2]}, {window.shape[-1]})")
            logits[:, :, top:top + window.shape[-2], left:left + window.shape[-1]] += out
            count[:, :, top:top + window.shape[-2], left:left + window.shape[-1]] += 1
    return logits / count


def _ignore_index(model: nn.Module) -> int:
    return int(getattr(model, "ignore_index", IGNORE_INDEX))


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module, dataset: ADE20KDataset, num_classes: int | None = None, crop: int | Sequence[int] = 512,
    stride: int | Sequence[int] = 341, test_scale: tuple[int, int] | None = (2048, 512),
    max_images: int | None = None, class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """mIoU, pixel accuracy (``aAcc``), mean class accuracy and per-class IoU over a split.

    As mmseg's ADE20K test: resize keeping the ratio to ``test_scale`` (long, short
    edge), slide ``crop`` windows with ``stride``, resize the logits to the original
    label size, and accumulate one confusion matrix over all images.
    """
    if dataset.transform is not None:
        raise ValueError("evaluate on a dataset without a training transform (labels must be at full size)")
    num_classes = num_classes or getattr(model, "num_classes", None) or dataset.num_classes
    model.eval()
    device = next(model.parameters()).device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    for i in range(count):
        image, label = dataset[i]
        h, w = label.shape
        x = image.unsqueeze(0).to(device)
        if test_scale is not None:
            x = _resize(x, keep_ratio_size(h, w, test_scale))
        logits = _resize(slide_inference(model, x, crop, stride, num_classes), (h, w))
        confusion += confusion_matrix(logits.argmax(1)[0].cpu(), label, num_classes, _ignore_index(model))
    scores = segmentation_scores(confusion, class_names)
    scores["num_images"] = count
    return scores


# --------------------------------------------------------------------------- #
# Complexity (Table 4)
# --------------------------------------------------------------------------- #
SEGMENTATION_CONVENTION = (
    "multiply-adds (FlopCounterMode / 2) of one img_size x img_size forward pass at test time (backbone and "
    "UperNet decode head; the auxiliary head is training-only, as in mmseg's get_flops); BatchNorm, pooling, "
    "interpolation and element-wise ops are not counted. Params: all learnable parameters including the "
    "auxiliary head (parts_params_m lists it), without the fixed sin-cos position table."
)


def upernet_complexity(model: UperNetSegmentor, img_size: int, name: str) -> DenseComplexity:
    """Params and GFLOPs of a built UperNet at ``img_size`` (build it on the meta device to count for free)."""
    device = next(model.parameters()).device
    with torch.device(device):
        x = torch.zeros(1, 3, img_size, img_size)
        with torch.no_grad():
            feats = model.features(x)
        parts = {
            "backbone": count_macs(lambda: model.features(x)),
            "decode_head": count_macs(lambda: model.decode_head(feats)),
        }
    params = {"backbone": count_trainable(model.backbone), "decode_head": count_trainable(model.decode_head),
              "aux_head": count_trainable(model.aux_head) if model.aux_head is not None else 0}
    return DenseComplexity(
        model=name, task="ade20k_upernet", img_size=img_size, params_m=count_trainable(model) / 1e6,
        gflops=sum(parts.values()) / 1e9, parts_gflops={k: v / 1e9 for k, v in parts.items()},
        parts_params_m={k: v / 1e6 for k, v in params.items()}, convention=SEGMENTATION_CONVENTION,
    )


def segmentor_complexity(name: str = "mixmim_base", img_size: int = 512, num_classes: int = 150) -> DenseComplexity:
    """Params and GFLOPs of Table 4's UperNet."""
    with torch.device("meta"):
        model = build_upernet(build_backbone(name, img_size), num_classes).eval()
    return upernet_complexity(model, img_size, name)
