"""Training slices SYNTHESISED from SynthSeg label maps: a contrast-agnostic white-matter segmenter.

Why: the bundled PixelDRL-MG starter model must work on real brain MRI of any contrast, but no
labelled real scans may be used for training (the BraTS data forbid redistribution of weights,
oasis2d has no labels). The 20 SynthSeg whole-head label maps (Apache-2.0) give exact labels;
:mod:`steprl.synth.from_labels` paints them with random intensities (or T1-like priors), bias field,
blur, gamma and noise, and deforms them at random (affine + elastic), so every batch shows new
"scans" of known anatomy. Both methods (PixelDRL-MG and the U-Net baseline) draw from this
source, so they see the same distribution for the same budget.

How a batch is made (:meth:`SynthSegSliceSource.sample`):

1. pick a training subject (its label map is on a canonical head grid, read once,
   :func:`steprl.synth.synthseg.load_canonical`);
2. draw a network pixel size ``fov / size`` with the field of view ``fov`` uniform in
   ``fov_mm`` (210-256 mm: what axial brain scans cover; the inference fits a slice's
   physical extent into the grid, see :class:`steprl.segmentation.data.SliceGrid`), and
   resample the label map onto a ``(Dz, *size)`` grid of that spacing through a random affine
   and elastic transform (:func:`steprl.synth.from_labels.random_resample`, rotations up to
   ``rotation_deg``: real scans are not pre-aligned);
3. with probability ``strip_probability`` remove everything but the brain (:func:`skull_strip`;
   with ``strip_margin_mm``, everything beyond a random rim around it),
   synthesise the intensity volume (:func:`steprl.synth.from_labels.synthesize`) and normalise the
   WHOLE volume by its 0.5 / 99.5 percentiles, exactly as inference does
   (:func:`steprl.preprocess.normalise_percentile`);
4. take axial slices (array axis 0 of the canonical, axis-aligned LPS grid): a slice with
   white matter with probability ``1 / (1 + empty_fraction)``, else a non-constant slice
   without (the model must learn to leave those empty), then random up-down / left-right
   flips (a scan's in-plane orientation on disk is arbitrary).

``volumes_per_batch`` volumes are synthesised per batch and the batch's slices spread over
them: one volume costs about as much as a small network update on a CPU, so slices share it.

The object is the union of ``label_values`` (default :data:`steprl.synth.synthseg.WHITE_MATTER`,
cerebral white matter, FreeSurfer 2 and 41). Subjects are split by
:func:`steprl.synth.synthseg.split_subjects` (last 3 held out for tests, 3 before for validation);
validation slices are synthesised once from the validation subjects with a fixed seed.
:func:`synth_case` makes whole 3D test cases (image + labels with geometry) for the
comparison benchmark.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from steprl.errors import InputError
from steprl.geometry import Geometry, Image
from steprl.preprocess import normalise_percentile
from steprl.segmentation.data import SliceBatch, random_flips

log = logging.getLogger(__name__)

FOV_MM = (210.0, 256.0)
"""Range of the in-plane field of view (mm) the network grid covers in training."""

SLAB_MM = 200.0
"""Extent (mm) of the synthesised volume along the slicing axis: the whole brain with margin."""

SYNTHSEG_LICENCE = ("SynthSeg label maps (B. Billot et al., SynthSeg, github.com/BBillot/SynthSeg), "
                    "Apache-2.0; images synthesised from them by steprl.synth.from_labels")


def spatial_augment(rotation_deg: float = 12.0):
    """The random spatial transform of training: larger rotations and shifts than registration's
    default (which assumes an affine pre-alignment), since segmentation inputs are not aligned."""
    from steprl.synth.from_labels import SpatialAugment

    return SpatialAugment(rotation_deg=rotation_deg, scaling=0.08, shear=0.03, shift_mm=8.0, elastic_mm=3.0)


def skull_strip(labels: torch.Tensor, margin_mm: float = 0.0, spacing_mm: float = 1.0) -> torch.Tensor:
    """``labels`` with every value outside the brain structures (and CSF) set to 0 (background), or,
    with ``margin_mm`` > 0, every value farther than that from them: an imperfect brain extraction.

    Why: many scans users segment are skull-stripped (as the MNI152 template nilearn ships is),
    so a share of the training volumes shows a brain on a dark background; real extractions
    (BET, a template's mask) leave a rim of dura, skull or scalp of varying width, which the margin
    draws. Measured (run w22, 440 updates with rims of 0-20 mm on half the volumes): whole-head
    Colin27 +0.003, MNI152 -0.018; the rims are not what whole-head scans lacked.

    Args:
        labels: FreeSurfer label values, any shape (``(1, 1, D, H, W)`` in training).
        margin_mm: width (mm) of the rim of non-brain labels kept around the brain; 0 = none.
        spacing_mm: voxel size (mm) of ``labels``' grid (isotropic), to measure the margin.
    """
    from steprl.synth.synthseg import BRAIN_STRUCTURES

    keep = torch.zeros(1024, dtype=torch.bool)
    keep[list(BRAIN_STRUCTURES)] = True
    inside = keep[labels.clamp(0, 1023)]
    if margin_mm > 0:
        inside = _within(inside, margin_mm, spacing_mm)
    return torch.where(inside, labels, torch.zeros_like(labels))


def _within(mask: torch.Tensor, margin_mm: float, spacing_mm: float) -> torch.Tensor:
    """``mask`` (bool, any shape with at most 3 non-singleton axes) grown by ``margin_mm`` (Euclidean
    distance on a grid of ``spacing_mm``), via SimpleITK's exact signed Maurer distance map."""
    import SimpleITK as sitk

    volume = mask.squeeze().numpy().astype(np.uint8)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing([float(spacing_mm)] * image.GetDimension())
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    grown = torch.from_numpy(sitk.GetArrayFromImage(distance) <= margin_mm)
    return grown.reshape(mask.shape)


@functools.lru_cache(maxsize=32)
def _canonical_labels(path: Path, spacing: float, size: int) -> torch.Tensor:
    """:func:`steprl.synth.synthseg.load_canonical`'s label tensor, cached per process (read-only use):
    reading and resampling a 256^3 label map takes seconds, and tests build several sources."""
    from steprl.synth.synthseg import load_canonical

    return load_canonical(path, spacing, size)[0]


def canonical_spacing(size: Sequence[int], fov_mm: Sequence[float] = FOV_MM) -> float:
    """Spacing (mm) of the canonical label grids: the finest network pixel, at least 1.5 mm."""
    return max(1.5, float(fov_mm[0]) / max(int(s) for s in size))


class SynthSegSliceSource:
    """Endless synthetic axial slices of SynthSeg heads; implements the learners' ``SliceSource``.

    Args:
        folder: the SynthSeg folder (``training_seg_*.nii.gz`` + ``labels_classes_priors/``).
        size: network grid ``(H, W)``.
        label_values: FreeSurfer values forming the object (default cerebral white matter).
        seed: seeds the fixed validation slices (training draws use the learner's generator).
        val_slices: number of validation slices (from the validation subjects).
        empty_fraction: slices without object per slice with object.
        volumes_per_batch: synthesised volumes a batch's slices are spread over.
        t1_probability: share of T1-like contrasts (the rest are random contrasts); 0.5 by default:
            random contrasts alone make white matter invisible in part of the volumes (equal class
            means), which a small model on a short CPU budget learns slowly from.
        max_train_subjects: use only the first N training subjects (CI smoke tests).
        validation, test: held-out subject counts (:func:`steprl.synth.synthseg.split_subjects`).
        fov_mm: range of the in-plane field of view of a training slice.
        rotation_deg: random rotation range of the spatial augmentation.
        strip_probability: share of volumes synthesised skull-stripped (:func:`skull_strip`).
        strip_margin_mm: the rim of non-brain tissue a stripped volume keeps is drawn uniform in
            ``[0, strip_margin_mm]`` mm (imperfect extractions; default 0: the brain alone, no draw).
        bright_fat: share of the T1-like volumes whose fat is brighter than white matter, as in real
            T1 scans (:func:`steprl.synth.from_labels.draw_contrast`; default 0).
        soft_grey: share of the T1-like volumes whose grey matter is brought toward white matter, as
            flat as in real T1 scans (``draw_contrast``; default 0).
        wild_head: share of the T1-like volumes whose scalp, skull, muscle and eyes get random levels,
            unrelated to the brain's (``draw_contrast``; default 0).
        match_levels: grey / white ratio every T1-like volume is remapped to, as inference remaps a
            user's scan (:mod:`steprl.segmentation.tissue_levels`; here the levels are read around and
            inside the TRUE white matter); 0 = off. Why: SynthSeg's T1 priors spread the ratio over
            0.38-0.75, and the network learns one border for all of them; trained at one ratio, with
            every scan brought to it, the border need not be a compromise.
    """

    def __init__(self, folder: str | Path, size: Sequence[int] = (128, 128), *,
                 label_values: Sequence[int] | None = None, seed: int = 0, val_slices: int = 48,
                 empty_fraction: float = 0.2, volumes_per_batch: int = 2, t1_probability: float = 0.5,
                 max_train_subjects: int | None = None, validation: int = 3, test: int = 3,
                 fov_mm: Sequence[float] = FOV_MM, rotation_deg: float = 12.0,
                 strip_probability: float = 0.3, bright_fat: float = 0.0, soft_grey: float = 0.0,
                 wild_head: float = 0.0, match_levels: float = 0.0, strip_margin_mm: float = 0.0) -> None:
        from steprl.synth.from_labels import IntensityModel
        from steprl.synth.synthseg import WHITE_MATTER, list_label_maps, split_subjects

        self.size = (int(size[0]), int(size[1]))
        if min(self.size) < 8:
            raise InputError(f"A {self.size} grid is too small.", "Use --size of at least 8 x 8 (128 128 for brains).")
        if empty_fraction < 0 or volumes_per_batch < 1:
            raise InputError("empty_fraction must be >= 0 and volumes_per_batch >= 1.", "Use e.g. 0.2 and 2.")
        self.folder = Path(folder)
        self.label_values = tuple(int(v) for v in (label_values or WHITE_MATTER))
        self.empty_fraction = float(empty_fraction)
        self.volumes_per_batch = int(volumes_per_batch)
        self.t1_probability = float(t1_probability)
        self.strip_probability = float(strip_probability)
        self.strip_margin_mm = float(strip_margin_mm)
        if not 0 <= self.strip_margin_mm <= 60:
            raise InputError(f"--synth-strip-margin must be 0-60 mm, got {strip_margin_mm}.",
                             "Use e.g. --synth-strip-margin 15, or 0 for brain-only stripping.")
        self.bright_fat, self.soft_grey, self.wild_head = float(bright_fat), float(soft_grey), float(wild_head)
        for name, share in (("bright-fat", self.bright_fat), ("soft-grey", self.soft_grey),
                            ("wild-head", self.wild_head), ("strip", self.strip_probability)):
            if not 0 <= share <= 1:
                raise InputError(f"--synth-{name} must be a share in [0, 1], got {share}.",
                                 f"Use e.g. --synth-{name} 0.5.")
        self.match_levels = float(match_levels)
        if self.match_levels and not 0.3 <= self.match_levels <= 0.95:
            raise InputError(f"--synth-match-levels must be a grey / white ratio in [0.3, 0.95], got {match_levels}.",
                             "Use e.g. --synth-match-levels 0.6, or 0 for none.")
        self.fov_mm = (float(fov_mm[0]), float(fov_mm[1]))
        self.augment = spatial_augment(rotation_deg)
        self.split = split_subjects(list_label_maps(self.folder), validation=validation, test=test)
        train_paths = self.split.train[:max_train_subjects] if max_train_subjects else self.split.train
        self.spacing = canonical_spacing(self.size, self.fov_mm)
        grid_size = int(math.ceil(240.0 / self.spacing))
        self.intensity = IntensityModel.from_synthseg_folder(self.folder)
        self.train_labels = [_canonical_labels(Path(p), self.spacing, grid_size) for p in train_paths]
        val_labels = [_canonical_labels(Path(p), self.spacing, grid_size) for p in self.split.validation]
        log.info("SynthSeg slices: %d training and %d validation subjects on a %d^3 grid of %.2f mm",
                 len(self.train_labels), len(val_labels), grid_size, self.spacing)
        self._val = self._fixed_slices(val_labels, val_slices, np.random.default_rng(seed + 104729))
        self.description = {
            "kind": "synthseg", "folder": str(self.folder), "size": list(self.size),
            "object": "labels in " + ", ".join(str(v) for v in self.label_values)
                      + (" (cerebral white matter)" if set(self.label_values) == set(WHITE_MATTER) else ""),
            "train_subjects": [p.name for p in train_paths],
            "validation_subjects": [p.name for p in self.split.validation],
            "test_subjects_held_out": [p.name for p in self.split.test],
            "fov_mm": list(self.fov_mm), "rotation_deg": rotation_deg, "t1_probability": self.t1_probability,
            "empty_fraction": self.empty_fraction, "strip_probability": self.strip_probability,
            "val_slices": len(self._val), "axis": "axial",
            "licence": SYNTHSEG_LICENCE,
        }
        # only when used: runs started before an option still resume
        for key in ("bright_fat", "soft_grey", "wild_head", "match_levels", "strip_margin_mm"):
            if getattr(self, key) > 0:
                self.description[key] = getattr(self, key)

    # -- volumes ------------------------------------------------------------------------------

    def synth_volume(self, labels: torch.Tensor, rng: np.random.Generator, *, spacing: float | None = None,
                     t1: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One random "scan" of ``labels`` (canonical grid): ``(image (Dz, H, W) float32 0..1, object bool)``.

        ``spacing``: the network pixel size (None: drawn from ``fov_mm``); ``t1``: force a
        T1-like (True) or random (False) contrast, None draws with ``t1_probability``.
        """
        from steprl.synth.from_labels import random_resample, synthesize

        if spacing is None:
            spacing = float(rng.uniform(*self.fov_mm)) / max(self.size)
        depth = max(1, int(round(SLAB_MM / spacing)))
        shape = (depth, *self.size)
        resampled = random_resample(labels[None, None], self.spacing, shape, spacing, rng, self.augment)
        if rng.random() < self.strip_probability:
            margin = float(rng.uniform(0, self.strip_margin_mm)) if self.strip_margin_mm else 0.0
            resampled = skull_strip(resampled, margin, spacing)
        probability = self.t1_probability if t1 is None else float(bool(t1))
        image = synthesize(resampled, self.intensity, rng, t1_probability=probability,
                           bright_fat=self.bright_fat, soft_grey=self.soft_grey,
                           wild_head=self.wild_head)[0, 0].numpy()
        values = resampled[0, 0].numpy()
        obj = np.isin(values, self.label_values)
        return self._matched(normalise_percentile(image), obj), obj

    def _matched(self, normalised: np.ndarray, white: np.ndarray) -> np.ndarray:
        """``normalised`` remapped to ``match_levels`` (levels read in-slice around and inside ``white``,
        the object); as it is when off or when the levels are not a T1 grey / white pair."""
        from steprl.segmentation.tissue_levels import match_levels, plausible, tissue_levels

        if not self.match_levels:
            return normalised
        levels = tissue_levels(normalised, white, slice_axis=0)
        return match_levels(normalised, *levels, self.match_levels) if plausible(levels) else normalised

    def _pick(self, image: np.ndarray, obj: np.ndarray, count: int, rng: np.random.Generator) -> list[int]:
        has_object = obj.any(axis=(1, 2))
        flat = image.reshape(image.shape[0], -1)
        empty = np.flatnonzero(~has_object & (flat.max(axis=1) > flat.min(axis=1)))
        full = np.flatnonzero(has_object)
        picks = []
        for _ in range(count):
            use_empty = len(empty) and (not len(full) or rng.random() >= 1.0 / (1.0 + self.empty_fraction))
            pool = empty if use_empty else full
            picks.append(int(rng.choice(pool)) if len(pool) else int(rng.integers(image.shape[0])))
        return picks

    def _slices(self, labels: torch.Tensor, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image, obj = self.synth_volume(labels, rng)
        index = self._pick(image, obj, count, rng)
        return image[index], obj[index]

    # -- the SliceSource protocol --------------------------------------------------------------

    def sample(self, n: int, rng: np.random.Generator) -> SliceBatch:
        """``n`` new slices ``(n, 1, H, W)`` from ``volumes_per_batch`` fresh synthetic volumes."""
        volumes = min(self.volumes_per_batch, n)
        counts = [n // volumes + (k < n % volumes) for k in range(volumes)]
        images, masks = [], []
        for count in counts:
            subject = self.train_labels[int(rng.integers(len(self.train_labels)))]
            im, ob = self._slices(subject, count, rng)
            images.append(im)
            masks.append(ob)
        batch = SliceBatch(torch.from_numpy(np.concatenate(images)[:, None]).float(),
                           torch.from_numpy(np.concatenate(masks)[:, None].astype(np.float32)))
        return random_flips(batch, rng)

    def validation(self) -> SliceBatch:
        return self._val

    def _fixed_slices(self, subjects: list[torch.Tensor], count: int, rng: np.random.Generator) -> SliceBatch:
        """``count`` slices spread over ``subjects``: one volume per contrast the training draws each.

        T1-like and random contrast when the training mixes them; T1-like only for a T1-first
        stage (``t1_probability`` 1), random only at 0. A T1-first run validated on half random
        contrasts (run wm_t1_128, issue 12) read 0.45-0.52 while its training slices scored 0.76:
        the curve measured the contrasts it was not trained on, and chose its best model by them.
        """
        contrasts = (True,) if self.t1_probability >= 1 else (False,) if self.t1_probability <= 0 else (True, False)
        per_volume = max(1, int(math.ceil(count / (len(contrasts) * len(subjects)))))
        images, masks = [], []
        for labels in subjects:
            for t1 in contrasts:
                spacing = float(np.mean(self.fov_mm)) / max(self.size)
                image, obj = self.synth_volume(labels, rng, spacing=spacing, t1=t1)
                index = self._pick(image, obj, per_volume, rng)
                images.append(image[index])
                masks.append(obj[index])
        images_t = torch.from_numpy(np.concatenate(images)[:count, None]).float()
        masks_t = torch.from_numpy(np.concatenate(masks)[:count, None].astype(np.float32))
        return SliceBatch(images_t, masks_t)


def synth_case(path: str | Path, folder: str | Path, seed: int, *, t1: bool, spacing: float = 1.5,
               shape: Sequence[int] = (128, 160, 160), label_values: Sequence[int] | None = None,
               rotation_deg: float = 8.0) -> tuple[Image, Image]:
    """A whole synthetic 3D test case from one label map: ``(image, object mask)`` with geometry.

    The volume is ``shape`` (numpy order, z y x) at ``spacing`` mm, identity direction (LPS),
    centred on the brain, whose centre is put at the physical origin; ``t1`` chooses a T1-like or
    a random contrast; the mask is uint8 (1 = ``label_values``, default cerebral white matter).
    Deterministic in ``seed``.
    """
    from steprl.synth.from_labels import IntensityModel, random_resample, synthesize
    from steprl.synth.synthseg import WHITE_MATTER

    rng = np.random.default_rng(seed)
    labels = _canonical_labels(Path(path), 1.0, 240)
    resampled = random_resample(labels[None, None], 1.0, tuple(int(s) for s in shape), spacing, rng,
                                spatial_augment(rotation_deg))
    model = IntensityModel.from_synthseg_folder(folder)
    image = synthesize(resampled, model, rng, t1_probability=1.0 if t1 else 0.0)[0, 0].numpy()
    obj = np.isin(resampled[0, 0].numpy(), tuple(label_values or WHITE_MATTER)).astype(np.uint8)
    extent = spacing * (np.asarray(shape[::-1], dtype=float) - 1) / 2  # xyz
    geometry = Geometry(tuple(int(s) for s in shape), (spacing,) * 3, tuple(-extent), tuple(np.eye(3).ravel()))
    return Image(image.astype(np.float32), geometry), Image(obj, geometry)
