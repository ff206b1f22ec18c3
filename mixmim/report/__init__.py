"""The report: the paper's tables and figures regenerated from what this suite ran.

``build_report({"default": "metrics", "ablations": "pipelines/ablations/metrics", ...})``
reads the committed metrics JSON and per-image records of each pipeline and writes
``reports/tables`` (CSV with interval and test columns; Markdown and LaTeX with the
intervals merged), ``reports/figures`` (PNG; only the loss curves read MLflow) and an
index ``reports/README.md``. The paper's numbers ship with the package in ``paper/``.
"""

from .build import FIGURES, ROLES, Report, build_report, build_tables_from
from .calibration import CALIBRATION_TASKS, DEFAULT_CALIBRATION, CalibrationEntry, check_calibration
from .results import Result, Results, load_results
from .tables import PAPER_TABLES, Table, build_tables, paper_table

__all__ = [
    "CALIBRATION_TASKS", "DEFAULT_CALIBRATION", "FIGURES", "PAPER_TABLES", "ROLES", "CalibrationEntry", "Report",
    "Result", "Results", "Table", "build_report", "build_tables", "build_tables_from", "check_calibration",
    "load_results", "paper_table",
]
