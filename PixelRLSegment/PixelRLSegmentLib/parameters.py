"""The module's parameter node: the panel's state, saved with the scene.

In Slicer the class is decorated with ``parameterNodeWrapper``, and ``connectGui`` binds each
field to the .ui widget whose dynamic property ``SlicerParameterName`` names it. ``model`` is set
by the widget code (the model list is built at run time) and ``sequenceBrowser`` holds the latest
result so that a saved scene reopens with its slider. Outside Slicer the class stays a plain
annotated class (see ``StepRLCommon.parameters``). Do not add ``from __future__ import
annotations`` here: parameterNodeWrapper reads the real types.
"""

import pathlib
import typing
from typing import Annotated

from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLSequenceBrowserNode,
)

from StepRLCommon.parameters import DEVICES, Choice, WithinRange, parameterNodeWrapper, user_folder

#: Slice axes the worker accepts (named in patient terms; found from the volume's direction).
AXES = ("axial", "coronal", "sagittal")

__all__ = ["AXES", "DEVICES", "MAX_STEPS", "MIN_STEPS", "PixelRLSegmentParameterNode",
           "user_folder"]

#: Bounds of the number of policy steps (the .ui spin box has the same range).
MIN_STEPS, MAX_STEPS = 1, 50


@parameterNodeWrapper
class PixelRLSegmentParameterNode:
    """Inputs and options of one segmentation, plus the latest result.

    inputVolume - the volume to segment (any spacing and orientation; segmented slice by slice).
    referenceSegmentation - optional segmentation or labelmap of the object: Dice per step.
    model - the chosen model: a ``.safetensors`` path or a bundled model name.
    userModelsFolder - a folder of the user's own models (listed after the bundled ones).
    steps - number of policy steps (3: pixeldrl_wm's card; its Dice is flat from step 2-3. The paper trains with 10).
    axis - the slice direction: axial, coronal or sagittal.
    device - where the policy runs: auto (GPU when available), cpu or cuda.
    createLabelmap - the output also includes a labelmap volume (besides the segmentation).
    showChanges - the step labelmap shows what each step changed instead of the mask.
    keepJobFolder - keep the run's temporary folder (exported inputs, job file, step files) for debugging.
    sequenceBrowser - the browser of the latest result (its slider is the step slider).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    referenceSegmentation: typing.Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # noqa: UP007
    model: str = ""
    userModelsFolder: pathlib.Path = pathlib.Path()
    steps: Annotated[int, WithinRange(MIN_STEPS, MAX_STEPS)] = 3
    axis: Annotated[str, Choice(list(AXES))] = "axial"
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    createLabelmap: bool = False
    showChanges: bool = False
    keepJobFolder: bool = False
    sequenceBrowser: vtkMRMLSequenceBrowserNode

