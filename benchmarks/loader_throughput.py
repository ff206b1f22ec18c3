"""Images/s of one data-loader worker for the ImageNet training transforms at paper settings.

The JPEGs are generated here (no downloads): ``--images`` pictures of ``--size`` pixels
(ImageNet's typical 500x375 by default) of smooth colour fields, shapes and noise, saved
at quality 90, so that they decode like photographs rather than flat test patterns.

Per worker means one process with one torch thread, as a ``DataLoader`` worker runs, timed
by its CPU time (so that other load on a shared machine does not count). Rows:

- ``decode``: PIL full decode + RGB; ``decode_draft``: PIL decoding at reduced size
  (``Image.draft``) to the smallest power-of-two scale that still leaves the crop at
  least the output size; ``decode_tv``: ``torchvision.io.decode_jpeg`` (libjpeg-turbo);
- ``pretrain``: Table 11, PIL decode, RandomResizedCrop(224, scale 0.2-1, bicubic), flip,
  ToTensor, Normalize (``mixmim.engine.loaders.pretrain_transform``);
- ``pretrain_draft``: the same crop distribution with the crop chosen on the header's
  size and the JPEG decoded at reduced size first;
- ``finetune``: Table 12, timm's RandAug(9, 0.5) pipeline with random erasing 0.25
  (``mixmim.engine.loaders.finetune_transform``), then timm Mixup/CutMix (0.8/1.0, label
  smoothing 0.1) on batches of 64, its cost spread over the images.

Workers per GPU = the GPU's images/s / one worker's images/s. No GPU has been measured
yet, so the GPU rate is stated, not measured: by default the FLOPs of a MixMIM-B step
(counted by ``benchmarks/gpu_check.py``'s counter) at ``--assumed-mfu`` of
``--gpu-peak-tflops``; ``--gpu-images-per-s`` replaces it with a measured rate.

    python benchmarks/loader_throughput.py --rounds 5
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg

from mixmim.engine.loaders import finetune_transform, pretrain_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_jpegs(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """``count`` photograph-like JPEGs (quality 90) of ``size`` (w, h) in ``folder``."""
    rng = np.random.default_rng(seed)
    w, h = size
    paths = []
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        img = np.zeros((h, w, 3), np.float32)
        for c in range(3):  # smooth colour field from a few low-frequency waves
            for _ in range(4):
                fx, fy, ph = rng.uniform(0.002, 0.02), rng.uniform(0.002, 0.02), rng.uniform(0, 6.3)
                img[..., c] += np.sin(xx * fx * 6.3 + yy * fy * 6.3 + ph) * rng.uniform(20, 50)
        for _ in range(12):  # hard-edged shapes
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, min(w, h) / 3)
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            img[inside] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 8, img.shape)  # sensor-like noise
        img = np.clip(img + 128 - img.mean(), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:04d}.jpg"
        Image.fromarray(img).save(path, quality=90)
        paths.append(path)
    return paths


def load_pil(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


class DraftRandomResizedCrop:
    """RandomResizedCrop whose crop is drawn on the JPEG header's size; the image is then
    decoded at the smallest power-of-two reduction that keeps the crop >= ``size`` pixels."""

    def __init__(self, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> None:
        self.size, self.scale, self.ratio = size, scale, ratio
        self.rest = T.Compose([T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])

    def __call__(self, path: Path) -> torch.Tensor:
        with Image.open(path) as img:
            w, h = img.size
            top, left, ch, cw = T.RandomResizedCrop.get_params(torch.empty(1, h, w), self.scale, list(self.ratio))
            factor = max(1, 2 ** int(math.floor(math.log2(max(1.0, min(cw, ch) / self.size)))))
            img.draft("RGB", (max(1, w // factor), max(1, h // factor)))
            sx, sy = img.size[0] / w, img.size[1] / h
            img = img.convert("RGB")
        box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
        crop = img.resize((self.size, self.size), Image.BICUBIC, box=box)
        return self.rest(crop)


def per_image_rate(fn, paths: list[Path], rounds: int) -> tuple[float, float, float]:
    """Median images per CPU second over ``rounds`` passes over ``paths`` (and the min and max).

    CPU time of this one-threaded process, not wall time: on a shared machine the process
    waits for a core, and a worker with a core of its own does not."""
    fn(paths[0])
    rates = []
    for _ in range(rounds):
        t = time.process_time()
        for p in paths:
            fn(p)
        rates.append(len(paths) / (time.process_time() - t))
    return statistics.median(rates), min(rates), max(rates)


def mixup_rate(batch: int, img_size: int, rounds: int) -> float:
    """Images/s of timm's Mixup/CutMix on (batch, 3, img, img) fp32 batches."""
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=1000)
    x = torch.randn(batch, 3, img_size, img_size)
    y = torch.randint(0, 1000, (batch,))
    mix(x.clone(), y)
    times = []
    for _ in range(rounds * 4):
        xb = x.clone()
        t = time.process_time()
        mix(xb, y)
        times.append(time.process_time() - t)
    return batch / statistics.median(times)


