"""Mask R-CNN on a MixMIM backbone with torchvision, evaluated with pycocotools (Table 4, COCO).

Why torchvision rather than mmdet: mmdet 3.x needs an mmcv that does not build against
this suite's torch, while torchvision ships Mask R-CNN, FPN, RoIAlign and NMS.

The detector follows the MAE/ViTDet Mask R-CNN that the paper reuses (section 8:
"we follow the training setting in [25, 19]"): an FPN over the four stages plus a
max-pooled P6, a two-conv RPN head, a 4conv1fc box head and a 4-conv mask head, with
channel-wise LayerNorm in the FPN and heads (batch-size independent, unlike BN). Images
are resized to a fixed square size (longest side ``size``) and the backbone pads them
to its build size, which is how large-scale-jitter training and testing see them.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .backbone import MixMIMBackbone, build_backbone
from ..data.coco import CocoInstanceDataset
from .dense_transforms import IMAGENET_MEAN, IMAGENET_STD
from .metrics import DenseComplexity, coco_stats_dict, count_macs, count_trainable

__all__ = [
    "DETECTION_BACKBONE_PREFIX",
    "LayerNorm2d",
    "MixMIMFPN",
    "build_mask_rcnn",
    "coco_evaluate_results",
    "detection_loss_step",
    "detections_to_coco",
    "detector_complexity",
    "evaluate_coco",
    "mask_rcnn_complexity",
    "predict_coco",
]

DETECTION_BACKBONE_PREFIX = "backbone.body."
"""Name prefix of the MixMIM backbone's parameters inside :func:`build_mask_rcnn`'s model."""

COCO_METRIC_KEYS: tuple[str, ...] = tuple(
    f"{name}_{kind}" for kind in ("box", "mask") for name in ("AP", "AP50", "AP75", "APs", "APm", "APl")
)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each position of a (B, C, H, W) map (ViTDet's "LN")."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class MixMIMFPN(nn.Module):
    """Backbone + FPN: levels "0".."3" (strides 4..32) and "pool" (stride 64), ``out_channels`` wide."""

    def __init__(self, body: MixMIMBackbone, out_channels: int = 256, norm: bool = True) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.out_channels, out_channels, extra_blocks=LastLevelMaxPool(),
            norm_layer=LayerNorm2d if norm else None,
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))


def _padded(size: int, stride: int = 32) -> int:
    return math.ceil(size / stride) * stride


def build_mask_rcnn(
    backbone: MixMIMBackbone,
    num_classes: int,
    size: int | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    norm: bool = True,
    anchor_sizes: Sequence[int] | None = None,
    **maskrcnn_kwargs: Any,
) -> MaskRCNN:
    """torchvision Mask R-CNN over ``backbone`` for ``num_classes`` object categories (background added).

    Image size: ``size`` makes every image's longest side ``size`` (the LSJ setting,
    default the backbone's build size); or give torchvision's ``min_size``/``max_size``.
    The backbone must be built at least as large as the padded batch can get.
    ``anchor_sizes``: one anchor size per FPN map ("0".."3", "pool"), default torchvision's
    32..512 px; objects much smaller than the smallest anchor match no anchor well enough to
    train the RPN, so small inputs need small anchors.
    ``maskrcnn_kwargs`` go to ``MaskRCNN`` (e.g. ``rpn_post_nms_top_n_train``).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes}; expected the number of object categories (>= 1)")
    if size is None and min_size is None and max_size is None:
        size = max(backbone.img_size)
    if size is not None:
        min_size = max_size = int(size)
    elif min_size is None or max_size is None:
        raise ValueError("give either size, or both min_size and max_size")
    needed = _padded(max_size)
    if min(backbone.img_size) < needed:
        raise ValueError(
            f"images may reach {needed}x{needed} (max_size {max_size} padded to a multiple of 32) but the backbone "
            f"was built for {backbone.img_size[0]}x{backbone.img_size[1]}; build it with img_size={needed}"
        )
    neck = MixMIMFPN(backbone, fpn_channels, norm=norm)
    norm_layer = LayerNorm2d if norm else None
    ratios = (0.5, 1.0, 2.0)  # torchvision's default: one size per level, three aspect ratios
    num_anchors = len(ratios)
    if anchor_sizes is not None:
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes={list(anchor_sizes)}; expected 5 sizes, one per FPN map ('0'..'3', 'pool')")
        maskrcnn_kwargs["rpn_anchor_generator"] = AnchorGenerator(tuple((int(s),) for s in anchor_sizes),
                                                                  (ratios,) * len(anchor_sizes))
    return MaskRCNN(
        neck,
        num_classes=None,  # given by the predictors below
        min_size=min_size,
        max_size=max_size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        rpn_head=RPNHead(fpn_channels, num_anchors, conv_depth=2),
        box_head=FastRCNNConvFCHead((fpn_channels, 7, 7), [fpn_channels] * 4, [representation_size],
                                    norm_layer=norm_layer),
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
        mask_head=MaskRCNNHeads(fpn_channels, [fpn_channels] * 4, 1, norm_layer=norm_layer),
        mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes + 1),
        **maskrcnn_kwargs,
    )


