"""The "steps" pictures: what a step-by-step policy did, at a glance, as one PNG.

Why: a policy that runs for T steps is judged by looking at a few of them side by side and at
its metric curves; the CLI (``steprl demo``, ``evaluate``) and the training logs write these.

- Never opens a window: figures are built on matplotlib's Agg canvas directly (no pyplot, no
  global backend switch), so this works headless, in threads and inside Slicer's worker.
- Writes atomically: a temporary ``.png`` in the target folder, then ``os.replace``.
- matplotlib is imported when a figure is drawn, not with this module: the step selection and
  slices below are used by every command, and the import costs 0.4-0.9 s of ``steprl register``'s
  10 s budget (the registration command draws its figure on a background thread).
- 2D arrays only (numpy order ``(H, W)``, shown with row 0 at the top); 3D callers pass
  :func:`representative_slice` of their volumes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

_PANEL_INCHES = 2.4
_CURVE_INCHES = 2.2
_EDGE_COLOUR = "#00e5ff"  # edges of the fixed image, cyan


def select_steps(n_steps: int, k: int = 5) -> list[int]:
    """About ``k`` evenly spaced step numbers in ``0..n_steps``, always with 0 and ``n_steps``.

    Example: ``select_steps(20, 5) == [0, 5, 10, 15, 20]``; ``select_steps(3, 5) == [0, 1, 2, 3]``.
    """
    if n_steps < 0 or k < 1:
        raise ValueError(f"need n_steps >= 0 and k >= 1, got n_steps={n_steps}, k={k}")
    if n_steps + 1 <= k:
        return list(range(n_steps + 1))
    if k == 1:
        return [n_steps]
    return sorted({int(round(v)) for v in np.linspace(0, n_steps, k)})


def representative_slice(array3d: np.ndarray, axis: int = 0) -> np.ndarray:
    """The middle slice of a 3D array along ``axis`` (a 2D array is returned unchanged).

    ``(D, H, W)`` with ``axis=0`` -> ``(H, W)``.
    """
    array3d = np.asarray(array3d)
    if array3d.ndim == 2:
        return array3d
    if array3d.ndim != 3:
        raise ValueError(f"expected a 2D or 3D array, got shape {array3d.shape}")
    return np.take(array3d, array3d.shape[axis] // 2, axis=axis)


def _window(arrays: Sequence[np.ndarray]) -> tuple[float, float]:
    """A shared display window: the 1st and 99th percentiles of all finite values."""
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [1.0, 99.0])
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            hi = lo + 1.0
    return float(lo), float(hi)


def _edges(image: np.ndarray) -> np.ndarray:
    """Boolean edge map of a 2D image: gradient magnitude above its 93rd percentile."""
    gy, gx = np.gradient(np.asarray(image, dtype=np.float64))
    magnitude = np.hypot(gx, gy)
    if not np.any(magnitude > 0):
        return np.zeros(image.shape, dtype=bool)
    return magnitude > max(np.percentile(magnitude, 93.0), 1e-12)


def _check_2d(name: str, array: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2D array, got shape {array.shape} (use representative_slice for 3D)")
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    return array


def preload() -> None:
    """Import the parts of matplotlib the figures use, e.g. on a background thread while a command
    computes, so that drawing at its end does not wait 0.4-0.9 s for the import."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.colors  # noqa: F401
    import matplotlib.figure  # noqa: F401


def _one_colour(colour: str):
    """A colormap of one colour (for overlays of a boolean mask)."""
    from matplotlib.colors import ListedColormap

    return ListedColormap([colour])


def _new_figure(n_panels: int, n_curves: int) -> tuple[Figure, list, list]:
    """A figure with a row of ``n_panels`` image axes and, below, a row of ``n_curves`` curve axes."""
    rows = 2 if n_curves else 1
    width = max(n_panels, 2) * _PANEL_INCHES
    height = _PANEL_INCHES + (_CURVE_INCHES + 0.3 if n_curves else 0.0) + 0.5
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ratios = [_PANEL_INCHES, _CURVE_INCHES] if n_curves else [1.0]
    outer = fig.add_gridspec(rows, 1, height_ratios=ratios, hspace=0.35)
    top = outer[0].subgridspec(1, n_panels, wspace=0.05)
    panels = [fig.add_subplot(top[0, i]) for i in range(n_panels)]
    curves = []
    if n_curves:
        bottom = outer[1].subgridspec(1, n_curves, wspace=0.35)
        curves = [fig.add_subplot(bottom[0, i]) for i in range(n_curves)]
    return fig, panels, curves


