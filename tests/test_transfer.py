"""Dense transfer (COCO Mask R-CNN, ADE20K UperNet) on MixMIM backbones, at CPU sizes."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from mixmim.checkpoint import convert_reference_state_dict
from mixmim.data.ade20k import reduce_zero_label
from mixmim.data.builtin import write_ade20k, write_coco
from mixmim.models import build_pretrainer
from mixmim.transfer import (
    ADE20KDataset,
    CocoInstanceDataset,
    LargeScaleJitter,
    SegmentationTrainTransform,
    build_backbone,
    build_mask_rcnn,
    build_upernet,
    coco_evaluate_results,
    collate_detection,
    confusion_matrix,
    detection_loss_step,
    detection_window_sizes,
    detections_to_coco,
    detector_complexity,
    evaluate_coco,
    evaluate_segmentation,
    param_groups_layer_decay,
    segmentation_scores,
    segmentor_complexity,
    slide_inference,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE = SHARED / "reference" / "mixmim_reference_small.pt"

# Small detector settings: a handful of proposals and RoIs keeps a step well under a second.
SMALL_RCNN = dict(fpn_channels=32, representation_size=64, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                  rpn_batch_size_per_image=64, box_batch_size_per_image=32, rpn_pre_nms_top_n_test=100,
                  rpn_post_nms_top_n_test=50)
ADE_CLASSES = 8  # the stand-in's labels 1..8

# pycocotools' mask decoding trips a numpy-2 DeprecationWarning inside its own code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return write_coco(tmp_path_factory.mktemp("data") / "coco", image_size=64, num_train=4, num_val=3)


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory) -> Path:
    return write_ade20k(tmp_path_factory.mktemp("data") / "ade20k", image_size=64, num_train=4, num_val=2)


def small_backbone(img_size: int = 64, **kw):
    torch.manual_seed(0)
    return build_backbone("mixmim_nano", img_size, **kw)


def mean_first_last(losses: list[float], k: int = 2) -> tuple[float, float]:
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


# --------------------------------------------------------------------- backbone
@pytest.mark.parametrize("size", [(64, 64), (64, 96), (128, 128), (100, 60)])
def test_feature_maps_have_the_four_strides(size):
    backbone = small_backbone(128).eval()
    assert backbone.strides == [4, 8, 16, 32] and backbone.out_channels == [32, 64, 128, 256]
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, *size))
    assert list(maps) == ["0", "1", "2", "3"]
    for fmap, stride, channels in zip(maps.values(), backbone.strides, backbone.out_channels):
        assert fmap.shape == (2, channels, math.ceil(size[0] / stride), math.ceil(size[1] / stride))


def test_inputs_larger_than_the_build_size_are_refused():
    with pytest.raises(ValueError, match="exceeds the backbone's build size 64x64"):
        small_backbone(64)(torch.zeros(1, 3, 96, 64))


def test_pretrained_windows_give_the_pretraining_encoder_output():
    torch.manual_seed(0)
    pre = build_pretrainer("mixmim_nano").eval()
    backbone = build_backbone("mixmim_nano", 64, window_size=(8, 8, 4, 2), checkpoint={"model": pre.state_dict()})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last = backbone(x)["3"]
        expected = pre.encoder(x)  # final-norm tokens: the stage-4 output norm starts from that norm
    torch.testing.assert_close(last.flatten(2).transpose(1, 2), expected)


def test_window_change_interpolates_tables_and_coinciding_windows_agree():
    torch.manual_seed(0)
    sd = build_pretrainer("mixmim_nano").state_dict()  # stage-1 window 8 on a 16x16 grid: 15x15 table
    a = build_backbone("mixmim_nano", 64, window_size=16, checkpoint=sd).eval()
    b = build_backbone("mixmim_nano", 64, window_size=32, checkpoint=sd).eval()
    table = a.encoder.stages[0].blocks[0].attn.rel_pos_table
    assert table.shape == (31 * 31, 1) and sd["encoder.stages.0.blocks.0.attn.rel_pos_table"].shape == (15 * 15, 1)
    torch.testing.assert_close(table, b.encoder.stages[0].blocks[0].attn.rel_pos_table)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for ma, mb in zip(a(x).values(), b(x).values()):
            torch.testing.assert_close(ma, mb)


@pytest.mark.skipif(not REFERENCE.is_file(), reason=f"{REFERENCE} not found")
def test_original_release_loads_like_the_converted_checkpoint():
    ref = torch.load(REFERENCE, weights_only=True)
    config = {k: v for k, v in ref["config"].items() if not k.startswith("decoder")}
    a = build_backbone(config, 128, checkpoint={"model": ref["state_dict"]}).eval()
    b = build_backbone(config, 128, checkpoint=convert_reference_state_dict(ref["state_dict"])).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(a(x)["2"], b(x)["2"])


def test_checkpoint_without_encoder_is_refused():
    with pytest.raises(ValueError, match="no encoder parameters"):
        build_backbone("mixmim_nano", 64, checkpoint={"head.weight": torch.zeros(2, 2)})


def test_detection_windows_of_the_paper_on_mixmim_base():
    windows = detection_window_sizes((2, 2, 18, 2))
    assert windows[0] == windows[1] == windows[3] == 16
    assert [i + 1 for i, w in enumerate(windows[2]) if w == 32] == [6, 12, 18]
    assert detection_window_sizes((1, 1, 7, 1))[2] == [16] * 5 + [32, 16]  # blocks 12 and 18 do not exist
    with torch.device("meta"):
        backbone = build_backbone("mixmim_base", 1024)
    stage3 = backbone.encoder.stages[2]
    assert len(stage3.blocks) == 18 and stage3.grid == (64, 64)
    assert [k + 1 for k, blk in enumerate(stage3.blocks) if blk.window == (32, 32)] == [6, 12, 18]
    assert all(blk.window == (16, 16) for s in (0, 1, 3) for blk in backbone.encoder.stages[s].blocks)


def test_layer_decay_groups():
    model = build_upernet(small_backbone(64), ADE_CLASSES, channels=16, aux_channels=8)
    groups = param_groups_layer_decay(model, base_lr=1.0, weight_decay=0.05, layer_decay=0.5)
    where = {name: g for g in groups for name in g["param_names"]}
    assert len(where) == sum(1 for _ in model.parameters())
    num_layers = sum((1, 1, 2, 1)) + 2
    expected_ids = {
        "backbone.encoder.patch_embed.proj.weight": 0,
        "backbone.encoder.stages.0.blocks.0.mlp.fc1.weight": 1,
        "backbone.encoder.stages.1.merge.proj.weight": 2,  # with the block it feeds
        "backbone.encoder.stages.1.blocks.0.attn.qkv.weight": 2,
        "backbone.encoder.stages.2.blocks.1.attn.proj.weight": 4,
        "backbone.encoder.stages.3.blocks.0.attn.qkv.weight": 5,
        "backbone.norms.3.weight": num_layers - 1,
    }
    for name, layer in expected_ids.items():
        assert where[name]["layer_id"] == layer, name
        assert where[name]["lr"] == pytest.approx(0.5 ** (num_layers - 1 - layer)), name
    head = where["decode_head.classifier.1.weight"]
    assert head["lr"] == 1.0 and head["layer_id"] is None
    for name in ("backbone.encoder.stages.0.blocks.0.attn.rel_pos_table", "backbone.norms.0.weight",
                 "backbone.encoder.stages.0.blocks.0.attn.qkv.bias", "decode_head.fuse.1.weight"):
        assert where[name]["weight_decay"] == 0.0, name
    assert where["backbone.encoder.stages.0.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    torch.optim.AdamW(groups)  # accepted as they are


@pytest.mark.parametrize("kernel", ["default", "fused"])
def test_dense_optimizer_takes_the_configured_adamw_kernel(kernel):
    from mixmim.transfer.dense_config import SegmentationConfig
    from mixmim.transfer.train import build_optimizer

    model = build_upernet(small_backbone(64), ADE_CLASSES, channels=16, aux_channels=8)
    opt = build_optimizer(model, SegmentationConfig(lr=1e-3, adamw_kernel=kernel), "backbone.")
    assert opt.defaults["fused"] is (True if kernel == "fused" else None)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for _ in model.parameters())


def test_classifier_and_dense_backbone_share_one_layer_decay_rule():
    """Every encoder parameter gets the same lr scale in classification finetuning (timm groups over
    the classifier's group_matcher) and in the dense backbone: a patch merging with the block it feeds,
    as in the authors' util/lr_decay.py; the classifier's head and the backbone's output norms at 1."""
    from mixmim.engine.optim import build_adamw
    from mixmim.models import build_classifier

    classifier = build_classifier("mixmim_nano", num_classes=3, img_size=64)
    opt = build_adamw(classifier, lr=1.0, weight_decay=0.05, betas=(0.9, 0.999), layer_decay=0.5)
    cls_scale = {n: g["lr_scale"] for g in opt.param_groups for p in g["params"]
                 for n, q in classifier.named_parameters() if q is p}
    model = build_upernet(small_backbone(64), ADE_CLASSES, channels=16, aux_channels=8)
    dense_scale = {n[len("backbone."):]: g["lr_scale"]
                   for g in param_groups_layer_decay(model, 1.0, 0.05, 0.5) for n in g["param_names"]
                   if n.startswith("backbone.encoder.")}
    shared = sorted(set(cls_scale) & set(dense_scale))
    assert len(shared) > 20 and any(".merge." in n for n in shared)
    for name in shared:
        assert cls_scale[name] == pytest.approx(dense_scale[name]), name
    assert cls_scale["encoder.stages.1.merge.proj.weight"] == cls_scale["encoder.stages.1.blocks.0.attn.qkv.weight"]
    assert cls_scale["encoder.stages.1.merge.proj.weight"] > cls_scale["encoder.stages.0.blocks.0.attn.qkv.weight"]
    assert cls_scale["head.weight"] == 1.0


# --------------------------------------------------------------------- detection
def test_mask_rcnn_training_lowers_the_loss_and_evaluates(coco_root):
    train = CocoInstanceDataset(coco_root, "train")
    model = build_mask_rcnn(small_backbone(64), train.num_classes, size=64, **SMALL_RCNN)
    images, targets = collate_detection([train[i] for i in range(2)])
    groups = param_groups_layer_decay(model, 2e-4, 0.05, 0.9, backbone_prefix="backbone.body.")
    opt = torch.optim.AdamW(groups)
    losses = []
    for _ in range(6):
        out = detection_loss_step(model, images, targets)
        assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(out)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    first, last = mean_first_last(losses)
    assert last < first, losses
    metrics = evaluate_coco(model, CocoInstanceDataset(coco_root, "val"), max_images=2)
    for key in ("AP_box", "AP50_box", "AP75_box", "AP_mask", "AP50_mask", "AP75_mask"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)


def test_anchor_sizes_reach_the_rpn_and_bad_ones_are_refused():
    from mixmim.engine.config import ConfigError, from_mapping
    from mixmim.transfer.dense_config import DetectionConfig, check_config

    default = build_mask_rcnn(small_backbone(64), 3, size=64, **SMALL_RCNN)
    assert [s[0] for s in default.rpn.anchor_generator.sizes] == [32, 64, 128, 256, 512]
    small = build_mask_rcnn(small_backbone(64), 3, size=64, anchor_sizes=(8, 16, 32, 64, 128), **SMALL_RCNN)
    assert [s[0] for s in small.rpn.anchor_generator.sizes] == [8, 16, 32, 64, 128]
    assert small.rpn.anchor_generator.num_anchors_per_location() == [3] * 5
    with pytest.raises(ValueError, match="expected 5 sizes"):
        build_mask_rcnn(small_backbone(64), 3, size=64, anchor_sizes=(8, 16, 32))
    cfg = from_mapping(DetectionConfig, {"img_size": 64, "anchor_sizes": [16, 8, 32, 64, 128]}, "coco")
    with pytest.raises(ConfigError, match=r"anchor_sizes=\[16, 8, 32, 64, 128\]: expected five increasing"):
        check_config(cfg, "coco")
    with pytest.raises(ConfigError, match="anchor_sizes"):
        from_mapping(DetectionConfig, {"anchor_sizes": [8, 16]}, "coco")


def test_mask_rcnn_needs_a_backbone_that_covers_the_images():
    with pytest.raises(ValueError, match="img_size=96"):
        build_mask_rcnn(small_backbone(64), 3, min_size=80, max_size=96)


def test_ground_truth_as_predictions_scores_ap_one(coco_root):
    val = CocoInstanceDataset(coco_root, "val")
    bbox, segm, ids = [], [], []
    for i in range(len(val)):
        _, target = val[i]
        n = len(target["labels"])
        prediction = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(n),
                      "masks": target["masks"][:, None].float()}
        b, s = detections_to_coco(target["image_id"], prediction, val.label_to_cat)
        bbox += b
        segm += s
        ids.append(target["image_id"])
    assert {r["category_id"] for r in bbox} <= set(val.cat_ids)
    metrics = coco_evaluate_results(val.coco, bbox, segm, ids)
    for key in ("AP_box", "AP50_box", "AP75_box", "AP_mask", "AP50_mask", "AP75_mask"):
        assert metrics[key] == pytest.approx(1.0), (key, metrics)
    empty = coco_evaluate_results(val.coco, [], [], ids)
    assert empty["AP_box"] == 0.0 and empty["AP_mask"] == 0.0


def test_category_ids_map_to_contiguous_labels(coco_root):
    train = CocoInstanceDataset(coco_root, "train")
    assert train.cat_ids == [1, 2, 3, 5, 7, 9]  # the stand-in's non-contiguous ids
    assert train.cat_to_label == {c: i + 1 for i, c in enumerate(train.cat_ids)}
    assert all(train.label_to_cat[train.cat_to_label[c]] == c for c in train.cat_ids)
    image, target = train[0]
    assert image.shape == (3, 64, 64) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert target["masks"].shape == (len(target["labels"]), 64, 64)
    assert int(target["labels"].min()) >= 1 and int(target["labels"].max()) <= train.num_classes


def test_large_scale_jitter_gives_square_consistent_targets(coco_root):
    torch.manual_seed(3)
    train = CocoInstanceDataset(coco_root, "train", transform=LargeScaleJitter(96, scale_range=(0.3, 2.0)))
    for i in range(len(train)):
        image, target = train[i]
        n = len(target["labels"])
        assert image.shape == (3, 96, 96) and target["masks"].shape == (n, 96, 96) and target["boxes"].shape == (n, 4)
        boxes = target["boxes"]
        if n:
            assert bool((boxes[:, 2:] > boxes[:, :2]).all()) and float(boxes.min()) >= 0 and float(boxes.max()) <= 96
        for box, mask in zip(boxes, target["masks"]):
            ys, xs = mask.nonzero(as_tuple=True)
            if len(ys):  # the mask lies inside its (clamped) box, to a pixel of resampling
                assert xs.min() >= box[0] - 1.5 and xs.max() <= box[2] + 0.5
                assert ys.min() >= box[1] - 1.5 and ys.max() <= box[3] + 0.5


