"""Images synthesised from label maps (SynthSeg / SynthMorph style), and random spatial augmentation.

Why: a model trained on synthetic images whose contrast, bias field, noise, resolution and
shape are drawn at random every time does not learn one scanner's look; it learns the
anatomy, so it works on T1, T2, PD or FLAIR it has never seen, and the training labels are
exact. Two steps, both on torch tensors so they cost milliseconds per 64^3 volume:

1. :func:`random_resample` samples a label map on an output grid through a random affine
   (rotation, scaling, shear, shift) and a smooth random elastic field (nearest neighbour).
2. :func:`synthesize` paints each generation class with a random Gaussian intensity (random
   contrast, or a T1-like prior for some draws), then blurs (partial volume), multiplies by a
   smooth bias field, applies a gamma, adds noise and normalises to ``0..1``.

Shapes: label maps ``(1, 1, D, H, W)`` holding label VALUES (FreeSurfer); all grids isotropic
and axis-aligned (the canonical grids of :mod:`steprl.synth.synthseg`); lengths in mm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from steprl import spatial
from steprl.synth.toy import gaussian_blur, random_rotation


@dataclass(frozen=True)
class SpatialAugment:
    """Ranges of the random spatial transform (uniform in ``+-range`` unless said otherwise)."""

    rotation_deg: float = 4.0  # what an affine pre-alignment leaves, not raw head poses
    scaling: float = 0.05  # log-uniform scale per axis in [1/(1+s), 1+s]
    shear: float = 0.02
    shift_mm: float = 2.0
    elastic_mm: float = 3.0  # std of the elastic control-point displacements, itself uniform in [0, this]
    elastic_control_mm: float = 32.0  # spacing of the elastic control points


def scaled_augment(aug: SpatialAugment, scale: float) -> SpatialAugment:
    """``aug`` with every range (rotation, scaling, shear, shift, elastic) times ``scale``; same control spacing."""
    if scale <= 0:
        raise ValueError(f"the scale of an augmentation must be positive, got {scale}")
    return SpatialAugment(aug.rotation_deg * scale, aug.scaling * scale, aug.shear * scale, aug.shift_mm * scale,
                          aug.elastic_mm * scale, aug.elastic_control_mm)


@dataclass(frozen=True)
class IntensityModel:
    """Generation classes (label value -> class) and optional T1 priors per contrast class.

    ``t1_means`` / ``t1_stds``: ``(2, K)`` arrays (mean and spread of the class means / stds,
    0..255 scale) indexed by ``contrast_class[value]``, as shipped with SynthSeg.
    """

    classes: np.ndarray  # (1024,) label value -> generation class (0 = background)
    contrast_class: np.ndarray | None = None  # (1024,) label value -> T1 prior index
    t1_means: np.ndarray | None = None
    t1_stds: np.ndarray | None = None

    @property
    def n_classes(self) -> int:
        return int(self.classes.max()) + 1

    @classmethod
    def from_synthseg_folder(cls, folder: str | Path, values: np.ndarray | None = None) -> IntensityModel:
        """Read ``labels_classes_priors/`` when present; else one class per label value in ``values``."""
        priors = Path(folder) / "labels_classes_priors"
        if (priors / "generation_labels.npy").is_file():
            labels = np.load(priors / "generation_labels.npy").astype(np.int64)
            classes = np.zeros(1024, dtype=np.int64)
            classes[labels] = np.load(priors / "generation_classes.npy").astype(np.int64)
            contrast = np.zeros(1024, dtype=np.int64)
            contrast[labels] = np.load(priors / "generation_classes_contrast_specific.npy").astype(np.int64)
            return cls(classes, contrast, np.load(priors / "prior_means_t1.npy"), np.load(priors / "prior_stds_t1.npy"))
        if values is None:
            raise ValueError("without SynthSeg priors the label values must be given")
        classes = np.zeros(1024, dtype=np.int64)
        for k, v in enumerate(sorted(int(x) for x in values if x != 0)):
            classes[v] = k + 1
        return cls(classes)


def _elastic(shape: tuple[int, ...], spacing: float, aug: SpatialAugment, rng: np.random.Generator,
             device) -> torch.Tensor:
    """A smooth random displacement ``(1, 3, *shape)`` in mm (cubic upsampling of control points)."""
    extent = max(shape) * spacing
    n = max(2, int(math.ceil(extent / aug.elastic_control_mm)) + 1)
    std = rng.uniform(0, aug.elastic_mm)
    control = torch.from_numpy(rng.normal(0, std, size=(1, 3, n, n, n)).astype(np.float32)).to(device)
    return F.interpolate(control, size=shape, mode="trilinear", align_corners=True)


def random_affine(aug: SpatialAugment, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random ``(3, 3)`` linear map and ``(3,)`` shift (mm) around the grid centre."""
    rot = random_rotation(3, aug.rotation_deg, rng)
    scale = np.diag(np.exp(rng.uniform(-math.log1p(aug.scaling), math.log1p(aug.scaling), size=3)))
    shear = np.eye(3) + np.triu(rng.uniform(-aug.shear, aug.shear, size=(3, 3)), 1)
    return rot @ scale @ shear, rng.uniform(-aug.shift_mm, aug.shift_mm, size=3)