def _to_device(
    images: Sequence[Tensor], targets: Sequence[dict[str, Any]] | None, device: torch.device,
) -> tuple[list[Tensor], list[dict[str, Any]] | None]:
    """Images and the tensors of each target on ``device`` (ids and other values as they are)."""
    images = [img.to(device) for img in images]
    if targets is None:
        return images, None
    moved = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]
    return images, moved


def detection_loss_step(
    model: MaskRCNN, images: Sequence[Tensor], targets: Sequence[dict[str, Any]],
) -> dict[str, Tensor]:
    """Training-mode forward: torchvision's five losses plus their sum under ``"loss"``.

    The caller owns backward, clipping and the optimizer step (the suite's engine).
    """
    model.train()
    device = next(model.parameters()).device
    images, targets = _to_device(images, targets, device)
    losses = model(images, targets)
    losses["loss"] = sum(losses.values())
    return losses


# --------------------------------------------------------------------------- #
# COCO evaluation
# --------------------------------------------------------------------------- #
def _encode_masks(masks: Tensor, threshold: float) -> list[dict[str, Any]]:
    """Binary RLEs (JSON-ready) of (N, H, W) or (N, 1, H, W) masks or probabilities."""
    if masks.ndim == 4:
        masks = masks[:, 0]
    binary = (masks.float() > threshold).to(torch.uint8).cpu().numpy()
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def detections_to_coco(
    image_id: int, prediction: dict[str, Tensor], label_to_cat: dict[int, int], mask_threshold: float = 0.5,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One image's prediction (torchvision format, XYXY boxes) as COCO bbox and segm results.

    The two lists are kept apart so that COCOeval takes segm areas from the masks
    rather than from the boxes.
    """
    boxes = prediction["boxes"].detach().cpu().to(torch.float64)
    if boxes.numel() == 0:
        return [], []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = prediction["scores"].detach().cpu().tolist()
    cats = [label_to_cat[int(label)] for label in prediction["labels"].cpu().tolist()]
    bbox = [{"image_id": image_id, "category_id": c, "bbox": b, "score": s} for b, c, s in zip(xywh, cats, scores)]
    segm: list[dict[str, Any]] = []
    if "masks" in prediction:
        rles = _encode_masks(prediction["masks"].detach(), mask_threshold)
        segm = [{"image_id": image_id, "category_id": c, "segmentation": r, "score": s}
                for r, c, s in zip(rles, cats, scores)]
    return bbox, segm


def _coco_eval(coco_gt: COCO, results: list[dict[str, Any]], iou_type: str, image_ids: Sequence[int],
               records: list[dict[str, Any]] | None = None) -> list[float]:
    """COCOeval's 12 stats; with ``records`` (a list) also the per-image match records
    (:func:`mixmim.records.coco_match_records`) appended to it, images in ``sorted(image_ids)`` order."""
    from ..records import coco_gt_records, coco_match_records

    ids = sorted(image_ids)
    if not results:
        if records is not None:
            records.extend(coco_gt_records(coco_gt, ids))
        return [0.0] * 12
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    if records is not None:
        records.extend(coco_match_records(evaluator, ids))
    return [float(v) for v in evaluator.stats]


def coco_evaluate_results(
    coco_gt: COCO, bbox_results: list[dict[str, Any]], segm_results: list[dict[str, Any]],
    image_ids: Iterable[int] | None = None, records: dict[str, Any] | None = None,
) -> dict[str, float]:
    """COCOeval on the given images: ``AP_box``, ``AP50_box``, ``AP75_box``, ``APs/m/l_box`` and
    the same with ``_mask``, as fractions (an empty result list scores 0). A ``records`` dict
    receives the per-image match records under ``box`` and ``mask`` (for the report's bootstrap)."""
    ids = sorted(set(image_ids) if image_ids is not None else coco_gt.getImgIds())
    box: list[dict[str, Any]] | None = [] if records is not None else None
    mask: list[dict[str, Any]] | None = [] if records is not None else None
    metrics = coco_stats_dict(_coco_eval(coco_gt, bbox_results, "bbox", ids, box), "box")
    metrics.update(coco_stats_dict(_coco_eval(coco_gt, segm_results, "segm", ids, mask), "mask"))
    if records is not None:
        records.update(box=box, mask=mask)
    return metrics


@torch.no_grad()
def predict_coco(
    model: MaskRCNN, dataset: CocoInstanceDataset, batch_size: int = 1, max_images: int | None = None,
    mask_threshold: float = 0.5,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    """Run the detector over ``dataset`` (untransformed images); COCO bbox/segm results and image ids."""
    if dataset.transform is not None:
        raise ValueError("evaluate on a dataset without a training transform: results must be in the "
                         "coordinates of the annotation file")
    model.eval()
    device = next(model.parameters()).device
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    bbox: list[dict[str, Any]] = []
    segm: list[dict[str, Any]] = []
    ids: list[int] = []
    for start in range(0, count, batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, count))]
        images, _ = _to_device([s[0] for s in samples], None, device)
        for (_, target), prediction in zip(samples, model(images)):
            b, s = detections_to_coco(target["image_id"], prediction, dataset.label_to_cat, mask_threshold)
            bbox += b
            segm += s
            ids.append(target["image_id"])
    return bbox, segm, ids


def evaluate_coco(model: MaskRCNN, dataset: CocoInstanceDataset, batch_size: int = 1,
                  max_images: int | None = None) -> dict[str, float]:
    """AP box / AP mask (and AP50, AP75, APs/m/l) of ``model`` on a COCO-format split."""
    bbox, segm, ids = predict_coco(model, dataset, batch_size, max_images)
    return coco_evaluate_results(dataset.coco, bbox, segm, ids)


# --------------------------------------------------------------------------- #
# Complexity (Table 4)
# --------------------------------------------------------------------------- #
DETECTION_CONVENTION = (
    "multiply-adds (FlopCounterMode / 2) of one img_size x img_size image: backbone and FPN, the RPN head on all "
    "five levels, the box head + predictor on {proposals} RoIs (torchvision's test-time post-NMS count) and the "
    "mask head + predictor on {detections} RoIs (detections per image); RoIAlign, NMS, anchor decoding and "
    "element-wise ops are not counted. Params: learnable parameters only (the fixed sin-cos position table, "
    "8.4M entries at 1024, is a buffer and not counted; Table 4's 110M matches that)."
)


def mask_rcnn_complexity(model: MaskRCNN, img_size: int, name: str) -> DenseComplexity:
    """Params and GFLOPs of a built Mask R-CNN at ``img_size`` (build it on the meta device to count for free).

    The detector's data-dependent steps (NMS, top-k, RoIAlign) cannot run on shapes
    alone, so each learned part is run on tensors of the shape it sees at test time
    (see ``DETECTION_CONVENTION``), as fvcore-style counts of detectors do: as many RoIs
    as the model keeps after NMS at test time, as many masks as detections per image.
    """
    proposals = int(model.rpn._post_nms_top_n["testing"])  # torchvision keeps the train/test pair privately
    detections = int(model.roi_heads.detections_per_img)
    device = next(model.parameters()).device
    with torch.device(device):
        x = torch.zeros(1, 3, img_size, img_size)
        body, fpn, heads = model.backbone.body, model.backbone.fpn, model.roi_heads
        with torch.no_grad():
            feats = body(x)
            pyramid = fpn(feats)
        channels = model.backbone.out_channels
        rois = torch.zeros(proposals, channels, 7, 7)
        mask_rois = torch.zeros(detections, channels, 14, 14)
        parts = {
            "backbone": count_macs(lambda: body(x)),
            "fpn": count_macs(lambda: fpn(feats)),
            "rpn": count_macs(lambda: model.rpn.head(list(pyramid.values()))),
            "box_head": count_macs(lambda: heads.box_predictor(heads.box_head(rois))),
            "mask_head": count_macs(lambda: heads.mask_predictor(heads.mask_head(mask_rois))),
        }
    params = {
        "backbone": count_trainable(body), "fpn": count_trainable(fpn),
        "rpn": count_trainable(model.rpn), "roi_heads": count_trainable(heads),
    }
    return DenseComplexity(
        model=name, task="coco_mask_rcnn", img_size=img_size, params_m=count_trainable(model) / 1e6,
        gflops=sum(parts.values()) / 1e9, parts_gflops={k: v / 1e9 for k, v in parts.items()},
        parts_params_m={k: v / 1e6 for k, v in params.items()},
        convention=DETECTION_CONVENTION.format(proposals=proposals, detections=detections),
    )


def detector_complexity(name: str = "mixmim_base", img_size: int = 1024, num_classes: int = 80) -> DenseComplexity:
    """Params and GFLOPs of Table 4's Mask R-CNN (torchvision's test-time defaults: 1000 RoIs, 100 detections)."""
    with torch.device("meta"):
        model = build_mask_rcnn(build_backbone(name, img_size), num_classes, size=img_size).eval()
    return mask_rcnn_complexity(model, img_size, name)
