"""Geometry acceptance tests: known physical transforms through files, RAS, composition, register().

The issue's acceptance wording: "a moving image that is the fixed one moved by a known physical
transform, with oblique directions, anisotropic spacing, different grids and LPS files: a field
built from the known transform warps it back within interpolation error; composition of a field
with zero is the identity; warping by the composed field equals warping twice, within tolerance."

The test images are ANALYTIC (a sum of Gaussian blobs plus a ramp, defined in physical LPS mm),
so a resampled voxel is compared with the exact value at its physical point, not only with
another resampler. Expected points are computed here in numpy from spacing/origin/direction
(``p = origin + direction @ (spacing * index_xyz)``), independently of ``steprl.spatial``, and
cross-checked against SimpleITK.

Tolerances: trilinear interpolation of a Gaussian of width ``sigma`` on a grid of spacing ``h``
errs by at most about ``h**2 / (8 * sigma**2)`` of its amplitude per axis (the ramp is
interpolated exactly). With ``h <= 1.6`` mm and ``sigma >= 6.5`` mm that is <= 0.8% per axis,
so 2% of the intensity range bounds the error with margin, while every wrong mapping tried
(no transform, the inverse transform) is off by more than 10 times that.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from steprl import io, spatial
from steprl.errors import InputError
from steprl.geometry import Geometry, Image, geometry_from_ijk_to_ras, ijk_to_ras_matrix, lps_to_ras

#: Allowed interpolation error, as a fraction of the image's intensity range (see module docstring).
INTERP_TOL = 0.02
#: Two implementations of the same trilinear sampling differ by float32 rounding only.
SAME_MATH_TOL = 1e-4
#: An image interpolated twice (resampled onto a grid, then warped on it): two interpolation errors.
DOUBLE_INTERP_TOL = 2 * INTERP_TOL


# ---- analytic images and grids --------------------------------------------------------
def rotation(ndim: int, degrees: float, axis: tuple[float, float, float] = (1.0, 2.0, 3.0)) -> np.ndarray:
    """A rotation matrix: in 2D by ``degrees``; in 3D about ``axis`` (Rodrigues)."""
    t = np.radians(degrees)
    if ndim == 2:
        return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(t) * kx + (1.0 - np.cos(t)) * kx @ kx


def physical_points(geom: Geometry) -> np.ndarray:
    """LPS mm of every voxel centre, ``(*shape, ndim)`` (components x, y[, z]), from the header only."""
    index_xyz = np.moveaxis(np.indices(geom.shape)[::-1], 0, -1).astype(np.float64)
    matrix = geom.direction @ np.diag(geom.spacing)
    return index_xyz @ matrix.T + np.asarray(geom.origin)


def continuous_index_xyz(geom: Geometry, points: np.ndarray) -> np.ndarray:
    """ITK continuous index ``(..., ndim)`` of physical points ``(..., ndim)``."""
    matrix = geom.direction @ np.diag(geom.spacing)
    return (points - np.asarray(geom.origin)) @ np.linalg.inv(matrix).T


def inside(geom: Geometry, points: np.ndarray) -> np.ndarray:
    """Mask of the points that lie within the grid's voxel-centre extent (no extrapolation needed)."""
    idx = continuous_index_xyz(geom, points)
    upper = np.asarray(geom.size_xyz) - 1
    return np.all((idx >= -1e-6) & (idx <= upper + 1e-6), axis=-1)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    nd = points.shape[-1]
    return points @ matrix[:nd, :nd].T + matrix[:nd, nd]


def corners(geom: Geometry) -> np.ndarray:
    """Physical LPS points of the grid's 2**ndim corner voxel centres, ``(2**ndim, ndim)``."""
    grid = np.meshgrid(*[[0, n - 1] for n in geom.size_xyz], indexing="ij")
    index = np.stack([g.ravel() for g in grid], axis=-1).astype(np.float64)
    return index @ (geom.direction @ np.diag(geom.spacing)).T + np.asarray(geom.origin)


def covering_grid(points: np.ndarray, direction: np.ndarray, spacing: tuple[float, ...], margin: float) -> Geometry:
    """A grid with ``direction`` (orthonormal) and ``spacing`` whose voxel centres cover ``points``."""
    local = points @ direction  # coordinates along the direction columns
    lo, hi = local.min(axis=0) - margin, local.max(axis=0) + margin
    size_xyz = np.ceil((hi - lo) / np.asarray(spacing)).astype(int) + 1
    return Geometry(tuple(int(n) for n in size_xyz[::-1]), spacing, tuple(direction @ lo), direction)


@dataclass(frozen=True)
class Blobs:
    """A smooth image defined at any physical point: background + Gaussian blobs + a weak ramp."""

    centres: np.ndarray  # (K, ndim) mm, LPS
    sigmas: np.ndarray  # (K,) mm
    amplitudes: np.ndarray  # (K,)
    ramp: np.ndarray  # (ndim,) intensity per mm

    def __call__(self, points: np.ndarray) -> np.ndarray:
        d2 = ((points[..., None, :] - self.centres) ** 2).sum(-1)
        blobs = (self.amplitudes * np.exp(-d2 / (2.0 * self.sigmas**2))).sum(-1)
        return 0.1 + blobs + (points - self.centres[0]) @ self.ramp


