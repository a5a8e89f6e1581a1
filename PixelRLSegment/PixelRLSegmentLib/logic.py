"""Segmentation logic on a MRML scene: start / poll / cancel a PixelDRL-MG worker. No Qt, no torch.

SKELETON (issue 5, see ``PixelRLSegment/DESIGN_NOTES.md``). It runs the worker's ``segment``
task and brings every step's mask into the scene as one labelmap volume (updated in place, the
input's geometry); the step sequence + browser, the action-change overlay, the metrics table and
the ``vtkMRMLSegmentationNode`` output are still to come. It REUSES the SPACRegistration pieces
(process runner with whole-tree kill, event protocol, worker environment, model cards, volume
export) by import; they move to the shared ``StepRLCommon`` package as the design note says,
after which only the import lines here change.

    logic = SegmentationLogic(scene)
    run = logic.start(SegmentationRequest(volume, model="pixeldrl_brats", steps=10))
    logic.wait(run)                     # in Slicer: a QTimer calls logic.poll(run) every 100 ms
    run.labelmap                        # vtkMRMLLabelMapVolumeNode: the last step's mask
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from SPACRegistrationLib import models
from SPACRegistrationLib.logic import RunState, default_python_command, default_temp_root, worker_environment
from SPACRegistrationLib.mrmlio import export_volume
from SPACRegistrationLib.process import ProcessHandle, ProcessRunner, SubprocessRunner
from SPACRegistrationLib.protocol import (
    DoneEvent,
    ErrorEvent,
    Event,
    ProgressEvent,
    StartedEvent,
    describe_exit,
    parse_event,
)
from steprl.errors import InputError, ModelFileError, StepRLError

log = logging.getLogger(__name__)

#: The learners whose models this module runs (model card ``method``).
METHODS = ("pixeldrl-mg", "unet")


@dataclass(frozen=True)
class SegmentStepEvent:
    """Step ``step`` of ``total`` is finished; its ``mask`` and ``changed`` files are complete.

    To become the shared protocol's ``StepEvent`` (with a ``files`` mapping) in ``StepRLCommon``.
    """

    step: int
    total: int
    mask: str
    changed: str
    metrics: dict[str, Any] = field(default_factory=dict)
    eta_seconds: float | None = None


def parse_line(line: str) -> Event | SegmentStepEvent | None:
    """The event on one worker stdout line: the shared parser, plus the segmentation step event."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    if data.get("event") == "step" and "mask" in data:
        try:
            return SegmentStepEvent(int(data["step"]), int(data.get("total", 0)), str(data["mask"]),
                                    str(data.get("changed", "")), dict(data.get("metrics") or {}),
                                    data.get("eta_seconds"))
        except (KeyError, TypeError, ValueError):
            return None
    return parse_event(data)


@dataclass
class SegmentationRequest:
    """What to segment and how (the parameter node's content, as nodes and values).

    ``model``: a bundled or user model name, or a ``.safetensors`` path; ``steps`` None uses the
    model's default; ``axis``: "axial", "coronal", "sagittal"; ``labels``: an optional reference
    labelmap volume (Dice per step).
    """

    volume: object
    model: str
    steps: int | None = None
    axis: str = "axial"
    device: str = "auto"
    labels: object | None = None
    user_models_folder: str | os.PathLike | None = None


@dataclass
class SegmentationRun:
    """One running or finished segmentation: its state, the steps received and the output node."""

    request: SegmentationRequest
    handle: ProcessHandle
    temp_dir: Path
    model: models.ModelEntry
    state: RunState = RunState.RUNNING
    total_steps: int | None = None
    steps: list[int] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    labelmap: object | None = None
    message: str = "Starting"
    error: str | None = None
    eta_seconds: float | None = None
    device: str = ""
    started_at: float = field(default_factory=time.monotonic)
    _error_event: ErrorEvent | None = None
    _done: bool = False

    @property
    def finished(self) -> bool:
        return self.state is not RunState.RUNNING

    @property
    def last_step(self) -> int | None:
        return self.steps[-1] if self.steps else None


def find_segmentation_model(model: str, user_folder: str | os.PathLike | None = None) -> models.ModelEntry | None:
    """The model entry of a name or path, among the segmentation methods' models (None if none)."""
    for method in METHODS:
        entry = models.find_model(model, user_folder, method=method)
        if entry is not None:
            return entry
    return None


def read_labelmap(path: str | os.PathLike, name: str):
    """A labelmap volume node (not in a scene) read by Slicer's own reader from a worker mask file."""
    from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLVolumeArchetypeStorageNode

    storage = vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    node = vtkMRMLLabelMapVolumeNode()
    node.SetName(name)
    if not storage.ReadData(node):
        raise OSError(f"Slicer could not read the mask {path}")
    return node


