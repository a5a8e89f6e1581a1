"""Volumes in and out of MRML with Slicer's own readers and writers (shared by the StepRL modules).

Geometry stays Slicer's business here: volumes are written by Slicer's volume storage node (NRRD
with the LPS header ITK and steprl read) and the worker's masks are read back by the same storage
node, which turns the LPS header into the node's RAS IJK-to-RAS matrix. No LPS/RAS arithmetic
happens in this module (:func:`volume_from_image` uses ``steprl.geometry.ijk_to_ras_matrix``, the
one place where LPS meets RAS).
"""

from __future__ import annotations

import logging
import os

from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLVolumeArchetypeStorageNode
from steprl.errors import InputError
from vtkmodules.vtkCommonMath import vtkMatrix4x4

log = logging.getLogger(__name__)


def role_attribute(module: str) -> str:
    """The node attribute that marks the nodes ``module`` created, with their role as value."""
    return f"{module}.Role"


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


def read_labelmap(path: str | os.PathLike) -> vtkMRMLLabelMapVolumeNode:
    """A labelmap volume node (not in any scene) read by Slicer's own reader from a worker mask file.

    Raises OSError when Slicer cannot read it.
    """
    storage = vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    node = vtkMRMLLabelMapVolumeNode()
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise OSError(f"Slicer could not read the mask {path}")
    return node


def volume_from_image(scene, image, name: str, *, labelmap: bool = False):
    """A new volume node in ``scene`` from a 3D ``steprl.geometry.Image`` (array (D, H, W), LPS geometry).

    For self-tests, benchmarks and scripts; the IJK-to-RAS matrix comes from
    ``steprl.geometry.ijk_to_ras_matrix``, the one place where LPS meets RAS.
    """
    import numpy as np
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


def voxel_array(volume):
    """A volume's voxels as a numpy view ``(D, H, W)`` (k, j, i order, as ``slicer.util.arrayFromVolume``)."""
    from vtkmodules.util import numpy_support

    data = volume.GetImageData()
    return numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(data.GetDimensions()[::-1])
