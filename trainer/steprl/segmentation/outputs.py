"""Run a segmentation and write its outputs: the files behind ``steprl segment``.

Output folder (``EXT`` = ``nii.gz`` or ``nrrd``)::

    labelmap.EXT                  the final mask, uint8 0/1, with the INPUT's geometry
    steps/mask_step_NNN.EXT       the mask after each step 1..N (step 0 is all ones; optional)
    metrics.json                  per step: object fraction, changed voxels, seconds (and Dice
                                  with --labels); with --labels the six metrics of the final
                                  mask (dice, ppv, sen, iou, biou, hd95 in mm)
    steps.png                     one slice at selected steps with the changed pixels, and the curves

Everything is written into a hidden staging folder next to ``out`` and moved in only when the
whole run succeeded (a previous run's ``steps/`` is removed then, so no stale step from a
longer run survives), so a failure never leaves half an output.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np

import steprl
from steprl.geometry import Image
from steprl.reporting import publish, staging_folder

log = logging.getLogger(__name__)

FORMATS = ("nii.gz", "nrrd")


def picture_slice(array: np.ndarray, axis: int, mask: np.ndarray | None = None) -> int:
    """Index along ``axis`` of the slice to show: the one with the most object in ``mask``, else the middle."""
    if array.ndim == 2:
        return 0
    if mask is not None and mask.any():
        other = tuple(k for k in range(3) if k != axis)
        return int(np.argmax(mask.sum(axis=other)))
    return array.shape[axis] // 2


def take(array: np.ndarray, index: int, axis: int) -> np.ndarray:
    """The 2D slice ``index`` along ``axis`` (a 2D array unchanged)."""
    return array if array.ndim == 2 else np.take(array, index, axis=axis)


def run_and_write(image: Image, model, out, *, steps: int | None = None, device="auto", axis: str | int = "axial",
                  batch_slices: int = 16, labels: Image | None = None, fmt: str = "nii.gz", step_masks: bool = True,
                  bf16: bool | None = None, quiet: bool = False, inputs: dict | None = None) -> dict:
    """Segment ``image`` and write the outputs listed in the module docstring; returns the metrics summary.

    ``labels``: a binary object mask (or label map, > 0 = object) on ``image``'s grid.
    """
    from tqdm import tqdm

    from steprl import io, metrics
    from steprl.device import resolve_device
    from steprl.plotting import segmentation_steps_figure, select_steps, slice_aspect
    from steprl.segmentation.data import CONSTANT_SLICE_RULE, resolve_axis
    from steprl.segmentation.inference import segment
    from steprl.segmentation.model import load_segmenter

    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    dev = resolve_device(device)
    loaded = load_segmenter(model)
    n_steps = loaded.default_steps if steps is None else int(steps)
    if not loaded.is_rl:
        n_steps = min(n_steps, 1)
    array_axis = resolve_axis(axis, image.geometry)
    out = Path(out)
    staging = staging_folder(out)
    wanted = set(select_steps(n_steps, 5)) if n_steps > 0 else {0}
    try:
        records, kept, last = [], {}, None
        start = time.perf_counter()
        with tqdm(total=None, desc=loaded.method, unit="slice", disable=quiet, dynamic_ncols=True) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            for result in segment(image, loaded, n_steps, dev, axis, batch_slices, labels=labels, bf16=bf16,
                                  progress=progress):
                if step_masks and result.step > 0:
                    io.write_image(result.mask, staging / "steps" / f"mask_step_{result.step:03d}.{fmt}")
                records.append({"step": result.step, **result.metrics})
                if result.step in wanted:
                    kept[result.step] = (result.mask.array, result.changed.array)
                last = result
        final_mask = last.mask.array
        io.write_image(last.mask, staging / f"labelmap.{fmt}")
        summary = {
            "steprl_version": steprl.__version__,
            "model": {"path": str(loaded.path), "sha256": loaded.card.get("sha256"), "method": loaded.method},
            "inputs": inputs or {},
            "device": str(dev),
            "axis": {"requested": str(axis), "array_axis": array_axis},
            "constant_slices": CONSTANT_SLICE_RULE,
            "steps": records,
            "seconds_total": time.perf_counter() - start,
            "out": str(out),
        }
        reference = None if labels is None else np.asarray(labels.array) > 0
        if reference is not None:
            summary["final"] = {"step": last.step,
                                **metrics.segmentation_metrics(final_mask, reference, image.geometry.spacing)}
        io.write_json(summary, staging / "metrics.json")
        index = picture_slice(image.array, array_axis, final_mask if final_mask.any() else reference)
        shown = sorted(kept)
        curves = {"object fraction": [r["object_fraction"] for r in records]}
        if reference is not None:
            curves = {"Dice": [r["dice"] for r in records], **curves}
        segmentation_steps_figure(
            take(image.array, index, array_axis), [take(kept[s][0], index, array_axis) for s in shown], shown, curves,
            staging / "steps.png", changed=[take(kept[s][1], index, array_axis) for s in shown],
            title=f"{loaded.method} segmentation ({loaded.path.stem})" + (
                f", slice {index} along axis {array_axis}" if image.ndim == 3 else ""),
            aspect=slice_aspect(image.geometry.spacing, array_axis))
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary
