"""Estimated GPU-hours of a DVC pipeline, from counted FLOPs.

For every training stage of a pipeline this reads the stage's command (after DVC's
interpolation), merges the params sections it names into the engine config it would run
with, counts the forward multiply-adds of that model per image on the meta device (the
pretraining model as it trains, the classifier, detector or segmentor; the same counting
as ``mixmim info``), and multiplies::

    GPU-hours = multiply-adds x 2 (FLOPs) x 3 (forward + backward) x images trained
                / assumed sustained FLOP/s / 3600

plus one forward pass over the validation split per finetuning epoch. Images trained is
epochs x training-set size (the official sizes below; a ``class_list`` scales ImageNet by
K/1000), or iterations x batch for ADE20K. Data loading, checkpointing and evaluation of
dense models are not counted, so these are lower bounds at the assumed throughput, not
measurements::

    python -m mixmim.budget pipelines/paper/dvc.yaml --tflops 100      # A100-class assumption
    python -m mixmim.budget pipelines/mid/dvc.yaml --tflops 300 --by-stage
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engine.config import ConfigError, FinetuneConfig, PretrainConfig, from_mapping
from .pipeline import load_params, merged

__all__ = ["TRAIN_IMAGES", "VAL_IMAGES", "StageBudget", "estimate", "gpu_hours", "main", "stage_budget"]

#: Official training / validation split sizes.
TRAIN_IMAGES = {"imagenet": 1_281_167, "inat2018": 437_513, "inat2019": 265_213, "places205": 2_448_873,
                "places365": 1_803_460, "coco": 118_287, "ade20k": 20_210}
VAL_IMAGES = {"imagenet": 50_000, "inat2018": 24_426, "inat2019": 3_030, "places205": 20_500,
              "places365": 36_500, "coco": 5_000, "ade20k": 2_000}
TRAIN_SCRIPTS = {"pretrain.py", "finetune.py", "coco.py", "ade20k.py"}


@dataclass(frozen=True)
class StageBudget:
    stage: str
    kind: str  # pretrain | finetune | coco | ade20k
    model: str
    gmacs_per_image: float  # forward multiply-adds per training image (G)
    images: float  # training images seen (plus validation forwards folded in as 1/3 image each)
    gpu_hours: float


def gpu_hours(gmacs_per_image: float, images: float, tflops: float) -> float:
    """multiply-adds x 2 x 3 (forward + backward) x images / sustained FLOP/s, in hours."""
    return gmacs_per_image * 1e9 * 2 * 3 * images / (tflops * 1e12) / 3600


def _subset_fraction(class_list: str | None, params_folder: Path) -> float:
    if not class_list:
        return 1.0
    from .data.imagenet import read_class_list

    path = Path(class_list)
    return len(read_class_list(path if path.is_absolute() else params_folder / path)) / 1000


@functools.lru_cache(maxsize=None)
def _pretrain_gmacs(cfg_json: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .engine.engine_pretrain import build_model
    from .flops import CUSTOM_FLOPS

    cfg = from_mapping(PretrainConfig, json.loads(cfg_json))
    for device in ("meta", "cpu"):  # some fills index by data (nonzero), which the meta device cannot do
        with torch.device(device):
            model = build_model(cfg)
        size = getattr(model, "img_size", None) or model.encoder.img_size
        x = torch.zeros(2, 3, *size, device=device)  # two images: the pair MixMIM mixes
        try:
            with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
                model(x)
        except NotImplementedError:
            continue
        return counter.get_total_flops() / 2 / 2 / 1e9
    raise RuntimeError(f"could not count the pretraining FLOPs of {cfg.model}")


@functools.lru_cache(maxsize=None)
def _classifier_gmacs(model: str, img_size: int | None, kwargs_json: str, num_classes: int) -> float:
    import torch

    from .flops import count_flops

    kwargs = json.loads(kwargs_json)
    if model.startswith("mixmim_"):
        from .models import build_classifier

        with torch.device("meta"):
            net = build_classifier(model, num_classes=num_classes, **kwargs,
                                   **({"img_size": img_size} if img_size else {}))
        return count_flops(net, net.encoder.img_size) / 1e9
    from .models.adapters.builder import create_timm_model

    size = img_size or 224  # the engines' default input for timm encoders
    with torch.device("meta"):
        net, _ = create_timm_model(model, size, num_classes=num_classes, **kwargs)
    return count_flops(net, size) / 1e9


def _label(cfg: Any) -> str:
    """The model's name, marked when ``model_kwargs`` change its shape."""
    return cfg.model + (" (resized)" if getattr(cfg, "model_kwargs", None) else "")


def _stage_args(cmd: str) -> dict[str, Any] | None:
    """The stage script and its --params/--sections/--dataset of a command, or None if it trains nothing."""
    words = shlex.split(cmd)
    script = next((w for w in words if Path(w).name in TRAIN_SCRIPTS), None)
    if script is None:
        return None
    out: dict[str, Any] = {"kind": Path(script).stem, "params": "params.yaml", "sections": [], "dataset": None}
    i = words.index(script) + 1
    while i < len(words):
        word = words[i]
        if word == "--sections":
            i += 1
            while i < len(words) and not words[i].startswith("--"):
                out["sections"].append(words[i])
                i += 1
            continue
        if word in ("--params", "--dataset") and i + 1 < len(words):
            out[word[2:]] = words[i + 1]
            i += 1
        i += 1
    return out