@dataclass(frozen=True)
class Scenario:
    """A fixed grid, a different moving grid, and the known transform T (fixed point -> moving point)."""

    fixed: Geometry
    moving: Geometry
    transform: np.ndarray  # (ndim + 1, ndim + 1), LPS mm
    image: Blobs

    @property
    def ndim(self) -> int:
        return self.fixed.ndim

    def fixed_image(self) -> Image:
        return Image(self.image(physical_points(self.fixed)).astype(np.float32), self.fixed)

    def moving_image(self) -> Image:
        """``moving(p) = fixed(T^-1 p)``, so that ``moving(T(x)) = fixed(x)``."""
        back = apply_affine(np.linalg.inv(self.transform), physical_points(self.moving))
        return Image(self.image(back).astype(np.float32), self.moving)


@cache
def scenario(ndim: int) -> Scenario:
    """Oblique, anisotropic fixed grid (right-handed); moving grid with another size, spacing,
    origin and a LEFT-handed oblique direction; T a rotation + small shear/scale + translation."""
    if ndim == 3:
        fixed = Geometry((18, 22, 26), (1.0, 1.3, 2.1), (-12.0, 8.5, -20.0), rotation(3, 25, (1.0, 2.0, 3.0)))
        shear = np.array([[0.06, 0.03, -0.02], [0.01, -0.04, 0.05], [-0.03, 0.02, 0.03]])
        linear = rotation(3, 12, (-2.0, 1.0, 0.5)) @ (np.eye(3) + shear)
        shift = np.array([3.5, -2.0, 4.0])
        moving_dir = rotation(3, -35, (0.3, -1.0, 2.0)) @ np.diag([1.0, 1.0, -1.0])
        moving_spacing = (1.6, 1.2, 1.5)
        offsets = np.array([[0.0, 0.0, 0.0], [7.0, -5.0, 6.0], [-6.0, 6.0, -8.0], [4.0, 7.0, -3.0]])
        ramp = np.array([0.004, -0.003, 0.002])
    else:
        fixed = Geometry((30, 26), (1.0, 1.7), (-14.0, 22.5), rotation(2, 30))
        linear = rotation(2, 9) @ (np.eye(2) + np.array([[0.05, 0.03], [-0.02, 0.04]]))
        shift = np.array([2.5, -3.0])
        moving_dir = rotation(2, -50) @ np.diag([1.0, -1.0])
        moving_spacing = (1.4, 1.1)
        offsets = np.array([[0.0, 0.0], [7.0, -5.0], [-6.0, 6.0], [5.0, 8.0]])
        ramp = np.array([0.004, -0.003])
    centre = fixed.center()
    transform = np.eye(ndim + 1)
    transform[:ndim, :ndim] = linear
    transform[:ndim, ndim] = centre + shift - linear @ centre  # T(x) = L (x - c) + c + t
    moving = covering_grid(apply_affine(transform, corners(fixed)), moving_dir, moving_spacing, margin=1.5)
    blobs = Blobs(centre + offsets, np.array([7.0, 6.5, 8.0, 6.5]), np.array([1.0, 0.7, 0.5, -0.4]), ramp)
    return Scenario(fixed, moving, transform, blobs)


def as_tensor(array: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    """numpy scalar image ``(*S)`` -> torch ``(1, 1, *S)``."""
    return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype)[None, None]


def field_tensor(array: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    """numpy field ``(*S, ndim)`` -> torch ``(1, ndim, *S)``."""
    return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype).movedim(-1, 0)[None]


def itk_affine(matrix: np.ndarray) -> sitk.AffineTransform:
    nd = matrix.shape[0] - 1
    tx = sitk.AffineTransform(nd)
    tx.SetMatrix(tuple(matrix[:nd, :nd].ravel()))
    tx.SetTranslation(tuple(matrix[:nd, nd]))
    return tx


def itk_field_transform(path: Path) -> sitk.DisplacementFieldTransform:
    return sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))


