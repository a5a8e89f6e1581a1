"""The step labelmaps of a segmentation result, their colours and the action-change overlay.

Each sequence item is one ``vtkMRMLLabelMapVolumeNode`` on the input volume's grid that encodes
the step's mask AND what the step changed (paper Fig. 4) in one value per voxel::

    value = mask + 2 * changed     0 background, 1 object (unchanged),
                                   2 turned background at this step, 3 turned object at this step

so one sequence, one proxy and one slider show both. Two colour tables on the proxy's display
node give the two views, swapped by :func:`show_changes`:

- "mask":    1 and 3 in the segment colour; 0 and 2 transparent (the segmentation at that step);
- "changes": 1 in a dim segment colour, 3 green (turned on), 2 red (turned off).

The result's nodes (``StepRLCommon.stepresults``) are placed in a subject-hierarchy folder
``<input> PixelRL`` beside the input volume; the browser refers to the input volume and to both
colour tables (``PixelRLSegment.input``, ``.maskColors``, ``.changeColors``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
from slicer import vtkMRMLColorTableNode, vtkMRMLLabelMapVolumeDisplayNode, vtkMRMLLabelMapVolumeNode
from steprl.errors import InputError
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from StepRLCommon import hierarchy, stepresults
from StepRLCommon.mrmlio import read_labelmap, voxel_array

log = logging.getLogger(__name__)

OBJECT, TURNED_OFF, TURNED_ON = 1, 2, 3
#: Table columns (metrics key, column name); Dice only with a reference segmentation.
COLUMNS = (("object_fraction", "object fraction"), ("changed_voxels", "changed voxels"), ("dice", "Dice"),
           ("seconds", "seconds"))
KIND = stepresults.ResultKind("PixelRLSegment", COLUMNS, plotted=("object_fraction", "dice"), proxy_suffix="mask")
#: The segment's colour when the model card names none (RGB 0..1).
DEFAULT_COLOR = (0.95, 0.78, 0.2)
TURNED_ON_COLOR = (0.1, 0.9, 0.2)
TURNED_OFF_COLOR = (0.95, 0.15, 0.1)
SEGMENT_NAME = "PixelRLSegment.segmentName"
SEGMENT_COLOR = "PixelRLSegment.segmentColor"
SEGMENT_TERMINOLOGY = "PixelRLSegment.segmentTerminology"


@dataclass(frozen=True)
class SegmentInfo:
    """Name, colour (RGB 0..1) and terminology of the output segment (from the model card's ``segment``)."""

    name: str = "Object"
    color: tuple[float, float, float] = DEFAULT_COLOR
    terminology: str = ""

    @classmethod
    def from_card(cls, card: dict) -> SegmentInfo:
        """The card's optional ``segment: {name, color, terminology}``; defaults for what is missing or invalid."""
        entry = card.get("segment") or {}
        if not isinstance(entry, dict):
            return cls()
        color = entry.get("color")
        try:
            color = tuple(float(c) for c in color)
            if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
                raise ValueError(color)
        except (TypeError, ValueError):
            color = DEFAULT_COLOR
        return cls(str(entry.get("name") or cls.name), color, str(entry.get("terminology") or ""))


def encode(mask: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """One step's item values (uint8) from its 0/1 mask and changed maps."""
    return (mask.astype(np.uint8) & 1) + 2 * (changed.astype(np.uint8) & 1)


def decode(values: np.ndarray) -> np.ndarray:
    """The 0/1 mask (uint8) of an item's values (1 and 3 are object)."""
    return (values & 1).astype(np.uint8)


def copy_geometry(target, volume) -> None:
    """Give ``target`` the IJK-to-RAS matrix of ``volume`` (its own, not the world one)."""
    matrix = vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    target.SetIJKToRASMatrix(matrix)


def read_step(mask_path: str | os.PathLike, changed_path: str | os.PathLike, volume, step: int):
    """The item labelmap (not in a scene) of one step from the worker's two files, on ``volume``'s grid.

    The worker writes both files with exactly the input's geometry; the item takes the input's own
    matrix (no round trip through the file header). Raises InputError when a file cannot be read
    or does not have the input's size.
    """
    try:
        mask_node, changed_node = read_labelmap(mask_path), read_labelmap(changed_path)
    except OSError as err:
        raise InputError(f"The mask of step {step} could not be read ({err}).",
                         "Check free space in Slicer's temporary folder, then apply again.") from err
    mask, changed = voxel_array(mask_node), voxel_array(changed_node)
    expected = volume.GetImageData().GetDimensions()[::-1]
    if mask.shape != expected or changed.shape != expected:
        raise InputError(f"The mask of step {step} has size {mask.shape[::-1]}, the input volume {expected[::-1]}.",
                         "Update the StepRL extension so that the module and steprl match, then apply again.")
    mask[...] = encode(mask, changed)  # in place: the node keeps its voxels, now the item's values
    node = vtkMRMLLabelMapVolumeNode()
    node.SetAndObserveImageData(mask_node.GetImageData())
    copy_geometry(node, volume)
    node.SetName(f"step {step}")
    return node


def _color_table(scene, name: str, colors: dict[int, tuple[float, float, float, float]]):
    table = vtkMRMLColorTableNode()
    table.SetTypeToUser()
    table.SetNumberOfColors(4)
    names = {0: "background", OBJECT: "object", TURNED_OFF: "turned background", TURNED_ON: "turned object"}
    for value in range(4):
        r, g, b, a = colors.get(value, (0.0, 0.0, 0.0, 0.0))
        table.SetColor(value, names[value], r, g, b, a)
    table.SetName(scene.GenerateUniqueName(name))
    table.SetAttribute(KIND.role_attribute, "colors")
    table.SetHideFromEditors(True)
    scene.AddNode(table)
    return table


def create(scene, first_step: int, first_node, metrics: dict, volume, sequences_logic,
           segment: SegmentInfo) -> stepresults.StepNodes:
    """The result's nodes around its first step: sequence, browser, table, chart, colours, folder."""
    base = f"{volume.GetName()} PixelRL"
    nodes = stepresults.create(scene, KIND, first_step, first_node, metrics, {"input": volume}, sequences_logic,
                               base)
    r, g, b = segment.color
    mask_colors = _color_table(scene, f"{base} mask colours", {OBJECT: (r, g, b, 1.0), TURNED_ON: (r, g, b, 1.0)})
    change_colors = _color_table(scene, f"{base} change colours", {
        OBJECT: (0.5 * r, 0.5 * g, 0.5 * b, 0.6), TURNED_ON: (*TURNED_ON_COLOR, 1.0),
        TURNED_OFF: (*TURNED_OFF_COLOR, 1.0)})
    nodes.browser.SetAttribute(SEGMENT_NAME, segment.name)  # kept with the scene, for "Keep this step"
    nodes.browser.SetAttribute(SEGMENT_COLOR, " ".join(repr(c) for c in segment.color))
    nodes.browser.SetAttribute(SEGMENT_TERMINOLOGY, segment.terminology)
    nodes.browser.SetNodeReferenceID(KIND.reference("maskColors"), mask_colors.GetID())
    nodes.browser.SetNodeReferenceID(KIND.reference("changeColors"), change_colors.GetID())

    proxy = nodes.proxy
    display = vtkMRMLLabelMapVolumeDisplayNode()
    display.SetAndObserveColorNodeID(mask_colors.GetID())
    scene.AddNode(display)
    proxy.SetAndObserveDisplayNodeID(display.GetID())
    parent = volume.GetParentTransformNode()
    proxy.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)

    folder = hierarchy.folder_next_to(volume, base)
    for node in [*nodes.nodes(), mask_colors, change_colors]:
        hierarchy.place(node, folder)
    return nodes


def segment_of(nodes: stepresults.StepNodes) -> SegmentInfo:
    """The segment a result shows (kept on its browser, so it survives saving the scene)."""
    try:
        color = tuple(float(c) for c in (nodes.browser.GetAttribute(SEGMENT_COLOR) or "").split())
    except ValueError:
        color = ()
    return SegmentInfo(nodes.browser.GetAttribute(SEGMENT_NAME) or SegmentInfo.name,
                       color if len(color) == 3 else DEFAULT_COLOR,
                       nodes.browser.GetAttribute(SEGMENT_TERMINOLOGY) or "")


def show_changes(nodes: stepresults.StepNodes, on: bool) -> None:
    """Show the action-change overlay (``on``) or the plain mask on the result's proxy labelmap."""
    table = nodes.reference("changeColors" if on else "maskColors")
    display = nodes.proxy.GetDisplayNode() if nodes.proxy is not None else None
    if table is None or display is None:
        raise InputError("This result has no colour tables (it was not made by this module's logic).",
                         "Apply the segmentation again.")
    display.SetAndObserveColorNodeID(table.GetID())


def changes_shown(nodes: stepresults.StepNodes) -> bool:
    """Whether the proxy shows the action-change colours."""
    display = nodes.proxy.GetDisplayNode()
    table = nodes.reference("changeColors")
    return display is not None and table is not None and display.GetColorNodeID() == table.GetID()
