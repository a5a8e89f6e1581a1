"""Match a scan's own grey / white-matter levels to the ratio the model segments best at (issue 12).

Why: a white-matter model trained on synthetic T1 volumes learns where the grey / white border
lies in THOSE volumes. SynthSeg's T1 priors spread grey / white over 0.38-0.75, most volumes near
0.6; real T1 scans sit at 0.78-0.82 (MNI152 0.82, Colin27 0.79-0.80, by the estimator below). The
bundled model then put its border too far into the grey matter and over-segmented every real scan
(MNI152: predicted volume 1.11x the reference), and training on softened synthetic grey matter
only moved the border to the other side (0.78x): the border follows the training contrast, not
each scan's own levels. Remapping each scan to one ratio, read with the SAME estimator that chose
that ratio, removes the mismatch without retraining.

The estimator (:func:`tissue_levels`) needs no brain mask: a first pass of the model itself
(one step, on every few slices: :data:`LEVEL_SLICES`) gives a white-matter mask; white = the
median intensity inside it, grey = the median in a 2-voxel ring around it within each slice
(mostly cortex and deep grey matter, which is what surrounds white matter). Intensities are the
0..1 percentile-normalised image the network reads (:func:`steprl.preprocess.normalise_percentile`).
Medians need no more than a few dozen slices: the first pass on all 180 slices of a 256x256x180
head cost 5 s of a 13-15 s command (2 cores); on 32 of them about 0.7 s. 16 slices read the same
levels as 32 on MNI152 and Colin27 (8-bit scans: the medians land on the same grey value) and
ratios within 0.004 on three synthetic T1 heads, with the same final Dice to 0.001 (2026-12-07),
for half that cost.

The card records the target (``normalisation.tissue_levels.grey_to_white``):
``trainer/tools/calibrate_tissue_levels.py`` chooses it on the model's VALIDATION subjects (the
ratio with the best Dice after remapping), or ``--synth-match-levels`` trains at one ratio and
writes that.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

#: Ring width around the first-pass mask, in voxels, where the grey level is read.
RING_VOXELS = 2
#: Most slices the first pass runs on (evenly spread over the non-constant ones).
LEVEL_SLICES = 16
#: Fewest first-pass mask voxels (and ring voxels) for a level estimate.
MIN_VOXELS = 500
#: Grey / white ratios outside this range are not a T1 grey / white pair: no remapping.
PLAUSIBLE_RATIO = (0.3, 0.95)


def tissue_levels(normalised: np.ndarray, white_mask: np.ndarray, slice_axis: int | None = None
                  ) -> tuple[float, float] | None:
    """``(grey, white)`` median levels of ``normalised`` (2D or 3D, 0..1), read around and inside the
    boolean ``white_mask`` (same shape); ``None`` when the mask or its ring is too small.

    ``slice_axis``: the ring grows within the slices across this array axis only (the mask may
    cover only some slices); ``None``: in every direction.
    """
    white_mask = np.asarray(white_mask, dtype=bool)
    if white_mask.sum() < MIN_VOXELS:
        return None
    axes = [a for a in range(white_mask.ndim) if a != slice_axis]
    ring = grown(white_mask, RING_VOXELS, axes) & ~white_mask
    if ring.sum() < MIN_VOXELS:
        return None
    return float(np.median(normalised[ring])), float(np.median(normalised[white_mask]))


def grown(mask: np.ndarray, iterations: int, axes: list[int]) -> np.ndarray:
    """``mask`` dilated ``iterations`` times by the 6- (4-) neighbour cross along ``axes`` (numpy only:
    Slicer's Python has no scipy)."""
    out = mask.copy()
    for _ in range(iterations):
        grown = out.copy()
        for axis in axes:
            or_neighbours(grown, out, axis)
        out = grown
    return out


def or_neighbours(target: np.ndarray, source: np.ndarray, axis: int) -> None:
    """``target |= source`` shifted by one voxel both ways along ``axis`` (bool arrays of one shape, in
    place): one step of a dilation along that axis, numpy only."""
    ahead = [slice(None)] * source.ndim
    behind = [slice(None)] * source.ndim
    ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
    target[tuple(ahead)] |= source[tuple(behind)]
    target[tuple(behind)] |= source[tuple(ahead)]


def match_levels(normalised: np.ndarray, grey: float, white: float, grey_to_white: float) -> np.ndarray:
    """``normalised`` (0..1) remapped piecewise linearly: ``0 -> 0``, ``grey -> grey_to_white * white``,
    ``white -> white`` and everything from ``white`` up unchanged. float32, same shape.

    float32 arithmetic on whole arrays (``np.interp`` goes through float64: 0.2-0.5 s against 0.05 s
    on a 256x256x180 volume; the two agree to float32 rounding)."""
    x = np.asarray(normalised, dtype=np.float32)
    target = grey_to_white * white
    out = x * np.float32(target / grey) if grey > 0 else np.zeros_like(x)
    between = np.subtract(x, np.float32(grey))
    between *= np.float32((white - target) / (white - grey))
    between += np.float32(target)
    np.copyto(out, between, where=x >= grey)
    np.copyto(out, x, where=x >= white)
    return out


def plausible(levels: tuple[float, float] | None) -> bool:
    """Whether ``(grey, white)`` looks like a T1 grey / white pair (:data:`PLAUSIBLE_RATIO`)."""
    if levels is None or levels[1] <= 0:
        return False
    lo, hi = PLAUSIBLE_RATIO
    return lo <= levels[0] / levels[1] <= hi
