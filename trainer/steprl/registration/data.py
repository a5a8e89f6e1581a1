"""Where training pairs come from: image files on disk, or an endless synthetic generator.

A pair source hands out batches on the network grid, already normalised to ``0..1``, with
label maps (real labels, or 3-class K-means pseudo-labels when the data has none):

    batch = source.sample(4, rng)          # random training pairs
    batch = source.validation()            # the same pairs every epoch

Images from files are resampled ONCE, in physical space, onto one reference grid: the network
grid covering the first training image. Inter-subject training therefore assumes the images
are roughly aligned in physical space (pre-aligned data, or run an affine pre-alignment first).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from steprl.errors import InputError
from steprl.geometry import Geometry
from steprl.preprocess import kmeans_labels, normalise_percentile

log = logging.getLogger(__name__)


@dataclass
class PairBatch:
    """A batch of pairs on the network grid: intensities ``(B, 1, *S)`` float, labels ``(B, 1, *S)`` long.

    ``true_field`` ``(B, ndim, *S)`` (voxels) is the exact pull-back field registering moving onto
    fixed where a source knows it (pairs made by deforming one subject), with ``field_known``
    ``(B,)`` bool saying for which items; both ``None`` when no item has one.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: torch.Tensor
    moving_labels: torch.Tensor
    true_field: torch.Tensor | None = None
    field_known: torch.Tensor | None = None

    def to(self, device) -> PairBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return PairBatch(*(move(t) for t in (self.fixed, self.moving, self.fixed_labels, self.moving_labels,
                                              self.true_field, self.field_known)))


class PairSource(Protocol):
    num_labels: int
    labels_are_real: bool

    def sample(self, n: int, rng: np.random.Generator) -> PairBatch: ...

    def validation(self) -> PairBatch: ...


def _stack(arrays: Sequence[np.ndarray], dtype) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)[:, None]).to(dtype)


class ImagePairSource:
    """Random pairs among a list of images (and optional label maps) already on one grid.

    Args:
        images: arrays of one shape ``S`` (normalised here).
        labels: integer arrays of shape ``S``, or None for K-means pseudo-labels.
        val_count: how many images (taken from the end) are kept for validation only.
        val_pairs: number of validation pairs (drawn once, deterministically, among them).
        gamma_range: training images get a random gamma ``x ** g``, ``log g`` uniform in
            ``+-gamma_range`` (0 = off), so the policy relies less on one exact contrast.
    """

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray] | None = None, *,
                 val_count: int = 2, val_pairs: int = 8, pseudo_classes: int = 3, seed: int = 0,
                 gamma_range: float = 0.0) -> None:
        self.gamma_range = gamma_range
        if len(images) < 2 + val_count:
            raise InputError(f"Training needs at least {2 + val_count} images ({val_count} kept for validation), "
                             f"got {len(images)}.", "Add images, or lower --val-count.")
        if val_count == 1:
            raise InputError("Validation needs at least 2 images to form a pair.", "Use --val-count 0 or >= 2.")
        self.images = [normalise_percentile(a) for a in images]
        self.labels_are_real = labels is not None
        if labels is None:
            self.labels = [kmeans_labels(a, pseudo_classes) for a in self.images]
        else:
            self.labels = [np.asarray(lab).astype(np.int16) for lab in labels]
        self.num_labels = int(max(lab.max() for lab in self.labels))
        n = len(self.images)
        self.train_ids = list(range(n - val_count))
        val_ids = list(range(n - val_count, n)) or self.train_ids
        vr = np.random.default_rng(seed + 7919)
        self.val_pairs = [tuple(vr.choice(val_ids, 2, replace=False)) for _ in range(val_pairs)]

    def _batch(self, pairs) -> PairBatch:
        f, m = zip(*pairs)
        images, labels = self.images, self.labels
        return PairBatch(_stack([images[i] for i in f], torch.float32), _stack([images[i] for i in m], torch.float32),
                         _stack([labels[i] for i in f], torch.long), _stack([labels[i] for i in m], torch.long))

    def sample(self, n: int, rng: np.random.Generator) -> PairBatch:
        batch = self._batch([tuple(rng.choice(self.train_ids, 2, replace=False)) for _ in range(n)])
        if self.gamma_range > 0:
            for t in (batch.fixed, batch.moving):
                gammas = np.exp(rng.uniform(-self.gamma_range, self.gamma_range, size=n)).astype(np.float32)
                t.pow_(torch.from_numpy(gammas).view(-1, *([1] * (t.ndim - 1))))
        return batch

    def validation(self) -> PairBatch:
        return self._batch(self.val_pairs)

    @classmethod
    def from_files(cls, image_paths: Sequence[Path], label_paths: Sequence[Path] | None, grid: tuple[int, ...],
                   **kwargs) -> tuple[ImagePairSource, Geometry]:
        """Read, validate and resample files onto the grid covering the first image.

        Returns the source and the reference geometry. Label maps are matched to images by
        order and brought onto the image grid in physical space.
        """
        from steprl import io, spatial

        if label_paths is not None and len(label_paths) != len(image_paths):
            raise InputError(f"Got {len(image_paths)} images but {len(label_paths)} label maps.",
                             "Give one label map per image, in the same order (or none).")
        arrays, labels, reference = [], [] if label_paths is not None else None, None
        for k, path in enumerate(image_paths):
            image = io.read_image(path, name=f"training image {Path(path).name}")
            io.validate_image(image, f"training image {Path(path).name}", ndim=len(grid))
            if reference is None:
                reference = image.geometry.resized(tuple(grid))
            moving = torch.from_numpy(image.array[None, None].astype(np.float32))
            arrays.append(spatial.resample(moving, image.geometry, reference)[0, 0].numpy())
            if labels is not None:
                lab = io.read_labels(label_paths[k], image.geometry, name=f"label map {Path(label_paths[k]).name}")
                lab_t = torch.from_numpy(lab.array[None, None].astype(np.float32))
                labels.append(spatial.resample(lab_t, lab.geometry, reference, mode="nearest")[0, 0].numpy())
        log.info("loaded %d training images onto a %s grid", len(arrays), "x".join(map(str, grid)))
        return cls(arrays, labels, **kwargs), reference


class SyntheticPairSource:
    """Endless synthetic pairs (blobs moved by random affine + smooth elastic fields), exact labels.

    For tests and quick experiments: every training batch is new, validation pairs are fixed.
    """

    labels_are_real = True

    def __init__(self, shape: tuple[int, ...], *, max_displacement: float = 4.0, val_pairs: int = 8,
                 seed: int = 0, num_labels: int = 4) -> None:
        self.shape, self.max_displacement, self.num_labels = tuple(shape), max_displacement, num_labels
        self._val = self._make(val_pairs, np.random.default_rng(seed + 104729))

    def _make(self, n: int, rng: np.random.Generator) -> PairBatch:
        from steprl.synth.toy import synthetic_pair

        pairs = [synthetic_pair(self.shape, rng, max_displacement=self.max_displacement) for _ in range(n)]
        def col(key, dtype):
            return _stack([p[key] for p in pairs], dtype)

        return PairBatch(col("fixed", torch.float32), col("moving", torch.float32),
                         col("fixed_labels", torch.long), col("moving_labels", torch.long))

    def sample(self, n: int, rng: np.random.Generator) -> PairBatch:
        return self._make(n, rng)

    def validation(self) -> PairBatch:
        return self._val
