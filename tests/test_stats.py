"""mixmim.stats and mixmim.records on cases whose answers are known."""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import numpy as np
import pytest

from mixmim import stats
from mixmim.records import coco_match_records, read_records, records_path, segmentation_counts
from mixmim.records import write_classification_records, write_detection_records, write_segmentation_records


def test_t_interval_matches_hand_computation():
    # values 1, 2, 3, 4: mean 2.5, sd sqrt(5/3), t_{0.975, 3} = 3.182446305...
    got = stats.t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert got.value == pytest.approx(2.5)
    assert got.low == pytest.approx(2.5 - half, abs=1e-9)
    assert got.high == pytest.approx(2.5 + half, abs=1e-9)
    assert got.n == 4


def test_t_interval_needs_two_values():
    with pytest.raises(ValueError, match="at least 2"):
        stats.t_interval([1.0])


def test_mcnemar_on_textbook_table():
    # 2 discordant one way, 10 the other: p = 2 * sum_{k<=2} C(12, k) / 2^12 = 158 / 4096
    a = [True] * 2 + [False] * 10 + [True] * 30 + [False] * 8
    b = [False] * 2 + [True] * 10 + [True] * 30 + [False] * 8
    got = stats.mcnemar_exact(a, b)
    assert got.p_value == pytest.approx(158 / 4096, rel=1e-12)
    assert got.diff == pytest.approx(100 * (2 - 10) / 50)
    assert got.resolved()


def test_paired_t_matches_hand_computation():
    # differences 1, 2, 2, 3: mean 2, sd sqrt(2/3), t = 2 / (sd / 2) = 2 * sqrt(6) on 3 degrees of freedom
    got = stats.paired_t_test([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0])
    t = 2 * math.sqrt(6)
    assert got.diff == pytest.approx(2.0) and got.n == 4
    assert got.p_value == pytest.approx(2 * stats._sp.t.sf(t, 3), rel=1e-9)
    half = 3.182446305284263 * math.sqrt(2 / 3) / 2
    assert (got.low, got.high) == pytest.approx((2 - half, 2 + half), abs=1e-9)
    assert got.resolved()


def test_paired_t_constant_differences_and_refusals():
    assert stats.paired_t_test([0.5, 0.6], [0.5, 0.6]).p_value == 1.0  # identical: nothing to resolve
    assert stats.paired_t_test([0.6, 0.7], [0.5, 0.6]).p_value == 0.0  # the same shift on every seed
    # 0.7 - 0.6 and 0.6 - 0.5 differ in the last bit: still one constant shift, with no scipy
    # precision-loss warning and an interval of zero width
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shift = stats.paired_t_test([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])
    assert shift.p_value == 0.0 and shift.low == shift.high == pytest.approx(0.1)
    assert "constant difference" in shift.method
    # a real spread well above rounding still gets the t test
    assert 0.0 < stats.paired_t_test([0.6, 0.7, 0.8], [0.5, 0.6, 0.69]).p_value < 0.05
    with pytest.raises(ValueError, match="at least 2 values"):
        stats.paired_t_test([0.5], [0.4])
    with pytest.raises(ValueError, match="equal-length"):
        stats.paired_t_test([0.5, 0.6, 0.7], [0.4, 0.5])


def test_mcnemar_identical_is_one():
    a = np.random.default_rng(0).random(100) > 0.5
    assert stats.mcnemar_exact(a, a).p_value == 1.0


def test_bootstrap_of_a_constant_is_the_constant():
    got = stats.bootstrap_interval(np.full(50, 0.7), resamples=1000)
    assert (got.value, got.low, got.high) == pytest.approx((0.7, 0.7, 0.7))