class SegmentationLogic:
    """See the module docstring. Collaborators are injected as in ``RegistrationLogic``."""

    def __init__(self, scene, *, runner: ProcessRunner | None = None, python: Sequence[str] | None = None,
                 temp_root: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> None:
        self.scene = scene
        self.runner = runner or SubprocessRunner()
        self.python = list(python) if python else default_python_command()
        self.temp_root = Path(temp_root) if temp_root else Path(default_temp_root())
        self.env = dict(env) if env is not None else worker_environment()

    def check(self, request: SegmentationRequest) -> models.ModelEntry:
        """Raise a StepRLError (problem + fix) when ``request`` cannot run; return its model."""
        if request.volume is None:
            raise InputError("Choose an input volume.", "Select it in the Inputs section.")
        if request.volume.GetScene() is not self.scene:
            raise InputError(f"The volume '{request.volume.GetName()}' is not in the scene.", "Choose another one.")
        if request.steps is not None and request.steps < 0:
            raise InputError(f"The number of steps must be 0 or more, got {request.steps}.", "Choose e.g. 10 steps.")
        if not request.model:
            raise ModelFileError("No model is chosen.", "Choose a model in the Model section.")
        entry = find_segmentation_model(request.model, request.user_models_folder)
        if entry is None:
            raise ModelFileError(f"Model '{request.model}' not found.",
                                 "Choose one of the listed models, or put NAME.safetensors with its NAME.json card "
                                 "into the user models folder.")
        if entry.card.get("method") not in METHODS:
            raise ModelFileError(f"Model '{entry.name}' is a {entry.card.get('method')} model, not a segmentation "
                                 "model.", "Choose a PixelDRL-MG or U-Net model.")
        return entry

    def start(self, request: SegmentationRequest) -> SegmentationRun:
        """Check, export, launch; raises StepRLError (nothing created, nothing left) when it cannot."""
        entry = self.check(request)
        self.temp_root.mkdir(parents=True, exist_ok=True)
        temp_dir = Path(tempfile.mkdtemp(prefix="PixelRLSegment-", dir=self.temp_root))
        try:
            export_volume(request.volume, temp_dir / "image.nrrd")
            job = {"version": 1, "task": "segment", "image": "image.nrrd", "labels": None, "model": str(entry.path),
                   "steps": request.steps, "axis": request.axis, "device": request.device or "auto",
                   "output": "steps"}
            if request.labels is not None:
                export_volume(request.labels, temp_dir / "labels.nrrd")
                job["labels"] = "labels.nrrd"
            job_path = temp_dir / "job.json"
            job_path.write_text(json.dumps(job, indent=2), encoding="utf-8")
            handle = self.runner.start([*self.python, "-m", "steprl", "worker", str(job_path)], env=self.env,
                                       cwd=str(temp_dir))
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        return SegmentationRun(request, handle, temp_dir, entry, total_steps=request.steps)

    def poll(self, run: SegmentationRun) -> list[int]:
        """Handle the worker's new events; returns the steps added to the scene by this call."""
        if run.finished:
            return []
        added: list[int] = []
        try:
            for line in run.handle.read_lines():
                event = parse_line(line)
                if isinstance(event, SegmentStepEvent):
                    self._add_step(run, event)
                    added.append(event.step)
                elif isinstance(event, StartedEvent):
                    run.total_steps, run.device, run.message = event.steps, event.device, f"Running on {event.device}"
                elif isinstance(event, ProgressEvent):
                    run.message = event.message
                elif isinstance(event, ErrorEvent):
                    run._error_event = event
                elif isinstance(event, DoneEvent):
                    run._done = True
                elif line.strip():
                    log.info("worker: %s", line)
        except StepRLError as err:
            run.handle.kill()
            self._finish(run, RunState.FAILED, str(err))
            return added
        if run.handle.finished():
            self._end(run)
        return added

    def _add_step(self, run: SegmentationRun, event: SegmentStepEvent) -> None:
        try:
            node = read_labelmap(event.mask, f"{run.request.volume.GetName()} PixelRL")
        except OSError as err:
            raise InputError(f"The mask of step {event.step} could not be read ({err}).",
                             "Check free space in Slicer's temporary folder, then apply again.") from err
        if run.labelmap is None:
            run.labelmap = self.scene.AddNode(node)
        else:
            from vtkmodules.vtkCommonMath import vtkMatrix4x4

            matrix = vtkMatrix4x4()
            node.GetIJKToRASMatrix(matrix)
            run.labelmap.SetIJKToRASMatrix(matrix)
            run.labelmap.SetAndObserveImageData(node.GetImageData())
        for path in (event.mask, event.changed):
            if path:
                Path(path).unlink(missing_ok=True)
        run.steps.append(event.step)
        run.metrics.append(dict(event.metrics))
        run.total_steps = event.total or run.total_steps
        run.eta_seconds = event.eta_seconds

    def _end(self, run: SegmentationRun) -> None:
        code = run.handle.returncode()
        if run._done and code == 0:
            self._finish(run, RunState.DONE)
            return
        if run._error_event is not None:
            message = run._error_event.text
        else:
            tail = run.handle.stderr_tail().strip().splitlines()[-3:]
            message = (f"The segmentation process stopped unexpectedly ({describe_exit(code)})."
                       + (f" Its last messages: {' | '.join(tail)}" if tail else "")
                       + " Try again; if it happens again, report it with the Slicer log.")
        self._finish(run, RunState.FAILED, message)

    def _finish(self, run: SegmentationRun, state: RunState, error: str | None = None) -> None:
        run.state = state
        if error and run.steps:
            error += f" Steps 0 to {run.steps[-1]} are kept."
        run.error = error
        run.eta_seconds = None
        run.message = {RunState.DONE: "Done", RunState.CANCELLED: "Cancelled", RunState.FAILED: "Failed"}[state]
        shutil.rmtree(run.temp_dir, ignore_errors=True)
        if error:
            log.error("PixelRL segmentation failed: %s", error)

    def cancel(self, run: SegmentationRun) -> None:
        """Kill the worker's process tree; keep the steps already received; remove the temporary files."""
        if run.finished:
            return
        run.handle.kill()
        self._finish(run, RunState.CANCELLED)

    def wait(self, run: SegmentationRun, timeout: float | None = None, interval: float = 0.05) -> SegmentationRun:
        """Poll until the run ends (batch use and tests); cancels it after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not run.finished:
            self.poll(run)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel(run)
                break
            time.sleep(interval)
        return run
