"""Slices for PixelDRL-MG and the U-Net baseline: from 2D/3D images and label maps, or synthetic.

Both methods are 2D. Training and inference prepare slices the same way (:func:`prepare_case`):

1. the WHOLE image (the volume, not each slice) is normalised to ``0..1`` by its 0.5 / 99.5
   percentiles (:func:`steprl.preprocess.normalise_percentile`), so slices keep their relative
   contrast;
2. a 3D image is cut into 2D slices along one array axis (:func:`resolve_axis`: ``axial``,
   ``coronal`` and ``sagittal`` are found from the direction matrix, so an oblique or
   reoriented volume is sliced the anatomical way; ``0/1/2`` name the array axis directly);
   a 2D image is one slice. The slices' rows and columns follow one physical order whatever the
   storage (:func:`in_plane_transposed`): an axial slice's rows run front-back and its columns
   left-right, as in the LPS-stored volumes the models are trained on;
3. every slice is resampled onto the network grid (:class:`SliceGrid`): a ``size`` grid
   (default 128 x 128) with ISOTROPIC pixels that covers the slice's physical extent, the
   slice centred and the margin padded with zeros. Anisotropic in-plane spacing and
   non-square slices therefore keep their physical proportions; the network never sees a
   squashed anatomy. Masks go back through the inverse mapping (bilinear, then >= 0.5).

Label maps are read onto the image grid in physical space (:func:`steprl.io.read_labels`
with the image's geometry): the object is ``labels > 0`` by default, or the union of
``label_values``.

Slices of a constant image value (outside a skull-stripped brain, the zero padding of a
scanner) carry no information: they are never used for training and are background at
inference (:data:`CONSTANT_SLICE_RULE`). Slices without object that are not constant are the
"empty slices" the network must learn to leave empty: training keeps ``empty_fraction`` of
them per object slice (0.2 by default), drawn at random once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from steprl.errors import InputError
from steprl.geometry import Geometry, Image
from steprl.preprocess import DEFAULT_PERCENTILES, normalise_percentile
from steprl.segmentation.config import DEFAULT_SIZE

log = logging.getLogger(__name__)

AXIS_NAMES = {"sagittal": 0, "coronal": 1, "axial": 2}
"""Anatomical slicing planes -> the physical LPS axis (x, y, z) they are perpendicular to."""

CONSTANT_SLICE_RULE = "slices whose input intensities are all equal are background and are not segmented"

NORMALISATION_CARD = {
    "kind": "percentile",
    "percentiles": list(DEFAULT_PERCENTILES),
    "scope": "whole image (volume) before slicing",
    "network_grid": "isotropic pixels covering the slice, centred, zero padding",
}


# ------------------------------------------------------------------------------------ slicing
def resolve_axis(axis: str | int, geometry: Geometry) -> int:
    """The array axis (0, 1, 2 in numpy order) to cut a 3D image along; 0 for a 2D image.

    ``axis``: ``"axial"``, ``"coronal"``, ``"sagittal"`` (the array axis whose direction is
    closest to the LPS z, y or x axis, so the slices are the named plane whatever the
    orientation on disk) or ``0``/``1``/``2`` (``"0"`` too): the numpy axis itself.
    """
    if geometry.ndim == 2:
        return 0
    text = str(axis).strip().lower()
    if text in ("0", "1", "2"):
        return int(text)
    if text not in AXIS_NAMES:
        raise InputError(f"Unknown slicing axis {axis!r}.", "Use axial, coronal, sagittal, or an array axis 0, 1 or 2.")
    physical = AXIS_NAMES[text]
    itk_axis = int(np.argmax(np.abs(geometry.direction[physical])))  # direction columns are the index axes
    return geometry.ndim - 1 - itk_axis


def in_plane_transposed(geometry: Geometry, axis: int) -> bool:
    """Whether the slices across array ``axis`` of a 3D image are stored transposed: their rows (the
    lower remaining array axis) point along an EARLIER physical LPS axis than their columns.

    Why: the training volumes are LPS-stored (array order z, y, x), so an axial slice's rows run
    along y (front-back) and its columns along x (left-right). A scan stored otherwise, e.g. a
    sagittal acquisition written as P-I-L, gives axial slices with rows left-right; flips are
    augmented in training, a transposition is not: pixeldrl_wm lost 0.004 (Colin27), 0.009 (MNI152) and
    0.083 Dice (MNI152 made to look like one subject's scan, 0.924 -> 0.841) on the same scans stored
    transposed (2026-12-07). Transposing such slices back makes the network read every scan the same
    way: identical results. 2D images: never.
    """
    if geometry.ndim != 3:
        return False
    rows, cols = (k for k in range(3) if k != axis)
    physical = np.argmax(np.abs(np.asarray(geometry.direction)), axis=0)  # index column -> x/y/z
    return bool(physical[2 - rows] < physical[2 - cols])


def slice_stack(array: np.ndarray, axis: int, transposed: bool = False) -> np.ndarray:
    """``(D, H, W)`` -> ``(N, h, w)`` with the slicing ``axis`` first (a view), each slice transposed when
    ``transposed`` (:func:`in_plane_transposed`); ``(H, W)`` -> ``(1, H, W)``."""
    array = np.asarray(array)
    if array.ndim == 2:
        return array[None]
    stack = np.moveaxis(array, axis, 0)
    return stack.swapaxes(1, 2) if transposed else stack


def unslice_stack(stack: np.ndarray, axis: int, transposed: bool, ndim: int) -> np.ndarray:
    """The inverse of :func:`slice_stack`: ``(N, h, w)`` slices back into the image's array order."""
    if ndim == 2:
        return stack[0]
    return np.ascontiguousarray(np.moveaxis(stack.swapaxes(1, 2) if transposed else stack, 0, axis))


def in_plane_spacing(geometry: Geometry, axis: int, transposed: bool = False) -> tuple[float, float]:
    """Pixel size (mm) of the slices along their two array axes, numpy order (after the transposition)."""
    spacing_numpy = geometry.spacing[::-1]
    if geometry.ndim == 2:
        return float(spacing_numpy[0]), float(spacing_numpy[1])
    rest = [float(spacing_numpy[k]) for k in range(3) if k != axis]
    return (rest[1], rest[0]) if transposed else (rest[0], rest[1])


@dataclass(frozen=True)
class SliceGrid:
    """How slices of ``shape`` (h, w) with ``spacing`` (mm) map onto the network grid ``size``.

    The slice's voxel-centre extent ``(n - 1) * spacing`` is scaled by one factor for both
    axes (isotropic network pixels), fitted into ``size`` and centred: it covers ``fitted``
    pixels starting at ``offset``; the rest is zero padding. Both directions use
    ``align_corners=True`` interpolation (first and last voxel centres coincide, as in
    :meth:`steprl.geometry.Geometry.resized`), with anti-aliasing when shrinking.
    """

    shape: tuple[int, int]
    spacing: tuple[float, float]
    size: tuple[int, int]
    fitted: tuple[int, int]
    offset: tuple[int, int]

    @classmethod
    def fit(cls, shape: Sequence[int], spacing: Sequence[float], size: Sequence[int]) -> SliceGrid:
        shape = (int(shape[0]), int(shape[1]))
        size = (int(size[0]), int(size[1]))
        if min(shape) < 2:
            raise InputError(f"Slices of {shape[0]} x {shape[1]} pixels cannot be segmented.",
                             "Give an image with at least 2 x 2 pixels per slice (or choose another --axis).")
        extent = [(n - 1) * float(s) for n, s in zip(shape, spacing)]
        pixel = max(e / (m - 1) for e, m in zip(extent, size))
        fitted = tuple(max(2, min(m, int(round(e / pixel)) + 1)) for e, m in zip(extent, size))
        offset = tuple((m - f) // 2 for m, f in zip(size, fitted))
        return cls(shape, (float(spacing[0]), float(spacing[1])), size, fitted, offset)  # type: ignore[arg-type]

    @property
    def network_spacing(self) -> tuple[float, float]:
        """Network pixel size (mm) along the two axes (equal up to the rounding of ``fitted``)."""
        return tuple((n - 1) * s / (f - 1) for n, s, f in zip(self.shape, self.spacing, self.fitted))  # type: ignore

    def to_network(self, slices: torch.Tensor) -> torch.Tensor:
        """``(N, C, h, w)`` -> ``(N, C, *size)`` float (bilinear, anti-aliased, zero padding)."""
        x = slices.float()
        if tuple(x.shape[-2:]) != self.fitted:
            x = F.interpolate(x, size=self.fitted, mode="bilinear", align_corners=True, antialias=True)
        (oh, ow), (fh, fw), (sh, sw) = self.offset, self.fitted, self.size
        return F.pad(x, (ow, sw - fw - ow, oh, sh - fh - oh))

    def from_network(self, maps: torch.Tensor) -> torch.Tensor:
        """``(N, C, *size)`` -> ``(N, C, h, w)`` float (the padding cropped, bilinear)."""
        (oh, ow), (fh, fw) = self.offset, self.fitted
        x = maps.float()[..., oh : oh + fh, ow : ow + fw]
        if tuple(x.shape[-2:]) != self.shape:
            x = F.interpolate(x, size=self.shape, mode="bilinear", align_corners=True, antialias=True)
        return x

    def mask_from_network(self, masks: torch.Tensor) -> torch.Tensor:
        """Binary ``(N, 1, *size)`` -> binary ``(N, 1, h, w)`` bool (bilinear, then >= 0.5)."""
        return self.from_network(masks) >= 0.5


def object_mask(labels: np.ndarray, label_values: Sequence[int] | None = None) -> np.ndarray:
    """The object to segment: ``labels > 0``, or the union of ``label_values``; bool, same shape."""
    labels = np.asarray(labels)
    if label_values is None or len(label_values) == 0:
        return labels > 0
    return np.isin(labels, np.asarray(list(label_values), dtype=labels.dtype))


def constant_slices(stack: np.ndarray) -> np.ndarray:
    """``(N, h, w)`` -> ``(N,)`` bool: slices whose values are all equal (see the module docstring)."""
    flat = stack.reshape(stack.shape[0], -1)
    return flat.min(axis=1) == flat.max(axis=1)


# ------------------------------------------------------------------------------------- cases
@dataclass
class CaseSlices:
    """One image cut and resampled for the network.

    ``images`` ``(N, 1, *size)`` float32 0..1, ``masks`` ``(N, 1, *size)`` float32 0/1 (or
    None without labels), ``has_object`` and ``constant`` ``(N,)`` bool, ``grid`` the mapping
    back to the slices, ``axis`` the array axis cut along, ``transposed`` whether each slice was
    transposed (:func:`in_plane_transposed`).
    """

    images: torch.Tensor
    masks: torch.Tensor | None
    has_object: np.ndarray
    constant: np.ndarray
    grid: SliceGrid
    axis: int
    name: str = ""
    transposed: bool = False

    def to_volume(self, per_slice: np.ndarray, ndim: int) -> np.ndarray:
        """``(N, h, w)`` slices on the image grid back into the image's array order."""
        return unslice_stack(per_slice, self.axis, self.transposed, ndim)


def check_image(image: Image, name: str) -> None:
    """Refuse what cannot be segmented slice by slice (vector, 1D/4D, empty, NaN, constant)."""
    from steprl.io import validate_image

    if image.is_vector:
        raise InputError(f"The {name} has {image.array.shape[-1]} components per voxel.",
                         "Give a scalar (grey-value) image.")
    validate_image(image, name)


def prepare_case(
    image: Image,
    labels: Image | None = None,
    *,
    size: Sequence[int] = DEFAULT_SIZE,
    axis: str | int = "axial",
    label_values: Sequence[int] | None = None,
    name: str = "image",
    normalised: np.ndarray | None = None,
) -> CaseSlices:
    """Normalise, slice and resample one image (and its label map, already on its grid).

    ``labels`` must be on ``image``'s grid (:func:`steprl.io.read_labels` with the image's
    geometry does that); a different array shape raises :class:`InputError`. ``normalised``:
    ``normalise_percentile(image.array)`` when the caller has it already (it is not recomputed).
    """
    check_image(image, name)
    if labels is not None and tuple(labels.array.shape) != tuple(image.array.shape):
        raise InputError(
            f"The label map of {name} has shape {tuple(labels.array.shape)}, the image {tuple(image.array.shape)}.",
            "Read the label map with steprl.io.read_labels(path, image.geometry) to bring it onto the image grid.",
        )
    array_axis = resolve_axis(axis, image.geometry)
    transposed = in_plane_transposed(image.geometry, array_axis)
    stack = slice_stack(image.array, array_axis, transposed)
    constant = constant_slices(stack)
    if normalised is None:
        normalised = normalise_percentile(image.array)
    elif normalised.shape != image.array.shape:
        raise ValueError(f"normalised has shape {normalised.shape}, the image {image.array.shape}")
    normalised = slice_stack(normalised, array_axis, transposed)
    grid = SliceGrid.fit(stack.shape[1:], in_plane_spacing(image.geometry, array_axis, transposed), size)
    images = grid.to_network(torch.from_numpy(np.ascontiguousarray(normalised))[:, None]).clamp_(0.0, 1.0)
    masks, has_object = None, np.zeros(len(stack), dtype=bool)
    if labels is not None:
        objects = slice_stack(object_mask(labels.array, label_values), array_axis, transposed)
        has_object = objects.reshape(len(objects), -1).any(axis=1)
        soft = grid.to_network(torch.from_numpy(np.ascontiguousarray(objects, dtype=np.float32))[:, None])
        masks = (soft >= 0.5).float()
    return CaseSlices(images, masks, has_object & ~constant, constant, grid, array_axis, name, transposed)


def select_training_slices(cases: Sequence[CaseSlices], empty_fraction: float,
                           rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """All object slices of ``cases`` plus ``round(empty_fraction * #object)`` non-constant empty ones.

    Returns ``(images (N, 1, *size), masks (N, 1, *size), counts)``; constant slices never.
    """
    with_object, empty = [], []
    for c, case in enumerate(cases):
        for k in range(len(case.has_object)):
            if case.constant[k]:
                continue
            (with_object if case.has_object[k] else empty).append((c, k))
    n_empty = min(len(empty), int(round(max(0.0, empty_fraction) * len(with_object))))
    if not with_object and empty:
        n_empty = len(empty)  # no object anywhere: at least learn to leave images empty
    chosen_empty = [empty[i] for i in sorted(rng.choice(len(empty), n_empty, replace=False))] if n_empty else []
    chosen = with_object + chosen_empty
    if not chosen:
        raise InputError("No usable slice: every slice is constant.", "Check the images (and --axis).")
    images = torch.stack([cases[c].images[k] for c, k in chosen])
    masks = torch.stack([cases[c].masks[k] for c, k in chosen])
    counts = {"object_slices": len(with_object), "empty_slices_kept": n_empty, "empty_slices_available": len(empty)}
    return images, masks, counts


# ------------------------------------------------------------------------------------ sources
@dataclass
class SliceBatch:
    """Slices on the network grid: ``images`` ``(B, 1, H, W)`` float 0..1, ``masks`` ``(B, 1, H, W)`` 0/1."""

    images: torch.Tensor
    masks: torch.Tensor

    def to(self, device: torch.device | str) -> SliceBatch:
        return SliceBatch(self.images.to(device), self.masks.to(device))

    def __len__(self) -> int:
        return int(self.images.shape[0])


class SliceSource(Protocol):
    """What the learners draw from."""

    size: tuple[int, int]
    description: dict

    def sample(self, n: int, rng: np.random.Generator) -> SliceBatch: ...

    def validation(self) -> SliceBatch: ...


def random_flips(batch: SliceBatch, rng: np.random.Generator) -> SliceBatch:
    """Flip each slice (with its mask) up-down and/or left-right with probability 1/2 each."""
    images, masks = batch.images.clone(), batch.masks.clone()
    flips = rng.random((len(batch), 2)) < 0.5
    for i, (ud, lr) in enumerate(flips):
        dims = [d for d, on in ((-2, ud), (-1, lr)) if on]
        if dims:
            images[i] = images[i].flip(dims)
            masks[i] = masks[i].flip(dims)
    return SliceBatch(images, masks)


def evenly_spaced(n_total: int, n_keep: int) -> np.ndarray:
    """``n_keep`` evenly spaced indices among ``n_total`` (all when ``n_keep >= n_total``)."""
    if n_keep >= n_total:
        return np.arange(n_total)
    return np.unique(np.linspace(0, n_total - 1, n_keep).round().astype(int))


@dataclass
class SliceSet:
    """Training and validation slices held in memory (CPU tensors); see :meth:`from_files`."""

    train: SliceBatch
    val: SliceBatch
    augment: bool = True
    description: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[-2:])  # type: ignore[return-value]

    def sample(self, n: int, rng: np.random.Generator) -> SliceBatch:
        """``n`` random training slices (with replacement only when fewer than ``n`` exist), flipped at random."""
        count = len(self.train)
        index = rng.choice(count, n, replace=count < n)
        batch = SliceBatch(self.train.images[index], self.train.masks[index])
        return random_flips(batch, rng) if self.augment else batch

    def validation(self) -> SliceBatch:
        return self.val

    @classmethod
    def from_cases(cls, train_cases: Sequence[CaseSlices], val_cases: Sequence[CaseSlices], *,
                   empty_fraction: float = 0.2, val_slices: int = 64, seed: int = 0, augment: bool = True,
                   description: dict | None = None) -> SliceSet:
        rng = np.random.default_rng(seed + 7919)
        train_images, train_masks, counts = select_training_slices(train_cases, empty_fraction, rng)
        if val_cases:
            val_images, val_masks, _ = select_training_slices(val_cases, empty_fraction, rng)
        else:
            log.warning("No validation case: validating on the training slices (the score will be optimistic).")
            val_images, val_masks = train_images, train_masks
        keep = evenly_spaced(len(val_images), val_slices)
        description = dict(description or {})
        description.update(train_slices=len(train_images), val_slices=int(len(keep)), **counts,
                           empty_fraction=empty_fraction)
        log.info("segmentation data: %d training slices (%d with object), %d validation slices",
                 len(train_images), counts["object_slices"], len(keep))
        return cls(SliceBatch(train_images, train_masks),
                   SliceBatch(val_images[keep], val_masks[keep]), augment, description)

    @classmethod
    def from_files(cls, image_paths: Sequence[Path], label_paths: Sequence[Path], *,
                   size: Sequence[int] = DEFAULT_SIZE, axis: str | int = "axial",
                   label_values: Sequence[int] | None = None, val_count: int | None = None,
                   **kwargs) -> SliceSet:
        """Read image / label-map pairs (matched by order); the last ``val_count`` cases validate.

        ``val_count`` None: ``max(1, round(0.2 * n))`` when there are at least 2 cases, else 0.
        """
        from steprl import io

        if len(label_paths) != len(image_paths):
            raise InputError(f"Got {len(image_paths)} images but {len(label_paths)} label maps.",
                             "Give one label map per image, in the same order.")
        n = len(image_paths)
        if val_count is None:
            val_count = max(1, round(0.2 * n)) if n >= 2 else 0
        if not 0 <= val_count < n:
            raise InputError(f"--val-count {val_count} leaves no training case among {n}.",
                             f"Use --val-count between 0 and {n - 1}, or add cases.")
        cases = []
        for image_path, label_path in zip(image_paths, label_paths, strict=True):
            name = Path(image_path).name
            image = io.read_image(image_path, name=f"training image {name}")
            labels = io.read_labels(label_path, image.geometry, name=f"label map {Path(label_path).name}")
            cases.append(prepare_case(image, labels, size=size, axis=axis, label_values=label_values,
                                      name=f"training image {name}"))
        description = {"kind": "files", "count": n, "validation_cases": val_count,
                       "folder": str(Path(image_paths[0]).parent), "axis": str(axis),
                       "object": _object_description(label_values), "size": list(size)}
        return cls.from_cases(cases[: n - val_count], cases[n - val_count :], description=description, **kwargs)


def _object_description(label_values: Sequence[int] | None) -> str:
    return "labels > 0" if not label_values else "labels in " + ", ".join(str(v) for v in label_values)


class SyntheticSliceSource:
    """Endless :func:`steprl.synth.toy.noisy_ellipse` slices of ``shape`` (new ones every batch).

    Validation: ``val_count`` fixed slices from another seed. The synthetic shape is the
    network grid (no resampling); each slice is normalised by its percentiles, as inference
    normalises a 2D image. For tests and quick self-checks.
    """

    def __init__(self, shape: Sequence[int], *, seed: int = 0, val_count: int = 16, augment: bool = False) -> None:
        self.size = (int(shape[0]), int(shape[1]))
        if min(self.size) < 8:
            raise InputError(f"Synthetic slices of {self.size} pixels are too small.", "Use at least 8 x 8.")
        self.augment = augment
        self._val = self.make(val_count, np.random.default_rng(seed + 104729))
        self.description = {"kind": "synthetic noisy ellipses", "size": list(self.size), "object": "ellipses"}

    def make(self, n: int, rng: np.random.Generator) -> SliceBatch:
        """``n`` new cases drawn with ``rng``."""
        from steprl.synth.toy import noisy_ellipse

        pairs = [noisy_ellipse(self.size, rng) for _ in range(n)]
        images = torch.from_numpy(np.stack([normalise_percentile(p[0]) for p in pairs])[:, None]).float()
        masks = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None]).float()
        return SliceBatch(images, masks)

    def sample(self, n: int, rng: np.random.Generator) -> SliceBatch:
        batch = self.make(n, rng)
        return random_flips(batch, rng) if self.augment else batch

    def validation(self) -> SliceBatch:
        return self._val


def pooled_dice(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """Dice of all slices pooled (``2 sum TP / (sum |P| + sum |G|)``, :func:`steprl.metrics.dice`) of
    masks thresholded at 0.5; 1.0 when both are empty."""
    from steprl.metrics import dice

    return dice(pred > 0.5, ref > 0.5)
