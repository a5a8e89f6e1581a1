"""Image geometry in physical space: the one place where index, physical, LPS and RAS meet.

Conventions (used by every other module of steprl):

- Arrays are in numpy / torch order: ``(H, W)`` in 2D, ``(D, H, W)`` in 3D, that is the
  REVERSE of ITK's index order ``(x, y, z)``. A vector image (a displacement field) has a
  trailing component axis: ``(D, H, W, 3)``, like SimpleITK's ``GetArrayFromImage``.
- ``spacing``, ``origin`` and ``direction`` are in ITK order and in LPS millimetres, exactly as
  SimpleITK reports them: ``physical = origin + direction @ (spacing * index_xyz)``.
  ``direction`` is an ``(ndim, ndim)`` matrix whose columns are the axis directions.
- Slicer works in RAS. The conversion (flip the first two physical axes) lives in
  :func:`lps_to_ras` and :func:`ijk_to_ras_matrix` and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from steprl.errors import InputError

#: Physical LPS <-> RAS is the same flip both ways (an involution).
_LPS_RAS_FLIP = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Geometry:
    """A sampling grid in physical space.

    Attributes:
        shape: array shape in numpy order, ``(H, W)`` or ``(D, H, W)``.
        spacing: voxel size in mm, ITK order ``(x, y[, z])``.
        origin: physical LPS position (mm) of the first voxel's centre, ITK order.
        direction: ``(ndim, ndim)`` direction cosines, columns are the index axes in LPS.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        ndim = len(self.shape)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))
        object.__setattr__(self, "direction", np.asarray(self.direction, dtype=np.float64).reshape(ndim, ndim))
        if ndim not in (2, 3):
            raise InputError(f"Only 2D and 3D images are supported, got {ndim} dimensions.",
                             "Give a 2D image or a 3D volume (drop time or channel axes first).")
        if len(self.spacing) != ndim or len(self.origin) != ndim:
            raise InputError("Geometry spacing/origin length does not match the image dimension.",
                             "Check the image header.")
        if min(self.shape) < 1:
            raise InputError(f"Image has an empty axis (shape {self.shape}).", "Give a non-empty image.")
        if not all(np.isfinite(self.spacing)) or min(self.spacing) <= 0:
            raise InputError(f"Image spacing {self.spacing} is not positive and finite.", "Fix the image header.")
        if abs(np.linalg.det(self.direction)) < 1e-6:
            raise InputError("Image direction matrix is singular.", "Fix the image header.")

    # ---- basic properties -------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size_xyz(self) -> tuple[int, ...]:
        """Grid size in ITK order ``(x, y[, z])``."""
        return self.shape[::-1]

    def index_to_physical(self) -> tuple[np.ndarray, np.ndarray]:
        """``(A, b)`` with ``physical = A @ index_xyz + b`` (mm, LPS)."""
        return self.direction @ np.diag(self.spacing), np.asarray(self.origin)

    def tensor_index_to_physical(self) -> tuple[np.ndarray, np.ndarray]:
        """``(A, b)`` with ``physical = A @ index + b`` for an index in array order (d, h, w)."""
        a, b = self.index_to_physical()
        return a[:, ::-1].copy(), b

    def physical_to_tensor_index(self) -> tuple[np.ndarray, np.ndarray]:
        """``(A, b)`` with ``index (d, h, w) = A @ physical + b``."""
        a, b = self.tensor_index_to_physical()
        inv = np.linalg.inv(a)
        return inv, -inv @ b

    def center(self) -> np.ndarray:
        """Physical (LPS, mm) centre of the grid."""
        a, b = self.index_to_physical()
        return a @ ((np.asarray(self.size_xyz) - 1) / 2.0) + b

    def matches(self, other: Geometry, tol: float = 1e-4) -> bool:
        """True when both grids sample the same physical points (within ``tol`` mm)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def resized(self, shape: tuple[int, ...]) -> Geometry:
        """A grid of ``shape`` voxels covering the same voxel-centre extent, same direction.

        The first and last voxel centres stay where they are (the ``align_corners=True``
        convention), so ``spacing_new = spacing * (n - 1) / (m - 1)`` per axis.
        """
        if len(shape) != self.ndim:
            raise InputError(f"Grid {shape} has {len(shape)} axes, the image has {self.ndim}.",
                             "Use a network grid with as many axes as the image.")
        new_xyz = tuple(shape)[::-1]
        spacing = tuple(
            s * (n - 1) / (m - 1) if m > 1 and n > 1 else s * n
            for s, n, m in zip(self.spacing, self.size_xyz, new_xyz)
        )
        return Geometry(tuple(shape), spacing, self.origin, self.direction)

    def slab(self, axis: int, index: int) -> Geometry:
        """The one-voxel-thick sub-grid at ``index`` along array ``axis`` (same spacing and direction)."""
        if not 0 <= index < self.shape[axis]:
            raise ValueError(f"index {index} is outside axis {axis} of a grid of shape {self.shape}")
        shape = list(self.shape)
        shape[axis] = 1
        start = np.zeros(self.ndim)
        start[axis] = index
        a, b = self.tensor_index_to_physical()
        return Geometry(tuple(shape), self.spacing, tuple(a @ start + b), self.direction)

    def axis_aligned(self, shape: tuple[int, ...]) -> Geometry:
        """A grid of ``shape`` voxels with IDENTITY direction (LPS axes) covering this grid's extent.

        Why: a network trained on axis-aligned LPS grids (the synthesised SynthSeg heads) must
        see every input the same way up, whatever the file's voxel order (LIA coronal, RAS
        axial, oblique). The box spans the voxel-centre corners of this grid along each LPS axis
        (first and last voxel centres on the box faces, as in :meth:`resized`).
        """
        if len(shape) != self.ndim:
            raise InputError(f"Grid {shape} has {len(shape)} axes, the image has {self.ndim}.",
                             "Use a network grid with as many axes as the image.")
        a, b = self.index_to_physical()
        last = np.asarray(self.size_xyz, dtype=np.float64) - 1
        corners = np.array(np.meshgrid(*[[0.0, n] for n in last], indexing="ij")).reshape(self.ndim, -1)
        physical = a @ corners + b[:, None]
        low, high = physical.min(axis=1), physical.max(axis=1)
        new_xyz = np.asarray(tuple(shape)[::-1], dtype=np.float64)
        spacing = np.where(new_xyz > 1, (high - low) / np.maximum(new_xyz - 1, 1), 1.0)
        spacing = np.maximum(spacing, 1e-6)
        return Geometry(tuple(shape), tuple(spacing), tuple(low), tuple(np.eye(self.ndim).ravel()))

    def reordered(self, order: tuple[int, ...], flips: tuple[bool, ...]) -> Geometry:
        """The grid of the same voxels stored in another array order: new array axis ``k`` is this grid's
        axis ``order[k]``, reversed where ``flips[k]``; every voxel keeps its physical position (the
        array itself moves with ``np.flip(array.transpose(order), flipped axes)``)."""
        a, b = self.tensor_index_to_physical()  # column k: one step along array axis k
        steps = [a[:, o] * (-1.0 if f else 1.0) for o, f in zip(order, flips)]
        first = b + sum((self.shape[o] - 1) * a[:, o] for o, f in zip(order, flips) if f)
        spacing = [float(np.linalg.norm(v)) for v in steps]  # array order
        direction = np.stack([steps[-1 - c] / spacing[-1 - c] for c in range(self.ndim)], axis=1)
        return Geometry(tuple(self.shape[o] for o in order), tuple(spacing[::-1]), tuple(first), direction)

    # ---- SimpleITK --------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image) -> Geometry:
        """Geometry of a ``SimpleITK.Image`` (its size is reversed into numpy order)."""
        ndim = image.GetDimension()
        return cls(tuple(image.GetSize())[::-1], image.GetSpacing(), image.GetOrigin(),
                   np.asarray(image.GetDirection()).reshape(ndim, ndim))

    def apply_to_sitk(self, image) -> None:
        """Stamp this geometry on a ``SimpleITK.Image`` of the same size."""
        if tuple(image.GetSize()) != self.size_xyz:
            raise ValueError(f"image size {image.GetSize()} != geometry size {self.size_xyz}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.ravel()))

    def to_sitk_reference(self):
        """An empty ``SimpleITK.Image`` with this grid, for ``sitk.Resample`` references."""
        import SimpleITK as sitk

        ref = sitk.Image(list(self.size_xyz), sitk.sitkUInt8)
        self.apply_to_sitk(ref)
        return ref


@dataclass(eq=False)
class Image:
    """An array with its physical geometry (see the module docstring for axis orders).

    ``array`` is ``(H, W)`` / ``(D, H, W)`` for a scalar image, or with a trailing component
    axis ``(..., C)`` for a vector image such as a displacement field (components in LPS, ITK order).
    """

    array: np.ndarray
    geometry: Geometry

    def __post_init__(self) -> None:
        spatial = self.array.shape[: self.geometry.ndim]
        if tuple(spatial) != self.geometry.shape:
            raise ValueError(f"array shape {self.array.shape} does not match geometry shape {self.geometry.shape}")

    @property
    def ndim(self) -> int:
        return self.geometry.ndim

    @property
    def is_vector(self) -> bool:
        return self.array.ndim == self.geometry.ndim + 1

    @classmethod
    def from_sitk(cls, image) -> Image:
        import SimpleITK as sitk

        return cls(sitk.GetArrayFromImage(image), Geometry.from_sitk(image))

    def to_sitk(self):
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.array, isVector=self.is_vector)
        self.geometry.apply_to_sitk(image)
        return image


# ---- the one LPS <-> RAS conversion ---------------------------------------------------
def lps_to_ras(points_or_vectors: np.ndarray) -> np.ndarray:
    """Convert 3D physical points or vectors ``(..., 3)`` between LPS and RAS (either way).

    2D steprl images live in the plane z = 0; pad them to 3D before calling this.
    """
    arr = np.asarray(points_or_vectors, dtype=np.float64)
    return arr @ _LPS_RAS_FLIP.T


ras_to_lps = lps_to_ras


def ijk_to_ras_matrix(geometry: Geometry) -> np.ndarray:
    """The 4x4 IJK -> RAS matrix Slicer's volume nodes use, for a 3D (or 2D, as z = 0) grid."""
    a, b = geometry.index_to_physical()
    nd = geometry.ndim
    a3, b3 = np.eye(3), np.zeros(3)
    a3[:nd, :nd], b3[:nd] = a, b
    m = np.eye(4)
    m[:3, :3] = _LPS_RAS_FLIP @ a3
    m[:3, 3] = _LPS_RAS_FLIP @ b3
    return m


def geometry_from_ijk_to_ras(matrix: np.ndarray, shape: tuple[int, ...]) -> Geometry:
    """Inverse of :func:`ijk_to_ras_matrix` for a 3D grid of array ``shape`` ``(D, H, W)``."""
    m = np.asarray(matrix, dtype=np.float64)
    a = _LPS_RAS_FLIP @ m[:3, :3]
    origin = _LPS_RAS_FLIP @ m[:3, 3]
    spacing = np.linalg.norm(a, axis=0)
    return Geometry(tuple(shape), tuple(spacing), tuple(origin), a / spacing)
