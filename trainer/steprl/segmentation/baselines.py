"""White-matter baselines a user would run instead of PixelDRL-MG: intensity classes inside the brain.

Why: a learned white-matter model is only worth choosing if it beats the two-line answers a
user already has. Issue 12 found the bundled ``pixeldrl_wm`` behind a 4-class Otsu threshold on
a real T1 scan, so ``steprl evaluate segmentation --baselines`` and
``trainer/benchmarks/compare_segmentation.py`` score these methods on the same cases, with the
same metric code (:func:`steprl.metrics.segmentation_metrics`), as the model:

- ``otsu``: SimpleITK ``OtsuMultipleThresholds`` with 3 thresholds (4 classes) over the
  histogram of the brain voxels only (SimpleITK's default 128 bins); white matter = the
  brightest class (voxels above the highest threshold).
- ``kmeans``: 3-class scalar K-means of the brain voxels (SimpleITK ``ScalarImageKmeans``,
  initial means at evenly spaced quantiles, through :func:`steprl.preprocess.kmeans_labels`);
  white matter = the class with the highest mean.
- ``atropos``: ANTs Atropos (``antspyx``), 3 classes, K-means initialisation, MRF smoothing
  0.1 over a 1-voxel neighbourhood, 5 iterations: the settings of ``ants.kmeans_segmentation``,
  without its hole filling, so the given brain mask is respected exactly; the image is first
  rescaled to 0..1 (as that wrapper does); white matter = the class with the highest mean.
  It runs on the voxel grid with the image's spacing. Its thread count is ITK's
  (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``, read once per process; see
  :func:`steprl.registration.baselines.set_tool_threads`).

All three are T1 rules ("white matter is the brightest tissue"); on other contrasts (T2,
FLAIR, the random synthetic contrasts) the brightest class is usually not white matter and they
fail, which the comparison reports rather than hides. They classify the whole brain mask, so
cerebellar white matter and the brain stem count as white matter too (a cerebral white-matter
reference scores that as false positives).

Arrays are numpy ``(D, H, W)`` or ``(H, W)``; intensities in any unit (only their order and
histogram matter); the brain mask is boolean of the same shape; every function returns a bool
white-matter mask of that shape that is False outside the brain. Nothing here imports
``antspyx`` at module import; without it the ``atropos`` baseline raises an
:class:`~steprl.errors.InputError` that says how to install it.
"""

from __future__ import annotations

import importlib
import logging
import tempfile
from collections.abc import Callable, Sequence

import numpy as np

from steprl.errors import InputError

log = logging.getLogger(__name__)

#: Baseline names, as ``steprl evaluate segmentation --baselines`` takes them.
METHODS = ("otsu", "kmeans", "atropos")
#: Fewest brain voxels a baseline accepts: it needs a histogram worth splitting into classes.
MIN_BRAIN_VOXELS = 64
#: More nonzero voxels than this share of the image: probably not skull-stripped (see :func:`nonzero_brain_mask`).
HEAD_NONZERO_SHARE = 0.5


def available(method: str) -> bool:
    """True when ``method`` can run here (``atropos`` needs ``antspyx``)."""
    if _check_method(method) != "atropos":
        return True
    try:
        importlib.import_module("ants")
    except ImportError:
        return False
    return True


def require(method: str) -> None:
    """Raise an InputError naming the fix when ``method`` cannot run here."""
    if not available(method):
        raise InputError(f"The {method} baseline needs the optional package antspyx, which is not installed.",
                         "Install the comparison tools: pip install 'steprl[compare]'.")


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise InputError(f"Unknown white-matter baseline {method!r}.", f"Use one of: {', '.join(METHODS)}.")
    return method


def _brain_values(image: np.ndarray, brain: np.ndarray, classes: int) -> np.ndarray:
    """The brain voxels' intensities (float32, 1D), after checking shapes and content."""
    image, brain = np.asarray(image), np.asarray(brain)
    if image.shape != brain.shape:
        raise InputError(f"The brain mask has shape {brain.shape}, the image {image.shape}.",
                         "Give a brain mask on the image's grid (steprl resamples mask files onto the image).")
    if brain.dtype != bool:
        brain = brain > 0
    values = image[brain].astype(np.float32)
    if values.size < MIN_BRAIN_VOXELS:
        raise InputError(f"The brain mask holds {values.size} voxels; the intensity baselines need at least "
                         f"{MIN_BRAIN_VOXELS}.", "Check the brain mask (is it empty, or on another image?).")
    if not np.all(np.isfinite(values)):
        raise InputError("The image has NaN or infinite values inside the brain mask.", "Fix or mask those voxels.")
    if np.unique(values).size < classes:
        raise InputError(f"The brain holds fewer than {classes} distinct intensities: nothing to split into "
                         f"{classes} classes.", "Check that the image and brain mask belong together.")
    return values


