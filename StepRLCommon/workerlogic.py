"""The run life cycle the StepRL modules share: start / poll / cancel a ``steprl worker`` job. No Qt, no torch.

A module's logic subclasses :class:`WorkerLogic`, passing its
:class:`~.description.ModuleDescription` (``class RegistrationLogic(WorkerLogic,
description=DESCRIPTION)``), and fills in four hooks: :meth:`~WorkerLogic.check`
(one clear message when the request cannot run, nothing created), :meth:`~WorkerLogic.write_job`
(export the inputs with Slicer's writer into the run's temporary folder and write ``job.json``),
:meth:`~WorkerLogic.add_step` (bring one finished step's files into the scene) and, optionally,
:meth:`~WorkerLogic.on_done` (outputs made once the run finished). The rest is here, the same for
every module::

    logic = RegistrationLogic(scene)            # a WorkerLogic
    run = logic.start(request)                   # checks, exports, launches the worker
    while not run.finished:                      # in Slicer: a QTimer calls logic.poll(run) every 100 ms
        logic.poll(run)
        time.sleep(0.1)
    if run.state is RunState.FAILED:
        print(run.error)                         # one message: what went wrong and what to do

:meth:`~WorkerLogic.start` launches ``python -m steprl worker job.json`` (PythonSlicer in Slicer)
through the injected :class:`~.process.ProcessRunner`; :meth:`~WorkerLogic.poll` drains the
worker's JSON-line events (:mod:`.protocol`). When the worker ends, or on
:meth:`~WorkerLogic.cancel` (which kills its whole process tree), the temporary folder is
removed; the steps received so far stay in the scene, usable. A request with
``keep_job_folder`` set keeps that folder (exported inputs, ``job.json``, every step file) and
logs where it is, for debugging a run outside Slicer (``python -m steprl worker job.json``).
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
from typing import Any

from steprl.errors import InputError, ModelFileError, StepRLError

from . import models, stepresults
from .description import ModuleDescription
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
class WorkerRun:
    """One running or finished job: its state, the steps received and the result nodes.

    ``progress`` is ``(done, total)`` of the worker's last counting progress event (the slices
    of a segmentation), None when it sent none.
    """

    request: Any
    handle: ProcessHandle
    temp_dir: Path
    model: models.ModelEntry
    state: RunState = RunState.RUNNING
    total_steps: int | None = None
    steps: list[int] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    nodes: stepresults.StepNodes | None = None
    message: str = "Starting"
    error: str | None = None
    eta_seconds: float | None = None
    device: str = ""
    progress: tuple[int, int] | None = None
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
    def fraction(self) -> float:
        """How far the run is, 0..1 (steps when they come one by one, else the counted progress)."""
        if self.state is RunState.DONE:
            return 1.0
        if self.last_step and self.total_steps:
            return min(self.last_step / self.total_steps, 1.0)
        if self.progress and self.progress[1]:
            return min(self.progress[0] / self.progress[1], 1.0)
        return 0.0

    @property
    def progress_text(self) -> str:
        """E.g. ``Step 3 of 20, about 12 s left`` or ``Slices 32 of 155, about 3 s left`` (for the progress bar)."""
        if self.last_step and self.total_steps is not None:
            text = f"Step {self.last_step} of {self.total_steps}"
        elif self.progress is not None and not self.finished:
            text = self.message
        elif self.steps and self.total_steps is not None:
            text = f"Step {self.last_step} of {self.total_steps}"
        else:
            return self.message
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


class WorkerLogic:
    """See the module docstring. Collaborators are injected so tests can replace them.

    A subclass passes its module's description: ``class RegistrationLogic(WorkerLogic,
    description=DESCRIPTION)``; it is then ``RegistrationLogic.description``.

    Args:
        scene: the ``vtkMRMLScene`` results go into.
        runner: starts the worker (default: :class:`~.process.SubprocessRunner`).
        python: the interpreter command (default: :func:`default_python_command`).
        sequences_logic: Slicer's ``vtkSlicerSequencesLogic`` for ``scene`` (in Slicer:
            ``slicer.modules.sequences.logic()``; default: a new one on ``scene``).
        temp_root: where the per-run temporary folders go (default: Slicer's temporary path).
        env: the worker's environment (default: :func:`worker_environment`).
    """

    description: ModuleDescription

    def __init_subclass__(cls, *, description: ModuleDescription, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not isinstance(description, ModuleDescription):
            raise TypeError(f"{cls.__name__}: description must be a ModuleDescription, got {description!r}")
        if not (isinstance(description.run_class, type) and issubclass(description.run_class, WorkerRun)):
            raise TypeError(f"{cls.__name__}: the description's run_class must subclass WorkerRun")
        cls.description = description

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

    # ---- hooks -----------------------------------------------------------------------------
    def check(self, request) -> models.ModelEntry:
        """Raise a StepRLError (problem + fix) when ``request`` cannot run; return its model."""
        raise NotImplementedError

    def write_job(self, request, entry: models.ModelEntry, folder: Path) -> Path:
        """Export the inputs into ``folder`` and write the job file there; return its path."""
        raise NotImplementedError

    def add_step(self, run: WorkerRun, event: StepEvent) -> None:
        """Bring one finished step into the scene (raise StepRLError when its files cannot be read)."""
        raise NotImplementedError

    def on_done(self, run: WorkerRun) -> None:
        """Called once when a run finished successfully, before its temporary folder goes."""

    # ---- helpers for the hooks -------------------------------------------------------------------
    def find_entry(self, model: str, user_models_folder=None) -> models.ModelEntry:
        """The model entry of a name or path among this module's models; ModelFileError when there is none."""
        if not model:
            raise ModelFileError("No model is chosen.", "Choose a model in the Model section.")
        methods, kind = self.description.methods, self.description.model_kind
        entry = models.find_model(model, user_models_folder, method=methods)
        if entry is None:
            listed = models.list_models(user_models_folder, method=methods)
            names = ", ".join(e.name for e in listed) or "none found"
            raise ModelFileError(
                f"Model '{model}' not found.",
                f"Choose one of the listed models ({names}), or put NAME.safetensors with its NAME.json card into "
                "the user models folder.")
        if entry.card.get("method") not in methods:
            raise ModelFileError(f"Model '{entry.name}' is a {entry.card.get('method')} model, not a "
                                 f"{kind}.", f"Choose a {kind}.")
        return entry

    def check_volume(self, volume, role: str) -> None:
        """InputError when ``volume`` (the ``role`` input, e.g. "input", "fixed") is not a volume of this scene."""
        if volume.GetScene() is not self.scene:
            raise InputError(f"The {role} volume '{volume.GetName()}' is not in the scene.", "Choose another one.")

    @staticmethod
    def write_job_file(folder: Path, job: dict) -> Path:
        """``folder/job.json`` with ``job`` (paths relative to ``folder``)."""
        path = folder / "job.json"
        path.write_text(json.dumps(job, indent=2), encoding="utf-8")
        return path

    # ---- start / poll / cancel ---------------------------------------------------------------
    def start(self, request) -> WorkerRun:
        """Check, export, launch; raises StepRLError (nothing created, nothing left) when it cannot."""
        entry = self.check(request)
        self.temp_root.mkdir(parents=True, exist_ok=True)
        temp_dir = Path(tempfile.mkdtemp(prefix=f"{self.description.name}-", dir=self.temp_root))
        try:
            job = self.write_job(request, entry, temp_dir)
            command = [*self.python, "-m", "steprl", "worker", str(job)]
            handle = self.runner.start(command, env=self.env, cwd=str(temp_dir))
        except BaseException:
            self._remove_job_folder(request, temp_dir)
            raise
        return self.description.run_class(request, handle, temp_dir, entry, total_steps=request.steps)

    @staticmethod
    def _remove_job_folder(request, folder: Path) -> None:
        """Remove a run's temporary folder, unless the request asks to keep it (then say where it is)."""
        if getattr(request, "keep_job_folder", False):
            log.info("The job folder is kept for debugging: %s (run it again with: python -m steprl worker %s)",
                     folder, folder / "job.json")
            return
        shutil.rmtree(folder, ignore_errors=True)

    def poll(self, run: WorkerRun) -> list[int]:
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

    def _handle_line(self, run: WorkerRun, line: str, added: list[int]) -> None:
        event = parse_line(line)
        if event is None:
            if line.strip():
                log.info("worker: %s", line)
        elif isinstance(event, StepEvent):
            self._take_step(run, event)
            added.append(event.step)
        elif isinstance(event, StartedEvent):
            run.total_steps, run.device = event.steps, event.device
            run.message = f"Running on {event.device}"
        elif isinstance(event, ProgressEvent):
            run.message = event.message
            if event.done is not None and event.total is not None:
                run.progress = (event.done, event.total)
                run.eta_seconds = event.eta_seconds
        elif isinstance(event, ErrorEvent):
            run._error_event = event
        elif isinstance(event, DoneEvent):
            run._done = True

    def _take_step(self, run: WorkerRun, event: StepEvent) -> None:
        self.add_step(run, event)
        if not getattr(run.request, "keep_job_folder", False):
            for path in event.files.values():  # read into the scene: the files are no longer needed
                Path(path).unlink(missing_ok=True)
        run.steps.append(event.step)
        run.metrics.append(dict(event.metrics))
        run.total_steps = event.total or run.total_steps
        run.eta_seconds = event.eta_seconds

    def _end(self, run: WorkerRun) -> None:
        code = run.handle.returncode()
        if run._done and code == 0:
            self._finish(run, RunState.DONE)
            return
        if run._error_event is not None:
            message = run._error_event.text
        else:
            tail = run.handle.stderr_tail().strip().splitlines()[-3:]
            message = (f"The {self.description.task_noun} process stopped unexpectedly ({describe_exit(code)})."
                       + (f" Its last messages: {' | '.join(tail)}" if tail else "")
                       + " Try again; if it happens again, report it with the Slicer log.")
        self._finish(run, RunState.FAILED, message)

    def _finish(self, run: WorkerRun, state: RunState, error: str | None = None) -> None:
        if state is RunState.DONE:
            try:
                self.on_done(run)
            except StepRLError as err:
                state, error = RunState.FAILED, str(err)
        run.state = state
        if error and run.steps:
            error += f" Steps 0 to {run.steps[-1]} are kept."
        run.error = error
        run.eta_seconds = None
        run.message = {RunState.DONE: "Done", RunState.CANCELLED: "Cancelled", RunState.FAILED: "Failed"}[state]
        self._remove_job_folder(run.request, run.temp_dir)
        if error:
            log.error("%s failed: %s", self.description.task_noun.capitalize(), error)

    def cancel(self, run: WorkerRun) -> None:
        """Kill the worker's process tree; keep the steps already finished; remove the temporary files."""
        if run.finished:
            return
        run.handle.kill()
        try:
            for line in run.handle.read_lines():  # steps whose files were complete before the kill
                event = parse_line(line)
                if isinstance(event, StepEvent) and all(Path(p).is_file() for p in event.files.values()):
                    self._take_step(run, event)
        except StepRLError:
            log.warning("a step finished just before Cancel could not be read", exc_info=True)
        self._finish(run, RunState.CANCELLED)

    def wait(self, run: WorkerRun, timeout: float | None = None, interval: float = 0.05) -> WorkerRun:
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
    def nodes_of(self, run_or_browser) -> stepresults.StepNodes:
        """The result nodes of a run or of a browser this module created; InputError when there are none."""
        if isinstance(run_or_browser, WorkerRun):
            nodes = run_or_browser.nodes
        else:
            nodes = stepresults.from_browser(run_or_browser, self.description.result_kind)
        if nodes is None:
            noun = self.description.task_noun
            raise InputError(f"There is no {noun} result to use yet.", f"Apply a {noun} first.")
        return nodes

    def select_step(self, run_or_browser, step: int) -> None:
        """Show step ``step`` (as the slider does)."""
        nodes = self.nodes_of(run_or_browser)
        stepresults.select(nodes, nodes.item_of(step), self.sequences_logic)

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
