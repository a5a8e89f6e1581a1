"""Endless inter-subject training pairs synthesised from SynthSeg label maps (contrast-agnostic SPAC).

Every training pair is two DIFFERENT subjects, each with its own random affine + elastic
augmentation, bias field, blur and noise (:mod:`steprl.synth.from_labels`); the contrast is random per
pair (by default shared by both images: mono-modal pairs of any contrast), so the policy must
align anatomy whatever the contrast. Labels for the Dice reward and loss are the 32 SynthSeg brain
structures, re-indexed ``1..32`` (:func:`steprl.synth.synthseg.structure_index`). Validation pairs
come from held-out subjects and are drawn once (fixed seed), so scores compare across epochs.

With ``known_fraction > 0``, that share of the training pairs are instead two views of ONE
subject related by a random affine + elastic field that is known exactly
(:func:`steprl.synth.from_labels.known_pair`, SynthMorph-style). The learner then also regresses that
field: a dense target at every voxel, where the label Dice only speaks at structure
boundaries (how fast a policy learns from it: ``trainer/benchmarks/probe_spac3d_learning.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from steprl.registration.data import PairBatch
from steprl.synth import synthseg
from steprl.synth.from_labels import (
    IntensityModel,
    SpatialAugment,
    draw_contrast,
    known_pair,
    pick_labels,
    pool_image,
    random_resample,
    synthesize,
)

log = logging.getLogger(__name__)


#: the field between the two views of a known pair: about what a centroid-affine alignment
#: leaves between two subjects (a few degrees, a few per cent, a few mm, smooth local shifts)
PAIR_AUGMENT = SpatialAugment(rotation_deg=5.0, scaling=0.06, shear=0.03, shift_mm=4.0, elastic_mm=4.0,
                              elastic_control_mm=24.0)


class SynthSegPairSource:
    """:class:`steprl.registration.data.PairSource` over synthesised head MRI pairs.

    Args:
        train, validation: label-map files (subjects) for training / validation pairs.
        grid: network grid ``(D, H, W)``; the pairs cover ``grid * spacing`` mm around the head centre.
        spacing: output voxel size in mm (default 3.3: a 64^3 grid spans 211 mm, a whole head).
        priors_folder: SynthSeg folder holding ``labels_classes_priors/`` (generation classes).
        val_pairs: number of fixed validation pairs.
        same_contrast: both images of a pair share one random contrast (mono-modal pairs of any
            contrast, so the image similarity term of the loss means something); False gives
            every image its own contrast (multi-modal, SynthMorph-style, labels-only loss).
        known_fraction: share of training pairs made from one subject with a known field
            (``PairBatch.true_field``); 0 = all pairs are two different subjects.
        pair_augment: the random field between the two views of a known pair.
        supersample: paint images on a grid this many times finer and average them down
            (partial volume; 1 = paint the output grid, so images move in whole voxels).
        t1_probability: share of contrasts drawn from SynthSeg's T1 priors (the rest are random);
            1 trains on T1-like images only, the first stage of a T1-first curriculum.
        strip_probability: share of pairs whose images are brain-extracted (every label outside
            the 32 brain structures, CSF included among them, painted as background), since
            users register skull-stripped scans and templates (MNI152, Colin27 ``ch2bet``) too.
    """

    labels_are_real = True
    #: merged into the model card's ``inference``: the pairs are on axis-aligned LPS grids
    inference_card = {"orientation": "lps"}

    def __init__(self, train: Sequence[Path], validation: Sequence[Path], grid: tuple[int, ...], *,
                 spacing: float = 3.3, priors_folder: Path | None = None, val_pairs: int = 6, seed: int = 0,
                 source_spacing: float = 2.0, same_contrast: bool = True, known_fraction: float = 0.0,
                 pair_augment: SpatialAugment = PAIR_AUGMENT, supersample: int = 1,
                 t1_probability: float = 0.3, strip_probability: float = 0.0) -> None:
        if supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {supersample}")
        self.supersample = supersample
        if not 0.0 <= t1_probability <= 1.0:
            raise ValueError(f"t1_probability must be in [0, 1], got {t1_probability}")
        self.t1_probability = t1_probability
        if not 0.0 <= strip_probability <= 1.0:
            raise ValueError(f"strip_probability must be in [0, 1], got {strip_probability}")
        self.strip_probability = strip_probability
        self.brain = torch.from_numpy(synthseg.lookup_table({v: 1 for v in synthseg.BRAIN_STRUCTURES}))
        if not 0.0 <= known_fraction <= 1.0:
            raise ValueError(f"known_fraction must be in [0, 1], got {known_fraction}")
        self.same_contrast, self.known_fraction, self.pair_augment = same_contrast, known_fraction, pair_augment
        self.grid, self.spacing, self.source_spacing = tuple(grid), float(spacing), float(source_spacing)
        subjects = synthseg.load_all([*train, *validation], source_spacing)  # all aligned to train[0]
        self.train, self.val_subjects = subjects[:len(train)], subjects[len(train):] or subjects[:len(train)]
        values = np.unique(torch.cat([t.flatten() for t in self.train[:1]]).numpy())
        folder = priors_folder if priors_folder is not None else Path(train[0]).parent
        self.intensity = IntensityModel.from_synthseg_folder(folder, values)
        self.structures = torch.from_numpy(synthseg.lookup_table(synthseg.structure_index()))
        self.num_labels = len(synthseg.BRAIN_STRUCTURES)
        self.augment = SpatialAugment()
        pairs = [self._val_pair(k) for k in range(val_pairs)]
        self._val = self._validation_pairs(pairs, np.random.default_rng(seed + 31))

    def _val_pair(self, k: int) -> tuple[int, int]:
        """The ``k``-th validation pair (fixed, moving) of distinct held-out subjects, cycling through them."""
        n = len(self.val_subjects)
        if n < 2:
            return 0, 0
        return k % n, (k + 1 + (k // n) % (n - 1)) % n  # offset 1..n-1: never the same subject

    def _painted(self, values: torch.Tensor, rng: np.random.Generator, contrast) -> tuple[torch.Tensor, torch.Tensor]:
        """Label values ``(1, 1, *S * supersample)`` -> image and structure indices ``0..32``, each ``(1, *S)``."""
        image = synthesize(values, self.intensity, rng, contrast=contrast, t1_probability=self.t1_probability)
        image = pool_image(image, self.supersample)
        return image[0], self.structures[pick_labels(values, self.supersample).clamp(0, 1023)][0]

    @property
    def _fine(self) -> tuple[int, ...]:
        return tuple(n * self.supersample for n in self.grid)

    @property
    def _fine_spacing(self) -> float:
        return self.spacing / self.supersample

    def _stripped(self, values: Sequence[torch.Tensor], rng: np.random.Generator) -> list[torch.Tensor]:
        """The label-value maps of one pair, brain-extracted together with ``strip_probability`` (no draw at 0)."""
        if self.strip_probability > 0 and rng.uniform() < self.strip_probability:
            return [v * self.brain[v.clamp(0, 1023)] for v in values]
        return list(values)

    def _contrast(self, rng: np.random.Generator):
        return draw_contrast(self.intensity, rng, self.t1_probability) if self.same_contrast else None

    def _two_subjects(self, fixed: torch.Tensor, moving: torch.Tensor, rng: np.random.Generator) -> tuple:
        """(fixed image, moving image, fixed structures, moving structures), each ``(1, *S)``, field ``None``."""
        contrast = self._contrast(rng)
        values = [random_resample(labels[None, None], self.source_spacing, self._fine, self._fine_spacing, rng,
                                  self.augment) for labels in (fixed, moving)]
        (fi, fl), (mi, ml) = (self._painted(v, rng, contrast) for v in self._stripped(values, rng))
        return fi, mi, fl, ml, None

    def _one_subject(self, labels: torch.Tensor, rng: np.random.Generator) -> tuple:
        """Two views of one subject (same tuple as :meth:`_two_subjects`) and the exact field ``(3, *S)``."""
        fixed_v, moving_v, field = known_pair(labels[None, None], self.source_spacing, self.grid, self.spacing, rng,
                                              self.augment, self.pair_augment, self.supersample)
        contrast = self._contrast(rng)
        (fi, fl), (mi, ml) = (self._painted(v, rng, contrast) for v in self._stripped((fixed_v, moving_v), rng))
        return fi, mi, fl, ml, field[0]

    @staticmethod
    def _stack(items: Sequence[tuple]) -> PairBatch:
        fixed, moving, fixed_l, moving_l = (torch.stack([item[k] for item in items]) for k in range(4))
        batch = PairBatch(fixed.float(), moving.float(), fixed_l.long(), moving_l.long())
        known = [item[4] is not None for item in items]
        if any(known):
            fields = [item[4] if item[4] is not None else torch.zeros(3, *fixed.shape[2:]) for item in items]
            batch.true_field, batch.field_known = torch.stack(fields), torch.tensor(known)
        return batch

    def _validation_pairs(self, pairs: Sequence[tuple[int, int]], rng: np.random.Generator) -> PairBatch:
        """Validation pairs of held-out subjects."""
        return self._stack([self._two_subjects(self.val_subjects[f], self.val_subjects[m], rng) for f, m in pairs])

    def sample(self, n: int, rng: np.random.Generator) -> PairBatch:
        pairs = [tuple(int(i) for i in rng.choice(len(self.train), 2, replace=False)) for _ in range(n)]
        known = rng.uniform(size=n) < self.known_fraction if self.known_fraction > 0 else np.zeros(n, bool)
        return self._stack([self._one_subject(self.train[f], rng) if one else
                            self._two_subjects(self.train[f], self.train[m], rng)
                            for (f, m), one in zip(pairs, known)])

    def validation(self) -> PairBatch:
        return self._val
