"""Optional affine pre-alignment with SimpleITK, for pairs that are not already roughly aligned.

SPAC's steps are small (a few voxels each), so a pair that is off by a rotation or a large
shift should first be aligned affinely. The result is a homogeneous matrix sending a FIXED
physical point (LPS, mm) to the corresponding MOVING point: the same direction as a
displacement field (a resampling transform), so it composes with SPAC's field directly.
"""

from __future__ import annotations

import logging

import numpy as np

from steprl.errors import InputError
from steprl.geometry import Image

log = logging.getLogger(__name__)

#: Coarsest level keeps at least this many voxels along every axis.
_MIN_LEVEL_SIZE = 16
#: The finest level has at most this many voxels along its longest axis: the pre-alignment
#: only has to bring the pair within a few voxels of SPAC's network grid (64-128 voxels), and
#: the full-resolution level cost most of the time (seconds to tens of seconds in 3D). 64
#: rather than 96 (3 mm instead of 2 mm voxels for a 192 mm box): 0.27x the time (3.7 s -> 1 s
#: on the 160x192x144 benchmark pair), the affine within 1.1 mm of the 96 one at the box's
#: corners (two runs at 96 differ by 0.45 mm). In compare_registration.py: MNI152 <-> Colin27
#: unchanged (0.689 after the affine alone, 0.757 after the policy); the held-out synthetic whole
#: heads lose 0.019 after the affine alone (0.477 -> 0.458) but not after the policy's 20 steps
#: (0.592 -> 0.591) nor the refinement (0.629 -> 0.627).
_FINEST_LEVEL_SIZE = 64
#: Fraction of the voxels the Mattes MI metric samples. 10 % rather than 20 %: with the fixed seed
#: (:func:`affine_prealign`) 20 % took 1.5x as long as the earlier wall-clock-seeded runs and 10 %
#: 1.13x, on the 160x192x144 benchmark pair on 2 threads (the optimiser's iterations depend on the
#: sample); both moved the corners of an 80 mm cube by 0.3 mm from an earlier run's, whose own runs
#: differed by up to 0.5 mm from one another.
_SAMPLING = 0.1


