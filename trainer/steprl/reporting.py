"""What registration and segmentation commands share when they hand results over.

- :func:`staging_folder`: the hidden folder beside the output where a run writes its files first.
- :func:`publish`: move a run's staged files into its output folder, so a failed run never
  leaves half an output and a re-run never mixes its per-step files with an older run's.
- :func:`mean_row` / :func:`format_table`: the plain-text tables of ``steprl evaluate``.

A column is ``(key, title, format)``, e.g. ``("dice", "Dice", "{:.3f}")``; the first column is
the row label (pair or case name) and the mean row is labelled ``mean``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

Column = tuple[str, str, str]


def staging_folder(out: Path) -> Path:
    """A new hidden ``.<out name>.partial-*`` folder beside ``out`` (same file system, so
    :func:`publish` moves files atomically); creates ``out``'s parent if needed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def publish(staging: Path, out: Path, replace_folders: Sequence[str] = ("steps",)) -> None:
    """Move every file of ``staging`` into ``out`` (same relative paths), then drop ``staging``.

    Same-named files are replaced; the ``replace_folders`` of ``out`` (the per-step outputs) are
    removed first, so they always belong to the run whose ``metrics.json`` is there.
    """
    out.mkdir(parents=True, exist_ok=True)
    for name in replace_folders:
        shutil.rmtree(out / name, ignore_errors=True)
    for src in sorted(staging.rglob("*")):
        if src.is_file():
            dst = out / src.relative_to(staging)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    shutil.rmtree(staging, ignore_errors=True)


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
