"""The native-resolution border: a segmentation's last stage, after the policy's steps (issue 12).

Why: the policy decides on its network grid (128 x 128 pixels over a slice: 1.6-2 mm on a head
scan) and its mask comes back onto the scan's grid by bilinear interpolation, so its border is
placed to within about one network pixel. A perfect binary labeller on that grid is capped at
Dice 0.951 on MNI152's white matter at 1 mm; the bundled ``pixeldrl_wm`` reached 0.899 there
while a 4-class Otsu threshold of the scan's own voxels reached 0.956. The scan itself resolves
the border; what the policy knows and an intensity threshold does not (cerebral, not cerebellar
white matter; not the scalp's fat; not the bright deep grey nuclei) lies away from it.

The rule (:func:`native_border`):

- **levels**: the object's level is the median intensity inside the policy's mask, its
  surroundings' the median in a ring around it (:func:`steprl.segmentation.tissue_levels.tissue_levels`,
  the estimator that already matches grey / white levels: for white matter, white and grey);
- **bias**: when the object's own smooth intensity field (:mod:`steprl.segmentation.intensity_field`,
  a quadratic fitted to the mask's core) spans more than ``MIN_SPAN`` of its level, the image is
  divided by it first and the levels are read again: one midpoint then holds across the volume
  (synthetic T1 heads with SynthSeg's bias fields 0.880 -> 0.901; unchanged on bias-free scans).
  Only when the grey matter around shares it (:data:`SHARED_SPAN`: its ring's field, fitted the
  same way, spans at least half as much): a bias multiplies every tissue, so a white-matter field
  alone is the policy mask's shape. On ``synth-s20-t1-d4`` (white field 41 %, grey 11 %; a policy
  that missed white matter on one side) dividing by it took the border from 0.828 to 0.584; of the
  56 masks of ``results/compare_segmentation_guard_cpu.md`` (both models) no other changed, nor did
  any of 17 new cases (five more draws of each held-out subject, MNI152 as a subject's scan at
  grey / white 0.80 and 0.95; the bundled model), where the grey field spans at least 0.8 of white's;
- **noise**: when the image's noise, measured in the mask's core, exceeds
  :data:`~steprl.segmentation.denoise.NOISE_TARGET` of the gap between the two levels (one subject's
  scan, not a template), the image is smoothed just enough to bring it there and the levels are
  read again (:mod:`steprl.segmentation.denoise`: MNI152 cerebrum with 3 % Rician noise 0.935 ->
  0.950; the templates and 10 of 15 synthetic heads untouched);
- **band**: voxels within ``band`` voxels of the policy's border along each axis (inside or
  out); by default one network pixel (:func:`band_voxels`);
- inside the band a voxel is object when its intensity lies on the object's side of the
  midpoint of the two levels (the partial-volume rule: more than half of the voxel is object,
  for a linear mix of two tissues); outside it the policy's decision stands;
- anywhere in the mask, a voxel further beyond the object's level than :data:`BEYOND` times the
  gap between the levels is dropped: in T1, fat, marrow and vessels can be brighter than white
  matter, nothing that is white matter is that much brighter (whole-head Colin27: 19,000 scalp
  voxels the policy took, Dice 0.765 -> 0.777; none on MNI152, Colin27's brain or the synthetic
  heads);
- **detached pieces** (:func:`keep_attached`): cerebral white matter is one body (the hemispheres
  joined by the corpus callosum); a piece of the mask farther than :data:`ATTACH_MM` from the main
  pieces (those of at least :data:`MAIN_SHARE` of the largest) is dropped: cerebellar white matter
  (the policy leaves out the brain stem that joins it), scalp fat, marrow. On the held-out
  synthetic heads (exact labels 2 + 41) 0.863 -> 0.871 (HD95 27 -> 3.3 mm); in the cerebrum rows
  of the real cases unchanged (MNI152 0.972, brain-extracted Colin27 0.823 -> 0.822) or up
  (whole-head Colin27 0.795 -> 0.821); the whole-map rows of MNI152 and Colin27 fall (0.958 ->
  0.944, 0.811 -> 0.793), because those references hold cerebellar white matter, which the
  model is not meant to segment.

Limits: the surroundings' level is read in a 2-voxel ring just outside the policy's mask. Where
the policy falls a voxel or more short of the true border, that ring holds object voxels, the
midpoint moves toward the object's level and the border moves out less than it should (a ball
one voxel short: Dice 0.88 -> 0.92, where a mask 1.5 voxels too large comes back to 0.97;
``Testing/test_native_border.py``). The policy over-segmented every real scan measured here
(predicted volume 1.05x MNI152's reference), where the rule works best. Reading the levels again
around the rule's own decision (2 and 3 passes, the band kept) was probed and dropped: MNI152
cerebrum 0.972 -> 0.955 / 0.937, 15 synthetic heads lower or equal. Smoothing a noisy scan
rounds thin strands off with the noise.

Measured (``trainer/benchmarks/compare_segmentation.py``, ``pixeldrl_wm``; the report in
``results/compare_segmentation_border_cpu.md``), the border alone: MNI152 0.899 -> 0.958
(cerebrum 0.925 -> 0.972; Otsu 0.956 / 0.969), Colin27 0.748 -> 0.776 whole head and 0.782 -> 0.811
brain-extracted; on the held-out synthetic T1 heads 0.879 -> 0.863 (their white matter spreads
widely in intensity, so a global midpoint cuts it). The band's width was chosen as one network
pixel before measuring; 1, 2 and 3 voxels at 1 mm gave MNI152 0.953 / 0.957 / 0.958. It is not
learned: every figure names it, and ``--no-border`` (or ``border=False``) gives the policy's own
mask.

numpy and SimpleITK only (no scipy: Slicer's Python has none). A 256 x 256 x 180 volume takes
0.4-0.7 s, the bias field 0.2 s more when it is fitted (2 cores; ``results/bench_segment_command_cpu.md``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from steprl.segmentation import denoise, intensity_field, tissue_levels

#: Where inside the band the object's side begins, between the surroundings' level (0) and the
#: object's (1): 0.5 is the partial-volume midpoint.
FRACTION = 0.5
#: How far beyond the object's level, in gaps between the two levels, a voxel is too bright (or, for
#: a dark object, too dark) to be the object; chosen as 2 before measuring (1.5 / 2 / 3 on whole-head
#: Colin27: 0.782 / 0.777 / 0.768).
BEYOND = 2.0
#: How far (mm) a piece of the mask may lie from the main pieces and be kept (:func:`keep_attached`);
#: set to 4 before measuring (3 and 4 voxels at 1 mm gave the same masks; 6 kept the cerebellum).
ATTACH_MM = 4.0
#: Pieces of at least this share of the largest are main pieces, kept wherever they lie (two
#: hemispheres the policy left unjoined); the cerebellar white matter's pieces are 1-3 %.
MAIN_SHARE = 0.25
#: A bias field multiplies every tissue: the object's field is divided out only when the field of its
#: surroundings (the levels' ring, fitted the same way) spans at least this share of it. A field the
#: grey matter around does not share is the policy mask's shape (white matter it missed on one side,
#: grey matter it took on another), not a coil's bias.
SHARED_SPAN = 0.5
#: Smallest level difference (on the 0..1 percentile-normalised scale) the rule acts on: below it
#: the object is not brighter or darker than its surroundings, and the policy's mask is kept.
MIN_CONTRAST = 0.05


@dataclass(frozen=True)
class BorderResult:
    """What :func:`native_border` did.

    ``mask``: bool, the input's shape. ``levels``: ``(surroundings, object)`` on the
    normalised scale, None when not found. ``threshold``: the midpoint used (None: not applied).
    ``band``: voxels per array axis. ``reason``: why the mask was kept as it was, else "".
    ``field_span``: the span of the object's fitted intensity field (None: not fitted);
    ``field_applied``: whether the image was divided by it before the rule
    (:mod:`steprl.segmentation.intensity_field`); levels and threshold are then on the flattened image.
    ``surround_span``: the span of the surroundings' field, fitted when the object's spans enough to be
    divided out (None: not fitted); below :data:`SHARED_SPAN` of ``field_span`` it is not divided out.
    ``noise_ratio``: the image's noise over the gap between the levels (None: not measured);
    ``smoothing``: the Gaussian sigma (voxels) the image was smoothed by before the rule, 0 for none
    (:mod:`steprl.segmentation.denoise`).
    """

    mask: np.ndarray
    levels: tuple[float, float] | None
    threshold: float | None
    band: tuple[int, ...]
    reason: str = ""
    field_span: float | None = None
    field_applied: bool = False
    noise_ratio: float | None = None
    smoothing: float = 0.0
    surround_span: float | None = None

    @property
    def applied(self) -> bool:
        return self.threshold is not None


def band_voxels(network_pixel_mm: float, spacing: Sequence[float]) -> tuple[int, ...]:
    """The band's half-width in voxels along each array axis: one network pixel, at least one voxel.

    ``network_pixel_mm``: the policy's pixel size on this scan (mm); ``spacing``: the scan's voxel
    size per array axis (mm).
    """
    if not network_pixel_mm > 0 or any(not s > 0 for s in spacing):
        raise ValueError(f"pixel size and spacing must be positive, got {network_pixel_mm} and {tuple(spacing)}")
    return tuple(max(1, int(math.floor(network_pixel_mm / float(s) + 0.5))) for s in spacing)


def grown_box(mask: np.ndarray, band: Sequence[int]) -> np.ndarray:
    """``mask`` (bool) dilated by ``band[a]`` voxels along each array axis ``a`` (a box)."""
    out = np.asarray(mask, dtype=bool).copy()
    for axis, reach in enumerate(band):
        for _ in range(int(reach)):
            step = out.copy()
            tissue_levels.or_neighbours(step, out, axis)
            out = step
    return out


def border_band(mask: np.ndarray, band: Sequence[int]) -> np.ndarray:
    """Voxels within ``band`` voxels (per axis) of the border of ``mask``: bool, same shape."""
    mask = np.asarray(mask, dtype=bool)
    return grown_box(mask, band) & grown_box(~mask, band)


def keep_attached(mask: np.ndarray, reach: Sequence[int]) -> np.ndarray:
    """``mask`` (bool) without its pieces (26-connected components) that lie farther than ``reach``
    voxels (per axis, a box) from every main piece (at least :data:`MAIN_SHARE` of the largest)."""
    import SimpleITK as sitk  # Slicer ships it; scipy it does not

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    box = _bounding_box(mask)  # the work on the mask's box only: a head's white matter fills a fraction of it
    if any(b.stop - b.start < n for b, n in zip(box, mask.shape)):
        out = np.zeros_like(mask)
        out[box] = keep_attached(mask[box], reach)
        return out
    pieces = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))
    labels = sitk.GetArrayFromImage(pieces)  # 1 = the largest, by decreasing size
    sizes = np.bincount(labels.ravel())[1:]
    if len(sizes) == 1:
        return mask
    main = (labels > 0) & (labels <= int(np.sum(sizes >= MAIN_SHARE * sizes[0])))
    near = grown_box(main, reach) & (labels > 0)
    return np.isin(labels, np.unique(labels[near]))


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box (slices per axis) holding every True voxel of ``mask`` (not empty)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def native_border(normalised: np.ndarray, mask: np.ndarray, band: Sequence[int], fraction: float = FRACTION,
                  reach: Sequence[int] | None = None, field_order: int = intensity_field.ORDER,
                  noise_target: float = denoise.NOISE_TARGET) -> BorderResult:
    """The policy's ``mask`` with its border re-decided by the scan's own intensities (module docstring).

    Args:
        normalised: the image (2D or 3D) on the 0..1 percentile-normalised scale the network read.
        mask: the policy's final mask on the same grid (bool or 0/1).
        band: half-width of the band in voxels per array axis (:func:`band_voxels`).
        fraction: where the object's side begins between the two levels (0.5: the midpoint).
        reach: drop the pieces farther than this (voxels per axis) from the main ones
            (:func:`keep_attached`); None: keep every piece.
        field_order: degree of the object's intensity field; the image is divided by it when it spans
            more than :data:`~steprl.segmentation.intensity_field.MIN_SPAN`; 0: no field.
        noise_target: the noise (share of the gap between the levels) the rule tolerates; a noisier
            image is smoothed down to it first (:mod:`steprl.segmentation.denoise`); 0: never smoothed.

    Returns:
        :class:`BorderResult`; its ``mask`` is the input's when the levels are not found or the
        object has no contrast against its surroundings (``reason`` says which).
    """
    mask = np.asarray(mask, dtype=bool)
    band = tuple(int(b) for b in band)
    if normalised.shape != mask.shape or len(band) != mask.ndim:
        raise ValueError(f"image {normalised.shape}, mask {mask.shape} and band {band} do not fit")
    if not mask.any():
        return BorderResult(mask, None, None, band, "the mask (or the ring around it) is too small")
    # Everything the rule reads lies in the mask's box grown by its band and the levels' ring: work there
    # (a head's white matter fills a quarter of the volume; the field's polynomial is the same in any box).
    margin = [max(b, tissue_levels.RING_VOXELS) + 1 for b in band]
    box = tuple(slice(max(0, s.start - m), s.stop + m) for s, m in zip(_bounding_box(mask), margin))
    done = _border_in_box(np.asarray(normalised)[box], mask[box], band, fraction, reach, field_order, noise_target)
    full = np.zeros_like(mask)
    full[box] = done.mask
    return dataclasses.replace(done, mask=full)


def _border_in_box(normalised: np.ndarray, mask: np.ndarray, band: tuple[int, ...], fraction: float,
                   reach: Sequence[int] | None, field_order: int, noise_target: float) -> BorderResult:
    """:func:`native_border` on a box that holds the mask with its band and ring."""
    levels = tissue_levels.tissue_levels(normalised, mask)  # the ring grows in 3D: the mask covers every slice
    core = mask & ~grown_box(~mask, (1,) * mask.ndim)
    field = _object_field(normalised, core, levels, fraction, field_order)
    span = None if field is None else field.span
    surround = None
    flattened = field is not None and field.span > intensity_field.MIN_SPAN
    if flattened:
        surround = _surroundings_span(normalised, mask, levels, field_order)
        flattened = surround is None or surround >= SHARED_SPAN * field.span
    if flattened:
        normalised = field.divide(normalised)
        levels = tissue_levels.tissue_levels(normalised, mask)
    ratio, sigma = _noise(normalised, core, levels, noise_target)
    if sigma > 0:
        normalised = denoise.smooth(normalised, sigma)
        levels = tissue_levels.tissue_levels(normalised, mask)
    if levels is None:
        return BorderResult(mask, None, None, band, "the mask (or the ring around it) is too small", span, flattened,
                            ratio, sigma, surround)
    around, inside = levels
    if abs(inside - around) < MIN_CONTRAST:
        why = f"the object is not brighter or darker than its surroundings ({inside:.2f} vs {around:.2f})"
        return BorderResult(mask, levels, None, band, why, span, flattened, ratio, sigma, surround)
    threshold = around + fraction * (inside - around)
    limit = inside + BEYOND * (inside - around)
    if inside > around:
        object_side, plausible = normalised > threshold, normalised <= limit
    else:
        object_side, plausible = normalised < threshold, normalised >= limit
    decided = np.where(border_band(mask, band), object_side, mask) & plausible
    if reach is not None:
        decided = keep_attached(decided, reach)
    return BorderResult(decided, levels, float(threshold), band, "", span, flattened, ratio, sigma, surround)


def _object_field(normalised: np.ndarray, core: np.ndarray, levels: tuple[float, float] | None, fraction: float,
                  order: int) -> intensity_field.IntensityField | None:
    """The object's intensity field (:mod:`steprl.segmentation.intensity_field`), fitted to its
    ``core`` (the mask eroded by one voxel), without what falls below the rule's threshold; None:
    ``order`` 0, no levels, a dark object (its field would be fitted to noise around a low level),
    too few voxels."""
    if order <= 0 or levels is None or not levels[1] > levels[0]:
        return None
    around, inside = levels
    return intensity_field.fit_field(normalised, core, order, threshold=around + fraction * (inside - around))


def _surroundings_span(normalised: np.ndarray, mask: np.ndarray, levels: tuple[float, float], order: int
                       ) -> float | None:
    """The span of the intensity field of the object's surroundings: the ring the levels are read in
    (:data:`~steprl.segmentation.tissue_levels.RING_VOXELS` around ``mask``, in 3D), without what is
    darker than half their level (CSF, background), fitted as the object's field is; None: too few
    voxels."""
    ring = tissue_levels.grown(mask, tissue_levels.RING_VOXELS, list(range(mask.ndim))) & ~mask
    field = intensity_field.fit_field(normalised, ring & (normalised > 0.5 * levels[0]), order)
    return None if field is None else field.span


def _noise(normalised: np.ndarray, core: np.ndarray, levels: tuple[float, float] | None,
           target: float) -> tuple[float | None, float]:
    """``(noise over the gap between the levels, smoothing sigma in voxels)`` of the image in the
    object's ``core`` (:mod:`steprl.segmentation.denoise`); ``(None, 0)`` when not measured (``target``
    0, no levels, no contrast, too small a core)."""
    if not target > 0 or levels is None or abs(levels[1] - levels[0]) < MIN_CONTRAST:
        return None, 0.0
    noise = denoise.noise_level(normalised, core)
    if noise is None:
        return None, 0.0
    ratio = noise / abs(levels[1] - levels[0])
    return ratio, denoise.smoothing_sigma(ratio, normalised.ndim, target)
