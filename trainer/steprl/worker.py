"""The Slicer worker: ``python -m steprl worker JOB.json`` runs one job and streams JSON-line events.

Why a child process (DESIGN.md, layers): the Slicer GUI stays responsive, Cancel kills the
process tree, a crash in torch cannot take Slicer down, and torch is never imported into
Slicer's own process. The Slicer logic (``SPACRegistrationLib``) writes the job, reads the
events line by line and streams every finished step into the scene.

Job file (JSON, written by the logic; relative paths are relative to the job file's folder; the
schema is :mod:`steprl.protocol`, which checks a whole job before any work starts)::

    {"version": 1, "task": "register",
     "fixed": "fixed.nrrd", "moving": "moving.nrrd",          # any grid, LPS headers
     "fixed_labels": null, "moving_labels": null,             # optional, for Dice per step
     "model": "spac3d_brain",                                 # bundled name or .safetensors path
     "steps": 20, "device": "auto", "prealign": false,
     "output": "out"}                                         # folder for the step fields

    {"version": 1, "task": "segment",
     "image": "image.nrrd", "labels": null,                   # labels optional (any grid), Dice per step
     "model": "pixeldrl_wm",                                  # bundled name or .safetensors path
     "steps": 10, "axis": "axial", "device": "auto",          # steps null: the model card's default
     "batch_slices": 8, "output": "out"}                      # folder for the step masks

    {"version": 1, "task": "devices"}                         # what torch can use here

Events, one JSON object per line on stdout (flushed after each line)::

    {"event": "started", "task": "register", "pid": 4242, "device": "cpu", "model": "...", "steps": 20, "grid": [..]}
    {"event": "progress", "stage": "loading", "message": "Loading model ..."}
    {"event": "step", "step": 3, "total": 20, "field": "/abs/out/field_step_003.mha",
     "metrics": {"ncc": 0.41, "folding_percent": 0.0, "seconds": 2.1}, "eta_seconds": 11.9, "time": 1.7e9}
    {"event": "step", "step": 3, "total": 10, "mask": "/abs/out/mask_step_003.nrrd",      # task segment
     "changed": "/abs/out/changed_step_003.nrrd", "metrics": {"object_fraction": 0.1, ...}, ...}
    {"event": "progress", "stage": "segmenting", "message": "Slices 32 of 155", "done": 32, "total": 155,
     "eta_seconds": 3.1}                                      # task segment, while the network runs
    {"event": "devices", "devices": [{"value": "cpu", "label": "CPU (8 threads)"}], "default": "cpu"}
    {"event": "done", "steps": 20, "seconds": 14.0}
    {"event": "error", "kind": "InputError", "message": "...", "fix": "...", "exit_code": 2}

Step 0 is the input (identity field, or the affine pre-alignment alone), so a run of ``n``
steps emits ``n + 1`` step events. Each step's field is an ITK displacement field (LPS mm,
pull-back, float32, uncompressed MetaImage for speed) on the network grid covering the fixed
image; it is written atomically (temporary name, then rename) BEFORE its event is printed, so
whoever reads the event can read the file. A segmentation step's ``mask`` and ``changed`` (the
voxels that step flipped; all 0 at step 0) are uint8 0/1 uncompressed NRRD files with exactly
the input image's geometry, both written atomically before the step event; a U-Net model runs
one step. ``segment()`` yields step 0 at once and steps 1..n after the whole volume has run,
so the ``progress`` events (slices done) drive the progress bar meanwhile; when the model card
asks for the native-resolution border, it comes last as step n + 1 (``metrics.stage`` is
``"border"``; the ``started`` event's ``results`` and every step's ``total`` count it).

Order of work: the job is checked, then the device, then the inputs are read and checked
(dimensions, overlap of the pair) and the model is loaded; only then is the output folder made.

Exit codes: 0 done; a user error exits with its :class:`~steprl.errors.StepRLError`
``exit_code`` (2 input, 3 model file); anything else is a bug and exits 1, always after one
``error`` event. SIGTERM ends the run like Ctrl-C (exit 130; set up by :func:`steprl.cli.main`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from steprl.errors import InputError, StepRLError
from steprl.jsonvalues import finite_json
from steprl.limits import check_steps
from steprl.outputfolder import check_output_folder
from steprl.protocol import JOB_VERSION, DevicesJob, Job, RegisterJob, SegmentJob, read_job

__all__ = ["JOB_VERSION", "field_path", "line_emitter", "main", "mask_paths", "read_job", "run_job"]

log = logging.getLogger(__name__)

FIELD_SUFFIX = ".mha"
MASK_SUFFIX = ".nrrd"
#: Seconds between two slice-progress events of a segmentation (the GUI needs no more).
PROGRESS_INTERVAL = 0.25
#: The task's noun in error messages.
NOUNS = {"register": "registration", "segment": "segmentation", "devices": "device check"}

Emit = Callable[[dict[str, Any]], None]


# ---- events ---------------------------------------------------------------------------------
def line_emitter(stream: TextIO) -> Emit:
    """An ``emit`` that writes one JSON line per event to ``stream`` and flushes it at once."""

    def emit(event: dict[str, Any]) -> None:
        stream.write(json.dumps(finite_json(event), allow_nan=False, default=str) + "\n")
        stream.flush()

    return emit


def _claim_stdout() -> TextIO:
    """Keep the real stdout for events and send everything else written to fd 1 to stderr.

    A library printing to stdout (or a C extension writing to fd 1) would otherwise corrupt
    the event stream.
    """
    sys.stdout.flush()
    events = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return events


# ---- the job's files -------------------------------------------------------------------------
def field_path(output: str | os.PathLike, step: int) -> Path:
    """Where the field of ``step`` is written."""
    return Path(output) / f"field_step_{step:03d}{FIELD_SUFFIX}"


def mask_paths(output: str | os.PathLike, step: int) -> tuple[Path, Path]:
    """Where the mask and the changed-voxel map of segmentation ``step`` are written."""
    return (Path(output) / f"mask_step_{step:03d}{MASK_SUFFIX}",
            Path(output) / f"changed_step_{step:03d}{MASK_SUFFIX}")


def _write_mask(image, path: Path) -> None:
    """A uint8 0/1 Image (input geometry) as an uncompressed NRRD, atomically."""
    import numpy as np
    import SimpleITK as sitk

    from steprl.atomic import atomic_path
    from steprl.geometry import Image

    sitk_image = Image(np.asarray(image.array, dtype=np.uint8), image.geometry).to_sitk()
    with atomic_path(path) as tmp:
        sitk.WriteImage(sitk_image, str(tmp), useCompression=False)


def _write_field(result, path: Path) -> None:
    """The step's physical displacement (LPS mm, pull-back) as an uncompressed float32 vector image."""
    import numpy as np
    import SimpleITK as sitk

    from steprl.atomic import atomic_path
    from steprl.geometry import Image

    displacement = result.displacement
    image = Image(np.asarray(displacement.array, dtype=np.float32), displacement.geometry).to_sitk()
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=False)