def stage_budget(name: str, cmd: str, wdir: Path, tflops: float) -> StageBudget | None:
    """The estimate of one stage, from its command and the params it names (None: not a training stage)."""
    args = _stage_args(cmd)
    if args is None:
        return None
    params = load_params(wdir / args["params"])
    values = merged(params, args["sections"])
    kind = args["kind"]
    if kind == "pretrain":
        cfg = from_mapping(PretrainConfig, values, where=name)
        gmacs = _pretrain_gmacs(json.dumps({k: v for k, v in values.items()
                                            if k in ("model", "model_kwargs", "img_size", "mask_ratio", "fill",
                                                     "dual", "unmix", "mask_type")}, sort_keys=True))
        images = cfg.epochs * TRAIN_IMAGES[cfg.dataset] * _subset_fraction(cfg.class_list, params.folder)
        return StageBudget(name, kind, _label(cfg), gmacs, images, gpu_hours(gmacs, images, tflops))
    if kind == "finetune":
        cfg = from_mapping(FinetuneConfig, values, where=name)
        dataset = args["dataset"] or cfg.dataset
        fraction = _subset_fraction(cfg.class_list, params.folder)
        classes = {"imagenet": round(1000 * fraction)}.get(dataset, 1000)
        kwargs = dict(cfg.model_kwargs)
        gmacs = _classifier_gmacs(cfg.model, cfg.img_size, json.dumps(kwargs, sort_keys=True), classes)
        train = TRAIN_IMAGES[dataset] * fraction
        val = VAL_IMAGES[dataset] * fraction
        images = cfg.epochs * (train + val / 3)  # a validation image costs one forward pass
        return StageBudget(name, kind, _label(cfg), gmacs, images, gpu_hours(gmacs, images, tflops))
    from .transfer.dense_config import DetectionConfig, SegmentationConfig

    if kind == "coco":
        from .transfer.detection import detector_complexity

        cfg = from_mapping(DetectionConfig, values, where=name)
        gmacs = detector_complexity(cfg.model, cfg.img_size).gflops
        images = cfg.epochs * TRAIN_IMAGES["coco"]
        return StageBudget(name, kind, _label(cfg), gmacs, images, gpu_hours(gmacs, images, tflops))
    from .transfer.segmentation import segmentor_complexity

    cfg = from_mapping(SegmentationConfig, values, where=name)
    gmacs = segmentor_complexity(cfg.model, cfg.img_size).gflops
    images = cfg.max_iters * cfg.batch_size
    return StageBudget(name, kind, _label(cfg), gmacs, images, gpu_hours(gmacs, images, tflops))


def estimate(dvc_yaml: str | Path, tflops: float) -> list[StageBudget]:
    """Every training stage of one dvc.yaml, in DVC's order."""
    from dvc.repo import Repo

    dvc_yaml = Path(dvc_yaml).resolve()
    if not dvc_yaml.is_file():
        raise ConfigError(f"{dvc_yaml} does not exist; expected a pipeline's dvc.yaml")
    if tflops <= 0:
        raise ConfigError(f"tflops={tflops}: expected a positive sustained throughput in TFLOP/s")
    out = []
    with Repo(str(dvc_yaml.parent)) as repo:
        for stage in repo.index.stages:
            if Path(stage.path).resolve() != dvc_yaml or not getattr(stage, "cmd", None):
                continue
            cmd = stage.cmd if isinstance(stage.cmd, str) else " ".join(stage.cmd)
            budget = stage_budget(stage.addressing.rsplit(":", 1)[-1], cmd, Path(stage.wdir), tflops)
            if budget is not None:
                out.append(budget)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixmim.budget", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dvc_yaml", nargs="+")
    parser.add_argument("--tflops", type=float, default=100.0,
                        help="assumed sustained TFLOP/s per GPU in bf16 (default 100: A100-class)")
    parser.add_argument("--by-stage", action="store_true", help="one line per stage")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"tflops": args.tflops, "pipelines": {}}
    for path in args.dvc_yaml:
        stages = estimate(path, args.tflops)
        groups: dict[str, float] = {}
        for s in stages:
            groups[s.stage.split("@")[0]] = groups.get(s.stage.split("@")[0], 0.0) + s.gpu_hours
        report["pipelines"][path] = {"gpu_hours": sum(s.gpu_hours for s in stages), "by_group": groups,
                                     "stages": [vars(s) for s in stages]}
        if args.json:
            continue
        print(f"{path}: {sum(s.gpu_hours for s in stages):,.1f} GPU-hours at {args.tflops:g} TFLOP/s "
              f"({len(stages)} training stages)")
        for group, hours in groups.items():
            print(f"  {group:24s} {hours:10,.1f}")
        if args.by_stage:
            for s in stages:
                print(f"    {s.stage:40s} {s.model:32s} {s.gmacs_per_image:8.2f} G x {s.images:14,.0f} "
                      f"-> {s.gpu_hours:9,.2f} h")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