def _finest_shrink(shape: tuple[int, ...]) -> int:
    """The least integer shrink bringing the longest axis to ``_FINEST_LEVEL_SIZE`` voxels, as long as
    the shortest axis keeps ``_MIN_LEVEL_SIZE`` voxels (1 = work at full resolution)."""
    factor = max(1, -(-max(shape) // _FINEST_LEVEL_SIZE))
    smallest = min(n for n in shape if n > 1)
    while factor > 1 and smallest // factor < _MIN_LEVEL_SIZE:
        factor -= 1
    return factor


def _shrink_factors(shape: tuple[int, ...]) -> list[int]:
    """``[4, 2, 1]`` or fewer levels, so that no shrunk axis falls below ``_MIN_LEVEL_SIZE`` voxels."""
    smallest = min(n for n in shape if n > 1)
    return [f for f in (4, 2) if smallest // f >= _MIN_LEVEL_SIZE] + [1]


def affine_prealign(fixed: Image, moving: Image, *, iterations: int = 200, seed: int = 1,
                    threads: int | None = None) -> np.ndarray:
    """Affine fixed -> moving point map ``(ndim + 1, ndim + 1)`` by Mattes mutual information.

    Both images are first block-averaged to at most ~64 voxels along their longest axis, then
    registered multi-resolution (shrink 4, 2, 1 as far as the size allows), centre-of-mass
    initialisation, a rigid stage then the affine one, 10% random sampling. Works across
    modalities and intensity ranges. If the optimised affine matches the images WORSE than no
    transform at all (an optimisation that went astray), the identity is returned, with a warning.

    The sampling uses ``seed`` (>= 1: SimpleITK reads a seed of 0 as "seed from the wall clock",
    which this function passed until 2026-12: two runs on the same BraTS pair then differed by up
    to 10 mm, and Dice after 20 policy steps by up to 0.03). With a fixed seed, what remains is
    SimpleITK's multi-threaded sums changing in their last bits: 0.001-0.003 mm between runs on the
    160x192x144 benchmark pair; ``threads=1`` makes it exact, at twice the time (2.1 s instead
    of 1.2 s on that pair with this CPU's 2 cores, where the whole command has 10 s).

    ``threads``: SimpleITK's threads for this call (None: its default, all cores).
    """
    import SimpleITK as sitk

    if seed < 1:
        raise ValueError(f"seed must be >= 1 (SimpleITK reads 0 as the wall clock), got {seed}")
    default_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if threads is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        f = _shrunk(sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32), fixed.geometry.shape)
        m = _shrunk(sitk.Cast(moving.to_sitk(), sitk.sitkFloat32), moving.geometry.shape)
        return _register(f, m, iterations, seed)
    except RuntimeError as err:  # SimpleITK reports its failures as RuntimeError
        first = str(err).strip().splitlines()[-1][:200]
        raise InputError(f"Affine pre-alignment failed ({first}).",
                         "Check that the two images overlap and show the same anatomy, or run without --prealign.") \
            from err
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(default_threads)


def _shrunk(image, shape: tuple[int, ...]):
    """The image averaged over ``k^ndim`` blocks (physical space kept), ``k`` from :func:`_finest_shrink`.

    Done once, before the registration: smoothing and metric evaluations at full resolution
    cost most of the time, and the pre-alignment does not need voxels finer than SPAC's grid.
    """
    import SimpleITK as sitk

    factor = _finest_shrink(tuple(shape))
    return image if factor == 1 else sitk.BinShrink(image, [factor] * image.GetDimension())


def _metric(reg, f, m, transform) -> float:
    reg.SetInitialTransform(transform, inPlace=False)
    return reg.MetricEvaluate(f, m)


def _register(f, m, iterations: int, seed: int) -> np.ndarray:
    import SimpleITK as sitk

    nd = f.GetDimension()
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(_SAMPLING, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                 gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    shrink = _shrink_factors(f.GetSize()[::-1])
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel([f // 2 for f in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    before = _metric(reg, f, m, sitk.AffineTransform(nd))
    # Rigid first, then affine: started from the moments alone, the 12-parameter affine got stuck
    # on a held-out synthetic pair far apart (Dice 0.20 after it; 0.57 with the rigid stage first;
    # the other pairs unchanged; trainer/benchmarks/results/compare_registration_cpu.md).
    rigid = sitk.CenteredTransformInitializer(f, m, sitk.Euler3DTransform() if nd == 3 else sitk.Euler2DTransform(),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg.SetInitialTransform(rigid, inPlace=True)
    reg.Execute(f, m)
    init = sitk.AffineTransform(nd)
    init.SetCenter(rigid.GetCenter())
    init.SetMatrix(rigid.GetMatrix())
    init.SetTranslation(rigid.GetTranslation())
    reg.SetInitialTransform(init, inPlace=True)
    reg.Execute(f, m)
    after = _metric(reg, f, m, init)
    log.info("affine pre-alignment: Mattes MI %.4f -> %.4f after %d iterations", before, after,
             reg.GetOptimizerIteration())
    if not after < before:  # Mattes MI is negated: lower is better
        log.warning("affine pre-alignment did not improve on the identity (MI %.4f -> %.4f): keeping the identity",
                    before, after)
        return np.eye(nd + 1)
    return affine_matrix(init)


def affine_matrix(transform) -> np.ndarray:
    """Homogeneous matrix of a SimpleITK affine-like transform: ``y = A (x - c) + c + t``."""
    nd = transform.GetDimension()
    a = np.asarray(transform.GetMatrix()).reshape(nd, nd)
    c = np.asarray(transform.GetCenter())
    t = np.asarray(transform.GetTranslation())
    out = np.eye(nd + 1)
    out[:nd, :nd] = a
    out[:nd, nd] = t + c - a @ c
    return out
