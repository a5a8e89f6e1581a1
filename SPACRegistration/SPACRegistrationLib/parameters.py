"""The module's parameter node: the panel's state, saved with the scene.

In Slicer the class is decorated with ``parameterNodeWrapper``, and ``connectGui`` binds each
field to the .ui widget whose dynamic property ``SlicerParameterName`` names it (node selectors,
spin box, check boxes, folder line edit, device combo box). ``model`` is set by the widget code
(the model list is built at run time) and ``sequenceBrowser`` holds the latest result so that a
saved scene reopens with its slider. Outside Slicer the class stays a plain annotated class (see
``StepRLCommon.parameters``). Do not add ``from __future__ import annotations`` here:
parameterNodeWrapper reads the real types.
"""

import pathlib
from typing import Annotated

from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSequenceBrowserNode,
)

from StepRLCommon.parameters import DEVICES, Choice, WithinRange, parameterNodeWrapper, user_folder

__all__ = ["DEVICES", "MAX_REFINE", "MAX_STEPS", "MIN_STEPS", "MODEL_DEFAULT_REFINE", "SPACRegistrationParameterNode",
           "user_folder"]

#: Bounds of the number of policy steps (the .ui spin box has the same range).
MIN_STEPS, MAX_STEPS = 1, 200
#: Bounds of the number of refinement steps; -1 means the model's default (the .ui spin box has the same range).
MODEL_DEFAULT_REFINE, MAX_REFINE = -1, 500


@parameterNodeWrapper
class SPACRegistrationParameterNode:
    """Inputs and options of one registration, plus the latest result.

    fixedVolume, movingVolume - the volumes to register (moving is warped onto fixed).
    fixedLabels, movingLabels - optional label maps; with both, Dice is computed per step.
    model - the chosen model: a ``.safetensors`` path or a bundled model name.
    userModelsFolder - a folder of the user's own models (listed after the bundled ones).
    steps - number of policy steps.
    refineSteps - refinement steps after the policy's (test-time optimisation); -1: the model's default, 0: off.
    device - where the policy runs: auto (GPU when available), cpu or cuda.
    prealign - affine pre-alignment before the policy.
    createWarpedVolume - "Keep this step" also creates the resampled moving volume.
    keepJobFolder - keep the run's temporary folder (exported inputs, job file, step files) for debugging.
    sequenceBrowser - the browser of the latest result (its slider is the step slider).
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedLabels: vtkMRMLLabelMapVolumeNode
    movingLabels: vtkMRMLLabelMapVolumeNode
    model: str = ""
    userModelsFolder: pathlib.Path = pathlib.Path()
    steps: Annotated[int, WithinRange(MIN_STEPS, MAX_STEPS)] = 20
    refineSteps: Annotated[int, WithinRange(MODEL_DEFAULT_REFINE, MAX_REFINE)] = MODEL_DEFAULT_REFINE
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    prealign: bool = False
    createWarpedVolume: bool = False
    keepJobFolder: bool = False
    sequenceBrowser: vtkMRMLSequenceBrowserNode

