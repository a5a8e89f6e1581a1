"""Run a registration and write its outputs: the files behind ``steprl register`` and ``steprl demo``.

Output folder::

    warped.nii.gz                 the moving image warped onto the fixed grid (fixed geometry)
    displacement.nii.gz           final field: ITK displacement-field image (LPS mm, pull-back),
                                  read by SimpleITK (DisplacementFieldTransform) and Slicer as a transform
    steps/displacement_step_NNN.nii      the accumulated field after each step (optional; uncompressed)
    metrics.json                  per-step NCC (and Dice with labels), final Jacobian statistics
    steps.png                     the moving image at selected steps beside the fixed, with the curves

``out`` is checked before any work and the files are published all at once, replacing only
the files of the previous steprl run there (:mod:`steprl.outputfolder`): a failure (bad input,
a crash, Ctrl-C, SIGTERM) never leaves half an output, and no file steprl did not write is
touched.
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
from steprl.registration.overlap import check_overlap

log = logging.getLogger(__name__)

#: The files of every run (the per-step fields come on top: :func:`step_file`).
OUTPUT_FILES = ("warped.nii.gz", "displacement.nii.gz", "metrics.json", "steps.png")


def step_file(step: int) -> str:
    """The per-step field of ``step``, relative to the output folder.

    Uncompressed NIfTI: a float32 field does not compress (gzip saved 7% of a 64^3 field's 3 MB)
    and compressing it cost 0.13-0.15 s per step on the 2-core CPU, 5-6 s of CPU over a default
    40-step run, taken from the policy's and refinement's threads (issue 11's 10 s budget).
    Writing the same file uncompressed takes 0.01 s.
    """
    return f"steps/displacement_step_{step:03d}.nii"


def _slice(array: np.ndarray) -> np.ndarray:
    """The picture's slice: the image in 2D, the middle of array axis 0 in 3D."""
    from steprl.plotting import representative_slice

    return array if array.ndim == 2 else representative_slice(array, axis=0)


def _final_metrics(last, fixed_labels: Image | None) -> dict:
    from steprl import metrics, spatial

    jac = spatial.jacobian_determinant(last.voxel_field)[0].cpu().numpy()
    out = {"step": last.step, "ncc": last.metrics["ncc"], **metrics.jacobian_stats(jac)}
    if "dice" in last.metrics:
        out["dice"] = last.metrics["dice"]
        out["dice_per_label"] = last.metrics["dice_per_label"]
    if fixed_labels is not None and last.warped_labels is not None:
        per = metrics.hd95_per_label(last.warped_labels, last.fixed_labels_array, fixed_labels.geometry.spacing)
        out["hd95_per_label"] = per
        finite = [v for v in per.values() if np.isfinite(v)]
        out["hd95"] = float(np.mean(finite)) if finite else float("nan")
    return out


def run_and_write(fixed: Image, moving: Image, model, out, *, steps: int | None = None, device="auto",
                  fixed_labels: Image | None = None, moving_labels: Image | None = None, prealign: bool = False,
                  max_step: float | None = None, early_stop: int | None = None, step_fields: bool = True,
                  quiet: bool = False, inputs: dict | None = None, refine: int | None = None,
                  bf16: bool | None = None) -> dict:
    """Register and write the outputs listed in the module docstring; returns the metrics summary.

    ``refine``: refinement steps after the policy's (None: the model card's default), written
    and plotted as further steps. ``bf16``: the policy's precision (None: the device's default,
    :func:`steprl.device.default_inference_bf16`).
    """
    from tqdm import tqdm

    from steprl import io
    from steprl.background_writes import BackgroundWrites
    from steprl.device import default_inference_bf16, resolve_device
    from steprl.plotting import preload as preload_plotting
    from steprl.plotting import select_steps
    from steprl.registration.inference import register
    from steprl.registration.model import load_spac

    check_output_folder(out, files=OUTPUT_FILES)  # before the model is read; the step files below
    check_overlap(fixed.geometry, moving.geometry, prealign=prealign)
    check_steps(steps)  # before the model is read; its default is checked below
    dev = resolve_device(device)
    bf16 = default_inference_bf16(dev) if bf16 is None else bool(bf16)  # resolved once: run and record agree
    spac = load_spac(model, dev)
    n_policy = spac.default_steps if steps is None else steps
    check_steps(n_policy, "the model's default number of steps")
    n_refine = spac.default_refine_steps if refine is None else refine
    check_steps(n_refine, "--refine")
    n_steps = n_policy + n_refine
    files = [*OUTPUT_FILES, *(step_file(k) for k in range(1, n_steps + 1) if step_fields)]
    check_output_folder(out, files=files)
    if step_fields:
        warn_step_outputs(n_steps, fixed.array.size * fixed.ndim * 8, "displacement fields", "--no-step-fields")
    out = Path(out)
    wanted = set(select_steps(n_steps, 5)) if n_steps > 0 else {0}
    with staged_output(out) as staging:
        records, pictures, last = [], {}, None
        start = time.perf_counter()
        with tqdm(total=n_steps, desc="SPAC", unit="step", disable=quiet, dynamic_ncols=True) as bar, \
                BackgroundWrites() as writes:
            writes.submit(preload_plotting)  # overlaps the steps; steps.png is drawn at the end
            for result in register(fixed, moving, spac, n_policy, dev, fixed_labels=fixed_labels,
                                   moving_labels=moving_labels, prealign=prealign, max_step=max_step,
                                   early_stop=early_stop, refine_steps=n_refine, bf16=bf16):
                if step_fields and result.step > 0:
                    writes.submit(io.write_displacement_field, result.displacement, staging / step_file(result.step),
                                  np.float32)
                records.append({"step": result.step, "kind": result.kind, **result.metrics})
                if result.step in wanted:
                    pictures[result.step] = result.warped_slice(axis=0)
                last = result
                if result.step:
                    bar.update(1)
                    bar.set_postfix(ncc=f"{result.metrics['ncc']:.3f}")
        if last.step not in pictures:  # stopped early
            pictures[last.step] = _slice(last.warped.array)  # computed anyway: warped.nii.gz
        with BackgroundWrites() as writes:  # matplotlib draws while SimpleITK writes (it releases the GIL)
            writes.submit(_write_steps_figure, fixed, pictures, records, staging / "steps.png",
                          f"SPAC registration ({spac.path.stem})")
            io.write_image(last.warped, staging / "warped.nii.gz")
            io.write_displacement_field(last.displacement, staging / "displacement.nii.gz")
        summary = {
            "steprl_version": steprl.__version__,
            "model": {"path": str(spac.path), "sha256": spac.card.get("sha256"), "method": "spac"},
            "inputs": inputs or {},
            "device": str(dev),
            "precision": "bf16" if bf16 else "fp32",
            "prealign": prealign,
            "policy_steps": n_policy,
            "refine_steps": n_refine,
            "steps": records,
            "final": _final_metrics(last, fixed_labels),
            "seconds_total": time.perf_counter() - start,
            "out": str(out),
        }
        io.write_json(summary, staging / "metrics.json")
    return summary


def _write_steps_figure(fixed: Image, pictures: dict[int, np.ndarray], records: list[dict], path: Path,
                        title: str) -> None:
    """``steps.png``: the fixed slice, the warped slice of each pictured step, the metric curves."""
    from steprl.plotting import registration_steps_figure, slice_aspect

    curves = {"local NCC": [r["ncc"] for r in records]}
    if "dice" in records[-1]:
        curves["Dice"] = [r["dice"] for r in records]
    shown = sorted(pictures)
    registration_steps_figure(_slice(fixed.array), [pictures[s] for s in shown], shown, curves, path, title=title,
                              aspect=slice_aspect(fixed.geometry.spacing, axis=0))


def print_summary(summary: dict) -> None:
    """The two lines ``steprl register`` and ``steprl demo`` print: the metrics' change, where the outputs are."""
    first, last = summary["steps"][0], summary["steps"][-1]
    line = f"steps: {last['step']}  NCC {first['ncc']:.3f} -> {last['ncc']:.3f}"
    if "dice" in last:
        line += f"  Dice {first['dice']:.3f} -> {last['dice']:.3f}"
    line += f"  folding {summary['final']['folding_percent']:.3f}%  time {last['seconds']:.1f} s"
    print(line)
    print(f"outputs in {summary['out']}")