# ---- 1. known physical transform, end to end through files ----------------------------
@pytest.mark.parametrize("ndim", [2, 3])
def test_known_transform_through_files_is_undone(tmp_path: Path, ndim: int) -> None:
    sc = scenario(ndim)
    fixed_path = io.write_image(sc.fixed_image(), tmp_path / "fixed.nii.gz")
    moving_path = io.write_image(sc.moving_image(), tmp_path / "moving.nrrd")
    fixed, moving = io.read_image(fixed_path), io.read_image(moving_path)
    assert fixed.geometry.matches(sc.fixed, tol=1e-4) and moving.geometry.matches(sc.moving, tol=1e-4)
    assert np.linalg.det(moving.geometry.direction) < 0  # the left-handed grid survived the file

    fixed_pts = physical_points(fixed.geometry)
    truth = sc.image(fixed_pts)
    span = float(truth.max() - truth.min())
    tol = INTERP_TOL * span
    mapped = apply_affine(sc.transform, fixed_pts)
    mask = inside(moving.geometry, mapped)
    assert mask.mean() > 0.9
    m = as_tensor(moving.array)

    # The field d(x) = T(x) - x, on a THIRD, coarser grid covering the fixed image.
    field_geom = fixed.geometry.resized((7, 8, 9)[:ndim])
    field_pts = physical_points(field_geom)
    d = apply_affine(sc.transform, field_pts) - field_pts
    on_fixed = spatial.resample(field_tensor(d), field_geom, fixed.geometry)  # a linear field: exact
    assert np.abs(on_fixed[0].movedim(0, -1).numpy() - (mapped - fixed_pts)).max() < 1e-3

    # (a) steprl resampling through the physical field undoes T.
    out = spatial.resample(m, moving.geometry, fixed.geometry, displacement=on_fixed)[0, 0].numpy()
    assert np.abs(out - truth)[mask].max() < tol

    # The check has power: no transform, or the inverse one (push instead of pull), is far off.
    none = spatial.resample(m, moving.geometry, fixed.geometry)[0, 0].numpy()
    inverse = spatial.resample(m, moving.geometry, fixed.geometry, affine=np.linalg.inv(sc.transform))[0, 0].numpy()
    assert np.abs(none - truth)[mask].max() > 10 * tol
    assert np.abs(inverse - truth)[mask].max() > 10 * tol

    # (b) the field as a file, applied by ITK (DisplacementFieldTransform), gives the same image.
    for ext in (".nii.gz", ".nrrd"):
        field_path = io.write_displacement_field(Image(d, field_geom), tmp_path / f"field{ext}")
        back = io.read_displacement_field(field_path)
        assert back.geometry.matches(field_geom, tol=1e-4) and np.allclose(back.array, d, atol=1e-5)
        itk = sitk.Resample(sitk.ReadImage(str(moving_path), sitk.sitkFloat32), sitk.ReadImage(str(fixed_path)),
                            itk_field_transform(field_path), sitk.sitkLinear, 0.0)
        itk_out = sitk.GetArrayFromImage(itk)
        assert np.abs(itk_out - out)[mask].max() < SAME_MATH_TOL * span, ext
        assert np.abs(itk_out - truth)[mask].max() < tol, ext

    # (c) the homogeneous matrix of T as `affine=` instead of a field; ITK's affine agrees.
    out_affine = spatial.resample(m, moving.geometry, fixed.geometry, affine=sc.transform)[0, 0].numpy()
    assert np.abs(out_affine - truth)[mask].max() < tol
    assert np.abs(out_affine - out)[mask].max() < SAME_MATH_TOL * span
    itk_affine_out = sitk.GetArrayFromImage(sitk.Resample(moving.to_sitk(), fixed.geometry.to_sitk_reference(),
                                                          itk_affine(sc.transform), sitk.sitkLinear, 0.0,
                                                          sitk.sitkFloat32))
    assert np.abs(itk_affine_out - out_affine)[mask].max() < SAME_MATH_TOL * span


def smooth_physical_field(points: np.ndarray) -> np.ndarray:
    """A smooth, non-linear physical displacement (mm) ``(..., ndim)`` at LPS points ``(..., ndim)``."""
    nd = points.shape[-1]
    comps = [2.0 * np.sin(points[..., (k + 1) % nd] / 9.0 + k) for k in range(nd)]
    return np.stack(comps, axis=-1)


