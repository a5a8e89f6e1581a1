"""Registration logic on a MRML scene: start / poll / cancel a SPAC worker. No Qt, no torch.

It runs in real Slicer (driven by the widget's timer) and in plain Python on ``slicer-core``
(driven by :meth:`RegistrationLogic.wait` in tests and batch scripts)::

    logic = RegistrationLogic(scene)
    run = logic.start(RegistrationRequest(fixed, moving, model="spac3d_brain", steps=20))
    while not run.finished:          # in Slicer: a QTimer calls logic.poll(run) every 100 ms
        logic.poll(run)
        time.sleep(0.1)
    if run.state is RunState.FAILED:
        print(run.error)              # one message: what went wrong and what to do
    transform, warped = logic.keep_step(run, run.last_step, resample=True)

What happens: :meth:`~RegistrationLogic.start` checks the inputs (one clear message, nothing
created on failure), writes the volumes with Slicer's own writer into a fresh temporary
folder, writes ``job.json`` and launches ``python -m steprl worker job.json`` (PythonSlicer in
Slicer) through the injected :class:`~.process.ProcessRunner`. :meth:`~RegistrationLogic.poll`
drains the worker's JSON-line events; each finished step's field is read into a grid transform
and appended to the result's sequence (:mod:`.results`; the first step creates every result
node at once and puts the moving volume under the browser's proxy transform). When the worker
ends, or on :meth:`~RegistrationLogic.cancel` (which kills its whole process tree), the
temporary folder is removed; the steps received so far stay in the scene, usable.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from steprl.errors import InputError, ModelFileError, StepRLError

from . import models, results
from .mrmlio import export_volume, is_own_proxy, read_grid_transform
from .process import ProcessHandle, ProcessRunner, SubprocessRunner
from .protocol import (
    DevicesEvent,
    DoneEvent,
    ErrorEvent,
    ProgressEvent,
    StartedEvent,
    StepEvent,
    describe_exit,
    parse_line,
)

log = logging.getLogger(__name__)


class RunState(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass
class RegistrationRequest:
    """What to register and how (the parameter node's content, as nodes and values).

    ``model`` is a bundled model name, a user model name (with ``user_models_folder``) or a
    ``.safetensors`` path; ``steps`` None uses the model's default.
    """

    fixed: object
    moving: object
    model: str
    steps: int | None = None
    device: str = "auto"
    fixed_labels: object | None = None
    moving_labels: object | None = None
    prealign: bool = False
    user_models_folder: str | os.PathLike | None = None


@dataclass
class RegistrationRun:
    """One running or finished registration: its state, the steps received and the result nodes."""

    request: RegistrationRequest
    handle: ProcessHandle
    temp_dir: Path
    model: models.ModelEntry
    state: RunState = RunState.RUNNING
    total_steps: int | None = None
    steps: list[int] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    nodes: results.ResultNodes | None = None
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

    @property
    def progress_text(self) -> str:
        """E.g. ``Step 3 of 20, about 12 s left`` (for the progress bar)."""
        if not self.steps or self.total_steps is None:
            return self.message
        text = f"Step {self.steps[-1]} of {self.total_steps}"
        if self.state is RunState.RUNNING and self.eta_seconds is not None:
            text += f", about {self.eta_seconds:.0f} s left"
        return text


def in_slicer() -> bool:
    """True inside the Slicer application (slicer-core has no ``slicer.app``)."""
    import slicer

    return hasattr(slicer, "app")


def default_python_command() -> list[str]:
    """The interpreter that runs the worker: Slicer's PythonSlicer in Slicer, this Python elsewhere."""
    if in_slicer():
        found = shutil.which("PythonSlicer")
        if found:
            return [found]
    return [sys.executable]


def default_temp_root() -> str:
    if in_slicer():
        import slicer

        return slicer.app.temporaryPath
    return tempfile.gettempdir()


def worker_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: ``steprl`` importable (it ships beside the modules), output unbuffered."""
    import steprl

    env = dict(os.environ if base is None else base)
    package_parent = str(Path(steprl.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


class RegistrationLogic:
    """See the module docstring. Collaborators are injected so tests can replace them.

    Args:
        scene: the ``vtkMRMLScene`` results go into.
        runner: starts the worker (default: :class:`~.process.SubprocessRunner`).
        python: the interpreter command (default: :func:`default_python_command`).
        sequences_logic: Slicer's ``vtkSlicerSequencesLogic`` for ``scene`` (in Slicer:
            ``slicer.modules.sequences.logic()``; default: a new one on ``scene``).
        temp_root: where the per-run temporary folders go (default: Slicer's temporary path).
        env: the worker's environment (default: :func:`worker_environment`).
    """

    def __init__(self, scene, *, runner: ProcessRunner | None = None, python: Sequence[str] | None = None,
                 sequences_logic=None, temp_root: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.scene = scene
        self.runner = runner or SubprocessRunner()
        self.python = list(python) if python else default_python_command()
        if sequences_logic is None:
            from slicer import vtkSlicerSequencesLogic

            sequences_logic = vtkSlicerSequencesLogic()
            sequences_logic.SetMRMLScene(scene)
        self.sequences_logic = sequences_logic
        self.temp_root = Path(temp_root) if temp_root else Path(default_temp_root())
        self.env = dict(env) if env is not None else worker_environment()

    # ---- checks ----------------------------------------------------------------------------
    def check(self, request: RegistrationRequest) -> models.ModelEntry:
        """Raise a StepRLError (problem + fix) when ``request`` cannot run; return its model."""
        if request.fixed is None or request.moving is None:
            raise InputError("Choose both a fixed and a moving volume.", "Select them in the Inputs section.")
        if request.fixed is request.moving:
            raise InputError("The fixed and moving volumes are the same volume.", "Choose two different volumes.")
        for role, volume in (("fixed", request.fixed), ("moving", request.moving)):
            if volume.GetScene() is not self.scene:
                raise InputError(f"The {role} volume '{volume.GetName()}' is not in the scene.", "Choose another one.")
        if (request.fixed_labels is None) != (request.moving_labels is None):
            raise InputError("Only one label map was chosen.",
                             "Choose both the fixed and the moving label maps (for Dice per step), or neither.")
        parent = request.moving.GetParentTransformNode()
        if parent is not None and not is_own_proxy(parent):
            raise InputError(
                f"The moving volume '{request.moving.GetName()}' is under the transform '{parent.GetName()}'; the "
                "registration result would replace it.",
                "Harden that transform on the moving volume (Data module: right-click, Harden transform) or remove it, "
                "then apply again.")
        if request.steps is not None and request.steps < 0:
            raise InputError(f"The number of steps must be 0 or more, got {request.steps}.", "Choose e.g. 20 steps.")
        if not request.model:
            raise ModelFileError("No model is chosen.", "Choose a model in the Model section.")
        entry = models.find_model(request.model, request.user_models_folder)
        if entry is None:
            names = ", ".join(e.name for e in models.list_models(request.user_models_folder)) or "none found"
            raise ModelFileError(
                f"Model '{request.model}' not found.",
                f"Choose one of the listed models ({names}), or put NAME.safetensors with its NAME.json card into "
                "the user models folder.")
        if entry.card.get("method") != models.METHOD:
            raise ModelFileError(f"Model '{entry.name}' is a {entry.card.get('method')} model, not a SPAC "
                                 "registration model.", "Choose a SPAC model.")
        if entry.ndim != 3:
            raise InputError(f"Model '{entry.name}' is a {entry.ndim}D model, but Slicer volumes are 3D.",
                             "Choose a 3D SPAC model (2D models are for the steprl command line on 2D images).")
        return entry

    # ---- start / poll / cancel ---------------------------------------------------------------
    def start(self, request: RegistrationRequest) -> RegistrationRun:
        """Check, export, launch; raises StepRLError (nothing created, nothing left) when it cannot."""
        entry = self.check(request)
        self.temp_root.mkdir(parents=True, exist_ok=True)
        temp_dir = Path(tempfile.mkdtemp(prefix="SPACRegistration-", dir=self.temp_root))
        try:
            job = self._write_inputs(request, entry, temp_dir)
            command = [*self.python, "-m", "steprl", "worker", str(job)]
            handle = self.runner.start(command, env=self.env, cwd=str(temp_dir))
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        return RegistrationRun(request, handle, temp_dir, entry, total_steps=request.steps)

    def _write_inputs(self, request: RegistrationRequest, entry: models.ModelEntry, folder: Path) -> Path:
        export_volume(request.fixed, folder / "fixed.nrrd")
        export_volume(request.moving, folder / "moving.nrrd", ignore_parent=True)
        job = {"version": 1, "task": "register", "fixed": "fixed.nrrd", "moving": "moving.nrrd",
               "fixed_labels": None, "moving_labels": None, "model": str(entry.path), "steps": request.steps,
               "device": request.device or "auto", "prealign": bool(request.prealign), "output": "steps"}
        if request.fixed_labels is not None:
            export_volume(request.fixed_labels, folder / "fixed_labels.nrrd")
            export_volume(request.moving_labels, folder / "moving_labels.nrrd",
                          ignore_parent=is_own_proxy(request.moving_labels.GetParentTransformNode()))
            job.update(fixed_labels="fixed_labels.nrrd", moving_labels="moving_labels.nrrd")
        path = folder / "job.json"
        path.write_text(json.dumps(job, indent=2), encoding="utf-8")
        return path

    def poll(self, run: RegistrationRun) -> list[int]:
        """Handle the worker's new events; returns the steps added to the scene by this call."""
        if run.finished:
            return []
        added: list[int] = []
        try:
            for line in run.handle.read_lines():
                self._handle_line(run, line, added)
        except StepRLError as err:  # a step could not be read: stop the worker, keep what is there
            run.handle.kill()
            self._finish(run, RunState.FAILED, str(err))
            return added
        if run.handle.finished():
            self._end(run)
        return added

    def _handle_line(self, run: RegistrationRun, line: str, added: list[int]) -> None:
        event = parse_line(line)
        if event is None:
            if line.strip():
                log.info("worker: %s", line)
        elif isinstance(event, StepEvent):
            self._add_step(run, event)
            added.append(event.step)
        elif isinstance(event, StartedEvent):
            run.total_steps, run.device = event.steps, event.device
            run.message = f"Running on {event.device}"
        elif isinstance(event, ProgressEvent):
            run.message = event.message
        elif isinstance(event, ErrorEvent):
            run._error_event = event
        elif isinstance(event, DoneEvent):
            run._done = True

    def _add_step(self, run: RegistrationRun, event: StepEvent) -> None:
        try:
            node = read_grid_transform(event.field)
        except OSError as err:
            raise InputError(f"The field of step {event.step} could not be read ({err}).",
                             "Check free space in Slicer's temporary folder, then apply again.") from err
        if run.nodes is None:
            base = f"{run.request.moving.GetName()} SPAC"
            run.nodes = results.create(self.scene, event.step, node, event.metrics, run.request.fixed,
                                       run.request.moving, self.sequences_logic, base)
            results.select(run.nodes, 0, self.sequences_logic)
            proxy_id = run.nodes.proxy.GetID()
            run.request.moving.SetAndObserveTransformNodeID(proxy_id)
            labels = run.request.moving_labels
            if labels is not None and (labels.GetParentTransformNode() is None
                                       or is_own_proxy(labels.GetParentTransformNode())):
                labels.SetAndObserveTransformNodeID(proxy_id)  # the labels follow the steps too
        else:
            results.add_step(run.nodes, event.step, node, event.metrics, self.sequences_logic)
        Path(event.field).unlink(missing_ok=True)  # read into the scene: the file is no longer needed
        run.steps.append(event.step)
        run.metrics.append(dict(event.metrics))
        run.total_steps = event.total or run.total_steps
        run.eta_seconds = event.eta_seconds

    def _end(self, run: RegistrationRun) -> None:
        code = run.handle.returncode()
        if run._done and code == 0:
            self._finish(run, RunState.DONE)
            return
        if run._error_event is not None:
            message = run._error_event.text
        else:
            tail = run.handle.stderr_tail().strip().splitlines()[-3:]
            message = (f"The registration process stopped unexpectedly ({describe_exit(code)})."
                       + (f" Its last messages: {' | '.join(tail)}" if tail else "")
                       + " Try again; if it happens again, report it with the Slicer log.")
        self._finish(run, RunState.FAILED, message)

    def _finish(self, run: RegistrationRun, state: RunState, error: str | None = None) -> None:
        run.state = state
        if error and run.steps:
            error += f" Steps 0 to {run.steps[-1]} are kept."
        run.error = error
        run.eta_seconds = None
        run.message = {RunState.DONE: "Done", RunState.CANCELLED: "Cancelled", RunState.FAILED: "Failed"}[state]
        shutil.rmtree(run.temp_dir, ignore_errors=True)
        if error:
            log.error("SPAC registration failed: %s", error)

    def cancel(self, run: RegistrationRun) -> None:
        """Kill the worker's process tree; keep the steps already finished; remove the temporary files."""
        if run.finished:
            return
        run.handle.kill()
        try:
            for line in run.handle.read_lines():  # steps whose files were complete before the kill
                event = parse_line(line)
                if isinstance(event, StepEvent) and Path(event.field).is_file():
                    self._add_step(run, event)
        except StepRLError:
            log.warning("a step finished just before Cancel could not be read", exc_info=True)
        self._finish(run, RunState.CANCELLED)

    def wait(self, run: RegistrationRun, timeout: float | None = None, interval: float = 0.05) -> RegistrationRun:
        """Poll until the run ends (batch use and tests); cancels it after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not run.finished:
            self.poll(run)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel(run)
                break
            time.sleep(interval)
        return run

    # ---- results -------------------------------------------------------------------------------
    def select_step(self, run_or_browser, step: int) -> None:
        """Show step ``step`` (as the slider does)."""
        nodes = self._nodes(run_or_browser)
        results.select(nodes, nodes.item_of(step), self.sequences_logic)

    def keep_step(self, run_or_browser, step: int | None = None, *, resample: bool = False, name: str | None = None):
        """Create the output transform of ``step`` (default: the selected one), and the warped volume if asked.

        Returns ``(grid_transform_node, volume_node_or_None)``.
        """
        nodes = self._nodes(run_or_browser)
        if step is None:
            step = nodes.step_at(nodes.browser.GetSelectedItemNumber())
        return results.keep(nodes, step, self.scene, resample=resample, name=name)

    @staticmethod
    def _nodes(run_or_browser) -> results.ResultNodes:
        nodes = run_or_browser.nodes if isinstance(run_or_browser, RegistrationRun) else \
            results.from_browser(run_or_browser)
        if nodes is None:
            raise InputError("There is no registration result to use yet.", "Apply a registration first.")
        return nodes

    # ---- devices -------------------------------------------------------------------------------
    def start_device_probe(self) -> ProcessHandle:
        """Ask a worker which devices torch can use (the answer comes via :meth:`read_device_probe`)."""
        return self.runner.start([*self.python, "-m", "steprl", "worker", "--devices"], env=self.env)

    @staticmethod
    def read_device_probe(handle: ProcessHandle) -> DevicesEvent | ErrorEvent | None:
        """The probe's answer once it has one; an ErrorEvent when it failed; None while running."""
        for line in handle.read_lines():
            event = parse_line(line)
            if isinstance(event, DevicesEvent | ErrorEvent):
                return event
        if handle.finished():
            return ErrorEvent(f"The device check stopped ({describe_exit(handle.returncode())}).",
                              "Install PyTorch (the PyTorch extension) and restart Slicer.")
        return None