def run_devices(emit: Emit) -> None:
    """Report the devices torch can use here (the module's device selector shows them)."""
    import torch

    from steprl.device import list_devices

    devices = [{"value": value, "label": label} for value, label in list_devices()]
    emit({"event": "devices", "devices": devices, "default": "cuda" if torch.cuda.is_available() else "cpu"})


def _prepare_output(output: str) -> Path:
    """The job's output folder, refused (InputError) when it cannot be made; created only by
    :func:`_make_output`, after the inputs and the model passed their checks."""
    return check_output_folder(output, flag="the job's output folder")


def _make_output(output: Path) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    return output


def run_register(job: RegisterJob, emit: Emit) -> int:
    """Run a registration job, emitting one step event per finished step; returns the step count."""
    from steprl import io
    from steprl.device import resolve_device
    from steprl.registration.inference import register
    from steprl.registration.model import load_spac
    from steprl.registration.overlap import check_overlap

    start = time.perf_counter()
    output = _prepare_output(job.output)
    if bool(job.fixed_labels) != bool(job.moving_labels):
        raise InputError("Only one label map was given.",
                         "Choose both the fixed and the moving label maps, or neither.")
    device = resolve_device(job.device)
    emit({"event": "progress", "stage": "reading", "message": "Reading the images"})
    fixed = io.read_image(job.fixed, name="fixed volume")
    moving = io.read_image(job.moving, name="moving volume")
    io.validate_image(moving, "moving volume", ndim=fixed.ndim, reference_name="fixed volume")
    check_overlap(fixed.geometry, moving.geometry, prealign=job.prealign, prealign_option="the affine pre-alignment",
                  names=("fixed volume", "moving volume"))
    fixed_labels = moving_labels = None
    if job.fixed_labels:
        fixed_labels = io.read_labels(job.fixed_labels, fixed.geometry, name="fixed label map")
        moving_labels = io.read_labels(job.moving_labels, moving.geometry, name="moving label map")
    emit({"event": "progress", "stage": "loading", "message": f"Loading model {job.model} on {device}"})
    spac = load_spac(job.model, device)
    steps = spac.default_steps if job.steps is None else job.steps
    check_steps(steps, "the model's default number of steps")
    refine = spac.default_refine_steps if job.refine is None else job.refine
    check_steps(refine, "the model's default number of refinement steps")
    total = steps + refine
    _make_output(output)
    emit({"event": "started", "task": "register", "pid": os.getpid(), "device": str(device),
          "model": str(spac.path), "steps": total, "policy_steps": steps, "refine_steps": refine,
          "grid": list(spac.grid)})
    if job.prealign:
        emit({"event": "progress", "stage": "prealign", "message": "Affine pre-alignment"})
    last = 0
    for result in register(fixed, moving, spac, steps, device, fixed_labels=fixed_labels,
                           moving_labels=moving_labels, prealign=job.prealign, refine_steps=refine):
        path = field_path(output, result.step)
        _write_field(result, path)  # atomically, before the event that names it
        elapsed = result.metrics["seconds"]
        eta = elapsed / result.step * (total - result.step) if result.step else None
        emit({"event": "step", "step": result.step, "total": total, "kind": result.kind, "field": str(path.resolve()),
              "metrics": result.metrics, "eta_seconds": eta, "time": time.time()})
        last = result.step
    emit({"event": "done", "steps": last, "seconds": time.perf_counter() - start})
    return last


