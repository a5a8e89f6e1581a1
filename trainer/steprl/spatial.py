"""Warping, composition and physical resampling of images and displacement fields (torch).

2D and 3D alike. Two kinds of displacement appear, never mixed up:

- **voxel displacement** ``(B, ndim, *S)``: on a grid, in voxels of that grid, channel ``k``
  along array axis ``k`` (``(d, h, w)`` order in 3D). The networks predict these.
- **physical displacement** ``(B, ndim, *S)``: in mm, LPS, channels in ITK order ``(x, y, z)``.
  Files, Slicer and the outside world see these.

Every displacement field is a pull-back ("resampling") field on the FIXED grid: it maps a fixed
point ``x`` to the moving point ``x + u(x)``; ``warp(m, u)(x) = m(x + u(x))``.

Everything stays on the device of its inputs; nothing here moves tensors.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from steprl.geometry import Geometry

_MODES = {"linear": "bilinear", "nearest": "nearest"}


def identity_coords(shape: tuple[int, ...], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel index of every grid point, ``(1, ndim, *shape)``, channel ``k`` = index along axis ``k``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def sample(volume: torch.Tensor, coords: torch.Tensor, mode: str = "linear", padding: str = "border") -> torch.Tensor:
    """Sample ``volume`` ``(B, C, *S_in)`` at voxel coordinates ``coords`` ``(B, ndim, *S_out)``.

    ``coords`` are indices into ``volume`` in array-axis order (continuous; align_corners
    convention: 0 is the first voxel centre, ``n - 1`` the last). ``mode`` is ``"linear"``
    (images, fields) or ``"nearest"`` (label maps); ``padding`` ``"border"`` or ``"zeros"``.
    Returns ``(B, C, *S_out)`` in ``volume``'s dtype.
    """
    ndim = coords.shape[1]
    sizes = torch.tensor(volume.shape[2:], device=coords.device, dtype=coords.dtype)
    view = (1, ndim) + (1,) * ndim
    norm = coords * (2.0 / (sizes - 1).clamp(min=1)).view(view) - 1.0
    grid = norm.flip(1).movedim(1, -1)  # grid_sample wants (x, y[, z]) = reversed array axes, last
    if grid.shape[0] != volume.shape[0]:
        grid = grid.expand(volume.shape[0], *grid.shape[1:])
    out = F.grid_sample(volume.to(grid.dtype), grid, mode=_MODES[mode], padding_mode=padding, align_corners=True)
    return out.to(volume.dtype)


def warp(volume: torch.Tensor, displacement: torch.Tensor, mode: str = "linear",
         padding: str = "border") -> torch.Tensor:
    """Pull-back warp: ``out(x) = volume(x + u(x))``, ``u`` a voxel displacement on ``volume``'s grid.

    Shapes: ``volume`` ``(B, C, *S)``, ``displacement`` ``(B, ndim, *S)`` -> ``(B, C, *S)``.
    """
    grid = identity_coords(displacement.shape[2:], displacement.device, displacement.dtype)
    return sample(volume, grid + displacement, mode, padding)


def compose(previous: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Pull-back composition ``u_t(x) = a_t(x) + u_{t-1}(x + a_t(x))`` (voxel fields, ``(B, ndim, *S)``).

    Warping the ORIGINAL image by the result equals warping it by ``previous`` and then the
    result by ``step``, without the blur of resampling twice.
    """
    return step + warp(previous, step, "linear", "border")


# ---- voxel <-> physical ---------------------------------------------------------------
def _matrix(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), device=like.device, dtype=like.dtype)


