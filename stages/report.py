"""Pipeline stage: regenerate the paper's tables and figures from the committed results (``mixmim.report``).

Usage::

    python stages/report.py --params params.yaml

Reads two sections of the params file::

    tracking:
      uri: sqlite:///mlflow.db        # the loss-curve figure only (relative: to the params file)
    report:
      out_dir: reports
      pipelines:                      # role -> metrics folder: the tables' only input
        default: metrics              # (also large / huge: MixMIM-L and -H folders of the paper pipeline)
        ablations: pipelines/ablations/metrics
        backbones: pipelines/backbones/metrics
      experiments: {default: default, ablations: ablations, backbones: backbones}   # MLflow, loss curves
      calibration:                    # task -> metric and metrics file stems (without _s<seed>)
        imagenet: {metric: top1, pretrained: finetune_imagenet, scratch: scratch_imagenet,
                   probe_pretrained: probe_imagenet_pretrained, probe_random: probe_imagenet_random}
      bootstrap_resamples: 2000
      pretrain_weights: runs/pretrain/s0/pretrain.pt   # optional (mixing figure)
      sample_images: data/builtin/imagenet/val         # optional (mixing figure)
      scale_note: "Built-in stand-in data, 64 px, CPU budgets; not comparable to the paper's numbers."

Every label names the scale of the results it shows: a metrics JSON's own ``scale``, else
``tracking.scale`` of the params file of the pipeline that owns the metrics folder (the
folder or up to two above it; :func:`mixmim.report.results.pipeline_scale`).

The ``report`` section is checked strictly (an unknown key or a wrong type stops the
stage, naming the key); paths in it are relative to the params file's folder. The
tracking URI is resolved as every stage resolves it (:meth:`mixmim.params.Params.tracking_uri`). The report is staged and moved into place whole, so a killed stage
leaves the previous report, never a half-written one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixmim.engine.config import ConfigError, from_mapping  # noqa: E402
from mixmim.report import ROLES, build_report, check_calibration  # noqa: E402
from mixmim.report.calibration import CalibrationEntry  # noqa: E402
from mixmim.params import load_params as load_project_params  # noqa: E402


def _default_experiments() -> dict[str, str]:
    return {role: role for role in ROLES}


def _default_pipelines() -> dict[str, str]:
    return {"default": "metrics", "ablations": "pipelines/ablations/metrics",
            "backbones": "pipelines/backbones/metrics"}


@dataclass
class ReportParams:
    """The ``report`` section of params.yaml."""

    out_dir: str = "reports"
    pipelines: dict[str, str] = field(default_factory=_default_pipelines)
    experiments: dict[str, str] = field(default_factory=_default_experiments)
    calibration: dict[str, dict] = field(default_factory=dict)
    bootstrap_resamples: int = 2000
    pretrain_weights: str | None = None
    sample_images: str | None = None
    scale_note: str = ""


def check_experiments(experiments: Mapping[str, Any], where: str) -> dict[str, str]:
    """Roles must be known pipelines and names non-empty strings (``from_mapping`` checks only the mapping)."""
    checked = {}
    for role, name in experiments.items():
        if role not in ROLES:
            raise ConfigError(f"{where}: unknown role {role!r}; expected some of {list(ROLES)}")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}.{role}={name!r}: expected an experiment name (a string)")
        checked[role] = name
    return checked


def load_params(path: Path) -> tuple[ReportParams, str]:
    """The checked ``report`` section and the tracking URI of a params file.

    The URI comes from :meth:`mixmim.params.Params.tracking_uri` like every stage's
    (``$MIXMIM_TRACKING_URI``, else ``tracking.uri`` with a relative SQLite path made
    absolute against the params file's folder, DVC experiment workspaces included).
    """
    project = load_project_params(path)
    section = project.data.get("report")
    if section is None:
        raise ConfigError(f"params file {path}: no 'report' section")
    params = from_mapping(ReportParams, section, where="report")
    params.experiments = check_experiments(params.experiments, "report.experiments")
    params.pipelines = check_experiments(params.pipelines, "report.pipelines")
    if params.bootstrap_resamples < 1000:
        raise ConfigError(f"report.bootstrap_resamples={params.bootstrap_resamples!r}: expected at least 1000")
    try:
        check_calibration(params.calibration)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return params, project.tracking_uri()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the paper's tables and figures from the committed "
                                                 "results (metrics JSON and per-image records).")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file (sections report and tracking)")
    args = parser.parse_args(argv)
    try:
        params, uri = load_params(args.params)
    except ConfigError as err:
        print(f"stages/report.py: {err}", file=sys.stderr)
        return 2
    root = args.params.resolve().parent  # every path of the section is relative to the params file

    def path(value: str | None) -> Path | None:
        return None if not value else root / value

    calibration: dict[str, CalibrationEntry] | None = check_calibration(params.calibration) or None
    report = build_report(
        params.pipelines, out_dir=root / params.out_dir, root=root, calibration=calibration, tracking_uri=uri,
        experiments=params.experiments, pretrain_weights=path(params.pretrain_weights),
        sample_images=path(params.sample_images), scale_note=params.scale_note,
        resamples=params.bootstrap_resamples,
    )
    print(f"report: {len(report.tables)} table files and {len(report.figures)} figures in {report.out_dir}")
    for name, why in report.skipped.items():
        print(f"report: skipped {name}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