@pytest.mark.parametrize("ndim", [2, 3])
def test_total_displacement_matches_analytic_composition(ndim: int) -> None:
    """(d) total_displacement(u, ref, A) is d(x) = A(x + u(x)) - x, and resampling by it equals
    resampling by (u, A), which is also ITK's composite transform [A, then-applied-first u]."""
    sc = scenario(ndim)
    ref = sc.fixed
    pts = physical_points(ref)
    u = smooth_physical_field(pts)
    expected = apply_affine(sc.transform, pts + u) - pts
    total = spatial.total_displacement(field_tensor(u, torch.float64), ref, sc.transform)
    assert total.shape == (1, ndim, *ref.shape)
    assert np.abs(total[0].movedim(0, -1).numpy() - expected).max() < 1e-9
    # Without an affine, u itself.
    assert torch.equal(spatial.total_displacement(field_tensor(u), ref, None), field_tensor(u))

    moving = sc.moving_image()
    m = as_tensor(moving.array)
    by_pair = spatial.resample(m, sc.moving, ref, displacement=field_tensor(u), affine=sc.transform)[0, 0].numpy()
    by_total = spatial.resample(m, sc.moving, ref, displacement=total.float())[0, 0].numpy()
    span = float(moving.array.max() - moving.array.min())
    mask = inside(sc.moving, pts + expected)
    assert mask.mean() > 0.5
    assert np.abs(by_pair - by_total)[mask].max() < SAME_MATH_TOL * span
    # ITK: CompositeTransform applies its LAST transform first: x -> A(x + u(x)).
    composite = sitk.CompositeTransform([itk_affine(sc.transform),
                                         sitk.DisplacementFieldTransform(Image(u, ref).to_sitk())])
    itk_out = sitk.GetArrayFromImage(sitk.Resample(moving.to_sitk(), ref.to_sitk_reference(), composite,
                                                   sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    assert np.abs(itk_out - by_pair)[mask].max() < SAME_MATH_TOL * span
    # ... and the reversed order (u applied after A) is measurably different.
    swapped = spatial.total_displacement(None, ref, sc.transform)[0].movedim(0, -1).numpy()
    swapped = swapped + smooth_physical_field(pts + swapped)
    assert np.abs(swapped - expected).max() > 0.5


# ---- 2. Slicer / RAS ------------------------------------------------------------------
def _nifti_ras_matrices(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The (sform, qform) voxel -> RAS 4x4 matrices parsed from a NIfTI-1 header (no nibabel, no ITK)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read(348)
    end = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    qform_code, sform_code = struct.unpack(end + "hh", raw[252:256])
    assert qform_code > 0 and sform_code > 0, (qform_code, sform_code)
    pixdim = struct.unpack(end + "8f", raw[76:108])
    b, c, d, qx, qy, qz = struct.unpack(end + "6f", raw[256:280])
    a = np.sqrt(max(0.0, 1.0 - b * b - c * c - d * d))
    rot = np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - b * b - c * c],
    ])
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    qform = np.eye(4)
    qform[:3, :3] = rot @ np.diag([pixdim[1], pixdim[2], qfac * pixdim[3]])
    qform[:3, 3] = (qx, qy, qz)
    sform = np.eye(4)
    sform[:3] = np.array(struct.unpack(end + "12f", raw[280:328])).reshape(3, 4)
    return sform, qform


@pytest.mark.parametrize("which", ["fixed", "moving"])
def test_ijk_to_ras_round_trip_and_corner(which: str) -> None:
    geom = getattr(scenario(3), which)
    m = ijk_to_ras_matrix(geom)
    assert np.array_equal(m[3], [0.0, 0.0, 0.0, 1.0])
    ox, oy, oz = geom.origin
    assert np.allclose(m @ [0, 0, 0, 1], [-ox, -oy, oz, 1.0], atol=1e-12)
    # Every corner voxel: Slicer's RAS = ITK's LPS physical point with x and y negated.
    ref = geom.to_sitk_reference()
    for ijk in np.ndindex(2, 2, 2):
        index = [int(i * (n - 1)) for i, n in zip(ijk, geom.size_xyz)]
        lps = np.asarray(ref.TransformIndexToPhysicalPoint(index))
        assert np.allclose((m @ [*index, 1])[:3], [-lps[0], -lps[1], lps[2]], atol=1e-9)
        assert np.allclose(lps_to_ras(lps), [-lps[0], -lps[1], lps[2]])
    back = geometry_from_ijk_to_ras(m, geom.shape)
    assert back.matches(geom, tol=1e-9)
    assert np.allclose(back.direction, geom.direction, atol=1e-12)


def test_ijk_to_ras_2d_lies_in_the_z0_plane() -> None:
    geom = scenario(2).fixed
    m = ijk_to_ras_matrix(geom)
    a, b = geom.index_to_physical()
    assert np.allclose(m[:3, 2], [0.0, 0.0, 1.0]) and m[2, 3] == 0.0
    ras = m @ [3.0, 5.0, 0.0, 1.0]
    lps = a @ [3.0, 5.0] + b
    assert np.allclose(ras[:3], [-lps[0], -lps[1], 0.0])


@pytest.mark.parametrize("which,name", [("fixed", "f.nii.gz"), ("moving", "m.nii")])
def test_nifti_written_by_io_has_slicer_ras_geometry(tmp_path: Path, which: str, name: str) -> None:
    """The voxel -> RAS matrix stored in the NIfTI header (what nibabel and Slicer see) is
    ``ijk_to_ras_matrix``: the LPS -> RAS flip happened exactly once on the way to the file."""
    sc = scenario(3)
    image = sc.fixed_image() if which == "fixed" else sc.moving_image()
    path = io.write_image(image, tmp_path / name)
    expected = ijk_to_ras_matrix(image.geometry)
    sform, qform = _nifti_ras_matrices(path)
    assert np.allclose(sform, expected, atol=1e-4)
    assert np.allclose(qform, expected, atol=1e-4)
    assert np.allclose(sform[:3, 3], lps_to_ras(np.asarray(image.geometry.origin)), atol=1e-4)
    try:
        import nibabel
    except ImportError:
        return  # the header parse above already checked what nibabel would report
    assert np.allclose(nibabel.load(str(path)).affine, expected, atol=1e-4)


# ---- 3. composition -------------------------------------------------------------------
def smooth_voxel_field(shape: tuple[int, ...], amplitude: float, phase: float) -> torch.Tensor:
    """A smooth voxel displacement ``(1, ndim, *shape)`` of about ``amplitude`` voxels."""
    coords = spatial.identity_coords(shape, dtype=torch.float64)[0]
    nd = len(shape)
    comps = [amplitude * torch.sin(coords[(k + 1) % nd] / 5.0 + phase * (k + 1))
             * torch.cos(coords[(k + 2) % nd] / 7.0 - phase) for k in range(nd)]
    return torch.stack(comps)[None].float()