def _slice_progress(emit: Emit, start: float) -> Callable[[int, int], None]:
    """``segment()``'s progress callback: a throttled ``progress`` event with the time left."""
    last = [-math.inf]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] < PROGRESS_INTERVAL and done < total:
            return
        last[0] = now
        elapsed = now - start
        eta = elapsed / done * (total - done) if done else None
        emit({"event": "progress", "stage": "segmenting", "message": f"Slices {done} of {total}", "done": done,
              "total": total, "eta_seconds": eta})

    return progress


def run_segment(job: SegmentJob, emit: Emit) -> int:
    """Run a segmentation job, emitting one step event (mask + changed files) per step; returns the last step."""
    from steprl import io
    from steprl.device import resolve_device
    from steprl.segmentation.data import resolve_axis
    from steprl.segmentation.inference import border_enabled, segment
    from steprl.segmentation.model import load_segmenter

    start = time.perf_counter()
    output = _prepare_output(job.output)
    device = resolve_device(job.device)
    emit({"event": "progress", "stage": "reading", "message": "Reading the image"})
    image = io.read_image(job.image, name="input volume")
    labels = None
    if job.labels:
        labels = io.read_labels(job.labels, image.geometry, name="reference label map")
    axis = job.axis
    array_axis = resolve_axis(axis, image.geometry)
    emit({"event": "progress", "stage": "loading", "message": f"Loading model {job.model} on {device}"})
    loaded = load_segmenter(job.model)
    steps = loaded.default_steps if job.steps is None else job.steps
    if not loaded.is_rl:
        steps = min(steps, 1)
    check_steps(steps, "the model's default number of steps")
    total = steps + int(steps > 0 and border_enabled(loaded))  # the border: one more result after the policy's
    _make_output(output)
    emit({"event": "started", "task": "segment", "pid": os.getpid(), "device": str(device),
          "model": str(loaded.path), "method": loaded.method, "steps": steps, "results": total,
          "grid": list(loaded.size), "axis": array_axis, "shape": list(image.array.shape)})
    last = 0
    for result in segment(image, loaded, steps, device, axis, job.batch_slices, labels=labels,
                          progress=_slice_progress(emit, time.perf_counter())):
        mask_path, changed_path = mask_paths(output, result.step)
        _write_mask(result.mask, mask_path)  # both atomically, before the event that names them
        _write_mask(result.changed, changed_path)
        elapsed = result.metrics["seconds"]
        eta = elapsed / result.step * (total - result.step) if result.step else None
        emit({"event": "step", "step": result.step, "total": total, "mask": str(mask_path.resolve()),
              "changed": str(changed_path.resolve()), "metrics": result.metrics, "eta_seconds": eta,
              "time": time.time()})
        last = result.step
    emit({"event": "done", "steps": last, "seconds": time.perf_counter() - start})
    return last


def run_job(job_path: str | os.PathLike | None, emit: Emit, *, devices: bool = False) -> int:
    """Run one job, reporting everything through ``emit``; returns the process exit code.

    Never raises for a user error or a bug: both become one ``error`` event (the traceback of
    a bug goes to the log, i.e. stderr).
    """
    noun = "registration"
    try:
        if devices or job_path is None:
            if not devices:
                raise InputError("No job file given.", "Run `steprl worker JOB.json` or `steprl worker --devices`.")
            run_devices(emit)
            emit({"event": "done", "steps": 0, "seconds": 0.0})
            return 0
        job: Job = read_job(job_path)
        noun = NOUNS[job.task]
        if isinstance(job, DevicesJob):
            run_devices(emit)
            emit({"event": "done", "steps": 0, "seconds": 0.0})
        elif isinstance(job, SegmentJob):
            run_segment(job, emit)
        else:
            run_register(job, emit)
        return 0
    except StepRLError as err:
        emit({"event": "error", "kind": type(err).__name__, "message": err.problem, "fix": err.fix,
              "exit_code": err.exit_code})
        return err.exit_code
    except KeyboardInterrupt:
        emit({"event": "error", "kind": "Interrupted", "message": f"The {noun} was interrupted.", "fix": "",
              "exit_code": 130})
        return 130
    except Exception as err:  # a bug: say so once, keep the traceback in the log
        log.exception("worker failed")
        emit({"event": "error", "kind": type(err).__name__,
              "message": f"Unexpected error in the {noun} worker: {type(err).__name__}: {err}",
              "fix": "Please report it with the Slicer log (it holds the worker's traceback).", "exit_code": 1})
        return 1


def main(args) -> int:
    """Entry point of ``steprl worker`` (see :mod:`steprl.worker_cli`)."""
    events = _claim_stdout()  # SIGTERM (Cancel) unwinds like Ctrl-C: steprl.cli.main sees to that
    return run_job(args.job, line_emitter(events), devices=args.devices)
