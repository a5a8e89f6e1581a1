"""Run a segmentation and write its outputs: the files behind ``steprl segment``.

Output folder (``EXT`` = ``nii.gz`` or ``nrrd``)::

    labelmap.EXT                  the final mask, uint8 0/1, with the INPUT's geometry
    steps/mask_step_NNN.EXT       the mask after each step 1..N (step 0 is all ones; optional), and
                                  after the native-resolution border, N + 1, when the model
                                  card asks for it (:mod:`steprl.segmentation.border`)
    metrics.json                  per step: object fraction, changed voxels, seconds (and Dice
                                  with --labels); with --labels the six metrics of the final
                                  mask (dice, ppv, sen, iou, biou, hd95 in mm)
    steps.png                     one slice at selected steps with the changed pixels, and the curves

``out`` is checked before any work and the files are published all at once, replacing only
the files of the previous steprl run there (so no stale step of a longer earlier run survives,
and no file steprl did not write is touched; :mod:`steprl.outputfolder`): a failure never
leaves half an output.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

import steprl
from steprl.geometry import Image
from steprl.limits import check_steps, warn_step_outputs
from steprl.outputfolder import check_output_folder, staged_output
from steprl.segmentation.config import BATCH_SLICES

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


def step_file(step: int, fmt: str) -> str:
    """The mask of ``step``, relative to the output folder."""
    return f"steps/mask_step_{step:03d}.{fmt}"


def output_files(fmt: str, steps: int, step_masks: bool) -> list[str]:
    """The files of a run, relative to the output folder."""
    return [f"labelmap.{fmt}", "metrics.json", "steps.png", *(step_file(k, fmt) for k in range(1, steps + 1)
                                                              if step_masks)]


def picture_title(method: str, model: str, axis: str | int, index: int, ndim: int) -> str:
    """The picture's title: the slice named as the user asked for it (``axial slice 68``)."""
    if ndim != 3:
        return f"{method} segmentation ({model})"
    plane = str(axis).strip().lower()
    named = plane in ("axial", "coronal", "sagittal")
    where = f"{plane} slice {index}" if named else f"slice {index} along array axis {plane}"
    return f"{method} segmentation ({model}), {where}"


def take(array: np.ndarray, index: int, axis: int) -> np.ndarray:
    """The 2D slice ``index`` along ``axis`` (a 2D array unchanged)."""
    return array if array.ndim == 2 else np.take(array, index, axis=axis)


def run_and_write(image: Image, model, out, *, steps: int | None = None, device="auto", axis: str | int = "axial",
                  batch_slices: int = BATCH_SLICES, labels: Image | None = None, fmt: str = "nii.gz",
                  step_masks: bool = True, bf16: bool | None = None, quiet: bool = False, inputs: dict | None = None,
                  match_levels: bool = True, border: bool = True, slice_stride: int | None = None) -> dict:
    """Segment ``image`` and write the outputs listed in the module docstring; returns the metrics summary.

    ``labels``: a binary object mask (or label map, > 0 = object) on ``image``'s grid.
    """
    from tqdm import tqdm

    from steprl import io, metrics
    from steprl.device import resolve_device
    from steprl.plotting import select_steps
    from steprl.segmentation.data import CONSTANT_SLICE_RULE, resolve_axis
    from steprl.segmentation.inference import border_enabled, segment
    from steprl.segmentation.model import load_segmenter

    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    check_output_folder(out, files=output_files(fmt, 0, False))  # before the model is read; the step files below
    check_steps(steps)
    dev = resolve_device(device)
    loaded = load_segmenter(model)
    n_steps = loaded.default_steps if steps is None else int(steps)
    if not loaded.is_rl:
        n_steps = min(n_steps, 1)
    check_steps(n_steps, "the model's default number of steps")
    array_axis = resolve_axis(axis, image.geometry)
    bordered = n_steps > 0 and border_enabled(loaded, border)
    n_results = n_steps + int(bordered)
    check_output_folder(out, files=output_files(fmt, n_results, step_masks))
    if step_masks:
        warn_step_outputs(n_results, image.array.size, "masks", "--no-step-masks")
    if labels is not None and not np.any(np.asarray(labels.array) > 0):
        log.warning("The reference label map has no object voxel: Dice, IoU and HD95 against it mean nothing "
                    "(undefined values are written as null in metrics.json).")
    out = Path(out)
    wanted = set(select_steps(n_results, 5)) if n_results > 0 else {0}
    with staged_output(out) as staging:
        records, kept, last = [], {}, None
        start = time.perf_counter()
        with tqdm(total=None, desc=loaded.method, unit="slice", disable=quiet, dynamic_ncols=True) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            for result in segment(image, loaded, n_steps, dev, axis, batch_slices, labels=labels, bf16=bf16,
                                  progress=progress, match_levels=match_levels, border=border,
                                  slice_stride=slice_stride):
                if step_masks and result.step > 0:
                    io.write_image(result.mask, staging / step_file(result.step, fmt))
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
            "match_levels": bool(match_levels and loaded.card.get("normalisation", {}).get("tissue_levels")),
            "border": bordered,
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
        _write_picture(image, loaded, axis, array_axis, records, kept, final_mask, reference, staging / "steps.png")
    return summary


def _write_picture(image: Image, loaded, axis: str | int, array_axis: int, records: list[dict],
                   kept: dict[int, tuple[np.ndarray, np.ndarray]], final_mask: np.ndarray, reference: np.ndarray | None,
                   path: Path) -> None:
    """``steps.png``: the kept steps' masks and changes on one slice through the object, with the curves."""
    from steprl.plotting import slice_aspect
    from steprl.segmentation.picture import segmentation_steps_picture

    index = picture_slice(image.array, array_axis, final_mask if final_mask.any() else reference)
    shown = sorted(kept)
    curves = {"object fraction": [r["object_fraction"] for r in records]}
    if reference is not None:
        curves = {"Dice": [r["dice"] for r in records], **curves}
    segmentation_steps_picture(
        take(image.array, index, array_axis), [take(kept[s][0], index, array_axis) for s in shown], shown, curves,
        path, changed=[take(kept[s][1], index, array_axis) for s in shown],
        names=[f"step {s} (border)" if records[s].get("stage") == "border" else None for s in shown],
        title=picture_title(loaded.method, loaded.path.stem, axis, index, image.ndim),
        aspect=slice_aspect(image.geometry.spacing, array_axis))