def test_missing_coco_paths_are_named(coco_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "annotations" / "instances_val2017.json"))):
        CocoInstanceDataset(tmp_path, "val")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(
        (coco_root / "annotations" / "instances_val2017.json").read_text())
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "val2017"))):
        CocoInstanceDataset(tmp_path, "val")


# --------------------------------------------------------------------- segmentation
def test_upernet_training_lowers_the_loss_and_evaluates(ade_root):
    train = ADE20KDataset(ade_root, "train", num_classes=ADE_CLASSES)
    model = build_upernet(small_backbone(64), ADE_CLASSES, channels=32, aux_channels=16).train()
    x = torch.stack([train[i][0] for i in range(2)])
    y = torch.stack([train[i][1] for i in range(2)])
    opt = torch.optim.AdamW(param_groups_layer_decay(model, 1e-3, 0.05, 0.9))
    losses = []
    for _ in range(6):
        out = model.losses(x, y)
        assert out["loss"].item() == pytest.approx(out["loss_decode"].item() + 0.4 * out["loss_aux"].item(), rel=1e-5)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    first, last = mean_first_last(losses)
    assert last < first, losses
    val = ADE20KDataset(ade_root, "val", num_classes=ADE_CLASSES)
    scores = evaluate_segmentation(model, val, crop=48, stride=32, test_scale=(160, 80))
    assert 0.0 <= scores["mIoU"] <= 1.0 and 0.0 <= scores["aAcc"] <= 1.0 and len(scores["IoU"]) == ADE_CLASSES
    assert scores["num_images"] == 2


