"""The ``mixmim`` console script."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .models import MODEL_SIZES


def _info(args: argparse.Namespace) -> int:
    from .flops import model_info

    names = sorted(MODEL_SIZES) if args.all else [args.model]
    if not args.all and args.model is None:
        print("mixmim info: give a MODEL or --all", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        try:
            rows.append(model_info(name, args.img_size).as_dict())
        except ValueError as err:
            print(f"mixmim info: {err}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=None if len(rows) == 1 else 2))
    else:
        print(f"{'model':<14} {'img_size':>8} {'params (M)':>11} {'GFLOPs':>8}")
        for r in rows:
            print(f"{r['model']:<14} {r['img_size']:>8} {r['params_m']:>11.2f} {r['gflops']:>8.2f}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .engine.config import FinetuneConfig, PretrainConfig, load_config, parse_overrides

    cls = PretrainConfig if args.command == "pretrain" else FinetuneConfig
    cfg = load_config(cls, args.config, parse_overrides(args.overrides))
    if args.command == "pretrain":
        from .engine.engine_pretrain import pretrain

        result = pretrain(cfg)
    else:
        from .engine.engine_finetune import finetune

        result = finetune(cfg)
    if result.get("run_id") is not None or int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))  # rank 0 only
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from .pipeline import run_under_parent

    command = [c for c in args.cmd if c != "--"]
    if not command:
        print("mixmim pipeline: give the command to run after --", file=sys.stderr)
        return 2
    try:
        return run_under_parent(args.params, command)
    except RuntimeError as err:
        print(f"mixmim pipeline: {err}", file=sys.stderr)
        return 1


def _merge_runs(args: argparse.Namespace) -> int:
    from .tracking_merge import merge_runs, store_uri

    summary = merge_runs(store_uri(args.src), store_uri(args.dst), args.experiment or None)
    for line in summary.lines():
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixmim", description="MixMIM reproduction suite")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameters and FLOPs (multiply-adds) of a registered model")
    info.add_argument("model", nargs="?", help=f"one of {', '.join(sorted(MODEL_SIZES))}, or a timm model name")
    info.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    info.add_argument("--json", action="store_true", help="print JSON: model, img_size, params_m, gflops")
    info.add_argument("--all", action="store_true", help="every registered model")
    info.set_defaults(func=_info)
    for name, text in (("pretrain", "MixMIM pretraining (Table 11)"),
                       ("finetune", "classification finetuning (Table 12) or linear probe")):
        p = sub.add_parser(name, help=text, description=f"{text}. Run under torchrun for several processes.")
        p.add_argument("--config", default=None, help="YAML file of config keys (see mixmim/engine/config.py)")
        p.add_argument("overrides", nargs="*", help="key=value pairs applied on top of the file")
        p.set_defaults(func=_train)
    pipe = sub.add_parser("pipeline", help="run a command (dvc repro ...) inside one parent MLflow run",
                          description="Group one pipeline invocation's stage runs under a parent MLflow run.")
    pipe.add_argument("--params", required=True, help="the pipeline's params.yaml (its tracking section)")
    pipe.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command, e.g. -- dvc repro FILE")
    pipe.set_defaults(func=_pipeline)
    merge = sub.add_parser(
        "merge-runs", help="copy the MLflow runs of one tracking store into another",
        description="Copy every run (tags, params, full metric histories, artifacts) of SRC's experiments "
                    "into DST, e.g. the runs of one pipeline made in two clones. Runs copied before are "
                    "skipped; a group run whose key DST already has is not duplicated, its seeds join the "
                    "existing group and its seeds/* metrics are recomputed. SRC is only read.")
    merge.add_argument("src", metavar="SRC_URI",
                       help="the store to copy from: a tracking URI, or the path of an mlflow.db file "
                            "(taken as sqlite:///<absolute path>); it must exist")
    merge.add_argument("dst", metavar="DST_URI",
                       help="the store to copy into, same forms; a missing SQLite file is created")
    merge.add_argument("--experiment", action="append", metavar="NAME",
                       help="copy only this experiment (repeatable; default: every active experiment)")
    merge.set_defaults(func=_merge_runs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """A user's mistake (unknown config key, missing dataset, unusable tracking store) ends the
    command with one line and exit status 2, as in the pipeline stages; bugs keep their traceback."""
    from .params import stage_main

    args = build_parser().parse_args(argv)
    status = [0]

    def run() -> None:
        status[0] = args.func(args)

    return stage_main(f"mixmim {args.command}", run) or status[0]


if __name__ == "__main__":
    sys.exit(main())
