"""The plain-text tables of ``steprl evaluate``: :func:`mean_row` / :func:`format_table`.

(Output folders, staging and publishing are :mod:`steprl.outputfolder`'s job.)

A column is ``(key, title, format)``, e.g. ``("dice", "Dice", "{:.3f}")``; the first column is
the row label (pair or case name) and the mean row is labelled ``mean``.
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
    cells = [[title for _, title, _ in cols]]
    for r in [*rows, mean_row(rows, cols)]:
        cells.append([fmt.format(r[key]) if key in r else "-" for key, _, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)