def test_ground_truth_label_maps_score_one(ade_root):
    val = ADE20KDataset(ade_root, "val", num_classes=ADE_CLASSES)
    confusion = torch.zeros(ADE_CLASSES, ADE_CLASSES, dtype=torch.int64)
    for i in range(len(val)):
        _, label = val[i]
        prediction = torch.where(label == 255, torch.zeros_like(label), label)  # ignored pixels: anything
        confusion += confusion_matrix(prediction, label, ADE_CLASSES)
    scores = segmentation_scores(confusion)
    assert scores["mIoU"] == 1.0 and scores["aAcc"] == 1.0 and scores["mAcc"] == 1.0


def test_scores_of_a_known_confusion():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    scores = segmentation_scores(confusion_matrix(pred, label, 4))
    assert scores["IoU"]["0"] == pytest.approx(1 / 3) and scores["IoU"]["1"] == pytest.approx(2 / 3)
    assert scores["IoU"]["2"] == pytest.approx(1 / 2) and math.isnan(scores["IoU"]["3"])
    assert scores["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert scores["aAcc"] == pytest.approx(4 / 6)


def test_reduce_zero_label():
    assert reduce_zero_label(torch.tensor([0, 1, 150])).tolist() == [255, 0, 149]


def test_slide_inference_equals_a_pointwise_model_on_the_whole_image():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 5, 1)
    img = torch.randn(2, 3, 70, 50)
    with torch.no_grad():
        expected = model(img)
    torch.testing.assert_close(slide_inference(model, img, crop=32, stride=21, num_classes=5), expected)
    torch.testing.assert_close(slide_inference(model, img, crop=(96, 96), stride=64, num_classes=5), expected)