def voxel_blobs(shape: tuple[int, ...]) -> torch.Tensor:
    """A smooth image ``(1, 1, *shape)`` on a voxel grid (blobs of width 5-6 voxels)."""
    coords = spatial.identity_coords(shape, dtype=torch.float64)[0]
    centre = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64).view(-1, *([1] * len(shape)))
    out = torch.zeros(shape, dtype=torch.float64)
    for shift, sigma, amp in (((0, 0, 0), 6.0, 1.0), ((3, -4, 2), 5.0, 0.6), ((-4, 3, -3), 5.5, -0.5)):
        s = torch.tensor(shift[: len(shape)], dtype=torch.float64).view_as(centre)
        out = out + amp * torch.exp(-((coords - centre - s) ** 2).sum(0) / (2 * sigma**2))
    return out[None, None].float()


def interior(shape: tuple[int, ...], margin: int) -> tuple[slice, ...]:
    return (slice(None), slice(None)) + tuple(slice(margin, n - margin) for n in shape)


@pytest.mark.parametrize("shape", [(40, 36), (22, 26, 20)])
def test_compose_with_zero_is_identity(shape: tuple[int, ...]) -> None:
    a = smooth_voxel_field(shape, 2.5, 0.3)
    zero = torch.zeros_like(a)
    assert torch.allclose(spatial.compose(zero, a), a, atol=1e-6, rtol=0)
    assert torch.allclose(spatial.compose(a, zero), a, atol=1e-5, rtol=0)
    img = voxel_blobs(shape)
    assert torch.allclose(spatial.warp(img, zero), img, atol=1e-6)


@pytest.mark.parametrize("shape", [(40, 36), (26, 28, 24)])
def test_warp_by_composed_equals_warping_twice(shape: tuple[int, ...]) -> None:
    """``warp(m, compose(u1, u2)) == warp(warp(m, u1), u2)`` (u1 first, then u2), on interior
    voxels (every sampled point inside the grid); the swapped order is measurably different."""
    img = voxel_blobs(shape)
    u1 = smooth_voxel_field(shape, 3.0, 0.3)
    u2 = smooth_voxel_field(shape, 3.0, 1.7)
    twice = spatial.warp(spatial.warp(img, u1), u2)
    composed = spatial.warp(img, spatial.compose(u1, u2))
    swapped = spatial.warp(img, spatial.compose(u2, u1))
    inner = interior(shape, 7)  # |u1| + |u2| <= 6 voxels: no sample needs padding
    span = float(img.max() - img.min())
    # Interpolating blobs 5-6 voxels wide twice errs by about 1% of the range (measured 0.9-1.1%);
    # the swapped order is off by 11-21%.
    assert (composed - twice)[inner].abs().max() < 0.025 * span
    assert (swapped - twice)[inner].abs().max() > 0.06 * span


@pytest.mark.parametrize("ndim", [2, 3])
def test_compose_of_affine_voxel_fields_is_exact_pullback(ndim: int) -> None:
    """For linear maps phi_i(x) = A_i x + b_i, compose(u1, u2) = phi1(phi2(x)) - x exactly
    (trilinear interpolation of a linear field is exact), not phi2(phi1(x)) - x."""
    shape = (30, 28) if ndim == 2 else (20, 22, 18)
    a1 = rotation(ndim, 15) @ np.diag([1.1, 0.9, 1.0][:ndim])
    a2 = np.eye(ndim) + np.array([[0.0, 0.15, -0.05], [0.0, 0.0, 0.1], [0.05, -0.1, 0.0]])[:ndim, :ndim]
    centre = np.array([(n - 1) / 2 for n in shape])
    b1 = centre - a1 @ centre + np.array([1.5, -1.0, 0.5][:ndim])
    b2 = centre - a2 @ centre + np.array([-1.0, 0.5, 1.5][:ndim])
    x = np.moveaxis(np.indices(shape), 0, -1).astype(np.float64)  # array-order voxel indices

    def field(a, b):
        return field_tensor(x @ a.T + b - x)

    composed = spatial.compose(field(a1, b1), field(a2, b2))[0].movedim(0, -1).numpy()
    right = (x @ a2.T + b2) @ a1.T + b1 - x  # phi1(phi2(x)) - x
    wrong = (x @ a1.T + b1) @ a2.T + b2 - x  # phi2(phi1(x)) - x
    inner = tuple(slice(6, n - 6) for n in shape)
    inside_grid = (x @ a2.T + b2)[inner]
    assert np.all((inside_grid >= 0) & (inside_grid <= np.asarray(shape) - 1))  # phi2(x) needs no padding
    assert np.abs(composed - right)[inner].max() < 1e-4
    assert np.abs(composed - wrong)[inner].max() > 0.5


