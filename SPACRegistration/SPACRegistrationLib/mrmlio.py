"""Volumes and transforms in and out of MRML with Slicer's own readers, writers and resampling.

Geometry stays Slicer's business here: volumes are written by Slicer's volume storage node
(NRRD with the LPS header ITK and steprl read), and the worker's displacement fields (ITK
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
    vtkMRMLVolumeArchetypeStorageNode,
)
from steprl.errors import InputError
from vtkmodules.vtkCommonCore import VTK_FLOAT
from vtkmodules.vtkCommonMath import vtkMatrix4x4
from vtkmodules.vtkCommonTransforms import vtkGeneralTransform
from vtkmodules.vtkImagingCore import vtkImageCast, vtkImageReslice

log = logging.getLogger(__name__)

#: Attribute that marks the nodes this module created, with their role as value.
ROLE_ATTRIBUTE = "SPACRegistration.Role"


def is_own_proxy(node) -> bool:
    """Whether ``node`` is the step-transform proxy of an earlier SPAC result."""
    return node is not None and node.GetAttribute(ROLE_ATTRIBUTE) == "proxy"


def ijk_to_world(volume) -> vtkMatrix4x4:
    """IJK -> world (RAS) matrix of a volume, its linear parent transforms included.

    Raises InputError when the volume is under a non-linear transform (it cannot be written as
    one grid with a header).
    """
    matrix = vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    parent = volume.GetParentTransformNode()
    if parent is None:
        return matrix
    if not parent.IsTransformToWorldLinear():
        raise InputError(
            f"The volume '{volume.GetName()}' is under the non-linear transform '{parent.GetName()}'.",
            "Harden the transform on the volume (Data module: right-click, Harden transform) or remove it, "
            "then apply again.")
    to_world = vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    out = vtkMatrix4x4()
    vtkMatrix4x4.Multiply4x4(to_world, matrix, out)
    return out


def export_volume(volume, path: str | os.PathLike, *, ignore_parent: bool = False) -> None:
    """Write a scalar or label volume as uncompressed NRRD with its world geometry (LPS header).

    ``ignore_parent`` writes the volume's own grid (used for a moving volume that sits under
    the proxy of an earlier result: that transform is what is being replaced).
    """
    image = volume.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(f"The volume '{volume.GetName()}' has no image data.", "Load or choose another volume.")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"The volume '{volume.GetName()}' has {image.GetNumberOfScalarComponents()} components "
                         "per voxel (a colour or vector volume).",
                         "Choose a scalar (grey-level) volume, e.g. converted by the Vector to Scalar Volume module.")
    node = volume
    if not ignore_parent and volume.GetParentTransformNode() is not None:
        node = volume.NewInstance()  # a detached copy with the world geometry, sharing the voxels
        node.SetIJKToRASMatrix(ijk_to_world(volume))
        node.SetAndObserveImageData(image)
    storage = vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(0)
    if not storage.WriteData(node):
        raise InputError(f"Could not write the volume '{volume.GetName()}' to {path}.",
                         "Check that the temporary folder is writable and has free space.")


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


def volume_from_image(scene, image, name: str, *, labelmap: bool = False):
    """A new volume node in ``scene`` from a 3D ``steprl.geometry.Image`` (array (D, H, W), LPS geometry).

    For self-tests, benchmarks and scripts; the IJK-to-RAS matrix comes from
    ``steprl.geometry.ijk_to_ras_matrix``, the one place where LPS meets RAS.
    """
    import numpy as np
    from slicer import vtkMRMLLabelMapVolumeNode
    from steprl.geometry import ijk_to_ras_matrix
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonDataModel import vtkImageData

    if image.ndim != 3 or image.is_vector:
        raise InputError(f"A volume needs a 3D scalar image, got {image.array.shape}.", "Give a (D, H, W) array.")
    array = np.ascontiguousarray(image.array)
    data = vtkImageData()
    data.SetDimensions(*array.shape[::-1])
    data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    matrix = vtkMatrix4x4()
    for i, row in enumerate(ijk_to_ras_matrix(image.geometry)):
        for j, value in enumerate(row):
            matrix.SetElement(i, j, float(value))
    volume = vtkMRMLLabelMapVolumeNode() if labelmap else vtkMRMLScalarVolumeNode()
    volume.SetName(name)
    volume.SetIJKToRASMatrix(matrix)
    volume.SetAndObserveImageData(data)
    scene.AddNode(volume)
    return volume


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
