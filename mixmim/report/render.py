"""Writing a table as Markdown, CSV and LaTeX.

Markdown and LaTeX are written here rather than with ``DataFrame.to_markdown`` /
``DataFrame.to_latex`` because those need ``tabulate`` and ``jinja2``, which are not
dependencies of this suite (they are only present when some other package happens to
pull them in); a report stage must not break because a transitive dependency moved.
Cells are already display strings when they get here, so no number formatting happens.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

__all__ = ["to_latex", "to_markdown", "write_table"]

_NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?$")
_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "—": "---", "–": "--",
}


def _cells(frame: pd.DataFrame) -> list[list[str]]:
    return [["" if pd.isna(v) else str(v) for v in row] for row in frame.itertuples(index=False)]


def _markdown_cell(text: str) -> str:
    return text.replace("|", r"\|").replace("\n", " ")


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured pipe table; numeric columns are right-aligned."""
    header = [str(c) for c in frame.columns]
    rows = _cells(frame)
    align = ["---:" if _numeric_column(rows, i) else ":---" for i in range(len(header))]
    lines = ["| " + " | ".join(_markdown_cell(h) for h in header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _numeric_column(rows: list[list[str]], i: int) -> bool:
    values = [row[i] for row in rows if row[i]]
    return bool(values) and all(_NUMBER.match(v) for v in values)


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters (and spell dashes the LaTeX way)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(frame: pd.DataFrame, caption: str = "", label: str = "") -> str:
    """A booktabs ``tabular`` in a ``table`` float, ready to ``\\input``."""
    header = [str(c) for c in frame.columns]
    rows = _cells(frame)
    spec = "".join("r" if _numeric_column(rows, i) else "l" for i in range(len(header)))
    lines = [r"\begin{table}[t]", r"\centering", r"\small"]
    if caption:
        lines.append(r"\caption{" + latex_escape(caption) + "}")
    if label:
        lines.append(r"\label{" + label + "}")
    lines += [r"\begin{tabular}{" + spec + "}", r"\toprule",
              " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """For reading: every column ``C`` with ``C_ci_low``/``C_ci_high`` siblings shows ``value (low–high)``,
    or ``value (no interval)`` when a value has none (the table's notes say why)."""
    out = frame.copy()
    for column in list(frame.columns):
        low, high = f"{column}_ci_low", f"{column}_ci_high"
        if low in frame.columns and high in frame.columns:
            merged = []
            for value, lo, hi in zip(frame[column], frame[low], frame[high]):
                value = "" if pd.isna(value) else str(value)
                lo = "" if pd.isna(lo) else str(lo)
                hi = "" if pd.isna(hi) else str(hi)
                bare = bool(_NUMBER.match(value)) and not (lo and hi)  # a value of ours without its interval
                merged.append(f"{value} ({lo}–{hi})" if lo and hi else f"{value} (no interval)" if bare else value)
            out[column] = merged
            out = out.drop(columns=[low, high])
    return out


def write_table(frame: pd.DataFrame, folder: Path, stem: str, title: str, notes: tuple[str, ...] = ()) -> list[Path]:
    """``<stem>.csv`` (every column), ``<stem>.md`` (titled, intervals merged, notes below) and ``<stem>.tex``."""
    folder.mkdir(parents=True, exist_ok=True)
    md, csv, tex = folder / f"{stem}.md", folder / f"{stem}.csv", folder / f"{stem}.tex"
    shown = display_frame(frame)
    below = "".join(f"\n{note}\n" for note in notes)
    md.write_text(f"# {title}\n\n{to_markdown(shown)}{below}", encoding="utf-8")
    frame.to_csv(csv, index=False, lineterminator="\n")
    caption = title + ("" if not notes else ". " + " ".join(notes))
    tex.write_text(to_latex(shown, caption=caption, label=f"tab:{stem}"), encoding="utf-8")
    return [md, csv, tex]