def _offsets_mm(shape: tuple[int, ...], spacing: float, aug: SpatialAugment | None, rng: np.random.Generator,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each voxel's offset ``p`` from the grid centre and its image ``A p + t + e(p)``, in mm ``(1, 3, *shape)``.

    ``aug=None``: the identity (``p`` twice, no random draw).
    """
    centre = torch.tensor([(n - 1) / 2 for n in shape], device=device).view(1, 3, 1, 1, 1)
    p = (spatial.identity_coords(shape, device) - centre) * spacing
    if aug is None:
        return p, p
    lin, shift = random_affine(aug, rng)
    q = torch.einsum("ij,bj...->bi...", torch.from_numpy(lin.astype(np.float32)).to(device), p)
    q = q + torch.from_numpy(shift.astype(np.float32)).to(device).view(1, 3, 1, 1, 1)
    return p, q + _elastic(shape, spacing, aug, rng, device)


def random_coords(source_shape: tuple[int, ...], source_spacing: float, shape: tuple[int, ...], spacing: float,
                  rng: np.random.Generator, aug: SpatialAugment | None = SpatialAugment(), device=None
                  ) -> torch.Tensor:
    """Source voxel coordinates ``(1, 3, *shape)`` that a ``shape`` grid of ``spacing`` mm samples.

    The output voxel at ``p`` mm from the output centre looks at ``A p + t + e(p)`` mm from the
    source centre (``aug=None``: identity); ``source_shape`` is the source grid of
    ``source_spacing`` mm, centres aligned.
    """
    _, q = _offsets_mm(shape, spacing, aug, rng, device)
    centre_src = torch.tensor([(n - 1) / 2 for n in source_shape], device=device).view(1, 3, 1, 1, 1)
    return q / source_spacing + centre_src


def random_resample(labels: torch.Tensor, source_spacing: float, shape: tuple[int, ...], spacing: float,
                    rng: np.random.Generator, aug: SpatialAugment | None = SpatialAugment()) -> torch.Tensor:
    """Sample ``labels`` ``(1, 1, *S_src)`` onto a ``shape`` grid of ``spacing`` mm, centres aligned.

    Through a random affine + elastic transform (:func:`random_coords`; ``aug=None``: identity).
    Returns int64 ``(1, 1, *shape)``; outside the source is 0.
    """
    coords = random_coords(tuple(labels.shape[2:]), source_spacing, shape, spacing, rng, aug, labels.device)
    return spatial.sample(labels.float(), coords, "nearest", "zeros").round().long()


def random_field(shape: tuple[int, ...], spacing: float, aug: SpatialAugment, rng: np.random.Generator,
                 device=None) -> torch.Tensor:
    """A random affine + elastic displacement ``(1, 3, *shape)`` in VOXELS of a ``spacing`` mm grid.

    ``v(x) = (A p + t + e(p) - p) / spacing`` with ``p`` the voxel's offset from the grid centre
    in mm: the kind of residual an affine pre-alignment leaves between two subjects.
    """
    p, q = _offsets_mm(shape, spacing, aug, rng, device)
    return (q - p) / spacing


def known_pair(labels: torch.Tensor, source_spacing: float, shape: tuple[int, ...], spacing: float,
               rng: np.random.Generator, aug: SpatialAugment, pair_aug: SpatialAugment, supersample: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two label maps of ONE subject and the exact field between them (SynthMorph-style pairs).

    The moving map samples ``labels`` through a random transform (``aug``); the fixed map is
    the moving one pulled through a random field ``v`` (``pair_aug``), both sampled from the
    source so neither is resampled twice: ``fixed(x) = moving(x + v(x))``. ``v`` is therefore
    exactly the pull-back displacement that registers moving onto fixed.

    Returns fixed and moving label values ``(1, 1, *shape * supersample)`` int64 (on a grid
    ``supersample`` times finer, for partial-volume images: :func:`pool_image`) and ``v``
    ``(1, 3, *shape)`` in voxels of the output grid.
    """
    source_shape = tuple(labels.shape[2:])
    fine = tuple(n * supersample for n in shape)
    moving_coords = random_coords(source_shape, source_spacing, fine, spacing / supersample, rng, aug, labels.device)
    field = random_field(shape, spacing, pair_aug, rng, labels.device)
    fine_field = field if supersample == 1 else supersample * F.interpolate(
        field, scale_factor=supersample, mode="trilinear", align_corners=False)
    fixed_coords = spatial.warp(moving_coords, fine_field, "linear", "border")

    def take(coords: torch.Tensor) -> torch.Tensor:
        return spatial.sample(labels.float(), coords, "nearest", "zeros").round().long()

    return take(fixed_coords), take(moving_coords), field


def pool_image(image: torch.Tensor, supersample: int) -> torch.Tensor:
    """Average ``supersample``^3 blocks of a fine image ``(1, 1, *S*f)`` -> ``(1, 1, *S)``: partial volume.

    An image synthesised from nearest-neighbour labels on the output grid itself moves in
    whole voxels: a sub-voxel shift between two views is invisible in it. Painting a finer grid
    and averaging keeps the shift in the boundary voxels' intensities, as a scanner does.
    """
    return image if supersample == 1 else F.avg_pool3d(image, supersample)


def pick_labels(values: torch.Tensor, supersample: int) -> torch.Tensor:
    """The label of one fine voxel per block (``(1, 1, *S*f)`` -> ``(1, 1, *S)``), for label Dice on the output grid."""
    if supersample == 1:
        return values
    c = supersample // 2
    return values[..., c::supersample, c::supersample, c::supersample]


#: Label values from which SynthSeg's generation labels are extra-cerebral (skull, scalp, fat, muscle, eyes...).
EXTRACEREBRAL_FROM = 500
#: Left cerebral white matter, whose T1 class mean :func:`draw_contrast` scales bright fat from.
_WHITE_MATTER = 2


def _extracerebral_classes(model: IntensityModel) -> np.ndarray:
    """The T1 contrast classes of the extra-cerebral generation labels (skull, scalp, fat, muscle, eyes...)."""
    values = np.flatnonzero(model.classes)
    return np.unique(model.contrast_class[values[values >= EXTRACEREBRAL_FROM]])


def _brighten_fat(cls_mean: np.ndarray, model: IntensityModel, rng: np.random.Generator) -> None:
    """Make 1-3 random extra-cerebral T1 classes 1.1-1.8x as bright as white matter, in place.

    Why (issue 12): in real T1 scans subcutaneous and marrow fat are the brightest tissue. Colin27's
    whole head has its 99.5th intensity percentile at 1.57x its brain's, so after percentile
    normalisation its white matter sits at 0.62 instead of 0.93, where SynthSeg's T1 priors rarely
    put it; a model trained on them found 19 % of Colin27's white matter (Dice 0.28), and 82 %
    (0.66) once the scalp was clipped to the brain's range.
    """
    extra = _extracerebral_classes(model)
    if extra.size == 0:
        return
    chosen = rng.choice(extra, size=min(extra.size, int(rng.integers(1, 4))), replace=False)
    cls_mean[chosen] = cls_mean[model.contrast_class[_WHITE_MATTER]] * rng.uniform(1.1, 1.8, size=chosen.size)


#: Range of :func:`_randomise_head`'s extra-cerebral class means, as multiples of white matter's.
HEAD_RANGE = (0.0, 1.8)


def _randomise_head(cls_mean: np.ndarray, model: IntensityModel, rng: np.random.Generator) -> None:
    """Give every extra-cerebral T1 class a uniform random mean in :data:`HEAD_RANGE` x white matter's, in place.

    Why (issue 12): SynthSeg's T1 priors (and :func:`_brighten_fat`) fix how scalp, skull, muscle
    and eyes look relative to the brain; scanners and sequences do not. Continuing the bundled
    model's training made it more inclusive on Colin27's whole head only (not on the same brain
    extracted); with the head's contrast unrelated to the brain's, only the brain can tell where
    white matter is. Measured (run w20, 500 updates at share 0.5): the synthetic heads gained
    (0.872 -> 0.881), the real rows held (0.913 -> 0.911), whole-head Colin27 did not come back (0.798).
    """
    extra = _extracerebral_classes(model)
    wm = cls_mean[model.contrast_class[_WHITE_MATTER]]
    cls_mean[extra] = wm * rng.uniform(*HEAD_RANGE, size=extra.size)


#: :func:`_soften_grey` moves the T1 classes whose mean lies between this share of white matter's and
#: white matter's own toward white matter: cortex and deep grey nuclei, and the extra-cerebral classes
#: in that range too (not CSF, about 0.28).
GREY_FROM = 0.45
#: Range of the factor that multiplies those classes' distance below white matter (1: unchanged).
GREY_SQUEEZE = (0.45, 1.0)


def _soften_grey(cls_mean: np.ndarray, model: IntensityModel, rng: np.random.Generator) -> None:
    """Bring the grey-matter-like T1 classes toward white matter by one random factor, in place.

    ``mean <- wm - (wm - mean) * k``, ``k`` uniform in :data:`GREY_SQUEEZE`, for every class
    between :data:`GREY_FROM` x and 1 x white matter's mean (extra-cerebral ones included: the
    task only needs the brain's grey and white levels right).
    Why (issue 12): SynthSeg's T1 priors put the cortex at 0.60 of white matter (means 96 and 160
    of 255); real T1 scans are flatter (MNI152 2009a: grey matter at 0.78 of white matter). A model
    trained on the priors alone put its white-matter border at about 0.8 x white matter's
    intensity, the middle of ITS training contrast, and so took the partial-volume rim of
    real scans (0.80-0.91 x white matter) as white matter: on MNI152, 142k false positives
    against 74k false negatives, 67 % of them within 1.5 mm of the reference. With k = 0.45 the
    cortex sits at 0.82.
    """
    wm = cls_mean[model.contrast_class[_WHITE_MATTER]]
    grey = (cls_mean >= GREY_FROM * wm) & (cls_mean < wm)
    cls_mean[grey] = wm - (wm - cls_mean[grey]) * rng.uniform(*GREY_SQUEEZE)


def draw_contrast(model: IntensityModel, rng: np.random.Generator, t1_probability: float = 0.3,
                  bright_fat: float = 0.0, soft_grey: float = 0.0,
                  wild_head: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Random mean and std (0..1 scale; bright fat may exceed 1) per generation class: ``(n_classes,)`` each.

    A T1-like draw (SynthSeg's priors) with ``t1_probability`` when the priors are known,
    else uniformly random contrast, with dark air in 80 % of the draws. ``bright_fat``: share of
    the T1-like draws whose fat is brighter than white matter (:func:`_brighten_fat`);
    ``soft_grey``: share of the T1-like draws whose grey matter is brought toward white matter
    (:func:`_soften_grey`); ``wild_head``: share of the T1-like draws whose extra-cerebral classes get
    random levels (:func:`_randomise_head`, after the other two). At 0 none of them draws an extra
    random number, so earlier seeds give the same images.
    """
    n = model.n_classes
    if model.t1_means is not None and rng.uniform() < t1_probability:
        contrast = model.contrast_class
        k = int(contrast.max()) + 1
        cls_mean = rng.normal(model.t1_means[0, :k], model.t1_means[1, :k]).clip(0, 255) / 255
        cls_std = np.abs(rng.normal(model.t1_stds[0, :k], model.t1_stds[1, :k])) / 255
        if bright_fat > 0 and rng.uniform() < bright_fat:
            _brighten_fat(cls_mean, model, rng)
        if soft_grey > 0 and rng.uniform() < soft_grey:
            _soften_grey(cls_mean, model, rng)
        if wild_head > 0 and rng.uniform() < wild_head:
            _randomise_head(cls_mean, model, rng)
        values = np.concatenate([[0], np.flatnonzero(model.classes)])  # the generation labels
        means, stds = np.zeros(n), np.zeros(n)
        means[model.classes[values]] = cls_mean[contrast[values]]
        stds[model.classes[values]] = cls_std[contrast[values]]
        return means, stds
    means, stds = rng.uniform(0, 1, size=n), rng.uniform(0, 0.06, size=n)
    if rng.uniform() < 0.8:  # air is dark in most MRI
        means[0], stds[0] = rng.uniform(0, 0.08), rng.uniform(0, 0.02)
    return means, stds


def synthesize(labels: torch.Tensor, model: IntensityModel, rng: np.random.Generator, *,
               t1_probability: float = 0.3, contrast: tuple[np.ndarray, np.ndarray] | None = None,
               bright_fat: float = 0.0, soft_grey: float = 0.0, wild_head: float = 0.0) -> torch.Tensor:
    """A random-contrast image ``(1, 1, *S)`` float32 in ``0..1`` from label values ``(1, 1, *S)``.

    ``contrast``: class means and stds from :func:`draw_contrast` (to give two images the same
    contrast); default a new draw (``t1_probability``, ``bright_fat``, ``soft_grey``, ``wild_head`` as there).
    Blur, bias field, gamma and noise are always drawn anew.
    """
    device = labels.device
    classes = torch.from_numpy(model.classes).to(device)[labels.clamp(0, 1023)]
    if contrast is None:
        contrast = draw_contrast(model, rng, t1_probability, bright_fat, soft_grey, wild_head)
    means, stds = contrast
    mean_t = torch.from_numpy(means.astype(np.float32)).to(device)[classes]
    std_t = torch.from_numpy(stds.astype(np.float32)).to(device)[classes]
    gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**62)))
    image = mean_t + std_t * torch.randn(labels.shape, generator=gen).to(device)
    image = gaussian_blur(image, float(rng.uniform(0.3, 1.2)))
    bias = torch.from_numpy(rng.normal(0, rng.uniform(0, 0.3), size=(1, 1, 4, 4, 4)).astype(np.float32))
    image = image * F.interpolate(bias.to(device), size=labels.shape[2:], mode="trilinear", align_corners=True).exp()
    image = image.clamp(min=0)
    image = image / image.flatten().quantile(0.999).clamp(min=1e-6)
    image = image.clamp(0, 1) ** float(math.exp(rng.normal(0, 0.25)))
    image = image + float(rng.uniform(0, 0.03)) * torch.randn(labels.shape, generator=gen).to(device)
    return image.clamp(0, 1)
