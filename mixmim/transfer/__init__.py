"""Dense transfer of MixMIM encoders: Mask R-CNN on COCO and UperNet on ADE20K (Table 4).

* :mod:`.backbone` -- the encoder as a four-level backbone, checkpoint loading with
  window changes, the paper's detection windows, layer-wise lr decay groups.
* :mod:`.detection` -- torchvision Mask R-CNN + FPN, COCO evaluation, complexity.
* :mod:`.segmentation` -- UperNet + auxiliary FCN head, sliding-window evaluation.
* :mod:`.dense_transforms` -- LSJ, the segmentation training pipeline and the detection
  collate (the COCO and ADE20K readers are :mod:`mixmim.data.coco` and :mod:`mixmim.data.ade20k`,
  re-exported by this package).
* :mod:`.dense_config` -- the run configurations; :mod:`.train` -- the dense engine.
* :mod:`.metrics` -- confusion-matrix scores, COCO stat names, MAC counting.
"""

from .backbone import (
    MixMIMBackbone,
    backbone_state_dict,
    build_backbone,
    detection_window_sizes,
    encoder_config,
    load_backbone_checkpoint,
    param_groups_layer_decay,
)
from ..data.ade20k import ADE20K_NUM_CLASSES, IGNORE_INDEX, ADE20KDataset
from ..data.coco import CocoInstanceDataset
from .dense_transforms import (
    LargeScaleJitter,
    SegmentationTrainTransform,
    collate_detection,
)
from .detection import (
    DETECTION_BACKBONE_PREFIX,
    MixMIMFPN,
    build_mask_rcnn,
    coco_evaluate_results,
    detection_loss_step,
    detections_to_coco,
    detector_complexity,
    evaluate_coco,
    mask_rcnn_complexity,
)
from .metrics import DenseComplexity, confusion_matrix, segmentation_scores
from .segmentation import (
    SEGMENTATION_BACKBONE_PREFIX,
    UperNetSegmentor,
    build_upernet,
    evaluate_segmentation,
    segmentor_complexity,
    slide_inference,
    upernet_complexity,
)

__all__ = [
    "ADE20K_NUM_CLASSES", "ADE20KDataset", "CocoInstanceDataset", "DETECTION_BACKBONE_PREFIX", "DenseComplexity",
    "IGNORE_INDEX", "LargeScaleJitter", "MixMIMBackbone", "MixMIMFPN", "SEGMENTATION_BACKBONE_PREFIX",
    "SegmentationTrainTransform", "UperNetSegmentor", "backbone_state_dict", "build_backbone", "build_mask_rcnn",
    "build_upernet", "coco_evaluate_results", "collate_detection", "confusion_matrix", "detection_loss_step",
    "detection_window_sizes", "detections_to_coco", "detector_complexity", "encoder_config", "evaluate_coco",
    "evaluate_segmentation", "load_backbone_checkpoint", "mask_rcnn_complexity", "param_groups_layer_decay", "segmentation_scores",
    "segmentor_complexity", "slide_inference", "upernet_complexity",
]
