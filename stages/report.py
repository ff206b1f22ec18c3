"""Pipeline stage: regenerate the paper's tables and figures from the MLflow runs (``mixmim.report``).

Usage::

    python stages/report.py --params params.yaml

Reads two sections of the params file::

    tracking:
      uri: sqlite:///mlflow.db        # a relative sqlite path is relative to the working directory
    report:
      out_dir: reports
      experiments: {default: default, ablations: ablations, backbones: backbones}
      pretrain_weights: outputs/default/pretrain/pretrain.pt   # optional (mixing figure)
      sample_images: data/builtin/imagenet/val                  # optional (mixing figure)
      scale_note: "Built-in stand-in data, 64 px, CPU budgets; not comparable to the paper's numbers."

The ``report`` section is checked strictly (an unknown key or a wrong type stops the
stage, naming the key); of ``tracking`` only ``uri`` is read, since other stages own
its other keys. The report is staged and moved into place whole, so a killed stage
leaves the previous report, never a half-written one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

if __package__ in (None, ""):  # run as a script from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from mixmim.engine.config import ConfigError, from_mapping  # noqa: E402
from mixmim.report import ROLES, build_report  # noqa: E402
from mixmim.tracking import resolve_tracking_uri  # noqa: E402


def _default_experiments() -> dict[str, str]:
    return {role: role for role in ROLES}


@dataclass
class ReportParams:
    """The ``report`` section of params.yaml."""

    out_dir: str = "reports"
    experiments: dict[str, str] = field(default_factory=_default_experiments)
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


def absolute_sqlite_uri(uri: str, root: Path) -> str:
    """``sqlite:///rel/x.db`` -> ``sqlite:////<root>/rel/x.db``; other URIs unchanged.

    SQLAlchemy reads three slashes as a path relative to the process's working
    directory; resolving it here makes the stage independent of where DVC starts it.
    """
    if urlparse(uri).scheme.lower() != "sqlite":
        return uri
    rest, _, query = uri[len("sqlite:///"):].partition("?")
    if not rest or rest == ":memory:" or rest.startswith("/"):
        return uri
    path = (root / rest).resolve()
    return f"sqlite:///{path.as_posix()}" + (f"?{query}" if query else "")


def load_params(path: Path, root: Path | None = None) -> tuple[ReportParams, str]:
    """The checked ``report`` section and the tracking URI (absolute for SQLite) of a params file."""
    root = Path.cwd() if root is None else root
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"params file {path} is not valid YAML: {err}") from err
    if not isinstance(data, Mapping):
        raise ConfigError(f"params file {path}: expected a mapping at the top level")
    section = data.get("report")
    if section is None:
        raise ConfigError(f"params file {path}: no 'report' section")
    params = from_mapping(ReportParams, section, where="report")
    params.experiments = check_experiments(params.experiments, "report.experiments")
    tracking = data.get("tracking") or {}
    if not isinstance(tracking, Mapping):
        raise ConfigError(f"tracking={tracking!r}: expected a mapping")
    uri = tracking.get("uri")
    if uri is not None and not isinstance(uri, str):
        raise ConfigError(f"tracking.uri={uri!r}: expected a string")
    return params, absolute_sqlite_uri(resolve_tracking_uri(uri, root), root)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the paper's tables and figures from MLflow runs.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file (sections report and tracking)")
    args = parser.parse_args(argv)
    try:
        params, uri = load_params(args.params)
    except ConfigError as err:
        print(f"stages/report.py: {err}", file=sys.stderr)
        return 2
    report = build_report(
        uri, params.experiments, out_dir=params.out_dir,
        pretrain_weights=Path(params.pretrain_weights) if params.pretrain_weights else None,
        sample_images=Path(params.sample_images) if params.sample_images else None,
        scale_note=params.scale_note,
    )
    print(f"report: {len(report.tables)} table files and {len(report.figures)} figures in {report.out_dir}")
    for name, why in report.skipped.items():
        print(f"report: skipped {name}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
