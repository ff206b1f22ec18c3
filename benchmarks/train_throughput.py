"""End-to-end training throughput of the engines on the built-in data.

Runs a short pretraining and a short finetuning with the real engine (data loading,
augmentation, forward, backward, optimiser, logging) and reports the images/s the engine
itself measured over each logging window, excluding the first window (warm-up).

    python benchmarks/train_throughput.py --model mixmim_tiny --batch 32 --workers 0
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from mlflow import MlflowClient

from mixmim.data.builtin import write_imagenet
from mixmim.engine.config import FinetuneConfig, PretrainConfig
from mixmim.engine.engine_finetune import finetune
from mixmim.engine.engine_pretrain import pretrain


def window_rates(store: str, run_id: str) -> list[float]:
    history = sorted(MlflowClient(store).get_metric_history(run_id, "train/images_per_s"), key=lambda m: m.step)
    return [m.value for m in history][1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mixmim_tiny")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--steps", type=int, default=12, help="optimiser steps per run")
    p.add_argument("--precision", default="fp32")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "imagenet"
        write_imagenet(root, seed=0, image_size=64, num_classes=10, train_per_class=40, val_per_class=10)
        store = f"sqlite:///{tmp}/mlflow.db"
        common = dict(model=a.model, dataset="imagenet", data_root=str(root), batch_size=a.batch,
                      num_workers=a.workers, epochs=1, warmup_epochs=0, max_steps_per_epoch=a.steps,
                      log_every_steps=2, tracking_uri=store, experiment="bench", progress=False,
                      precision=a.precision)
        pre = pretrain(PretrainConfig(output_dir=f"{tmp}/pre", **common))
        fin = finetune(FinetuneConfig(output_dir=f"{tmp}/ft", **common))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {a.model}, batch {a.batch}, "
              f"64 px built-in ImageNet stand-in, workers {a.workers}, {a.precision}, {a.steps} steps")
        print("| run | images/s (median of windows) | min | max |")
        print("|---|---|---|---|")
        for name, run in (("pretrain", pre), ("finetune (RandAug, mixup/cutmix, erasing)", fin)):
            rates = window_rates(store, run["run_id"])
            print(f"| {name} | {statistics.median(rates):.1f} | {min(rates):.1f} | {max(rates):.1f} |")


if __name__ == "__main__":
    main()
