"""Grid transforms in and out of MRML with Slicer's own readers, and resampling through them.

Geometry stays Slicer's business here: volumes are written by Slicer's volume storage node
(``StepRLCommon.mrmlio``), and the worker's displacement fields (ITK
displacement fields, LPS, pull-back) are read by Slicer's transform storage node, which turns
them into a RAS grid transform FROM the parent, the convention of DESIGN.md. No LPS/RAS
arithmetic happens in this module.

Resampling (:func:`resample_volume`) chains the same pieces as Slicer's slice views: the
reference grid's IJK-to-world matrix, the transform from world to the moving volume's
coordinates (``vtkMRMLTransformNode.GetTransformBetweenNodes``), and the moving IJK matrix,
evaluated by ``vtkImageReslice`` (trilinear).
"""

from __future__ import annotations

import logging
import os

from slicer import (
    vtkMRMLGridTransformNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLTransformNode,
    vtkMRMLTransformStorageNode,
)
from vtkmodules.vtkCommonCore import VTK_FLOAT
from vtkmodules.vtkCommonMath import vtkMatrix4x4
from vtkmodules.vtkCommonTransforms import vtkGeneralTransform
from vtkmodules.vtkImagingCore import vtkImageCast, vtkImageReslice

from StepRLCommon.mrmlio import ijk_to_world, role_attribute

log = logging.getLogger(__name__)

__all__ = ["FLOAT", "ROLE_ATTRIBUTE", "copy_grid_transform", "is_own_proxy", "read_grid_transform",
           "resample_volume"]

#: Attribute that marks the nodes this module created, with their role as value.
ROLE_ATTRIBUTE = role_attribute("SPACRegistration")


def is_own_proxy(node) -> bool:
    """Whether ``node`` is the step-transform proxy of an earlier SPAC result."""
    return node is not None and node.GetAttribute(ROLE_ATTRIBUTE) == "proxy"


def read_grid_transform(path: str | os.PathLike) -> vtkMRMLGridTransformNode:
    """A grid transform node (not in any scene) from a displacement-field file written by the worker.

    Slicer's reader converts the ITK field (LPS, resampling direction) into a RAS grid
    transform FROM the parent. The grid is stored as float32 (half the memory of the double
    grid the reader makes) and interpolated linearly, as steprl and ITK do.
    """
    storage = vtkMRMLTransformStorageNode()
    storage.SetFileName(str(path))
    node = vtkMRMLGridTransformNode()
    if not storage.ReadData(node):
        raise OSError(f"Slicer could not read the displacement field {path}")
    transform = node.GetTransformFromParent()
    if transform is None or not hasattr(transform, "GetDisplacementGrid") or transform.GetDisplacementGrid() is None:
        raise OSError(f"{path} did not load as a grid transform")
    cast = vtkImageCast()
    cast.SetOutputScalarTypeToFloat()
    cast.SetInputData(transform.GetDisplacementGrid())
    cast.Update()
    transform.SetDisplacementGridData(cast.GetOutput())
    transform.SetInterpolationModeToLinear()
    return node


def copy_grid_transform(source, name: str, scene) -> vtkMRMLGridTransformNode:
    """A new grid transform node in ``scene`` holding a deep copy of ``source``'s transform."""
    node = vtkMRMLGridTransformNode()
    node.CopyContent(source, True)
    node.SetName(name)
    scene.AddNode(node)
    return node


def resample_volume(moving, reference, transform: vtkMRMLTransformNode | None, scene, name: str,
                    *, scalar_type: int | None = None) -> vtkMRMLScalarVolumeNode:
    """``moving`` as seen through ``transform``, resampled onto ``reference``'s grid, as a new volume.

    Each reference voxel centre ``x`` (world) takes the moving value at ``T(x)``, where ``T`` is
    the transform from world to ``transform``'s coordinates (its FromParent chain): exactly what
    a slice view shows when ``moving`` is under ``transform``. Trilinear, 0 outside. The result
    has the reference's world geometry and, unless ``scalar_type`` (a VTK type) is given, the
    moving volume's voxel type.
    """
    chain = vtkGeneralTransform()
    chain.PostMultiply()
    chain.Concatenate(ijk_to_world(reference))
    if transform is not None:
        world_to_node = vtkGeneralTransform()
        vtkMRMLTransformNode.GetTransformBetweenNodes(None, transform, world_to_node)
        chain.Concatenate(world_to_node)
    ras_to_ijk = vtkMatrix4x4()
    moving.GetRASToIJKMatrix(ras_to_ijk)
    chain.Concatenate(ras_to_ijk)

    reslice = vtkImageReslice()
    reslice.SetInputData(moving.GetImageData())
    reslice.SetResliceTransform(chain)
    reslice.SetInterpolationModeToLinear()
    reslice.SetBackgroundLevel(0.0)
    reslice.SetOutputOrigin(0.0, 0.0, 0.0)
    reslice.SetOutputSpacing(1.0, 1.0, 1.0)
    reslice.SetOutputExtent(reference.GetImageData().GetExtent())
    reslice.SetOutputScalarType(moving.GetImageData().GetScalarType() if scalar_type is None else scalar_type)
    reslice.Update()

    volume = vtkMRMLScalarVolumeNode()
    volume.SetName(name)
    volume.SetIJKToRASMatrix(ijk_to_world(reference))
    volume.SetAndObserveImageData(reslice.GetOutput())
    scene.AddNode(volume)
    return volume


#: Re-exported for callers that want float output from :func:`resample_volume`.
FLOAT = VTK_FLOAT
