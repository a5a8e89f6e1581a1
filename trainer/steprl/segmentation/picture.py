"""``steps.png`` of a segmentation, drawn with Pillow.

Why not matplotlib, as the registration's picture: importing it and laying out a figure took 1.0-1.6 s
of a 13-17 s ``steprl segment`` on a 256x256x180 head (2-core CPU; issue 12's target is 15 s for the
whole command), drawing this picture with numpy and Pillow takes about 0.05 s.

Layout: a row of panels, one per selected step: the slice in grey (1st-99th percentile window),
the pixels that step changed in translucent magenta, the mask's outline in red, the step above
(``input`` for step 0); under it one small chart per metric (value against step, the shown steps
marked), and the title on top.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from steprl.plotting import _check_2d, _window

#: Longest side of a panel, in pixels (slices are enlarged by whole factors up to it).
PANEL_PIXELS = 240
#: A chart's size (width, height) in pixels.
CHART_SIZE = (300, 150)
MARGIN = 10
TITLE_PIXELS = 18
OUTLINE = (255, 40, 40)
CHANGED = (255, 0, 255)
CHANGED_ALPHA = 0.45
BACKGROUND = (255, 255, 255)


def segmentation_steps_picture(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    step_numbers: Sequence[int],
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    changed: Sequence[np.ndarray] | None = None,
    title: str | None = None,
    aspect: float = 1.0,
    names: Sequence[str | None] | None = None,
) -> Path:
    """Write the segmentation steps picture (PNG, atomically) and return its path.

    Args:
        image: the slice ``(H, W)``.
        masks: per shown step, the mask ``(H, W)`` after it (nonzero = object).
        step_numbers: the shown steps (0 = the input).
        curves: metric name -> value after every step (index 0 = the input).
        changed: per shown step, the pixels ``(H, W)`` it changed (nonzero), or None.
        title: the picture's title.
        aspect: pixel height / width (:func:`steprl.plotting.slice_aspect`).
        names: per shown step, its panel's title (None: ``input`` for step 0, else ``step N``).
    """
    from PIL import Image, ImageDraw

    image = _check_2d("image", image)
    if len(masks) != len(step_numbers) or not masks:
        raise ValueError(f"need one step number per mask, got {len(masks)} masks and {len(step_numbers)} step numbers")
    if changed is not None and len(changed) != len(masks):
        raise ValueError(f"changed has {len(changed)} entries, masks has {len(masks)}")
    masks = [_check_2d(f"masks[{i}]", m, image.shape) != 0 for i, m in enumerate(masks)]
    moved = [None] * len(masks) if changed is None else [
        _check_2d(f"changed[{i}]", c, image.shape) != 0 for i, c in enumerate(changed)]
    grey = _grey(image)
    panels = [_panel(grey, mask, move, aspect) for mask, move in zip(masks, moved, strict=True)]
    panel_w, panel_h = panels[0].shape[1], panels[0].shape[0]
    font = _font()
    row_w = len(panels) * (panel_w + MARGIN) + MARGIN
    charts_w = len(curves) * (CHART_SIZE[0] + MARGIN) + MARGIN
    top = MARGIN + (TITLE_PIXELS + MARGIN if title else 0)
    height = top + TITLE_PIXELS + panel_h + (MARGIN + CHART_SIZE[1] + TITLE_PIXELS if curves else 0) + MARGIN
    canvas = Image.new("RGB", (max(row_w, charts_w), height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((MARGIN, MARGIN), title, fill=(0, 0, 0), font=font)
    names = [None] * len(panels) if names is None else list(names)
    for k, (panel, step, name) in enumerate(zip(panels, step_numbers, names, strict=True)):
        x = MARGIN + k * (panel_w + MARGIN)
        name = name or ("input" if step == 0 else f"step {step}")
        draw.text((x, top), name, fill=(0, 0, 0), font=font)
        canvas.paste(Image.fromarray(panel), (x, top + TITLE_PIXELS))
    chart_top = top + TITLE_PIXELS + panel_h + MARGIN
    for k, (name, values) in enumerate(curves.items()):
        _chart(draw, (MARGIN + k * (CHART_SIZE[0] + MARGIN), chart_top), name, values, step_numbers, font)
    return _save(canvas, Path(path))


def _grey(image: np.ndarray) -> np.ndarray:
    """The slice windowed to 0..255 (uint8)."""
    lo, hi = _window([image])
    scaled = (np.asarray(image, dtype=np.float64) - lo) / (hi - lo)
    return (255 * np.clip(np.nan_to_num(scaled), 0, 1)).astype(np.uint8)


def _panel(grey: np.ndarray, mask: np.ndarray, moved: np.ndarray | None, aspect: float) -> np.ndarray:
    """One RGB panel ``(h, w, 3)``, enlarged by whole factors, with the changed pixels and the outline."""
    rows, cols = _factors(grey.shape, aspect)
    big = lambda a: np.repeat(np.repeat(a, rows, axis=0), cols, axis=1)  # noqa: E731
    rgb = np.repeat(big(grey)[..., None], 3, axis=2).astype(np.float32)
    if moved is not None and moved.any():
        tint = big(moved)
        rgb[tint] = (1 - CHANGED_ALPHA) * rgb[tint] + CHANGED_ALPHA * np.array(CHANGED, dtype=np.float32)
    inside = big(mask)
    rgb[inside & ~_interior(inside)] = OUTLINE
    return rgb.astype(np.uint8)


def _factors(shape: tuple[int, int], aspect: float) -> tuple[int, int]:
    """Whole enlargement factors (rows, columns) that bring the longer side near :data:`PANEL_PIXELS`
    with pixels ``aspect`` times as high as wide."""
    cols = max(1, int(PANEL_PIXELS // max(shape[0] * aspect, shape[1])))
    return max(1, int(round(cols * aspect))), cols


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` whose four neighbours are all in it (the rest of it is its outline)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def _chart(draw, origin: tuple[int, int], name: str, values: Sequence[float], marks: Sequence[int], font) -> None:
    """A small line chart of ``values`` against step at ``origin`` (top left), ``marks`` dotted."""
    values = np.asarray(values, dtype=np.float64)
    x0, y0 = origin
    w, h = CHART_SIZE
    draw.text((x0, y0), name, fill=(0, 0, 0), font=font)
    box = (x0 + 50, y0 + TITLE_PIXELS, x0 + w, y0 + TITLE_PIXELS + h - 20)
    draw.rectangle(box, outline=(120, 120, 120))
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return
    lo, hi = float(finite.min()), float(finite.max())
    hi = hi if hi > lo else lo + 1.0
    last = max(1, values.size - 1)
    to_xy = lambda i, v: (box[0] + (box[2] - box[0]) * i / last, box[3] - (box[3] - box[1]) * (v - lo) / (hi - lo))  # noqa: E731
    for step in marks:
        if 0 <= step < values.size:
            x = to_xy(step, lo)[0]
            for y in range(int(box[1]), int(box[3]), 4):
                draw.point((x, y), fill=(180, 180, 180))
    points = [to_xy(i, v) for i, v in enumerate(values) if np.isfinite(v)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    for x, y in points:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(31, 119, 180))
    draw.text((x0, box[1]), f"{hi:.3g}", fill=(0, 0, 0), font=font)
    draw.text((x0, box[3] - 12), f"{lo:.3g}", fill=(0, 0, 0), font=font)
    draw.text((box[0], box[3] + 3), "step 0", fill=(0, 0, 0), font=font)
    draw.text((box[2] - 40, box[3] + 3), f"step {last}", fill=(0, 0, 0), font=font)


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _save(canvas, path: Path) -> Path:
    from steprl.atomic import atomic_path

    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
