"""Pipeline stage: write the built-in stand-in datasets (see ``mixmim.data.builtin``).

Why a stage: a fresh machine has no datasets, so the pipeline's first step generates
small, seeded stand-ins in the real on-disk formats, and every later stage points its
dataset roots at them.  Usage::

    python stages/prepare_data.py --params params.yaml      # the DVC stage: section `data`
    python stages/prepare_data.py --out data/builtin --seed 0
    python stages/prepare_data.py --out data/builtin --datasets imagenet coco --image-size 32
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixmim.data.builtin import DATASETS, DEFAULT_SIZES, BuiltinSizes, generate_all  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Command-line options; defaults mirror ``BuiltinSizes`` so both stay in step."""
    d = DEFAULT_SIZES
    p = argparse.ArgumentParser(description="Generate the built-in stand-in datasets.")
    p.add_argument("--params", type=Path, default=None,
                   help="read root, seed and sizes from this params file's `data` section (other options ignored)")
    p.add_argument("--out", type=Path, default=Path("data/builtin"), help="output root directory")
    p.add_argument("--seed", type=int, default=0, help="generation seed (same seed -> identical files)")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS), help="which datasets")
    p.add_argument("--image-size", type=int, default=d.image_size, help="classification image side")
    p.add_argument("--num-classes", type=int, default=d.num_classes, help="classes per classification set")
    p.add_argument("--train-per-class", type=int, default=d.train_per_class)
    p.add_argument("--val-per-class", type=int, default=d.val_per_class)
    p.add_argument("--dense-image-size", type=int, default=d.dense_image_size, help="COCO/ADE20K image side")
    p.add_argument("--dense-train", type=int, default=d.dense_train, help="COCO/ADE20K training images")
    p.add_argument("--dense-val", type=int, default=d.dense_val, help="COCO/ADE20K validation images")
    p.add_argument("--unlabeled-images", type=int, default=d.unlabeled_images,
                   help="images of the unlabeled pretraining set (all domains mixed)")
    p.add_argument("--places-num-classes", type=int, default=d.places_num_classes,
                   help="classes of the Places stand-ins (0: --num-classes)")
    p.add_argument("--places-train-per-class", type=int, default=d.places_train_per_class,
                   help="training images per class of the Places stand-ins (0: --train-per-class)")
    p.add_argument("--inat-val-per-class", type=int, default=d.inat_val_per_class,
                   help="validation images per class of the iNat stand-ins (0: --val-per-class)")
    return p


def _summary(path: Path) -> tuple[int, int]:
    """(file count, total bytes) under ``path``, for the report line."""
    files = [f for f in path.rglob("*") if f.is_file()]
    return len(files), sum(f.stat().st_size for f in files)


def _from_params(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options from the params file's ``data`` section, checked key by key."""
    from dataclasses import asdict, make_dataclass

    from mixmim.engine.config import from_mapping
    from mixmim.params import load_params

    params = load_params(args.params)
    spec = make_dataclass("DataParams", [("root", str, "data/builtin"), ("seed", int, 0)]
                          + [(k, int, v) for k, v in asdict(DEFAULT_SIZES).items()])
    data = from_mapping(spec, params.section("data"), where=f"{args.params}: data")
    args.out = Path(params.resolve_path(data.root))
    args.seed = data.seed
    for key, value in asdict(data).items():
        setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the requested datasets and print one line per dataset written."""
    from mixmim.params import stage_main

    args = build_parser().parse_args(argv)
    return stage_main("stages/prepare_data.py", lambda: generate(args))


def generate(args: argparse.Namespace) -> None:
    if args.params is not None:
        args = _from_params(args)
    sizes = BuiltinSizes(
        image_size=args.image_size,
        num_classes=args.num_classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        dense_image_size=args.dense_image_size,
        dense_train=args.dense_train,
        dense_val=args.dense_val,
        unlabeled_images=args.unlabeled_images,
        places_num_classes=args.places_num_classes,
        places_train_per_class=args.places_train_per_class,
        inat_val_per_class=args.inat_val_per_class,
    )
    start = last = time.perf_counter()

    def report(name: str, path: Path) -> None:
        nonlocal last
        now = time.perf_counter()
        count, size = _summary(path)
        print(f"{name:10s} {path}  {count} files  {size / 1e6:.1f} MB  {now - last:.1f}s", flush=True)
        last = now

    generate_all(args.out, seed=args.seed, sizes=sizes, datasets=args.datasets, on_done=report)
    print(f"wrote {len(args.datasets)} datasets to {args.out} (seed {args.seed}) "
          f"in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