def test_bootstrap_interval_covers_mean_and_is_seeded():
    x = (np.random.default_rng(1).random(200) < 0.3).astype(float)
    a = stats.bootstrap_interval(x, resamples=1000, seed=3)
    b = stats.bootstrap_interval(x, resamples=1000, seed=3)
    assert a == b
    assert a.low < x.mean() < a.high
    # a binomial proportion at n=200: the interval is about +-1.96 * sqrt(p(1-p)/n) wide
    assert a.high - a.low == pytest.approx(2 * 1.96 * math.sqrt(x.mean() * (1 - x.mean()) / 200), rel=0.2)


def test_bootstrap_refuses_few_resamples():
    with pytest.raises(ValueError, match="resamples"):
        stats.bootstrap_interval([1.0, 2.0], resamples=100)


def test_paired_identical_predictions_p_is_one():
    x = (np.random.default_rng(2).random(200) < 0.4).astype(float)
    got = stats.paired_bootstrap_test(x, x.copy(), resamples=1000)
    assert got.p_value == 1.0
    assert got.diff == 0.0
    assert not got.resolved()


def test_paired_large_clear_difference_is_resolved():
    rng = np.random.default_rng(4)
    a = (rng.random(300) < 0.8).astype(float)
    b = (rng.random(300) < 0.3).astype(float)
    got = stats.paired_bootstrap_test(a, b, resamples=1000)
    assert got.p_value < 0.05
    assert got.low > 0


def test_paired_length_mismatch_refused():
    with pytest.raises(ValueError, match="share items"):
        stats.paired_bootstrap_test([1.0, 0.0], [1.0, 0.0, 1.0], resamples=1000)


def test_miou_from_counts_equals_confusion_matrix_miou():
    from mixmim.transfer.metrics import confusion_matrix, segmentation_scores
    import torch

    rng = np.random.default_rng(5)
    labels = [rng.integers(0, 4, size=(6, 7)) for _ in range(5)]
    preds = [np.where(rng.random(lab.shape) < 0.7, lab, rng.integers(0, 4, size=lab.shape)) for lab in labels]
    labels[0][0, :3] = 255
    counts = [segmentation_counts(p, g, 4) for p, g in zip(preds, labels)]
    inter = np.array([c[0] for c in counts])
    union = np.array([c[1] for c in counts])
    conf = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(g), 4) for p, g in zip(preds, labels))
    assert stats.miou_from_counts(inter, union) == pytest.approx(segmentation_scores(conf)["mIoU"], abs=1e-12)
    # a resample with repeats is the mIoU of the images concatenated
    idx = np.array([0, 0, 3])
    conf2 = sum(confusion_matrix(torch.from_numpy(preds[i]), torch.from_numpy(labels[i]), 4) for i in idx)
    assert stats.miou_from_counts(inter, union, idx) == pytest.approx(segmentation_scores(conf2)["mIoU"], abs=1e-12)


