"""A table's display frame as Markdown, CSV or LaTeX (booktabs) text."""

from __future__ import annotations

import pandas as pd

from dipddpm.io import csv_text

FORMATS = ("md", "csv", "latex")

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "—": "---", "–": "--", "×": r"$\times$"}


def markdown_table(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |"]
    lines.append("|" + "|".join("---" for _ in frame.columns) + "|")
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def latex_escape(text) -> str:
    return "".join(_LATEX_SPECIAL.get(char, char) for char in str(text).replace("\n", " "))


def latex_table(frame: pd.DataFrame, title: str, label_columns: int, row_kinds=(), note: str = "") -> str:
    """A booktabs table (needs \\usepackage{booktabs}): label columns left-aligned, the rest
    right-aligned, a rule above the mean row, the note in small type below."""
    align = "l" * label_columns + "r" * (len(frame.columns) - label_columns)
    lines = [r"\begin{table}[ht]", r"\centering", rf"\caption{{{latex_escape(title)}}}",
             rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in frame.columns) + r" \\", r"\midrule"]
    kinds = list(row_kinds) or ["regular"] * len(frame)
    for kind, (_, row) in zip(kinds, frame.iterrows()):
        if kind == "mean":
            lines.append(r"\midrule")
        lines.append(" & ".join(latex_escape(v) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if note:
        lines.append(rf"\par\smallskip{{\footnotesize {latex_escape(note)}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def render(table, fmt: str) -> str:
    """The table's display frame in one of FORMATS (md is table.markdown, title and notes included)."""
    if fmt == "md":
        return table.markdown
    if fmt == "csv":
        return csv_text(table.display)
    return latex_table(table.display, table.title, len(table.row_fields), table.row_kinds, table.notes)