def test_segmentation_train_transform(ade_root):
    torch.manual_seed(0)
    train = ADE20KDataset(ade_root, "train", num_classes=ADE_CLASSES,
                          transform=SegmentationTrainTransform(crop_size=48, scale=(256, 64)))
    seen = set()
    for i in range(len(train)):
        image, label = train[i]
        assert image.shape == (3, 48, 48) and label.shape == (48, 48) and label.dtype == torch.int64
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        seen |= set(label.unique().tolist())
    assert seen <= set(range(ADE_CLASSES)) | {255}
    small = SegmentationTrainTransform(crop_size=64, scale=(64, 16), ratio_range=(1.0, 1.0), photometric=False)
    image, label = small(*ADE20KDataset(ade_root, "val", num_classes=ADE_CLASSES)[0])
    assert image.shape == (3, 64, 64) and bool((label[16:, :] == 255).all())  # 16x16 resized, padded with ignore


def test_missing_ade20k_paths_are_named(ade_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "images" / "validation"))):
        ADE20KDataset(tmp_path, "val")
    images = tmp_path / "ADEChallengeData2016" / "images" / "validation"
    images.mkdir(parents=True)
    (images / "ADE_val_00000001.jpg").write_bytes(
        (ade_root / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_00000001.jpg").read_bytes())
    labels = tmp_path / "ADEChallengeData2016" / "annotations" / "validation"
    with pytest.raises(FileNotFoundError, match=re.escape(str(labels))):
        ADE20KDataset(tmp_path, "val")
    labels.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(str(labels / "ADE_val_00000001.png"))):
        ADE20KDataset(tmp_path, "val")


# --------------------------------------------------------------------- Table 4 complexity
# Table 4, MixMIM-B row (../shared/paper/table4_coco_ade20k.csv): COCO 701 GFLOPs / 110M, ADE20K 302 / 122.
TABLE4_BASE = {"coco_flops_g": 701, "coco_params_m": 110, "ade_flops_g": 302, "ade_params_m": 122}


def test_complexity_of_mixmim_base_matches_table4():
    row = TABLE4_BASE
    det = detector_complexity("mixmim_base")
    seg = segmentor_complexity("mixmim_base")
    assert det.img_size == 1024 and seg.img_size == 512
    assert det.params_m == pytest.approx(float(row["coco_params_m"]), rel=0.02)
    assert det.gflops == pytest.approx(float(row["coco_flops_g"]), rel=0.02)
    assert seg.params_m == pytest.approx(float(row["ade_params_m"]), rel=0.02)
    assert seg.gflops == pytest.approx(float(row["ade_flops_g"]), rel=0.02)
