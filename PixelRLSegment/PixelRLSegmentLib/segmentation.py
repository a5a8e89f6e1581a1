"""Segmentation nodes in and out: the kept step as a ``vtkMRMLSegmentationNode``, the reference as a labelmap.

Both go through Slicer's segmentations logic (``vtkSlicerSegmentationsModuleLogic``), so what a
user exports from the output segmentation is what the worker computed, voxel for voxel:

- :func:`keep`: a new segmentation node ``<input> PixelRL step N`` with one named, coloured
  segment (terminology when the model card gives one) imported from the step's mask; its
  reference image geometry is the input volume's, it sits under the input's parent transform and
  beside the input in the subject hierarchy; optionally a labelmap volume exported from it on the
  input's grid.
- :func:`export_reference`: a reference segmentation (every segment: their union is the object)
  or labelmap volume written as a labelmap file on the input's grid, for the worker's per-step Dice.
"""

from __future__ import annotations

import logging
import os

from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLSegmentationNode,
    vtkSegmentation,
    vtkSlicerSegmentationsModuleLogic,
)
from steprl.errors import InputError

from StepRLCommon import hierarchy
from StepRLCommon.mrmlio import export_volume, voxel_array

from .steps import SegmentInfo, copy_geometry, decode

log = logging.getLogger(__name__)


def _binary_labelmap(item, volume) -> vtkMRMLLabelMapVolumeNode:
    """A labelmap (not in a scene) with the 0/1 mask of a sequence item, on ``volume``'s grid."""
    from vtkmodules.vtkCommonDataModel import vtkImageData

    data = vtkImageData()
    data.DeepCopy(item.GetImageData())
    node = vtkMRMLLabelMapVolumeNode()
    node.SetAndObserveImageData(data)
    values = voxel_array(node)
    values[...] = decode(values)
    data.Modified()
    copy_geometry(node, volume)
    return node


def _same_parent(node, volume) -> None:
    parent = volume.GetParentTransformNode()
    node.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)


def keep(item, volume, scene, name: str, segment: SegmentInfo, *, labelmap: bool = False):
    """The output nodes of one step's item labelmap (see the module docstring).

    Returns ``(segmentation_node, labelmap_node_or_None)``, new nodes in ``scene`` owned by the
    user (deleting the result does not touch them).
    """
    mask = _binary_labelmap(item, volume)
    node = vtkMRMLSegmentationNode()
    node.SetName(scene.GenerateUniqueName(name))
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    _same_parent(node, volume)
    segmentation = node.GetSegmentation()
    if voxel_array(mask).any():
        if not vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(mask, node):
            scene.RemoveNode(node)
            raise InputError(f"Slicer could not import the mask of '{name}' into a segmentation.",
                             "Try again; if it happens again, report it with the Slicer log.")
        segment_id = segmentation.GetNthSegmentID(0)
    else:  # an empty mask imports nothing: keep a named, empty segment
        segment_id = segmentation.AddEmptySegment("", segment.name, segment.color)
    out = segmentation.GetSegment(segment_id)
    out.SetName(segment.name)
    out.SetColor(*segment.color)
    if segment.terminology:
        out.SetTerminology(segment.terminology)
    hierarchy.place(node, hierarchy.parent_of(volume))

    volume_out = None
    if labelmap:
        volume_out = vtkMRMLLabelMapVolumeNode()
        volume_out.SetName(scene.GenerateUniqueName(f"{name} labelmap"))
        scene.AddNode(volume_out)
        export_labelmap(node, volume, volume_out)
        _same_parent(volume_out, volume)
        hierarchy.place(volume_out, hierarchy.parent_of(volume))
    return node, volume_out


def export_labelmap(segmentation_node, volume, labelmap_node) -> None:
    """Every segment of ``segmentation_node`` into ``labelmap_node`` (in a scene) on ``volume``'s whole grid.

    Segment k of the segmentation becomes label k (1, 2, ...); the labelmap takes ``volume``'s own
    geometry.
    """
    ids = segmentation_node.GetSegmentation().GetSegmentIDs()
    if not vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap_node, volume, vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
        raise InputError(f"Slicer could not export the segmentation '{segmentation_node.GetName()}' to a labelmap.",
                         "Check that it has segments, or choose a labelmap volume instead.")


def export_reference(reference, volume, path: str | os.PathLike) -> None:
    """Write a reference segmentation or labelmap volume as a labelmap file (> 0 = object) for the worker.

    A labelmap volume is written as it is (any grid: the worker resamples it onto the input in
    physical space); a segmentation is first exported on the input's grid. Nothing stays in the
    scene.
    """
    if reference.IsA("vtkMRMLLabelMapVolumeNode"):
        export_volume(reference, path)
        return
    scene = reference.GetScene()
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    temporary = vtkMRMLLabelMapVolumeNode()
    temporary.SetName(scene.GenerateUniqueName(f"{reference.GetName()} reference"))
    scene.AddNode(temporary)
    try:
        export_labelmap(reference, volume, temporary)
        parent = volume.GetParentTransformNode()  # the labelmap is on the input's own grid
        temporary.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)
        export_volume(temporary, path)
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in before:
                scene.RemoveNode(node)