def _plot_curves(axes: list, curves: Mapping[str, Sequence[float]], step_numbers: Sequence[int]) -> None:
    """One small plot per metric: value against step (index 0 = the input), selected steps marked."""
    for ax, (name, values) in zip(axes, curves.items(), strict=True):
        values = np.asarray(values, dtype=np.float64)
        steps = np.arange(values.size)
        ax.plot(steps, values, marker="." if values.size <= 40 else None, linewidth=1.2)
        for s in step_numbers:
            if 0 <= s < values.size:
                ax.axvline(s, color="0.75", linewidth=0.8, linestyle=":", zorder=0)
        ax.set_xlabel("step")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)


def slice_aspect(spacing_xyz: Sequence[float], axis: int = 0) -> float:
    """Height / width of one pixel of a slice taken along numpy ``axis`` of a 3D array (a 2D
    image: the image itself) whose voxel size is ``spacing_xyz`` (ITK order), for
    ``imshow(aspect=...)``: true proportions on screen."""
    spacing_rows_first = list(spacing_xyz)[::-1]
    if len(spacing_rows_first) == 2:
        return float(spacing_rows_first[0] / spacing_rows_first[1])
    rows, cols = (spacing_rows_first[k] for k in range(3) if k != axis)
    return float(rows / cols)


def _image_panel(ax, image: np.ndarray, window: tuple[float, float], title: str, aspect: float = 1.0) -> None:
    ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest", aspect=aspect)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _save_atomic(fig: Figure, path: str | os.PathLike) -> Path:
    """Save ``fig`` as PNG to ``path`` atomically (:func:`steprl.atomic.atomic_path`: the file gets
    the usual ``0666 & ~umask`` mode, as every other output; mkstemp's 0600 would hide it)."""
    from steprl.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    log.debug("wrote %s", path)  # often a staging folder: the command names the final folder
    return path


def registration_steps_figure(
    fixed: np.ndarray,
    moving_steps: Sequence[np.ndarray],
    step_numbers: Sequence[int],
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str | None = None,
    aspect: float = 1.0,
) -> Path:
    """Write the registration steps picture and return its path.

    Top row: the ``fixed`` image ``(H, W)``, then the warped moving image at each selected step
    (``moving_steps[i]`` ``(H, W)`` after step ``step_numbers[i]``; step 0 is the input moving
    image), all in one shared percentile window, each with the edges of the fixed image drawn
    over it (cyan) so that alignment can be judged. Bottom row: each curve of ``curves``
    (name -> values, ``values[t]`` after step ``t``, ``t = 0`` the input) against step.
    ``aspect``: pixel height / width (:func:`slice_aspect`).
    """
    fixed = _check_2d("fixed", fixed)
    if len(moving_steps) != len(step_numbers) or not moving_steps:
        raise ValueError(f"need one step number per moving image, got {len(moving_steps)} images "
                         f"and {len(step_numbers)} step numbers")
    moving_steps = [_check_2d(f"moving_steps[{i}]", m, fixed.shape) for i, m in enumerate(moving_steps)]
    window = _window([fixed, *moving_steps])
    edges = np.ma.masked_where(~_edges(fixed), np.ones(fixed.shape))
    fig, panels, curve_axes = _new_figure(1 + len(moving_steps), len(curves))
    _image_panel(panels[0], fixed, window, "fixed", aspect)
    for ax, image, step in zip(panels[1:], moving_steps, step_numbers, strict=True):
        _image_panel(ax, image, window, "moving (input)" if step == 0 else f"step {step}", aspect)
        ax.imshow(edges, cmap=_one_colour(_EDGE_COLOUR), alpha=0.6, vmin=0, vmax=1, interpolation="nearest",
                  aspect=aspect)
    _plot_curves(curve_axes, curves, step_numbers)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save_atomic(fig, path)
