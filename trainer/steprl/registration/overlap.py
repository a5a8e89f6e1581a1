"""How far the fixed and moving images overlap in physical space, checked before a registration.

Why: a pair whose headers place the images apart (a fixed image at 0.001 mm spacing against a
moving one at 100 mm, an oblique volume rotated off the other) used to run to the end without
a word, and its result means nothing. The images are compared as boxes in physical space (LPS
mm, voxel edges included), from the headers alone: no voxel is read.

- :func:`pair_overlap`: the share of the fixed image covered by the moving one, and the shared
  volume over the joint volume (intersection over union of the two boxes).
- :func:`check_overlap`: below :data:`REFUSE_IOU` of shared volume the run is refused (with an
  affine pre-alignment only a warning: its moment-based start moves the images together), and
  when less than :data:`WARN_COVERED` of the fixed image is covered a warning says that the
  field there is not supported by any moving data.

Example::

    check_overlap(fixed.geometry, moving.geometry, prealign=False)   # InputError or warnings
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from steprl.errors import InputError
from steprl.geometry import Geometry

log = logging.getLogger(__name__)

#: Refused below this shared volume over joint volume (1 %).
REFUSE_IOU = 0.01
#: Warned below this share of the fixed image covered by the moving image.
WARN_COVERED = 0.5
#: Samples per axis of the fixed image's box (24^3 points in 3D: well under a millisecond).
SAMPLES = 24


@dataclass(frozen=True)
class PairOverlap:
    """``fixed_covered``: share of the fixed box inside the moving box; ``iou``: shared volume
    over the volume of the union of both boxes."""

    fixed_covered: float
    iou: float


def _volume(geometry: Geometry) -> float:
    matrix, _ = geometry.index_to_physical()
    return float(abs(np.linalg.det(matrix)) * np.prod(geometry.size_xyz, dtype=np.float64))


def pair_overlap(fixed: Geometry, moving: Geometry, samples: int = SAMPLES) -> PairOverlap:
    """The overlap of the two grids' physical boxes (see :class:`PairOverlap`)."""
    if fixed.ndim != moving.ndim:
        raise ValueError(f"a {fixed.ndim}D and a {moving.ndim}D grid cannot overlap")
    size_f = np.asarray(fixed.size_xyz, dtype=np.float64)
    axes = [(np.arange(samples) + 0.5) / samples * n - 0.5 for n in size_f]  # cell centres, voxel edges included
    index_f = np.stack(np.meshgrid(*axes, indexing="ij"), 0).reshape(fixed.ndim, -1)
    a_f, b_f = fixed.index_to_physical()
    a_m, b_m = moving.index_to_physical()
    index_m = np.linalg.solve(a_m, a_f @ index_f + (b_f - b_m)[:, None])
    size_m = np.asarray(moving.size_xyz, dtype=np.float64)[:, None]
    inside = np.all((index_m >= -0.5) & (index_m <= size_m - 0.5), axis=0)
    covered = float(inside.mean())
    shared = covered * _volume(fixed)
    union = _volume(fixed) + _volume(moving) - shared
    return PairOverlap(covered, shared / union if union > 0 else 0.0)


def _box(geometry: Geometry) -> str:
    extent = np.asarray(geometry.size_xyz) * np.asarray(geometry.spacing)
    return (f"{' x '.join(f'{e:.4g}' for e in extent)} mm at origin "
            f"({', '.join(f'{o:.4g}' for o in geometry.origin)}) mm")


def check_overlap(fixed: Geometry, moving: Geometry, *, prealign: bool, prealign_option: str = "--prealign",
                  names: tuple[str, str] = ("fixed image", "moving image")) -> PairOverlap | None:
    """Refuse (InputError) or warn about a pair that barely overlaps; returns the overlap.

    ``prealign``: an affine pre-alignment will run (then a tiny overlap is only a warning);
    ``prealign_option`` names that option in the message. Grids of different dimensions
    return None: the registration's own dimension check says what is wrong with them.
    """
    if fixed.ndim != moving.ndim:
        return None
    result = pair_overlap(fixed, moving)
    where = f"{names[0]}: {_box(fixed)}; {names[1]}: {_box(moving)} (LPS)"
    if result.iou < REFUSE_IOU:
        problem = (f"The {names[0]} and the {names[1]} barely overlap in physical space: they share "
                   f"{100 * result.iou:.3g}% of their joint extent ({where}).")
        if not prealign:
            raise InputError(problem, "Check that both headers (spacing, origin, direction) are right; if the "
                                      "images show the same anatomy but their headers place them apart, use "
                                      f"{prealign_option}.")
        log.warning("%s The affine pre-alignment starts by moving their centres of mass together.", problem)
    elif result.fixed_covered < WARN_COVERED:
        log.warning("Only %.0f%% of the %s is covered by the %s in physical space (%s): the field outside is not "
                    "supported by any moving data.", 100 * result.fixed_covered, names[0], names[1], where)
    return result