def gpu_rate(assumed_mfu: float, peak_tflops: float, img_size: int) -> dict[str, float]:
    """Images/s of a MixMIM-B pretraining and finetuning step at an assumed MFU (stated, not measured)."""
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).with_name("gpu_check.py"))
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    from mixmim.models import build_classifier, build_pretrainer

    out = {}
    for kind, model in (("pretrain", build_pretrainer("mixmim_base", img_size=img_size)),
                        ("finetune", build_classifier("mixmim_base", num_classes=1000, img_size=img_size))):
        flops = gc.forward_flops_per_image(model.train(), img_size, kind)
        out[kind] = assumed_mfu * peak_tflops * 1e12 / (3 * flops)
        out[f"{kind}_fwd_gflops"] = flops / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--assumed-mfu", type=float, default=0.4)
    parser.add_argument("--gpu-peak-tflops", type=float, default=989.4, help="dense bf16 (H100/H200 SXM)")
    parser.add_argument("--gpu-images-per-s", type=float, nargs=2, default=None, metavar=("PRETRAIN", "FINETUNE"),
                        help="measured GPU rates; replaces the assumed-MFU estimate")
    args = parser.parse_args()
    if args.images < 1 or args.rounds < 1:
        raise ValueError(f"--images {args.images} --rounds {args.rounds}; expected positive counts")
    torch.set_num_threads(1)  # as one DataLoader worker
    random.seed(0)
    torch.manual_seed(0)
    size = args.img_size
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.images, tuple(args.size))
        kib = statistics.mean(os.path.getsize(p) for p in paths) / 1024
        pre = pretrain_transform(size)
        fine = finetune_transform(size, True, "rand-m9-mstd0.5-inc1", 0.25, 0.875)
        draft = DraftRandomResizedCrop(size)
        rows = {
            "decode (PIL)": lambda p: load_pil(p),
            "decode_draft (PIL, reduced size)": lambda p: draft(p),  # includes the crop: see below
            "decode_tv (torchvision.io)": lambda p: decode_jpeg(torch.frombuffer(bytearray(p.read_bytes()),
                                                                                 dtype=torch.uint8),
                                                                mode=ImageReadMode.RGB),
            "pretrain (Table 11)": lambda p: pre(load_pil(p)),
            "finetune (Table 12, RandAug + erasing)": lambda p: fine(load_pil(p)),
        }
        results = {}
        for name, fn in rows.items():
            results[name] = per_image_rate(fn, paths, args.rounds)
        del rows["decode_draft (PIL, reduced size)"]
        results["pretrain_draft (crop drawn on header, reduced-size decode)"] = results.pop(
            "decode_draft (PIL, reduced size)")
    mix = mixup_rate(64, size, args.rounds)
    fine_rate = results["finetune (Table 12, RandAug + erasing)"][0]
    fine_with_mix = 1.0 / (1.0 / fine_rate + 1.0 / mix)
    if args.gpu_images_per_s:
        gpu = {"pretrain": args.gpu_images_per_s[0], "finetune": args.gpu_images_per_s[1]}
        basis = "measured GPU rates given on the command line"
    else:
        gpu = gpu_rate(args.assumed_mfu, args.gpu_peak_tflops, size)
        basis = (f"assumed, not measured: {args.assumed_mfu:.0%} MFU of {args.gpu_peak_tflops} TFLOP/s bf16, "
                 f"{gpu['pretrain_fwd_gflops']:.1f} / {gpu['finetune_fwd_gflops']:.1f} GFLOP per image forward "
                 "(pretrain / finetune)")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread; "
          f"{args.images} JPEGs {args.size[0]}x{args.size[1]} (mean {kib:.0f} KiB), {args.rounds} rounds")
    print("| per worker | images per CPU-second (median) | min | max |")
    print("|---|---|---|---|")
    for name, (med, lo, hi) in results.items():
        print(f"| {name} | {med:.1f} | {lo:.1f} | {hi:.1f} |")
    print(f"| mixup/cutmix (timm, batch 64, per image) | {mix:.0f} | | |")
    print(f"| finetune incl. mixup/cutmix | {fine_with_mix:.1f} | | |")
    print(f"GPU step rate ({basis}): pretrain {gpu['pretrain']:.0f} images/s, finetune {gpu['finetune']:.0f} images/s")
    pre_best = max(results["pretrain (Table 11)"][0],
                   results["pretrain_draft (crop drawn on header, reduced-size decode)"][0])
    print(f"workers per GPU: pretrain {math.ceil(gpu['pretrain'] / results['pretrain (Table 11)'][0])} "
          f"(with reduced-size decoding {math.ceil(gpu['pretrain'] / pre_best)}), "
          f"finetune {math.ceil(gpu['finetune'] / fine_with_mix)}")


if __name__ == "__main__":
    main()
