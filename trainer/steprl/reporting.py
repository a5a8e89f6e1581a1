"""The plain-text tables of ``steprl evaluate``: :func:`mean_row` / :func:`format_table`.

(Output folders, staging and publishing are :mod:`steprl.outputfolder`'s job.)

A column is ``(key, title, format)``, e.g. ``("dice", "Dice", "{:.3f}")``; the first column is
the row label (pair or case name) and the mean row is labelled ``mean``. Tables that compare
several methods on the same cases (:func:`format_method_table`) have one mean row per method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Column = tuple[str, str, str]


def mean_row(rows: list[dict], columns: Sequence[Column]) -> dict:
    """Means of every numeric column over its finite values (NaN and inf left out)."""
    means: dict = {columns[0][0]: "mean"}
    for key, _, _ in columns[1:]:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if values:
            means[key] = float(np.mean(values))
    return means


def format_table(rows: list[dict], columns: Sequence[Column]) -> str:
    """A plain-text table of the columns present in ``rows``, with a final ``mean`` row."""
    cols = [c for c in columns if any(c[0] in r for r in rows)]
    return _render(cols, rows, [mean_row(rows, cols)], left=1)


def method_means(rows: list[dict], columns: Sequence[Column], key: str = "method") -> list[dict]:
    """One mean row per method (``row[key]``, in first-seen order): the finite means of the numeric
    columns over that method's rows, labelled ``mean``, with the method and its row count ``cases``."""
    out = []
    for method in dict.fromkeys(r[key] for r in rows):
        group = [r for r in rows if r[key] == method]
        out.append({**mean_row(group, columns), key: method, "cases": len(group)})
    return out


def format_method_table(rows: list[dict], columns: Sequence[Column]) -> str:
    """A table of several methods on the same cases: one line per case and method, then one ``mean``
    line per method. ``columns`` start with the case and the method (both left-aligned)."""
    cols = [c for c in columns if any(c[0] in r for r in rows)]
    return _render(cols, rows, method_means(rows, cols, cols[1][0]), left=2)


def _render(cols: Sequence[Column], rows: list[dict], means: list[dict], left: int) -> str:
    """Rows, a rule, the mean rows; the first ``left`` columns left-aligned, ``-`` where a value is absent."""
    cells = [[title for _, title, _ in cols]]
    for r in [*rows, *means]:
        cells.append([fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    rule = "-" * len(lines[0])
    lines.insert(1, rule)
    lines.insert(len(lines) - len(means), rule)
    return "\n".join(lines)