# ---- 4. voxel <-> physical displacement -----------------------------------------------
@pytest.mark.parametrize("ndim", [2, 3])
def test_voxel_physical_displacement_conversions(ndim: int) -> None:
    geom = scenario(ndim).moving  # oblique, anisotropic, left-handed
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(2, ndim, *geom.shape, generator=gen, dtype=torch.float64)
    assert torch.allclose(spatial.physical_to_voxel(spatial.voxel_to_physical(u, geom), geom), u, atol=1e-10)
    assert torch.allclose(spatial.voxel_to_physical(spatial.physical_to_voxel(u, geom), geom), u, atol=1e-10)
    ref = geom.to_sitk_reference()
    start = [1] * ndim
    for k in range(ndim):  # one voxel along ARRAY axis k = ITK axis ndim - 1 - k
        itk_axis = ndim - 1 - k
        e = torch.zeros(1, ndim, *geom.shape, dtype=torch.float64)
        e[:, k] = 1.0
        phys = spatial.voxel_to_physical(e, geom)[0].movedim(0, -1).reshape(-1, ndim).numpy()
        expected = geom.spacing[itk_axis] * geom.direction[:, itk_axis]
        assert np.allclose(phys, expected, atol=1e-12)
        step = list(start)
        step[itk_axis] += 1
        itk = np.subtract(ref.TransformIndexToPhysicalPoint(step), ref.TransformIndexToPhysicalPoint(start))
        assert np.allclose(itk, expected, atol=1e-9)
        assert np.isclose(np.linalg.norm(expected), geom.spacing[itk_axis])



@pytest.mark.parametrize("ndim", [2, 3])
def test_resample_between_grids_of_one_box_is_a_plain_resize(ndim: int, monkeypatch) -> None:
    """Onto a grid spanning the same voxel-centre corners (a network grid and its fixed grid), the
    resize shortcut gives what the general sampler gives; a shifted or flipped grid does not take it."""
    from steprl import spatial

    fine = Geometry((24, 20, 18)[:ndim], (1.0, 1.5, 2.0)[:ndim], (-10.0, 4.0, 2.5)[:ndim], np.eye(ndim))
    coarse = fine.axis_aligned((9, 7, 8)[:ndim])
    field = torch.randn(1, ndim, *coarse.shape, dtype=torch.float64)
    calls, resize = [], spatial._interpolate
    monkeypatch.setattr(spatial, "_interpolate", lambda *a: calls.append(a) or resize(*a))
    fast = spatial.resample(field, coarse, fine)
    assert len(calls) == 1  # the shortcut was taken
    calls.clear()
    shifted = Geometry(fine.shape, fine.spacing, tuple(np.add(fine.origin, 0.3)), np.eye(ndim))
    spatial.resample(field, coarse, shifted)  # not the same box: the general path
    flipped = Geometry(fine.shape, fine.spacing, fine.origin, np.diag([-1.0] + [1.0] * (ndim - 1)))
    spatial.resample(field, coarse, flipped)
    spatial.resample(field, coarse, fine, mode="nearest")
    assert not calls
    monkeypatch.undo()
    monkeypatch.setattr(spatial, "_same_box", lambda *a: False)
    general = spatial.resample(field, coarse, fine)
    torch.testing.assert_close(fast, general, rtol=0, atol=1e-9)
    assert not torch.equal(fast[..., :1], fast[..., -1:])

# ---- 5. Geometry: resized, matches, validation ----------------------------------------
@pytest.mark.parametrize("ndim", [2, 3])
def test_resized_keeps_corner_voxel_centres_and_direction(ndim: int) -> None:
    geom = scenario(ndim).fixed
    for shape in [(7, 8, 9), (40, 50, 60), (16, 16, 16)]:
        shape = shape[:ndim]
        r = geom.resized(shape)
        assert r.shape == shape
        assert np.array_equal(r.direction, geom.direction)
        assert np.allclose(corners(r), corners(geom), atol=1e-9)
        ref = r.to_sitk_reference()  # ITK agrees on the last voxel centre
        last = np.asarray(ref.TransformIndexToPhysicalPoint([n - 1 for n in r.size_xyz]))
        assert np.allclose(last, corners(geom)[-1], atol=1e-9)
    assert geom.resized(geom.shape).matches(geom, tol=1e-9)
    with pytest.raises(InputError):
        geom.resized((8,) * (ndim + 1))


def test_matches() -> None:
    g = scenario(3).fixed
    same = Geometry(g.shape, g.spacing, g.origin, g.direction.copy())
    assert g.matches(same) and same.matches(g)
    assert g.matches(Geometry(g.shape, g.spacing, tuple(np.add(g.origin, 1e-6)), g.direction))
    assert not g.matches(Geometry(g.shape, g.spacing, tuple(np.add(g.origin, [0.0, 0.01, 0.0])), g.direction))
    assert not g.matches(Geometry((18, 22, 27), g.spacing, g.origin, g.direction))
    assert not g.matches(Geometry(g.shape, (1.0, 1.3, 2.2), g.origin, g.direction))
    assert not g.matches(Geometry(g.shape, g.spacing, g.origin, rotation(3, 26, (1.0, 2.0, 3.0))))
    assert not g.matches(Geometry(g.shape, g.spacing, g.origin, g.direction @ np.diag([1.0, 1.0, -1.0])))
    assert not g.matches(scenario(3).moving)