def _coco_fixture(seed: int = 0, images: int = 12, cats: int = 3):
    from pycocotools.coco import COCO

    rng = np.random.default_rng(seed)
    gts, dets, aid = [], [], 1
    for img in range(1, images + 1):
        for _ in range(int(rng.integers(0, 5))):
            x, y = rng.uniform(0, 60, 2)
            w, h = rng.uniform(8, 30, 2)
            cat = int(rng.integers(1, cats + 1))
            gts.append({"id": aid, "image_id": img, "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
                        "iscrowd": 0})
            aid += 1
            if rng.random() < 0.8:  # a detection near the object, jittered
                jit = rng.normal(0, 3, 4)
                dets.append({"image_id": img, "category_id": cat if rng.random() < 0.85 else 1 + cat % cats,
                             "bbox": [x + jit[0], y + jit[1], max(2.0, w + jit[2]), max(2.0, h + jit[3])],
                             "score": float(rng.random())})
        for _ in range(int(rng.integers(0, 4))):  # false positives
            x, y = rng.uniform(0, 60, 2)
            dets.append({"image_id": img, "category_id": int(rng.integers(1, cats + 1)),
                         "bbox": [x, y, 10.0, 10.0], "score": float(rng.random() * 0.6)})
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "width": 100, "height": 100} for i in range(1, images + 1)],
                    "annotations": gts, "categories": [{"id": c} for c in range(1, cats + 1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, dets


def _cocoeval(coco, dets, ids):
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        res = coco.loadRes([d for d in dets if d["image_id"] in ids])
        ev = COCOeval(coco, res, "bbox")
        ev.params.imgIds = sorted(ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.mark.parametrize("seed", [0, 1])
def test_coco_ap_from_records_equals_cocoeval(seed):
    coco, dets = _coco_fixture(seed)
    ids = sorted(coco.getImgIds())
    ev = _cocoeval(coco, dets, ids)
    records = coco_match_records(ev, ids)
    assert stats.coco_ap_from_records(records) == pytest.approx(ev.stats[0], abs=1e-12)
    unpruned = coco_match_records(ev, ids, prune=False)
    assert sum(len(r["dets"]) for r in records) <= sum(len(r["dets"]) for r in unpruned)
    # a subset of images: the same as COCOeval restricted to them
    subset = [0, 2, 3, 5, 8, 11]
    sub = _cocoeval(coco, dets, [ids[i] for i in subset])
    assert stats.coco_ap_from_records(records, subset) == pytest.approx(sub.stats[0], abs=1e-12)


def test_coco_ap_of_a_resample_with_repeats_equals_cocoeval_on_copied_images():
    """An image drawn twice counts like two copies of it in COCOeval (new ids, same boxes and scores)."""
    from pycocotools.coco import COCO

    coco, dets = _coco_fixture(2, images=8)
    ids = sorted(coco.getImgIds())
    records = coco_match_records(_cocoeval(coco, dets, ids), ids, prune=False)
    draw = [0, 0, 3, 5, 5, 5, 7]
    images, anns, copies, aid = [], [], [], 1
    for new_id, i in enumerate(draw, start=1):
        images.append({"id": new_id, "width": 100, "height": 100})
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[ids[i]])):
            anns.append({**ann, "id": aid, "image_id": new_id})
            aid += 1
        copies += [{**d, "image_id": new_id} for d in dets if d["image_id"] == ids[i]]
    copied = COCO()
    copied.dataset = {"images": images, "annotations": anns, "categories": coco.dataset["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):
        copied.createIndex()
    expected = _cocoeval(copied, copies, list(range(1, len(draw) + 1))).stats[0]
    assert stats.coco_ap_from_records(records, draw) == pytest.approx(expected, abs=1e-12)


def test_coco_bootstrap_interval_brackets_full_ap():
    coco, dets = _coco_fixture(3, images=30)
    ids = sorted(coco.getImgIds())
    ev = _cocoeval(coco, dets, ids)
    records = coco_match_records(ev, ids)
    got = stats.bootstrap_interval(lambda idx: stats.coco_ap_from_records(records, idx), n=len(records),
                                   resamples=1000)
    assert got.value == pytest.approx(ev.stats[0], abs=1e-12)
    assert got.low <= got.value <= got.high
    assert got.high - got.low > 0


def test_records_round_trip(tmp_path):
    path = records_path(tmp_path / "metrics" / "finetune_x.json")
    assert path.name == "finetune_x_preds.json"
    write_classification_records(path, [1, 2, 3], [1, 0, 3])
    got = read_records(path)
    assert got["n_val"] == 3 and got["pred"] == [1, 0, 3]
    seg = write_segmentation_records(tmp_path / "s.json", [[1, 2]], [[3, 4]], ["a", "b"])
    assert read_records(seg)["classes"] == ["a", "b"]
    det = write_detection_records(tmp_path / "d.json", [{"image_id": 1, "gt": {"1": 2}, "dets": [[1, 0.5, 3, 0]]}])
    assert read_records(det)["box"][0]["gt"] == {"1": 2}
    with pytest.raises(ValueError, match="same non-zero"):
        write_classification_records(path, [1, 2], [1])
