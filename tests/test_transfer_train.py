"""Dense-transfer engines and stages (COCO Mask R-CNN, ADE20K UperNet) on tiny generated data."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

import mixmim.engine.loop as loop_module
from mixmim.checkpoint import load_file
from mixmim.data.builtin import write_ade20k, write_coco
from mixmim.engine.config import ConfigError, from_mapping
from mixmim.engine.loop import KILL_AT_STEP_ENV
from mixmim.models import build_pretrainer
from mixmim.pipeline import load_params
from mixmim.tracking import PRETRAIN_RUN_TAG
from mixmim.transfer.dense_config import DetectionConfig, SegmentationConfig, check_config
from mixmim.dense_stages import ADE20K_METRICS, COCO_METRICS, ade20k_stage, coco_stage
from mixmim.records import read_records
from mixmim.stats import coco_ap_from_records, miou_from_counts
from mixmim.transfer.train import (
    DETECTOR_WEIGHTS, PER_CLASS_FILE, SEGMENTOR_WEIGHTS, build_dense_backbone, build_dense_schedule, build_detector,
    build_segmentor, majority_class_baseline, train_detection, train_segmentation,
)
from mixmim.transfer import mask_rcnn_complexity, upernet_complexity

# pycocotools' mask decoding trips a numpy-2 DeprecationWarning inside its own code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL_RCNN = dict(rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_batch_size_per_image=32,
                  box_batch_size_per_image=16, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)
COCO_SECTION = dict(model="mixmim_nano", img_size=64, batch_size=2, epochs=2, warmup_epochs=0.5, lr=1e-3,
                    fpn_channels=16, representation_size=32, detector_kwargs=SMALL_RCNN, num_workers=0,
                    eval_every=1, eval_batch_size=2, progress=False, log_every_steps=1)
ADE_SECTION = dict(model="mixmim_nano", img_size=64, batch_size=2, max_iters=4, iters_per_epoch=2, warmup_iters=1,
                   lr=1e-3, train_scale=[128, 64], test_scale=[128, 64], eval_crop=48, eval_stride=16,
                   head_channels=16, aux_channels=8, num_workers=0, eval_every=1, progress=False, log_every_steps=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-threaded torch: on a shared 2-core box, two spin-waiting OpenMP threads run up to 15x
    slower whenever another process is busy, one thread at most ~1.4x slower when the box is idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("dense")
    return {"coco": write_coco(base / "coco", image_size=64, num_train=4, num_val=2),
            "ade20k": write_ade20k(base / "ade20k", image_size=64, num_train=4, num_val=2)}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def engine_cfg(cls, section: dict, root: Path, store: str, out: Path, **kw):
    return from_mapping(cls, {**section, "data_root": str(root), "output_dir": str(out), "tracking_uri": store,
                              "experiment": "transfer-tests", **kw})


# --------------------------------------------------------------------------- engines
def test_detection_resumes_after_a_kill(roots, store, tmp_path, monkeypatch):
    """Killed right after step 3's checkpoint (epoch 2 of 2), the rerun continues from there and
    ends where an uninterrupted run ends."""

    class Killed(Exception):
        pass

    def kill(pid, sig):
        raise Killed

    cfg = engine_cfg(DetectionConfig, COCO_SECTION, roots["coco"], store, tmp_path, ckpt_every_steps=1)
    monkeypatch.setenv(KILL_AT_STEP_ENV, "3")
    monkeypatch.setattr(loop_module.os, "kill", kill)
    with pytest.raises(Killed):
        train_detection(cfg)
    saved = load_file(tmp_path / "checkpoint-last.pt")
    assert saved["position"] == {"epoch": 1, "batch": 1, "step": 3}
    first_epoch = saved["extra"]["history"][0]
    assert {"ap_box", "ap50_box", "ap_mask"} <= set(first_epoch)  # eval_every=1: evaluated after epoch 1

    monkeypatch.delenv(KILL_AT_STEP_ENV)
    result = train_detection(cfg)
    assert [h["epoch"] for h in result["history"]] == [1, 2] and result["history"][-1]["step"] == 4
    assert result["history"][0] == first_epoch
    for key in ("ap_box", "ap50_box", "ap75_box", "ap_mask", "ap50_mask", "ap75_mask"):
        assert 0.0 <= result[key] <= 1.0, (key, result)
    weights = load_file(tmp_path / DETECTOR_WEIGHTS)
    assert weights["kind"] == "mixmim_coco_mask_rcnn" and weights["num_classes"] == 6
    run = MlflowClient(store).get_run(result["run_id"])
    assert {"final/ap_box", "final/ap_mask", "final/ap50_box", "final/ap75_box"} <= set(run.data.metrics)
    assert run.data.tags["mixmim.stage"] == "coco" and run.data.tags["mixmim.init"] == "scratch"
    # the size it logged (counted on a meta-device twin) is that of the model it trained, counted for real
    real = mask_rcnn_complexity(build_detector(cfg, 6).eval(), cfg.img_size, cfg.model)
    assert real.gflops > 0 and "20 RoIs" in real.convention  # the test's rpn_post_nms_top_n_test
    assert run.data.metrics["model/gflops"] == pytest.approx(real.gflops, rel=1e-6)
    assert run.data.metrics["model/params_m"] == pytest.approx(real.params_m, rel=1e-6)
    assert (tmp_path / "mlflow_run.json").is_file()

    reference = engine_cfg(DetectionConfig, COCO_SECTION, roots["coco"], store, tmp_path / "uninterrupted")
    train_detection(reference)  # the resumed run ends with exactly the weights of an uninterrupted one
    ref_weights = load_file(tmp_path / "uninterrupted" / DETECTOR_WEIGHTS)["model"]
    for name, value in weights["model"].items():
        torch.testing.assert_close(value, ref_weights[name], rtol=0, atol=0, msg=name)


def test_segmentation_runs_and_a_finished_run_starts_afresh(roots, store, tmp_path):
    cfg = engine_cfg(SegmentationConfig, ADE_SECTION, roots["ade20k"], store, tmp_path)
    first = train_segmentation(cfg)
    assert [h["step"] for h in first["history"]] == [2, 4]
    assert "miou" in first["history"][0] and "miou" in first["history"][1]  # periodic + final evaluation
    for key in ("miou", "pixel_acc", "baseline_miou", "baseline_pixel_acc"):
        assert 0.0 <= first[key] <= 1.0, (key, first)
    assert len(first["per_class_iou"]) == 8 and "sky" in first["per_class_iou"]  # the stand-in's names
    assert load_file(tmp_path / SEGMENTOR_WEIGHTS)["num_classes"] == 8
    per_class = json.loads((tmp_path / PER_CLASS_FILE).read_text())
    assert set(per_class["iou"]) == set(first["per_class_iou"])
    run = MlflowClient(store).get_run(first["run_id"])
    assert {"final/miou", "final/pixel_acc", "final/baseline_miou", "final/baseline_pixel_acc"} <= set(run.data.metrics)
    real = upernet_complexity(build_segmentor(cfg, 8).eval(), cfg.img_size, cfg.model)
    assert real.gflops > 0
    assert run.data.metrics["model/gflops"] == pytest.approx(real.gflops, rel=1e-6)
    assert run.data.metrics["model/params_m"] == pytest.approx(real.params_m, rel=1e-6)

    again = train_segmentation(cfg)  # the checkpoint is of a finished run: the loop starts afresh, same seed
    assert [h["step"] for h in again["history"]] == [2, 4]
    assert again["miou"] == pytest.approx(first["miou"]) and again["run_id"] != first["run_id"]


# --------------------------------------------------------------------------- stages
def write_params(tmp_path: Path, roots: dict[str, Path], store: str) -> Path:
    params = {
        "roots": {k: str(v) for k, v in roots.items()},
        "tracking": {"uri": store, "experiment": "stage-tests", "pipeline": "tests"},
        "coco": {**COCO_SECTION, "epochs": 1, "eval_every": 0},
        "ade20k": {**ADE_SECTION, "max_iters": 2, "eval_every": 0},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_stages_write_metrics_and_plots(roots, store, tmp_path):
    params = load_params(write_params(tmp_path, roots, store))
    coco = coco_stage(params, ["coco"], "default", None, "runs/coco", str(tmp_path / "m" / "coco.json"),
                      str(tmp_path / "p" / "coco.csv"))
    metrics = json.loads((tmp_path / "m" / "coco.json").read_text())
    assert set(COCO_METRICS) <= set(metrics) and metrics["init"] == "scratch" and metrics["run_id"] == coco["run_id"]
    rows = read_csv(tmp_path / "p" / "coco.csv")
    assert len(rows) == 1 and {"epoch", "train_loss", "ap_box", "ap50_box"} <= set(rows[0])
    assert (tmp_path / "runs" / "coco" / DETECTOR_WEIGHTS).is_file()  # run dir relative to the params file
    records = read_records(tmp_path / "m" / "coco_preds.json")  # per-image records reproduce the AP
    assert records["n_val"] == metrics["n_val"] == len(records["box"]) == len(records["mask"])
    assert coco_ap_from_records(records["box"]) == pytest.approx(metrics["ap_box"] or 0.0, abs=1e-9)
    assert metrics["model_gflops"] > 0 and metrics["model_params_m"] > 0  # the size the report's Table 4 shows

    init = tmp_path / "pre" / "pretrain.pt"  # a pretraining checkpoint of this suite, with its run reference
    init.parent.mkdir()
    torch.save({"model": build_pretrainer("mixmim_nano").state_dict()}, init)
    (init.parent / "mlflow_run.json").write_text(json.dumps(
        {"run_id": "pre123", "experiment_id": "1", "tracking_uri": store, "run_name": "pretrain/default"}))
    ade = ade20k_stage(params, ["ade20k"], "default", "pre/pretrain.pt", "runs/ade20k",
                       str(tmp_path / "m" / "ade20k.json"), str(tmp_path / "p" / "ade20k.csv"))
    metrics = json.loads((tmp_path / "m" / "ade20k.json").read_text())
    assert set(ADE20K_METRICS) <= set(metrics) and len(metrics["per_class_iou"]) == 8
    assert metrics["init"] == "pretrained"
    assert metrics["baseline_miou"] == pytest.approx(ade["baseline_miou"])
    records = read_records(tmp_path / "m" / "ade20k_preds.json")
    assert records["n_val"] == metrics["n_val"]
    assert miou_from_counts(records["intersection"], records["union"]) == pytest.approx(metrics["miou"], abs=1e-12)
    rows = read_csv(tmp_path / "p" / "ade20k.csv")
    assert [r["step"] for r in rows] == ["2"] and rows[0]["miou"]

    run = MlflowClient(store).get_run(ade["run_id"])
    assert run.info.run_name == "ade20k/default/s0" and run.data.tags["mixmim.pipeline"] == "tests"
    assert run.data.tags["mixmim.stage"] == "ade20k" and run.data.tags["mixmim.dataset"] == "ade20k"
    assert run.data.tags[PRETRAIN_RUN_TAG] == "pre123" and run.data.tags["mixmim.init"] == str(init)


def test_stage_config_errors_name_the_key(roots, store, tmp_path):
    path = write_params(tmp_path, roots, store)
    data = yaml.safe_load(path.read_text())
    data["coco"]["epoch"] = 3
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="'epoch'"):
        coco_stage(load_params(path), ["coco"], "default", None, "runs/c", "m.json", "p.csv")
    data["coco"].pop("epoch")
    data["ade20k"]["iters_per_epoch"] = 3
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"ade20k\.iters_per_epoch=3"):
        ade20k_stage(load_params(path), ["ade20k"], "default", None, "runs/a", "m.json", "p.csv")
    assert not (tmp_path / "runs").exists()  # refused before any work


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("cls, values, match", [
    (DetectionConfig, {"epochs": "many"}, r"DetectionConfig\.epochs='many': expected an integer"),
    (DetectionConfig, {"lsj_scale": [0.1]}, r"lsj_scale"),
    (DetectionConfig, {"lr_stpes": [0.8, 0.9]}, r"unknown key 'lr_stpes'"),
    (SegmentationConfig, {"detection_windows": "yes"}, r"detection_windows='yes': expected true or false"),
    (SegmentationConfig, {"test_scale": [512]}, r"test_scale"),
])
def test_type_errors_name_the_key(cls, values, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping(cls, values, where=cls.__name__)


@pytest.mark.parametrize("cls, values, key", [
    (DetectionConfig, {"model": "mixmim_tiniest"}, "model"),
    (DetectionConfig, {"img_size": 100}, "img_size"),
    (DetectionConfig, {"schedule": "linear"}, "schedule"),
    (DetectionConfig, {"lr_steps": [0.9, 0.8]}, "lr_steps"),
    (DetectionConfig, {"model_kwargs": {"window_size": 8}}, "model_kwargs.window_size"),
    (DetectionConfig, {"lsj_scale": [0.0, 2.0]}, "lsj_scale"),
    (SegmentationConfig, {"max_iters": 10, "iters_per_epoch": 4}, "iters_per_epoch"),
    (SegmentationConfig, {"eval_crop": 1024}, "eval_crop"),
    (SegmentationConfig, {"layer_decay": 1.5}, "layer_decay"),
])
def test_value_errors_name_the_key(cls, values, key):
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{key}="):
        check_config(from_mapping(cls, values))


def test_windows_that_do_not_tile_the_maps_are_a_config_error():
    cfg = from_mapping(DetectionConfig, {"model": "mixmim_nano", "img_size": 96, "detection_windows": False,
                                         "model_kwargs": {"window_size": [8, 8, 4, 2]}})
    with pytest.raises(ConfigError, match="window"):
        build_dense_backbone(cfg)  # maps 24/12/6/3: an 8x8 window tiles 24x24 but not stage 2's 12x12


def test_paper_defaults():
    det, seg = DetectionConfig(), SegmentationConfig()
    assert (det.img_size, det.epochs, det.batch_size, det.lsj_scale) == (1024, 55, 64, (0.1, 2.0))
    assert (det.schedule, det.lr_steps, det.warmup_epochs, det.layer_decay, det.detection_windows) == \
        ("step", (0.889, 0.963), 0.25, 0.85, True)
    assert (seg.img_size, seg.max_iters, seg.batch_size, seg.warmup_iters) == (512, 16000, 16, 1500)
    assert (seg.schedule, seg.layer_decay) == ("poly", 0.85)
    assert (seg.eval_crop or seg.img_size, seg.eval_stride) == (512, 341)
    check_config(det)
    check_config(seg)


# --------------------------------------------------------------------------- collectives
def _sharded_evaluation(rank: int, world: int, init_file: str, roots: dict[str, Path], out: str) -> dict:
    """Both dense evaluations (with per-image records) of fixed untrained models, on ``world`` gloo ranks."""
    import torch.distributed as dist

    from mixmim.engine.distributed import DistInfo
    from mixmim.data.ade20k import ADE20KDataset
    from mixmim.data.coco import CocoInstanceDataset
    from mixmim.transfer.train import ade20k_num_classes, evaluate_ade20k, evaluate_detection

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    info = DistInfo(rank=rank, world_size=world)
    seg_cfg = from_mapping(SegmentationConfig, {**ADE_SECTION, "data_root": str(roots["ade20k"])})
    det_cfg = from_mapping(DetectionConfig, {**COCO_SECTION, "data_root": str(roots["coco"])})
    k = ade20k_num_classes(roots["ade20k"])
    torch.manual_seed(0)
    segmentor = build_segmentor(seg_cfg, k)
    coco_val = CocoInstanceDataset(roots["coco"], "val")
    detector = build_detector(det_cfg, coco_val.num_classes)
    seg = evaluate_ade20k(segmentor, ADE20KDataset(roots["ade20k"], "val", num_classes=k), seg_cfg, info,
                          records=True)
    det = evaluate_detection(detector, coco_val, info, records=True)
    result = {"seg": {key: seg[key] for key in ("mIoU", "aAcc", "intersection", "union", "num_images")},
              "det": det}
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    Path(f"{out}.{rank}.json").write_text(json.dumps(result, default=str))
    return result


def test_sharded_dense_evaluation_on_two_gloo_processes_matches_one(roots, tmp_path):
    """The collectives of mixmim.engine.distributed (all_reduce_sum, all_gather_object, broadcast_object)
    give every rank of a 2-process run the scores and per-image records of a 1-process run."""
    import torch.multiprocessing as mp

    _sharded_evaluation(0, 1, "", roots, str(tmp_path / "one"))
    mp.start_processes(_sharded_evaluation, args=(2, str(tmp_path / "init"), roots, str(tmp_path / "two")),
                       nprocs=2, start_method="fork")
    one = json.loads((tmp_path / "one.0.json").read_text())
    assert one["seg"]["num_images"] == 2 and len(one["seg"]["intersection"]) == 2
    assert len(one["det"]["records"]["box"]) == 2
    for rank in (0, 1):
        two = json.loads((tmp_path / f"two.{rank}.json").read_text())
        assert two["seg"] == one["seg"], rank
        assert {k: v for k, v in two["det"].items() if k != "records"} == \
            {k: v for k, v in one["det"].items() if k != "records"}, rank
    assert json.loads((tmp_path / "two.0.json").read_text())["det"]["records"] == one["det"]["records"]


# --------------------------------------------------------------------------- schedule and baseline
def test_schedule_warmup_steps_and_layer_scale():
    """timm's schedulers through build_dense_schedule: warmup from warmup_factor * lr, 10x drops at the
    lr_steps fractions (the milestone step is the first at the lower lr), poly and cosine over the run."""
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.AdamW([{"params": [params[0]], "lr_scale": 0.5}, {"params": [params[1]], "lr_scale": 1.0}],
                                 lr=1.0)

    def lrs(cfg: DetectionConfig, warmup: int, steps: tuple[int, ...]) -> dict[int, float]:
        opt = optimizer()
        sched = build_dense_schedule(opt, cfg, total_steps=100, warmup_steps=warmup)
        out = {}
        for t in steps:
            sched.step_update(t)
            assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * opt.param_groups[1]["lr"]), t  # lr_scale once
            out[t] = opt.param_groups[1]["lr"]
        return out

    step = DetectionConfig(lr=1.0, schedule="step", warmup_factor=0.001, lr_steps=(0.8, 0.9))
    opt = optimizer()
    build_dense_schedule(opt, step, total_steps=100, warmup_steps=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0005) and opt.param_groups[1]["lr"] == pytest.approx(0.001)
    expected = {5: 0.001 + 0.999 * 0.5, 10: 1.0, 79: 1.0, 80: 0.1, 89: 0.1, 90: 0.01, 100: 0.01}
    assert lrs(step, 10, tuple(expected)) == pytest.approx(expected)
    poly = DetectionConfig(lr=1.0, schedule="poly", poly_power=1.0)
    assert list(lrs(poly, 0, (0, 50, 100)).values()) == pytest.approx([1.0, 0.5, 0.0])
    cosine = DetectionConfig(lr=1.0, schedule="cosine", min_lr=0.1)
    assert list(lrs(cosine, 0, (0, 50, 100)).values()) == pytest.approx([1.0, 0.55, 0.1])


def test_majority_class_baseline():
    train = torch.tensor([10, 50, 5])  # class 1 is the most frequent in training
    val = torch.tensor([30, 60, 10, 0])[:3]
    scores = majority_class_baseline(train, val)
    assert scores["class"] == 1
    assert scores["pixel_acc"] == pytest.approx(0.6)
    assert scores["miou"] == pytest.approx(0.6 / 3)  # IoU 0.6 for class 1, 0 for the others present
    assert not math.isnan(scores["miou"])