def _scatter(brain: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """A full-shape bool mask that is ``selected`` (1D, one per brain voxel) inside the brain."""
    out = np.zeros(brain.shape, dtype=bool)
    out[np.asarray(brain) > 0] = selected
    return out


def brightest_class(values: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``classes == k`` for the class ``k`` with the highest mean of ``values`` (both 1D, same length)."""
    present = np.unique(classes)
    means = [float(values[classes == k].mean()) for k in present]
    return classes == present[int(np.argmax(means))]


def otsu_white_matter(image: np.ndarray, brain: np.ndarray, classes: int = 4, bins: int = 128) -> np.ndarray:
    """White matter as the brightest of ``classes`` multi-Otsu classes of the brain voxels.

    ``image`` and ``brain`` are ``(D, H, W)`` or ``(H, W)``; returns a bool mask of that shape.
    The histogram is of the brain voxels alone (Otsu is histogram-only, so an image of them alone is
    exactly "Otsu inside the mask").
    """
    import SimpleITK as sitk

    values = _brain_values(image, brain, classes)
    otsu = sitk.OtsuMultipleThresholdsImageFilter()
    otsu.SetNumberOfThresholds(classes - 1)
    otsu.SetNumberOfHistogramBins(bins)
    otsu.Execute(sitk.GetImageFromArray(values[None, :]))  # 2D: SimpleITK has no 1D images
    top = max(otsu.GetThresholds())
    return _scatter(brain, values > top)


def kmeans_white_matter(image: np.ndarray, brain: np.ndarray, classes: int = 3) -> np.ndarray:
    """White matter as the highest-mean class of a ``classes``-class K-means of the brain voxels.

    ``image`` and ``brain`` are ``(D, H, W)`` or ``(H, W)``; returns a bool mask of that shape.
    """
    from steprl.preprocess import kmeans_labels

    values = _brain_values(image, brain, classes)
    labels = kmeans_labels(values[None, :], classes)[0]
    return _scatter(brain, brightest_class(values, labels))


def atropos_white_matter(image: np.ndarray, brain: np.ndarray, spacing_xyz: Sequence[float] | None = None,
                         classes: int = 3, mrf: float = 0.1, iterations: int = 5) -> np.ndarray:
    """White matter as the highest-mean class of ANTs Atropos (settings: module docstring).

    ``image`` and ``brain`` are ``(D, H, W)`` or ``(H, W)``, ``spacing_xyz`` the voxel size in mm
    (x first, as :class:`~steprl.geometry.Geometry` keeps it; default 1 mm). Returns a bool mask.
    """
    require("atropos")
    import ants

    values = _brain_values(image, brain, classes)
    array = np.asarray(image, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
    ndim = array.ndim
    spacing = tuple(float(s) for s in (spacing_xyz or (1.0,) * ndim))[::-1]  # numpy axis order
    a = ants.from_numpy(np.ascontiguousarray(scaled), spacing=spacing)
    mask = ants.from_numpy(np.ascontiguousarray((np.asarray(brain) > 0).astype(np.float32)), spacing=spacing)
    # antspyx leaves its probability images in the temporary folder: give it one we remove.
    with tempfile.TemporaryDirectory(prefix="steprl-atropos-") as tmp:
        previous, tempfile.tempdir = tempfile.tempdir, tmp
        try:
            result = ants.atropos(a=a, x=mask, i=f"kmeans[{classes}]", m=f"[{mrf},{'x'.join(['1'] * ndim)}]",
                                  c=f"[{iterations},0]")
        finally:
            tempfile.tempdir = previous
    labels = result["segmentation"].numpy()[np.asarray(brain) > 0].astype(np.int32)
    return _scatter(brain, brightest_class(values, labels))


_RUNNERS: dict[str, Callable[..., np.ndarray]] = {
    "otsu": lambda image, brain, spacing: otsu_white_matter(image, brain),
    "kmeans": lambda image, brain, spacing: kmeans_white_matter(image, brain),
    "atropos": lambda image, brain, spacing: atropos_white_matter(image, brain, spacing),
}


def white_matter(method: str, image: np.ndarray, brain: np.ndarray,
                 spacing_xyz: Sequence[float] | None = None) -> np.ndarray:
    """Run one baseline by name (:data:`METHODS`): a bool white-matter mask of ``image``'s shape."""
    require(_check_method(method))
    return _RUNNERS[method](image, brain, spacing_xyz)


def nonzero_brain_mask(image: np.ndarray) -> np.ndarray:
    """The brain of a skull-stripped image: its nonzero voxels (bool, same shape).

    Only right for brain-extracted images (zero outside the brain). When most voxels are
    nonzero the image is probably a whole head, and the baselines would classify scalp and
    skull too: a warning says so and how to give a real mask.
    """
    mask = np.asarray(image) != 0
    share = float(mask.mean()) if mask.size else 0.0
    if share > HEAD_NONZERO_SHARE:
        log.warning("%.0f%% of the image's voxels are nonzero: it does not look skull-stripped, so the baselines "
                    "will classify the whole head. Give --brain-masks (or --brain-from-labels with a whole-brain "
                    "label map).", 100 * share)
    return mask