def _apply(matrix: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Multiply every channel vector of ``(B, n, *S)`` by ``matrix`` ``(m, n)`` -> ``(B, m, *S)``."""
    return torch.einsum("ij,bj...->bi...", matrix, vectors)


def voxel_to_physical(displacement: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Voxel displacement (array order) on ``geometry`` -> physical displacement (mm, LPS, xyz)."""
    a, _ = geometry.tensor_index_to_physical()
    return _apply(_matrix(a, displacement), displacement)


def physical_to_voxel(displacement: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Physical displacement (mm, LPS, xyz) on ``geometry`` -> voxel displacement (array order)."""
    a, _ = geometry.physical_to_tensor_index()
    return _apply(_matrix(a, displacement), displacement)


def resample(
    moving: torch.Tensor,
    moving_geometry: Geometry,
    reference: Geometry,
    displacement: torch.Tensor | None = None,
    affine: np.ndarray | None = None,
    mode: str = "linear",
    padding: str = "border",
) -> torch.Tensor:
    """Resample ``moving`` ``(B, C, *S_m)`` onto the ``reference`` grid through physical space.

    The reference point ``x`` is sent to the moving point ``A(x + u(x))``, where ``u`` is the
    optional physical ``displacement`` ``(B, ndim, *S_ref)`` on the reference grid and ``A`` the
    optional homogeneous ``affine`` ``(ndim + 1, ndim + 1)`` (fixed LPS point -> moving LPS
    point, the direction ITK calls a resampling transform). Handles any spacing, size, origin
    and (oblique) direction of either grid. Returns ``(B, C, *S_ref)``.
    """
    nd = reference.ndim
    like = moving if moving.is_floating_point() else moving.float()
    ref_a, ref_b = reference.tensor_index_to_physical()
    mov_a, mov_b = moving_geometry.physical_to_tensor_index()
    aff_m, aff_t = (np.eye(nd), np.zeros(nd)) if affine is None else (affine[:nd, :nd], affine[:nd, nd])
    to_index = mov_a @ aff_m  # physical point before the affine -> moving index
    linear, offset = to_index @ ref_a, to_index @ ref_b + mov_a @ aff_t + mov_b  # reference index -> moving index
    if displacement is None and mode == "linear" and _same_box(linear, offset, moving.shape[2:], reference.shape):
        return _interpolate(moving, reference.shape)
    lin, off = _matrix(linear, like), _matrix(offset, like)
    grid = identity_coords(reference.shape, like.device, like.dtype)
    coords = _apply(lin, grid) + off.view((1, nd) + (1,) * nd)
    if displacement is not None:
        coords = coords + _apply(_matrix(to_index, like), displacement.to(like.dtype))
    return sample(moving, coords, mode, padding)


def _same_box(linear: np.ndarray, offset: np.ndarray, moving_shape, reference_shape) -> bool:
    """Whether the reference-index -> moving-index map sends the first and last voxel centres of every
    axis onto the moving grid's (same axes, same order and sense, no shift): a plain resize."""
    if any(n < 2 for n in reference_shape):
        return False
    scale = np.array([(m - 1) / (r - 1) for m, r in zip(moving_shape, reference_shape, strict=True)])
    tolerance = 1e-6 * max(1.0, float(np.abs(linear).max()))
    return bool(np.allclose(linear, np.diag(scale), rtol=0, atol=tolerance)
                and np.allclose(offset, 0, rtol=0, atol=1e-5))


def _interpolate(volume: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Linear resize of ``(B, C, *S)`` to ``shape`` with the voxel-centre corners kept.

    The same values as :func:`sample` at the resized grid's coordinates (align_corners
    convention), without building them: 4x faster for a 64^3 field onto a 160x192x144 grid,
    which ``steprl register`` does for every warp onto the fixed grid (outputs, label Dice).
    """
    if tuple(volume.shape[2:]) == tuple(shape):
        return volume.clone()
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    source = volume if volume.is_floating_point() else volume.float()
    out = F.interpolate(source, size=tuple(shape), mode=mode, align_corners=True)
    return out.to(volume.dtype)


def total_displacement(displacement: torch.Tensor | None, reference: Geometry,
                       affine: np.ndarray | None) -> torch.Tensor:
    """The single physical field ``d(x) = A(x + u(x)) - x`` equal to an affine then ``u``.

    ``displacement`` is ``u`` ``(B, ndim, *S)`` in mm on ``reference`` (or None for zero);
    returns ``(B, ndim, *S)`` in mm, LPS. Without an affine this is ``u`` itself.
    """
    if affine is None:
        if displacement is None:
            raise ValueError("need a displacement or an affine")
        return displacement
    device, dtype = (displacement.device, displacement.dtype) if displacement is not None else (None, torch.float32)
    flat = tuple(float(v) for v in np.asarray(affine, dtype=np.float64).ravel())
    linear, offset = _affine_terms(reference, flat, device, dtype)
    if displacement is None:
        return offset.clone()
    return _apply(linear, displacement) + offset


@lru_cache(maxsize=8)
def _affine_terms(reference: Geometry, affine_flat: tuple[float, ...], device, dtype) -> tuple[torch.Tensor, ...]:
    """``A`` and ``(A - I) p + t`` on the points ``p`` of ``reference``: ``A(p + u) + t - p = A u + that``.

    Cached (geometries hash by identity): ``steprl register`` converts every step's field on the
    same grid with the same affine, and the points' part, 15 ms of each step's 18 ms at 64^3, is
    the same each time. Callers must not modify the returned tensors in place.
    """
    nd = reference.ndim
    affine = np.asarray(affine_flat, dtype=np.float64).reshape(nd + 1, nd + 1)
    ref_a, ref_b = reference.tensor_index_to_physical()
    like = torch.empty(0, device=device, dtype=dtype)
    grid = identity_coords(reference.shape, device, torch.float64)
    points_linear = (affine[:nd, :nd] - np.eye(nd)) @ ref_a
    points_offset = (affine[:nd, :nd] - np.eye(nd)) @ ref_b + affine[:nd, nd]
    offset = _apply(torch.as_tensor(points_linear, device=device), grid) + torch.as_tensor(
        points_offset, device=device).view((1, nd) + (1,) * nd)
    return _matrix(affine[:nd, :nd], like), offset.to(dtype)


# ---- regularity -----------------------------------------------------------------------
def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of ``x -> x + u(x)`` for a voxel field ``(B, ndim, *S)`` -> ``(B, *S)``.

    Central differences inside, one-sided at the border. The determinant does not depend on
    spacing or direction (they cancel), so voxel units are exact here. ``<= 0`` means folding.
    """
    nd = displacement.shape[1]
    # grads[i][j] = d u_i / d axis_j
    grads = [torch.gradient(displacement[:, i], dim=tuple(range(1, nd + 1))) for i in range(nd)]
    jac = [[grads[i][j] + (1.0 if i == j else 0.0) for j in range(nd)] for i in range(nd)]
    if nd == 2:
        return jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    return (
        jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
        - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
        + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
    )

