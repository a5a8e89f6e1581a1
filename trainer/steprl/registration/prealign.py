"""Optional affine pre-alignment with SimpleITK, for pairs that are not already roughly aligned.

SPAC's steps are small (a few voxels each), so a pair that is off by a rotation or a large
shift should first be aligned affinely. The result is a homogeneous matrix sending a FIXED
physical point (LPS, mm) to the corresponding MOVING point: the same direction as a
displacement field (a resampling transform), so it composes with SPAC's field directly.
"""

from __future__ import annotations

import logging

import numpy as np

from steprl.geometry import Image

log = logging.getLogger(__name__)


def affine_prealign(fixed: Image, moving: Image, *, iterations: int = 200, seed: int = 0) -> np.ndarray:
    """Affine fixed -> moving point map ``(ndim + 1, ndim + 1)`` by Mattes mutual information.

    Multi-resolution (shrink 4, 2, 1), centre-of-mass initialisation, 20% random sampling
    (fixed ``seed`` for reproducibility). Works across modalities and intensity ranges.
    """
    import SimpleITK as sitk

    f = sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32)
    m = sitk.Cast(moving.to_sitk(), sitk.sitkFloat32)
    nd = fixed.ndim
    init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(nd),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                 gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(init, inPlace=True)
    reg.Execute(f, m)
    log.info("affine pre-alignment: metric %.4f after %d iterations", reg.GetMetricValue(),
             reg.GetOptimizerIteration())
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
