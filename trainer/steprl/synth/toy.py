"""Synthetic images, label maps and deformations, for tests, smoke training and demos.

Why: the unit and CLI tests need registration pairs whose true relation and labels are known,
and segmentation images on which a fixed threshold is clearly not enough, without any data on
disk. Everything here is 2D and 3D alike and reproducible: every function takes a
``numpy.random.Generator`` and draws from it only.

Conventions (those of :mod:`steprl.spatial`):

- arrays are in numpy order, ``shape`` = ``(H, W)`` or ``(D, H, W)``;
- a displacement field is a **voxel** pull-back field ``(ndim, *shape)`` (no batch axis),
  channel ``k`` along array axis ``k``: ``warped(x) = image(x + u(x))``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from steprl import spatial
from steprl.geometry import Geometry, Image

log = logging.getLogger(__name__)

#: Most label classes a blob image carries (few, so that a Dice per label means something).
MAX_CLASSES = 4


# ---- small helpers -----------------------------------------------------------------------
def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 4:
        raise ValueError(f"shape must be 2D or 3D with every axis >= 4, got {shape}")
    return shape


def _coords(shape: tuple[int, ...]) -> np.ndarray:
    """Voxel index of every grid point, ``(ndim, *shape)`` float64."""
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))


def _cubic_bspline(t: np.ndarray) -> np.ndarray:
    """The uniform cubic B-spline kernel (support ``|t| < 2``, partition of unity)."""
    a = np.abs(t)
    return np.where(a < 1, (4 - 6 * a**2 + 3 * a**3) / 6, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def _bspline_matrix(n_voxels: int, spacing: float) -> np.ndarray:
    """``(n_voxels, n_control)`` weights evaluating a cubic B-spline with knots every ``spacing`` voxels.

    One extra control point lies beyond each end of the axis, so that the spline is complete
    (its weights sum to one) over the whole axis.
    """
    n_control = int(math.ceil((n_voxels - 1) / spacing)) + 3
    t = np.arange(n_voxels, dtype=np.float64)[:, None] / spacing + 1.0
    return _cubic_bspline(t - np.arange(n_control, dtype=np.float64)[None, :])


def _max_magnitude(field: np.ndarray) -> float:
    return float(np.sqrt((field.astype(np.float64) ** 2).sum(axis=0)).max())


def gaussian_blur(t: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, *S)`` (2D or 3D; ``sigma`` in voxels, replicate border;
    the kernel spans ``+-ceil(3 sigma)`` voxels and sums to 1). Matrix products, :mod:`steprl.filters`."""
    if sigma <= 0:
        return t
    from steprl.filters import gaussian_kernel, separable

    return separable(t, [gaussian_kernel(sigma)] * (t.ndim - 2), border="replicate")


def _gaussian_blur(array: np.ndarray, sigma: float) -> np.ndarray:
    """:func:`gaussian_blur` of one 2D/3D numpy array, returned as float32 numpy."""
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    return gaussian_blur(t, sigma)[0, 0].numpy()


def random_rotation(ndim: int, max_deg: float, rng: np.random.Generator) -> np.ndarray:
    """A rotation by a uniform angle in ``[-max_deg, max_deg]`` (about a random axis in 3D)."""
    angle = math.radians(rng.uniform(-max_deg, max_deg))
    c, s = math.cos(angle), math.sin(angle)
    if ndim == 2:
        return np.array([[c, -s], [s, c]])
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis) + 1e-12
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + s * k + (1 - c) * k @ k  # Rodrigues