@pytest.mark.parametrize(
    "shape,spacing,origin,direction",
    [
        ((4, 5, 6), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), [[1, 0, 0], [0, 1, 0], [1, 0, 0]]),  # singular
        ((4, 5, 6), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.zeros((3, 3))),  # singular
        ((4, 5, 6), (1.0, 0.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)),  # zero spacing
        ((4, 5, 6), (1.0, -1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)),  # negative spacing
        ((4, 5, 6), (1.0, float("nan"), 1.0), (0.0, 0.0, 0.0), np.eye(3)),  # NaN spacing
        ((2, 4, 5, 6), (1.0,) * 4, (0.0,) * 4, np.eye(4)),  # 4D
        ((7,), (1.0,), (0.0,), np.eye(1)),  # 1D
        ((4, 0, 6), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)),  # empty axis
        ((4, 5, 6), (1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)),  # spacing of the wrong length
    ],
)
def test_geometry_validation_errors(shape, spacing, origin, direction) -> None:
    with pytest.raises(InputError) as info:
        Geometry(shape, spacing, origin, direction)
    assert info.value.fix  # every user-facing error says what to do


# ---- 6. Jacobian determinant ----------------------------------------------------------
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_jacobian_of_affine_field_is_det_a_everywhere(ndim: int, dtype: torch.dtype) -> None:
    shape = (12, 10) if ndim == 2 else (9, 10, 11)
    x = np.moveaxis(np.indices(shape), 0, -1).astype(np.float64)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for a in (rotation(ndim, 20) @ np.diag([1.2, 0.9, 1.1][:ndim]) + 0.05,
              np.diag([-1.0, 1.0, 1.0][:ndim]) @ rotation(ndim, 10)):  # the second one folds
        u = field_tensor(x @ a.T + 0.3 - x, dtype)
        det = spatial.jacobian_determinant(u)
        assert det.shape == (1, *shape)
        assert torch.allclose(det, torch.full_like(det, float(np.linalg.det(a))), atol=tol, rtol=0)


def test_jacobian_does_not_depend_on_spacing_or_direction() -> None:
    """A physical affine map x -> B x on an oblique anisotropic grid, converted to voxels, has det(B)."""
    geom = scenario(3).moving
    b = rotation(3, 15, (1.0, -1.0, 0.5)) @ np.diag([1.1, 0.8, 1.3])
    pts = physical_points(geom)
    centre = geom.center()
    u_phys = field_tensor((pts - centre) @ b.T + centre - pts, torch.float64)
    det = spatial.jacobian_determinant(spatial.physical_to_voxel(u_phys, geom))
    assert torch.allclose(det, torch.full_like(det, float(np.linalg.det(b))), atol=1e-9, rtol=0)


# ---- 7. register(): the pipeline's physical mapping -----------------------------------
@pytest.fixture(scope="module")
def tiny_spac_model(tmp_path_factory) -> Path:
    """A random 3D SPAC policy whose steps are a few voxels (a near-zero step would test nothing)."""
    from steprl.modelfile import save_model
    from steprl.registration.networks import SPACConfig, SPACPolicy

    torch.manual_seed(0)
    cfg = SPACConfig(ndim=3, grid=(16, 16, 16), channels=(8, 8), plan_dim=4, critic_channels=(4, 4))
    policy = SPACPolicy(cfg)
    with torch.no_grad():  # the actor's last layer: half-grid voxels, doubled on output
        policy.actor.out.weight.normal_(0.0, 0.05)
        policy.actor.out.bias.copy_(torch.tensor([0.6, -0.5, 0.4]))
    card = {"method": "spac", "ndim": 3, "config": cfg.to_dict(), "inference": {"max_step": 3.0, "steps": 2}}
    return save_model(tmp_path_factory.mktemp("spac") / "tiny", policy.state_dict(), card)


