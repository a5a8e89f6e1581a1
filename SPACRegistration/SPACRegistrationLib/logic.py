"""Registration logic on a MRML scene: a SPAC worker run on the shared run life cycle. No Qt, no torch.

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

Start / poll / cancel / wait come from ``StepRLCommon.workerlogic.WorkerLogic``; this module
adds what is SPAC's: the checks, the job (fixed and moving volumes, optional label maps, written
with Slicer's own writer), and each step's field read into a grid transform and appended to the
result's sequence (:mod:`.results`; the first step creates every result node at once and puts
the moving volume under the browser's proxy transform).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from steprl.errors import InputError
from steprl.protocol import RegisterJob, write_job

from StepRLCommon.description import ModuleDescription
from StepRLCommon.mrmlio import export_volume
from StepRLCommon.protocol import StepEvent
from StepRLCommon.workerlogic import (
    RunState,
    WorkerLogic,
    WorkerRun,
    default_python_command,
    default_temp_root,
    in_slicer,
    worker_environment,
)

from . import models, steps
from .parameters import SPACRegistrationParameterNode
from .transforms import is_own_proxy, read_grid_transform

__all__ = ["DESCRIPTION", "RegistrationLogic", "RegistrationRequest", "RegistrationRun", "RunState",
           "default_python_command", "default_temp_root", "in_slicer", "worker_environment"]

log = logging.getLogger(__name__)


@dataclass
class RegistrationRequest:
    """What to register and how (the parameter node's content, as nodes and values).

    ``model`` is a bundled model name, a user model name (with ``user_models_folder``) or a
    ``.safetensors`` path; ``steps`` None uses the model's default; ``keep_job_folder`` keeps the
    run's temporary folder (exported inputs, job file, step files) for debugging; ``refine`` is the
    number of refinement steps after the policy's (test-time optimisation, shown on the slider as
    further steps; None: the model's default, 0: off).
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
    keep_job_folder: bool = False
    refine: int | None = None


class RegistrationRun(WorkerRun):
    """One running or finished registration (``nodes``: its :class:`~.steps.ResultNodes`)."""


#: The module, as the shared base classes need it (StepRLCommon.description).
DESCRIPTION = ModuleDescription(
    name="SPACRegistration", task_noun="registration", methods=(models.METHOD,), model_kind="SPAC registration model",
    result_kind=steps.KIND, run_class=RegistrationRun, request_class=RegistrationRequest,
    parameter_node_class=SPACRegistrationParameterNode,
    request_fields={"fixed": "fixedVolume", "moving": "movingVolume", "fixed_labels": "fixedLabels",
                    "moving_labels": "movingLabels", "prealign": "prealign"},
    default_volume_parameter="fixedVolume")


class RegistrationLogic(WorkerLogic, description=DESCRIPTION):
    """See the module docstring; the constructor's arguments are ``WorkerLogic``'s."""

    def check(self, request: RegistrationRequest) -> models.ModelEntry:
        """Raise a StepRLError (problem + fix) when ``request`` cannot run; return its model."""
        if request.fixed is None or request.moving is None:
            raise InputError("Choose both a fixed and a moving volume.", "Select them in the Inputs section.")
        if request.fixed is request.moving:
            raise InputError("The fixed and moving volumes are the same volume.", "Choose two different volumes.")
        self.check_volume(request.fixed, "fixed")
        self.check_volume(request.moving, "moving")
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
        if request.refine is not None and request.refine < 0:
            raise InputError(f"The number of refinement steps must be 0 or more, got {request.refine}.",
                             "Choose 0 to turn refinement off, or leave the model's default.")
        entry = self.find_entry(request.model, request.user_models_folder)
        if entry.ndim != 3:
            raise InputError(f"Model '{entry.name}' is a {entry.ndim}D model, but Slicer volumes are 3D.",
                             "Choose a 3D SPAC model from your models folder (2D models are for the steprl command "
                             "line on 2D images); `steprl train registration --synthseg DIR` trains a 3D one.")
        return entry

    def write_job(self, request: RegistrationRequest, entry: models.ModelEntry, folder: Path) -> Path:
        export_volume(request.fixed, folder / "fixed.nrrd")
        export_volume(request.moving, folder / "moving.nrrd", ignore_parent=True)
        labels = {}
        if request.fixed_labels is not None:
            export_volume(request.fixed_labels, folder / "fixed_labels.nrrd")
            export_volume(request.moving_labels, folder / "moving_labels.nrrd",
                          ignore_parent=is_own_proxy(request.moving_labels.GetParentTransformNode()))
            labels = {"fixed_labels": "fixed_labels.nrrd", "moving_labels": "moving_labels.nrrd"}
        job = RegisterJob(fixed="fixed.nrrd", moving="moving.nrrd", model=str(entry.path), output="steps",
                          steps=request.steps, device=request.device or "auto", prealign=bool(request.prealign),
                          refine=request.refine, **labels)
        return write_job(job, folder)

    def add_step(self, run: RegistrationRun, event: StepEvent) -> None:
        try:
            node = read_grid_transform(event.field)
        except OSError as err:
            raise InputError(f"The field of step {event.step} could not be read ({err}).",
                             "Check free space in Slicer's temporary folder, then apply again.") from err
        if run.nodes is not None:
            steps.add_step(run.nodes, event.step, node, event.metrics, self.sequences_logic)
            return
        base = f"{run.request.moving.GetName()} SPAC"
        run.nodes = steps.create(self.scene, event.step, node, event.metrics, run.request.fixed,
                                   run.request.moving, self.sequences_logic, base)
        steps.select(run.nodes, 0, self.sequences_logic)
        proxy_id = run.nodes.proxy.GetID()
        run.request.moving.SetAndObserveTransformNodeID(proxy_id)
        labels = run.request.moving_labels
        if labels is not None and (labels.GetParentTransformNode() is None
                                   or is_own_proxy(labels.GetParentTransformNode())):
            labels.SetAndObserveTransformNodeID(proxy_id)  # the labels follow the steps too

    def keep_step(self, run_or_browser, step: int | None = None, *, resample: bool = False, name: str | None = None):
        """Create the output transform of ``step`` (default: the selected one), and the warped volume if asked.

        Returns ``(grid_transform_node, volume_node_or_None)``.
        """
        nodes = self.nodes_of(run_or_browser)
        if step is None:
            step = nodes.selected_step
        return steps.keep(nodes, step, self.scene, resample=resample, name=name)
