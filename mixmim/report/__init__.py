"""The report: the paper's tables and figures regenerated from what this suite ran.

``build_report(tracking_uri, {"default": ..., "ablations": ..., "backbones": ...})``
reads the finished MLflow runs of each pipeline and writes ``reports/tables`` (Markdown,
CSV, LaTeX; paper and measured values side by side), ``reports/figures`` (PNG) and an
index ``reports/README.md``. The paper's numbers ship with the package in ``paper/``.
"""

from .build import FIGURES, Report, build_report
from .runs import ROLES, Run, RunIndex, load_runs
from .tables import PAPER_TABLES, Table, build_tables, paper_table

__all__ = [
    "FIGURES", "PAPER_TABLES", "ROLES", "Report", "Run", "RunIndex", "Table", "build_report", "build_tables",
    "load_runs", "paper_table",
]