def _register_scenario() -> tuple[Image, Image, Blobs]:
    """Fixed and moving grids that differ (size, spacing, origin, oblique directions), NO motion:
    both sample the same analytic image at their own physical points."""
    sc = scenario(3)
    fixed_geom = Geometry((12, 14, 15), (1.7, 1.4, 2.0), (-9.0, 10.0, -17.0), rotation(3, 25, (1.0, 2.0, 3.0)))
    moving_dir = rotation(3, -20, (0.3, -1.0, 2.0)) @ np.diag([1.0, 1.0, -1.0])
    moving_geom = covering_grid(corners(fixed_geom), moving_dir, (1.5, 1.2, 1.4), margin=2.0)
    fixed = Image(sc.image(physical_points(fixed_geom)).astype(np.float32), fixed_geom)
    moving = Image(sc.image(physical_points(moving_geom)).astype(np.float32), moving_geom)
    return fixed, moving, sc.image


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_register_geometry(tmp_path: Path, tiny_spac_model: Path, device: str) -> None:
    from steprl.registration.inference import register

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")

    fixed, moving, blobs = _register_scenario()
    fixed_pts = physical_points(fixed.geometry)
    truth = blobs(fixed_pts)
    span = float(truth.max() - truth.min())

    # steps=0: the input, identity transform: the moving image resampled onto the fixed grid.
    results = list(register(fixed, moving, tiny_spac_model, steps=0, device=device, prealign=False))
    assert [r.step for r in results] == [0]
    step0 = results[0]
    assert step0.warped.geometry.matches(fixed.geometry)
    assert np.abs(step0.displacement.array).max() == 0.0
    mask0 = inside(moving.geometry, fixed_pts)
    assert mask0.mean() > 0.95
    itk_identity = sitk.GetArrayFromImage(sitk.Resample(moving.to_sitk(), fixed.geometry.to_sitk_reference(),
                                                        sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear,
                                                        0.0, sitk.sitkFloat32))
    assert np.abs(step0.warped.array - itk_identity)[mask0].max() < SAME_MATH_TOL * span
    assert np.abs(step0.warped.array - truth)[mask0].max() < INTERP_TOL * span

    # steps=2: the field is an ITK displacement field on the network grid covering the fixed image.
    results = list(register(fixed, moving, tiny_spac_model, steps=2, device=device, prealign=False))
    assert [r.step for r in results] == [0, 1, 2]
    final = results[-1]
    field = final.displacement
    assert field.is_vector and field.array.shape == (16, 16, 16, 3)
    assert field.geometry.shape == (16, 16, 16)
    assert np.allclose(field.geometry.direction, fixed.geometry.direction, atol=1e-12)
    assert np.allclose(corners(field.geometry), corners(fixed.geometry), atol=1e-6)
    assert np.abs(field.array).max() > 1.0  # mm: the policy really moved something

    field_path = io.write_displacement_field(field, tmp_path / "final_field.nii.gz")
    itk_warped = sitk.GetArrayFromImage(sitk.Resample(moving.to_sitk(), fixed.geometry.to_sitk_reference(),
                                                      itk_field_transform(field_path), sitk.sitkLinear, 0.0,
                                                      sitk.sitkFloat32))
    on_fixed = final.field_on_fixed_grid()[0].movedim(0, -1).cpu().numpy()
    mask = inside(moving.geometry, fixed_pts + on_fixed)
    assert mask.mean() > 0.8
    assert final.warped.geometry.matches(fixed.geometry)
    assert np.abs(final.warped.array - itk_warped)[mask].max() < SAME_MATH_TOL * span
    assert np.abs(final.warped.array - blobs(fixed_pts + on_fixed))[mask].max() < INTERP_TOL * span
    # The warp is not the identity (so the comparison above had something to compare).
    assert np.abs(final.warped.array - step0.warped.array)[mask].max() > 0.05 * span

    # What the policy saw (the network-grid moving image warped by the VOXEL field) is the moving
    # image resampled through the PHYSICAL field the user gets, up to double interpolation.
    net = field.geometry
    m = as_tensor(moving.array)
    voxel_field = final.voxel_field.float().cpu()
    by_voxels = spatial.warp(spatial.resample(m, moving.geometry, net), voxel_field)[0, 0].numpy()
    by_mm = spatial.resample(m, moving.geometry, net, displacement=field_tensor(field.array))[0, 0].numpy()
    net_pts = physical_points(net)
    in_net = np.moveaxis(np.indices(net.shape) + voxel_field[0].numpy(), 0, -1)
    mask_net = inside(moving.geometry, net_pts + field.array) & np.all((in_net >= 0) & (in_net <= 15), axis=-1)
    assert mask_net.mean() > 0.5
    assert np.abs(by_voxels - by_mm)[mask_net].max() < DOUBLE_INTERP_TOL * span
    assert np.abs(by_voxels - blobs(net_pts + field.array))[mask_net].max() < DOUBLE_INTERP_TOL * span


@pytest.mark.parametrize("order, flips", [((1, 0), (False, True)), ((2, 0, 1), (False, True, True)),
                                          ((0, 2, 1), (True, False, False))])
def test_reordered_grid_keeps_every_voxel_where_it_was(order, flips) -> None:
    """The same voxels stored in another array order: the index of each voxel in the new array maps to
    the physical point its old index mapped to."""
    ndim = len(order)
    rotation = np.linalg.qr(np.random.default_rng(ndim).normal(size=(ndim, ndim)))[0]  # oblique
    shape = (7, 9, 11)[:ndim]
    geometry = Geometry(shape, (0.9, 1.3, 2.0)[:ndim], (4.0, -2.0, 7.0)[:ndim], rotation)
    moved = geometry.reordered(order, flips)
    assert moved.shape == tuple(shape[o] for o in order)
    old_a, old_b = geometry.tensor_index_to_physical()
    new_a, new_b = moved.tensor_index_to_physical()
    for old in np.ndindex(*shape):
        new = [shape[o] - 1 - old[o] if f else old[o] for o, f in zip(order, flips)]
        np.testing.assert_allclose(new_a @ np.asarray(new) + new_b, old_a @ np.asarray(old) + old_b, atol=1e-9)
