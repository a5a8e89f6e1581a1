"""Segmentation logic on a MRML scene: a PixelDRL-MG worker run on the shared run life cycle. No Qt, no torch.

    logic = SegmentationLogic(scene)
    run = logic.start(SegmentationRequest(volume, model="pixeldrl_wm", steps=10))
    logic.wait(run)                   # in Slicer: a QTimer calls logic.poll(run) every 100 ms
    run.segmentation                  # vtkMRMLSegmentationNode of the last step (made on finish)
    logic.select_step(run, 3)         # the slider: the proxy labelmap shows step 3
    logic.show_changes(run, True)     # the action-change overlay (turned on green, turned off red)
    segmentation, labelmap = logic.keep_step(run, 3, labelmap=True)

Start / poll / cancel / wait come from ``StepRLCommon.workerlogic.WorkerLogic``; this module adds
what is segmentation's: the checks, the job (the input volume written with Slicer's own writer,
and an optional reference segmentation or labelmap for Dice per step), each step's mask and
changed files read into one labelmap item of the step sequence (:mod:`.steps`), and on finish
(or "Keep this step") the segmentation node (:mod:`.segmentation`).

Timing (worker): step 0 (the all-object start) comes at once; steps 1..n all arrive together
after the network has run over every slice, so meanwhile ``run.progress`` counts slices and
``run.progress_text`` says e.g. "Slices 32 of 155, about 3 s left". With ``pixeldrl_wm`` a last
item, "step 11 (border)", follows: the policy's mask with its border re-decided at the scan's
resolution (``steprl.segmentation.border``; not a policy step), and the run's result.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from steprl.errors import InputError
from steprl.protocol import SegmentJob, write_job
from steprl.segmentation.config import BATCH_SLICES

from StepRLCommon import stepresults
from StepRLCommon.description import ModuleDescription
from StepRLCommon.models import ModelEntry
from StepRLCommon.mrmlio import export_volume
from StepRLCommon.protocol import StepEvent
from StepRLCommon.workerlogic import RunState, WorkerLogic, WorkerRun

from . import segmentation, steps
from .parameters import AXES, PixelRLSegmentParameterNode

__all__ = ["AXES", "DESCRIPTION", "METHODS", "RunState", "SegmentationLogic", "SegmentationRequest",
           "SegmentationRun"]

log = logging.getLogger(__name__)

#: The learners whose models this module runs (model card ``method``).
METHODS = ("pixeldrl-mg", "unet")


@dataclass
class SegmentationRequest:
    """What to segment and how (the parameter node's content, as nodes and values).

    ``model``: a bundled or user model name, or a ``.safetensors`` path; ``steps`` None uses the
    model's default; ``axis``: one of :data:`AXES`; ``reference``: an optional segmentation node or
    labelmap volume (Dice per step); ``create_labelmap``: the finished run (and "Keep this step")
    also creates a labelmap volume; ``keep_job_folder``: keep the run's temporary folder (exported
    inputs, job file, step files) for debugging.
    """

    volume: object
    model: str
    steps: int | None = None
    axis: str = "axial"
    device: str = "auto"
    reference: object | None = None
    create_labelmap: bool = False
    batch_slices: int = BATCH_SLICES
    user_models_folder: str | os.PathLike | None = None
    keep_job_folder: bool = False


@dataclass
class SegmentationRun(WorkerRun):
    """One running or finished segmentation; ``segmentation`` / ``labelmap``: the outputs made on finish."""

    segmentation: object | None = None
    labelmap: object | None = None


#: The module, as the shared base classes need it (StepRLCommon.description).
DESCRIPTION = ModuleDescription(
    name="PixelRLSegment", task_noun="segmentation", methods=METHODS,
    model_kind="segmentation model (PixelDRL-MG or U-Net)", result_kind=steps.KIND, run_class=SegmentationRun,
    request_class=SegmentationRequest, parameter_node_class=PixelRLSegmentParameterNode,
    request_fields={"volume": "inputVolume", "axis": "axis", "reference": "referenceSegmentation",
                    "create_labelmap": "createLabelmap"},
    default_volume_parameter="inputVolume")


class SegmentationLogic(WorkerLogic, description=DESCRIPTION):
    """See the module docstring; the constructor's arguments are ``WorkerLogic``'s."""

    def check(self, request: SegmentationRequest) -> ModelEntry:
        """Raise a StepRLError (problem + fix) when ``request`` cannot run; return its model."""
        if request.volume is None:
            raise InputError("Choose an input volume.", "Select it in the Inputs section.")
        self.check_volume(request.volume, "input")
        if request.steps is not None and request.steps < 0:
            raise InputError(f"The number of steps must be 0 or more, got {request.steps}.", "Choose e.g. 10 steps.")
        if request.axis not in AXES:
            raise InputError(f"Unknown slice axis '{request.axis}'.", f"Choose one of {', '.join(AXES)}.")
        reference = request.reference
        if reference is not None:
            if not (reference.IsA("vtkMRMLSegmentationNode") or reference.IsA("vtkMRMLLabelMapVolumeNode")):
                raise InputError(f"The reference '{reference.GetName()}' is neither a segmentation nor a labelmap.",
                                 "Choose a segmentation or a labelmap volume, or none.")
            if reference.GetScene() is not self.scene:
                raise InputError(f"The reference '{reference.GetName()}' is not in the scene.", "Choose another one.")
            if reference.IsA("vtkMRMLSegmentationNode") and not reference.GetSegmentation().GetNumberOfSegments():
                raise InputError(f"The reference segmentation '{reference.GetName()}' has no segments.",
                                 "Choose one with the object segmented, or none.")
        return self.find_entry(request.model, request.user_models_folder)

    def write_job(self, request: SegmentationRequest, entry: ModelEntry, folder: Path) -> Path:
        export_volume(request.volume, folder / "image.nrrd")
        labels = None
        if request.reference is not None:
            segmentation.export_reference(request.reference, request.volume, folder / "labels.nrrd")
            labels = "labels.nrrd"
        job = SegmentJob(image="image.nrrd", model=str(entry.path), output="steps", labels=labels,
                         steps=request.steps, axis=request.axis, device=request.device or "auto",
                         batch_slices=int(request.batch_slices))
        return write_job(job, folder)

    def add_step(self, run: SegmentationRun, event: StepEvent) -> None:
        volume = run.request.volume
        node = steps.read_step(event.mask, event.changed, volume, event.step)
        if event.metrics.get("stage") == "border":  # not a policy step: say so on the slider's item
            node.SetName(f"step {event.step} (border)")
        if run.nodes is not None:
            stepresults.add_step(run.nodes, event.step, node, event.metrics, self.sequences_logic)
            return
        run.nodes = steps.create(self.scene, event.step, node, event.metrics, volume, self.sequences_logic,
                                 steps.SegmentInfo.from_card(run.model.card))
        stepresults.select(run.nodes, 0, self.sequences_logic)

    def on_done(self, run: SegmentationRun) -> None:
        """The finished run's outputs: the last step as a segmentation (and a labelmap if asked)."""
        if run.nodes is not None:
            run.segmentation, run.labelmap = self.keep_step(run, run.last_step,
                                                            labelmap=run.request.create_labelmap)

    # ---- results -------------------------------------------------------------------------------
    def keep_step(self, run_or_browser, step: int | None = None, *, labelmap: bool = False,
                  name: str | None = None):
        """The segmentation node of ``step`` (default: the one shown), and a labelmap volume if asked.

        Returns ``(segmentation_node, labelmap_node_or_None)``.
        """
        nodes = self.nodes_of(run_or_browser)
        if step is None:
            step = nodes.selected_step
        item = nodes.item_of(step)
        volume = nodes.reference("input")
        if item < 0 or volume is None:
            raise InputError(f"Step {step} (or the input volume) of this result is no longer in the scene.",
                             "Choose a step on the slider, or apply the segmentation again.")
        base = name or f"{volume.GetName()} PixelRL step {step}"
        return segmentation.keep(nodes.sequence.GetNthDataNode(item), volume, self.scene, base,
                                 steps.segment_of(nodes), labelmap=labelmap)

    def show_changes(self, run_or_browser, on: bool = True) -> None:
        """Toggle the action-change overlay (the paper's Fig. 4) on the step labelmap."""
        steps.show_changes(self.nodes_of(run_or_browser), on)
