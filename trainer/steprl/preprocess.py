"""Intensity preprocessing shared by registration and segmentation (numpy in, numpy out).

Fixed and moving images may come from different scanners with different intensity ranges, so
every image is mapped to ``0..1`` by robust percentiles before a network sees it. The model
card records the percentiles (``normalisation``) so inference does exactly what training did.
"""

from __future__ import annotations

import numpy as np

DEFAULT_PERCENTILES = (0.5, 99.5)


def normalise_percentile(array: np.ndarray, percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> np.ndarray:
    """Map the ``[p_low, p_high]`` percentile range to ``[0, 1]`` and clip; float32, same shape.

    A (near-)constant image maps to zeros; callers validate contrast beforehand
    (:func:`steprl.io.validate_image`) so this only happens on purpose.
    """
    arr = np.asarray(array, dtype=np.float32)
    lo, hi = np.percentile(arr, percentiles)
    if hi - lo <= 1e-8 * max(1.0, abs(hi)):
        return np.zeros_like(arr)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def kmeans_labels(array: np.ndarray, classes: int = 3) -> np.ndarray:
    """Intensity K-means pseudo-labels ``1..classes`` (darkest = 1), same shape, int16.

    SPAC's reward uses the Dice of such maps when no real labels exist. SimpleITK's
    ``ScalarImageKmeansImageFilter`` (initial means at evenly spaced quantiles) does it in
    milliseconds. Every class counts as a label, including the darkest (mostly background).
    """
    import SimpleITK as sitk

    arr = np.asarray(array, dtype=np.float32)
    means = [float(q) for q in np.quantile(arr, (np.arange(classes) + 0.5) / classes)]
    image = sitk.GetImageFromArray(arr)
    km = sitk.ScalarImageKmeansImageFilter()
    km.SetClassWithInitialMean(means)
    km.SetUseNonContiguousLabels(False)
    labels = sitk.GetArrayFromImage(km.Execute(image)).astype(np.int16)
    return labels + 1
