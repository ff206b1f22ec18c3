"""Per-image evaluation records: what the report's intervals and paired tests are computed from.

Every stage that writes ``metrics/<name>.json`` also writes ``metrics/<name>_preds.json``
(:func:`records_path`), a small committed file with one entry per validation image, in
the validation set's own order, so two runs on the same split can be paired item by item:

* ``classification``: ``label`` and ``pred`` (top-1) lists; correctness is ``pred == label``;
* ``segmentation``: per image and class, intersection and union pixel counts (their sums
  over the split are the confusion-matrix totals behind mIoU);
* ``detection``: per image, non-ignored ground truths per category and each kept
  detection's category, score and match / ignore bits per IoU threshold, exactly as
  ``COCOeval.evaluateImg`` decided them (:func:`coco_match_records`), for ``box`` and ``mask``.

The records describe the model of the reported (last) epoch. Files are written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RECORDS_SUFFIX", "coco_gt_records", "coco_match_records", "read_records", "records_path", "segmentation_counts",
    "write_classification_records", "write_detection_records", "write_records", "write_segmentation_records",
]

RECORDS_SUFFIX = "_preds"
KINDS = ("classification", "segmentation", "detection")


def records_path(metrics_path: str | os.PathLike[str]) -> Path:
    """``metrics/finetune_imagenet.json`` -> ``metrics/finetune_imagenet_preds.json``."""
    path = Path(metrics_path)
    return path.with_name(f"{path.stem}{RECORDS_SUFFIX}.json")


def write_records(path: str | os.PathLike[str], record: Mapping[str, Any]) -> Path:
    """Write one records file atomically (compact JSON, keys sorted, one line per top-level list)."""
    from .io import write_text_atomic

    if record.get("kind") not in KINDS:
        raise ValueError(f"records kind={record.get('kind')!r}: expected one of {KINDS}")
    parts = [f"{json.dumps(key)}: {json.dumps(record[key], separators=(',', ':'))}" for key in sorted(record)]
    return write_text_atomic(path, "{\n" + ",\n".join(parts) + "\n}\n")


def write_classification_records(path: str | os.PathLike[str], labels: Sequence[int], preds: Sequence[int],
                                 epoch: str = "last") -> Path:
    """Top-1 prediction and label of every validation image (validation-set order)."""
    labels, preds = [int(x) for x in labels], [int(x) for x in preds]
    if len(labels) != len(preds) or not labels:
        raise ValueError(f"classification records: {len(labels)} labels and {len(preds)} predictions; "
                         "expected the same non-zero number")
    return write_records(path, {"kind": "classification", "epoch": epoch, "n_val": len(labels),
                                "label": labels, "pred": preds})


def segmentation_counts(pred: Any, label: Any, num_classes: int, ignore_index: int = 255) -> tuple[list[int], list[int]]:
    """Per-class intersection and union pixel counts of one image (ignored pixels skipped)."""
    p = np.asarray(pred).reshape(-1).astype(np.int64)
    g = np.asarray(label).reshape(-1).astype(np.int64)
    valid = g != ignore_index
    p, g = np.clip(p[valid], 0, num_classes - 1), g[valid]
    inter = np.bincount(g[p == g], minlength=num_classes)[:num_classes]
    area_p = np.bincount(p, minlength=num_classes)[:num_classes]
    area_g = np.bincount(g, minlength=num_classes)[:num_classes]
    return inter.tolist(), (area_p + area_g - inter).tolist()


def write_segmentation_records(path: str | os.PathLike[str], intersection: Sequence[Sequence[int]],
                               union: Sequence[Sequence[int]], class_names: Sequence[str],
                               epoch: str = "last") -> Path:
    """Per-image, per-class intersection/union counts (image order of the validation split)."""
    if len(intersection) != len(union) or not intersection:
        raise ValueError(f"segmentation records: {len(intersection)} intersection rows and {len(union)} union rows")
    return write_records(path, {"kind": "segmentation", "epoch": epoch, "n_val": len(intersection),
                                "classes": list(class_names), "intersection": [list(map(int, r)) for r in intersection],
                                "union": [list(map(int, r)) for r in union]})


def coco_match_records(coco_eval: Any, image_ids: Iterable[int], prune: bool = True) -> list[dict[str, Any]]:
    """Per-image match records from a ``COCOeval`` after ``evaluate()`` (area 'all', the largest maxDets).

    With ``prune`` a detection scoring below every true positive of its category (at any
    threshold) is dropped: it sorts after the last true positive of any multiset of these
    images, so it cannot change their AP, and dropping it keeps the file small.
    """
    params = coco_eval.params
    all_area = list(params.areaRng[params.areaRngLbl.index("all")])
    max_det = params.maxDets[-1]
    per_image: dict[int, dict[str, Any]] = {int(i): {"image_id": int(i), "gt": {}, "dets": []} for i in image_ids}
    for entry in coco_eval.evalImgs:
        if entry is None or list(entry["aRng"]) != all_area or entry["maxDet"] != max_det:
            continue
        image = per_image.get(int(entry["image_id"]))
        if image is None:
            continue
        cat = int(entry["category_id"])
        gt_ignore = np.asarray(entry["gtIgnore"], dtype=bool)
        if (~gt_ignore).any():
            image["gt"][str(cat)] = int((~gt_ignore).sum())
        matches = np.asarray(entry["dtMatches"]) > 0
        ignores = np.asarray(entry["dtIgnore"], dtype=bool)
        weights = 1 << np.arange(matches.shape[0]) if matches.ndim == 2 else np.zeros(0, dtype=np.int64)
        for d, score in enumerate(entry["dtScores"]):
            m = int((matches[:, d] * weights).sum())
            g = int((ignores[:, d] * weights).sum())
            image["dets"].append([cat, float(score), m, g])
    records = [per_image[int(i)] for i in image_ids]
    if prune:
        floor: dict[int, float] = {}
        for image in records:
            for cat, score, m, g in image["dets"]:
                if m & ~g:
                    floor[cat] = min(floor.get(cat, score), score)
        for image in records:
            image["dets"] = [d for d in image["dets"] if d[0] in floor and d[1] >= floor[d[0]]]
    return records


def coco_gt_records(coco_gt: Any, image_ids: Iterable[int]) -> list[dict[str, Any]]:
    """Records of images with no detections at all: only their non-crowd ground truths per category."""
    records = []
    for image_id in image_ids:
        gt: dict[str, int] = {}
        for ann in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id])):
            if not ann.get("iscrowd", 0):
                gt[str(int(ann["category_id"]))] = gt.get(str(int(ann["category_id"])), 0) + 1
        records.append({"image_id": int(image_id), "gt": gt, "dets": []})
    return records


def write_detection_records(path: str | os.PathLike[str], box: Sequence[Mapping[str, Any]],
                            mask: Sequence[Mapping[str, Any]] | None = None, epoch: str = "last") -> Path:
    """COCO match records for boxes (and masks), images in the same order."""
    if not box:
        raise ValueError("detection records: no images")
    record: dict[str, Any] = {"kind": "detection", "epoch": epoch, "n_val": len(box), "box": list(box)}
    if mask is not None:
        if len(mask) != len(box):
            raise ValueError(f"detection records: {len(box)} box images and {len(mask)} mask images")
        record["mask"] = list(mask)
    return write_records(path, record)


def read_records(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A records file, checked for its kind and per-image length."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    kind = record.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{path}: kind={kind!r}; expected one of {KINDS}")
    key = {"classification": "label", "segmentation": "intersection", "detection": "box"}[kind]
    if len(record.get(key, ())) != record.get("n_val"):
        raise ValueError(f"{path}: n_val={record.get('n_val')!r} but {len(record.get(key, ()))} entries in {key!r}")
    return record