def _ellipsoid(shape: tuple[int, ...], centre: np.ndarray, radii: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Boolean mask of a rotated ellipse/ellipsoid (``centre``, ``radii`` in voxels, array order)."""
    rel = _coords(shape) - centre.reshape((-1,) + (1,) * len(shape))
    local = np.einsum("ji,j...->i...", rotation, rel)  # rotation.T @ rel: coordinates in the ellipsoid frame
    return (sum((local[i] / radii[i]) ** 2 for i in range(len(shape)))) <= 1.0


def _random_ellipsoid(shape: tuple[int, ...], rng: np.random.Generator, size: tuple[float, float],
                      margin: float = 0.2) -> np.ndarray:
    """A random ellipsoid mask: radii a fraction ``size`` of each axis, centre in the inner region."""
    n = np.asarray(shape, dtype=np.float64)
    centre = rng.uniform(margin, 1 - margin, size=len(shape)) * (n - 1)
    radii = np.maximum(rng.uniform(size[0], size[1], size=len(shape)) * n, 1.5)
    return _ellipsoid(shape, centre, radii, random_rotation(len(shape), 90.0, rng))


# ---- displacement fields -----------------------------------------------------------------
def smooth_random_field(shape: Sequence[int], max_displacement: float, control_spacing: float,
                        rng: np.random.Generator) -> np.ndarray:
    """A smooth random voxel displacement, ``(ndim, *shape)`` float32.

    A cubic B-spline free-form deformation: Gaussian random coefficients on a control grid
    with knots every ``control_spacing`` voxels, evaluated on the voxel grid, then scaled so
    that the largest displacement magnitude is exactly ``max_displacement`` voxels.

    The map ``x -> x + u(x)`` is a diffeomorphism in practice while ``max_displacement`` is
    below about ``0.4 * control_spacing`` (the classical B-spline FFD folding bound); larger
    amplitudes may fold.
    """
    shape = _check_shape(shape)
    if control_spacing <= 0 or max_displacement < 0:
        raise ValueError("control_spacing must be > 0 and max_displacement >= 0")
    mats = [_bspline_matrix(n, float(control_spacing)) for n in shape]
    coeffs = rng.normal(size=(len(shape), *[m.shape[1] for m in mats]))
    field = coeffs
    for axis, m in enumerate(mats):  # apply the 1D evaluation matrix along each spatial axis
        field = np.moveaxis(np.tensordot(m, np.moveaxis(field, axis + 1, 0), axes=(1, 0)), 0, axis + 1)
    peak = _max_magnitude(field)
    scale = max_displacement / peak if peak > 0 else 0.0
    return (field * scale).astype(np.float32)


def _affine_displacement(shape: tuple[int, ...], matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``u(x) = (M - I)(x - c) + t`` about the grid centre ``c``, ``(ndim, *shape)`` float64."""
    nd = len(shape)
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    rel = _coords(shape) - centre.reshape((-1,) + (1,) * nd)
    return np.einsum("ij,j...->i...", matrix - np.eye(nd), rel) + offset.reshape((-1,) + (1,) * nd)


def random_affine_field(shape: Sequence[int], rng: np.random.Generator, rotation_deg: float = 10.0,
                        scale: float = 0.1, shear: float = 0.05, translation: float = 0.05) -> np.ndarray:
    """The voxel displacement ``(ndim, *shape)`` float32 of a random affine about the grid centre.

    Draws a rotation of at most ``rotation_deg`` degrees, per-axis scales in ``1 +- scale``,
    shears in ``+- shear`` and a translation of at most ``translation`` times the size of each
    axis. The pull-back map is ``x -> c + R @ S @ H @ (x - c) + t`` (in voxel units).
    """
    shape = _check_shape(shape)
    nd = len(shape)
    rot = random_rotation(nd, rotation_deg, rng)
    scales = np.diag(1.0 + rng.uniform(-scale, scale, size=nd))
    sh = np.eye(nd)
    upper = np.triu_indices(nd, k=1)
    sh[upper] = rng.uniform(-shear, shear, size=len(upper[0]))
    offset = rng.uniform(-translation, translation, size=nd) * np.asarray(shape, dtype=np.float64)
    return _affine_displacement(shape, rot @ scales @ sh, offset).astype(np.float32)


def compose_fields(first: np.ndarray, then: np.ndarray) -> np.ndarray:
    """Pull-back composition of two voxel fields ``(ndim, *shape)``: warp by ``first``, then by ``then``.

    ``warp(warp(m, first), then) == warp(m, compose_fields(first, then))`` (without the double blur),
    see :func:`steprl.spatial.compose`.
    """
    out = spatial.compose(torch.from_numpy(np.ascontiguousarray(first, dtype=np.float32))[None],
                          torch.from_numpy(np.ascontiguousarray(then, dtype=np.float32))[None])
    return out[0].numpy()


# ---- images --------------------------------------------------------------------------------
def blob_image(shape: Sequence[int], rng: np.random.Generator,
               n_blobs: tuple[int, int] = (3, 6)) -> tuple[np.ndarray, np.ndarray]:
    """A few overlapping random ellipses/ellipsoids on a dark background.

    Returns ``(image, labels)``: ``image`` float32 in ``0..1`` of ``shape`` (lightly blurred,
    light noise), ``labels`` int16 of ``shape`` with ``0`` = background and ``1..K`` the blob
    class, ``K = min(n, 4)`` for ``n`` blobs drawn in ``n_blobs`` (inclusive). Every class is
    present; blobs of one class share an intensity; larger blobs are painted first so that
    small ones stay visible on top.
    """
    shape = _check_shape(shape)
    lo, hi = n_blobs
    if lo < 1 or hi < lo:
        raise ValueError(f"n_blobs must be (min, max) with 1 <= min <= max, got {n_blobs}")
    for _attempt in range(20):
        n = int(rng.integers(lo, hi + 1))
        k = min(n, MAX_CLASSES)
        classes = np.concatenate([np.arange(1, k + 1), rng.integers(1, k + 1, size=n - k)])
        rng.shuffle(classes)
        levels = rng.permutation(np.linspace(0.35, 0.95, k)) + rng.uniform(-0.03, 0.03, size=k)
        masks = [_random_ellipsoid(shape, rng, (0.12, 0.28)) for _ in range(n)]
        order = np.argsort([-m.sum() for m in masks], kind="stable")
        labels = np.zeros(shape, dtype=np.int16)
        for i in order:
            labels[masks[i]] = classes[i]
        if len(np.unique(labels)) == k + 1:
            break
    else:  # pragma: no cover - vanishingly unlikely
        raise RuntimeError("could not draw a blob image with every class visible")
    background = rng.uniform(0.02, 0.12)
    image = np.where(labels > 0, levels[np.maximum(labels, 1) - 1], background)
    image = _gaussian_blur(image, 0.7) + rng.normal(0.0, 0.02, size=shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), labels


def noisy_ellipse(shape: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A segmentation case on which a single global threshold clearly fails.

    The object is one or two ellipses/ellipsoids; around it lie distractors (boxes and thin
    bars) whose intensity is close to, but not equal to, the object's, some brighter, some
    darker; a smooth background ramp shifts every intensity, and the noise is strong. Shape and
    context separate object from distractors, intensity alone does not.

    Returns ``(image, mask)``: ``image`` float32 of ``shape`` (roughly ``0..1``, clipped),
    ``mask`` uint8 of ``shape`` (1 = object).
    """
    shape = _check_shape(shape)
    nd = len(shape)
    n = np.asarray(shape, dtype=np.float64)
    coords = _coords(shape)
    # smooth background: a random linear ramp over the field of view, amplitude 0.25
    direction = rng.normal(size=nd)
    direction /= np.linalg.norm(direction) + 1e-12
    ramp = np.einsum("i,i...->...", direction, coords / (n - 1).reshape((-1,) + (1,) * nd))
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    background = 0.15 + 0.25 * ramp
    obj_level = rng.uniform(0.5, 0.6)
    image = background.copy()
    # distractors first (the object is painted over them): boxes and bars near the object's level
    for _ in range(int(rng.integers(4, 8))):
        centre = rng.uniform(0.1, 0.9, size=nd) * (n - 1)
        half = rng.uniform(0.05, 0.15, size=nd) * n
        if rng.random() < 0.5:  # a thin bar
            half[int(rng.integers(nd))] = rng.uniform(0.6, 1.5)
        rel = np.abs(coords - centre.reshape((-1,) + (1,) * nd))
        box = np.all(rel <= half.reshape((-1,) + (1,) * nd), axis=0)
        sign = 1.0 if rng.random() < 0.5 else -1.0
        image[box] = obj_level + sign * rng.uniform(0.06, 0.15) + 0.2 * ramp[box]
    mask = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(1, 3))):
        mask |= _random_ellipsoid(shape, rng, (0.1, 0.22), margin=0.25)
    image[mask] = obj_level + 0.2 * ramp[mask]
    image = _gaussian_blur(image, 0.6) + rng.normal(0.0, 0.1, size=shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), mask.astype(np.uint8)


# ---- deformation -------------------------------------------------------------------------
def deform(image: np.ndarray, labels: np.ndarray | None, field: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Pull-back warp of an image (linear) and its labels (nearest) by a voxel field.

    ``image`` and ``labels`` have ``shape``, ``field`` is ``(ndim, *shape)``; returns arrays of
    the input dtypes (``labels`` may be None). Border values are replicated outside the grid.
    """
    if field.shape != (image.ndim, *image.shape):
        raise ValueError(f"field shape {field.shape} does not match image shape {image.shape}")
    u = torch.from_numpy(np.ascontiguousarray(field, dtype=np.float32))[None]
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    warped = spatial.warp(img, u, "linear")[0, 0].numpy().astype(image.dtype)
    if labels is None:
        return warped, None
    lab = torch.from_numpy(np.ascontiguousarray(labels).astype(np.float32))[None, None]
    warped_labels = spatial.warp(lab, u, "nearest")[0, 0].numpy()
    return warped, np.rint(warped_labels).astype(labels.dtype)


def random_deformation(shape: Sequence[int], rng: np.random.Generator, max_displacement: float = 4.0,
                       affine: bool = True, control_spacing: float | None = None) -> np.ndarray:
    """A random smooth deformation ``(ndim, *shape)`` float32: a mild affine, then an elastic part.

    The elastic part has a peak of ``max_displacement`` voxels; the affine part (if any) is
    scaled down, when needed, to a peak of ``max_displacement / 2``; so the total stays within
    about ``1.5 * max_displacement`` voxels. ``control_spacing`` defaults to a quarter of the
    smallest axis, at least 8 voxels and at least ``2.5 * max_displacement`` (the folding bound
    of :func:`smooth_random_field`).
    """
    shape = _check_shape(shape)
    if control_spacing is None:
        control_spacing = max(8.0, min(shape) / 4.0, 2.5 * max_displacement)
    field = smooth_random_field(shape, max_displacement, control_spacing, rng)
    if affine:
        aff = random_affine_field(shape, rng, rotation_deg=5.0, scale=0.05, shear=0.03, translation=0.03)
        peak = _max_magnitude(aff)
        limit = max_displacement / 2.0
        if peak > limit:  # an affine displacement scaled by a factor is still affine
            aff = aff * (limit / peak)
        field = compose_fields(aff, field)
    return field.astype(np.float32)


def synthetic_pair(shape: Sequence[int], rng: np.random.Generator, max_displacement: float = 4.0,
                   affine: bool = True, return_fields: bool = False) -> dict[str, np.ndarray]:
    """A registration pair related by a smooth, invertible in practice, deformation of a few voxels.

    One base :func:`blob_image`; ``fixed`` is the base warped by one :func:`random_deformation`,
    ``moving`` by another, and the label maps follow exactly the same warps (nearest neighbour).

    Returns a dict of arrays of ``shape``: ``fixed``, ``moving`` (float32, 0..1),
    ``fixed_labels``, ``moving_labels`` (int16, 0..4). With ``return_fields`` also
    ``base``, ``base_labels`` and the voxel fields ``fixed_field``, ``moving_field``
    ``(ndim, *shape)`` that carry the base onto each.
    """
    shape = _check_shape(shape)
    base, base_labels = blob_image(shape, rng)
    fixed_field = random_deformation(shape, rng, max_displacement, affine)
    moving_field = random_deformation(shape, rng, max_displacement, affine)
    fixed, fixed_labels = deform(base, base_labels, fixed_field)
    moving, moving_labels = deform(base, base_labels, moving_field)
    out = {"fixed": fixed, "moving": moving, "fixed_labels": fixed_labels, "moving_labels": moving_labels}
    if return_fields:
        out.update(base=base, base_labels=base_labels, fixed_field=fixed_field, moving_field=moving_field)
    return out


# ---- on-disk datasets ----------------------------------------------------------------------
def _write_image(array: np.ndarray, geometry: Geometry, path: Path) -> None:
    """Write ``array`` with ``geometry`` to ``path`` atomically (through :func:`steprl.io.write_image`)."""
    from steprl.io import write_image  # imported here: SimpleITK loads only when a dataset is written

    write_image(Image(array, geometry), path)


def _geometry(shape: tuple[int, ...], spacing: Sequence[float] | None) -> Geometry:
    """Identity-direction grid at the origin; ``spacing`` in ITK order ``(x, y[, z])`` mm (default 1)."""
    nd = len(shape)
    spacing = (1.0,) * nd if spacing is None else tuple(float(s) for s in spacing)
    return Geometry(shape, spacing, (0.0,) * nd, np.eye(nd))


def write_registration_dataset(folder: str | os.PathLike, n: int, shape: Sequence[int], seed: int,
                               spacing: Sequence[float] | None = None, max_displacement: float = 4.0) -> Path:
    """Write ``n`` cases that are different deformations of ONE shared blob image.

    Any two cases therefore form a registration pair with known corresponding labels. Writes
    ``folder/images/case_###.nii.gz`` (float32) and ``folder/labels/case_###.nii.gz`` (int16),
    numbered from 0, all on the same grid: ``shape`` in numpy order, ``spacing`` in ITK order
    (mm, default 1), origin 0, identity direction. Returns ``Path(folder)``.
    """
    shape = _check_shape(shape)
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    geometry = _geometry(shape, spacing)
    base, base_labels = blob_image(shape, rng)
    for i in range(n):
        image, labels = deform(base, base_labels, random_deformation(shape, rng, max_displacement))
        _write_image(image, geometry, folder / "images" / f"case_{i:03d}.nii.gz")
        _write_image(labels, geometry, folder / "labels" / f"case_{i:03d}.nii.gz")
    log.info("wrote %d synthetic registration cases of shape %s to %s", n, shape, folder)
    return folder


def write_segmentation_dataset(folder: str | os.PathLike, n: int, shape: Sequence[int], seed: int,
                               spacing: Sequence[float] | None = None) -> Path:
    """Write ``n`` independent :func:`noisy_ellipse` cases.

    ``folder/images/case_###.nii.gz`` (float32) and ``folder/labels/case_###.nii.gz`` (uint8,
    1 = object), same grid conventions as :func:`write_registration_dataset`. Returns ``Path(folder)``.
    """
    shape = _check_shape(shape)
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    geometry = _geometry(shape, spacing)
    for i in range(n):
        image, mask = noisy_ellipse(shape, rng)
        _write_image(image, geometry, folder / "images" / f"case_{i:03d}.nii.gz")
        _write_image(mask, geometry, folder / "labels" / f"case_{i:03d}.nii.gz")
    log.info("wrote %d synthetic segmentation cases of shape %s to %s", n, shape, folder)
    return folder
