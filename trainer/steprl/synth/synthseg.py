"""SynthSeg-style whole-head label maps: the label tables, the subject split, and a canonical grid.

Why: the contrast-agnostic starter models are trained on images SYNTHESISED from label maps
(:mod:`steprl.synth.from_labels`), never on real intensities, so they work on any MRI contrast and the
training labels are exact. This module knows the FreeSurfer label values of the SynthSeg
label maps (``training_seg_XX.nii.gz``, 53 values of which 32 are brain structures scored by
Dice), which ones are white matter, and how to hold subjects out for validation and testing.

Label maps are read once and resampled (nearest neighbour) onto a canonical grid: axis-aligned
LPS (identity direction), isotropic, centred on the head. Random affine and elastic
augmentation then samples from that grid (:func:`steprl.synth.from_labels.random_resample`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from steprl.errors import InputError
from steprl.geometry import Geometry

log = logging.getLogger(__name__)

#: The 32 brain structures SynthSeg segments (FreeSurfer values), the labels our Dice scores.
BRAIN_STRUCTURES: dict[int, str] = {
    2: "left cerebral white matter", 3: "left cerebral cortex", 4: "left lateral ventricle",
    5: "left inferior lateral ventricle", 7: "left cerebellum white matter", 8: "left cerebellum cortex",
    10: "left thalamus", 11: "left caudate", 12: "left putamen", 13: "left pallidum", 14: "3rd ventricle",
    15: "4th ventricle", 16: "brain-stem", 17: "left hippocampus", 18: "left amygdala",
    26: "left accumbens area", 28: "left ventral DC", 41: "right cerebral white matter",
    42: "right cerebral cortex", 43: "right lateral ventricle", 44: "right inferior lateral ventricle",
    46: "right cerebellum white matter", 47: "right cerebellum cortex", 49: "right thalamus",
    50: "right caudate", 51: "right putamen", 52: "right pallidum", 53: "right hippocampus",
    54: "right amygdala", 58: "right accumbens area", 60: "right ventral DC", 24: "CSF",
}
#: Cerebral white matter, left and right (the PixelDRL-MG starter model's target).
WHITE_MATTER = (2, 41)
#: Brain tissue classes shared with tissue-probability atlases (MNI152 gm/wm maps): 1 GM, 2 WM, 3 CSF.
TISSUE_CLASSES: dict[int, int] = {
    **{v: 1 for v in (3, 8, 10, 11, 12, 13, 17, 18, 26, 28, 42, 47, 49, 50, 51, 52, 53, 54, 58, 60)},
    **{v: 2 for v in (2, 7, 16, 41, 46)},
    **{v: 3 for v in (4, 5, 14, 15, 24, 43, 44)},
}


@dataclass(frozen=True)
class SubjectSplit:
    """Label-map files split by subject: nobody appears in two parts."""

    train: list[Path]
    validation: list[Path]
    test: list[Path]


def list_label_maps(folder: str | Path) -> list[Path]:
    """The ``training_seg_*.nii.gz`` files of a SynthSeg folder, sorted; InputError if none."""
    folder = Path(folder)
    paths = sorted(folder.glob("training_seg_*.nii.gz")) if folder.is_dir() else []
    if not paths:
        raise InputError(f"No SynthSeg label maps (training_seg_*.nii.gz) in {folder}.",
                         "Point --synthseg at the folder holding the label maps (e.g. ../shared/data/synthseg).")
    return paths


def split_subjects(paths: Sequence[Path], validation: int = 3, test: int = 3) -> SubjectSplit:
    """Deterministic split by sorted order: the LAST ``test`` subjects are held out for comparisons,
    the ``validation`` before them choose the best checkpoint, the rest train."""
    paths = sorted(Path(p) for p in paths)
    if len(paths) < validation + test + 2:
        raise InputError(f"{len(paths)} label maps cannot give {validation} validation, {test} test and "
                         "at least 2 training subjects.", "Add label maps, or lower the held-out counts.")
    n_train = len(paths) - validation - test
    return SubjectSplit(paths[:n_train], paths[n_train:n_train + validation], paths[n_train + validation:])


def lookup_table(mapping: dict[int, int], size: int = 1024) -> np.ndarray:
    """A dense ``value -> class`` table (unlisted values map to 0), for ``table[labels]``."""
    table = np.zeros(size, dtype=np.int64)
    for value, target in mapping.items():
        table[value] = target
    return table


def structure_index() -> dict[int, int]:
    """FreeSurfer value -> contiguous index ``1..32`` of :data:`BRAIN_STRUCTURES` (sorted by value)."""
    return {value: k + 1 for k, value in enumerate(sorted(BRAIN_STRUCTURES))}


def head_grid(geometry: Geometry, labels: np.ndarray, spacing: float, size: int) -> Geometry:
    """An axis-aligned LPS cube of ``size**3`` voxels of ``spacing`` mm centred on the brain.

    The centre is the middle of the bounding box of the brain structures (not of the whole
    head, whose extent depends on how much neck the scan shows), in physical space.
    """
    nz = np.argwhere(np.isin(labels, list(BRAIN_STRUCTURES)))
    if nz.size == 0:
        raise InputError("A label map is empty (all zero).", "Remove it from the SynthSeg folder.")
    middle_index = (nz.min(0) + nz.max(0)) / 2.0  # numpy order
    matrix, offset = geometry.tensor_index_to_physical()
    centre = matrix @ middle_index + offset
    origin = centre - spacing * (size - 1) / 2.0
    return Geometry((size,) * 3, (spacing,) * 3, tuple(origin), tuple(np.eye(3).ravel()))


def structure_centroids(labels: np.ndarray, geometry: Geometry) -> dict[int, np.ndarray]:
    """Physical centre (LPS, mm) of every brain structure present in ``labels``."""
    matrix, offset = geometry.tensor_index_to_physical()
    out = {}
    for value in BRAIN_STRUCTURES:
        idx = np.argwhere(labels == value)
        if len(idx):
            out[value] = matrix @ idx.mean(0) + offset
    return out


def centroid_affine(reference: dict[int, np.ndarray], subject: dict[int, np.ndarray]) -> np.ndarray:
    """Least-squares ``(4, 4)`` affine sending reference points to the subject's (structure centroids).

    Why: it aligns two label maps exactly as an affine pre-alignment would align their images
    (32 corresponding points, no optimiser), so training pairs look like what the policy gets
    after ``prealign`` at inference time.
    """
    common = sorted(set(reference) & set(subject))
    if len(common) < 4:
        raise InputError(f"Only {len(common)} brain structures in common between two label maps.",
                         "Use whole-brain SynthSeg label maps.")
    ref = np.array([reference[v] for v in common])
    sub = np.array([subject[v] for v in common])
    ref_h = np.hstack([ref, np.ones((len(common), 1))])
    solution, *_ = np.linalg.lstsq(ref_h, sub, rcond=None)  # (4, 3)
    affine = np.eye(4)
    affine[:3, :] = solution.T
    return affine


def load_canonical(path: str | Path, spacing: float = 2.0, size: int = 112,
                   reference: tuple[Geometry, dict[int, np.ndarray]] | None = None
                   ) -> tuple[torch.Tensor, Geometry, dict[int, np.ndarray]]:
    """One label map on a canonical head grid: ``(size, size, size)`` int16 tensor, the grid, centroids.

    Without ``reference``: the grid is centred on this subject's brain. With ``reference`` (a
    grid and its structure centroids, from an earlier call): the label map is affinely aligned
    to the reference subject (:func:`centroid_affine`) and sampled on the reference grid.
    Default 112 voxels of 2 mm = a 224 mm cube, the whole head of an adult.
    """
    from steprl import spatial
    from steprl.io import read_image

    image = read_image(path, name=f"label map {Path(path).name}")
    if image.ndim != 3:
        raise InputError(f"Label map {Path(path).name} is {image.ndim}D.", "Use the 3D SynthSeg label maps.")
    labels = np.rint(image.array).astype(np.int16)
    centroids = structure_centroids(labels, image.geometry)
    if reference is None:
        grid, affine = head_grid(image.geometry, labels, spacing, size), None
    else:
        grid, affine = reference[0], centroid_affine(reference[1], centroids)
    t = torch.from_numpy(labels.astype(np.float32))[None, None]
    on_grid = spatial.resample(t, image.geometry, grid, affine=affine, mode="nearest", padding="zeros")[0, 0]
    return on_grid.round().to(torch.int16), grid, centroids


def load_all(paths: Sequence[Path], spacing: float = 2.0, size: int = 112) -> list[torch.Tensor]:
    """:func:`load_canonical` for every path, all affinely aligned to the FIRST one (label tensors)."""
    out, reference = [], None
    for k, path in enumerate(paths):
        labels, grid, centroids = load_canonical(path, spacing, size, reference)
        reference = reference or (grid, centroids)
        out.append(labels)
        log.info("label map %d/%d: %s", k + 1, len(paths), Path(path).name)
    return out
