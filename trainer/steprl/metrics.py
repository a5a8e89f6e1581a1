"""Evaluation metrics for registration and segmentation, 2D and 3D alike.

Arrays are in numpy order (``(H, W)`` / ``(D, H, W)``, see :mod:`steprl.geometry`), while
``spacing_xyz`` is in ITK order ``(x, y[, z])`` in mm, as :class:`~steprl.geometry.Geometry`
stores it; the functions here reverse it where an array-order spacing is needed. NumPy in,
Python floats out, except :func:`local_ncc` / :func:`global_ncc`, which are differentiable torch
losses. torch, SciPy and MONAI are imported inside the functions that need them, so importing
this module stays cheap (``import monai.metrics`` alone takes ~2 s).

Empty-structure conventions (one rule everywhere):

- Overlap ratios (Dice, precision, sensitivity, IoU, boundary IoU) are 1.0 when BOTH masks are
  empty (the prediction correctly says "nothing here") and 0.0 when only one is empty (a 0/0
  precision or sensitivity then counts as 0, like scikit-learn's ``zero_division=0``: an empty
  output that missed the whole structure must not score a perfect precision).
- HD95 is 0.0 when both masks are empty and ``nan`` when only one is: a surface distance to
  nothing is undefined, and ``nan`` (unlike ``inf``) keeps mean curves readable while refusing
  to invent a number. Report how many cases were ``nan`` next to any ``nanmean``.
- Per-label functions skip labels absent from both arrays; a label absent from one of them
  gets Dice 0.0 and HD95 ``nan``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from steprl.errors import InputError

if TYPE_CHECKING:
    import torch

#: Boundary IoU band width as a fraction of the image diagonal (Cheng et al. 2021).
BOUNDARY_DILATION_RATIO = 0.02
#: ``std_log_jacobian`` clips det J to this range before the log, so folded (<= 0) voxels count
#: as a very large (finite) contraction instead of producing nan / -inf.
JACOBIAN_CLIP = (1e-9, 1e9)
#: Added to the product of the two local variances (in units of each image's global variance).
NCC_EPS = 1e-5


# ---- helpers ------------------------------------------------------------------------------
def _as_numpy(array: Any) -> np.ndarray:
    """A numpy view of ``array`` (numpy, list, or a torch tensor on any device)."""
    if hasattr(array, "detach"):  # a torch tensor; avoids importing torch here
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _same_shape(pred: np.ndarray, ref: np.ndarray, what: str) -> None:
    if pred.shape != ref.shape:
        raise InputError(
            f"{what}: prediction shape {pred.shape} differs from reference shape {ref.shape}.",
            "Resample both onto the same grid (in physical space) before comparing them.",
        )


def _as_labels(array: Any) -> np.ndarray:
    """An integer label array; float arrays must hold whole numbers (e.g. a label map saved as float)."""
    arr = _as_numpy(array)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        return arr
    if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
        raise InputError(
            "A label map holds non-integer values.",
            "Give integer labels (resample label maps with nearest-neighbour interpolation).",
        )
    return arr.astype(np.int64)


def _spacing_zyx(spacing_xyz: Sequence[float], ndim: int) -> tuple[float, ...]:
    """ITK-order spacing ``(x, y[, z])`` -> array-order spacing ``([z,] y, x)``, validated."""
    spacing = tuple(float(s) for s in spacing_xyz)
    if len(spacing) != ndim:
        raise InputError(
            f"Spacing {spacing} has {len(spacing)} values for a {ndim}D image.",
            "Give one spacing per image axis, in ITK (x, y[, z]) order (Geometry.spacing).",
        )
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"Spacing {spacing} is not positive and finite.", "Fix the image header.")
    return spacing[::-1]


def _ratio(num: float, den: float, both_empty: bool) -> float:
    """``num / den`` with the module's empty rule: 0/0 is 1.0 when both masks are empty, else 0.0."""
    if den > 0:
        return float(num) / float(den)
    return 1.0 if both_empty else 0.0


# ---- Dice ---------------------------------------------------------------------------------
def _label_counts(labels: np.ndarray) -> dict[int, int]:
    """``{label: voxel count}`` of an integer array: one ``bincount`` pass for the usual small
    non-negative labels, a sort (``np.unique``) for negative or huge label values."""
    flat = labels.ravel()
    if flat.size and flat.min() >= 0 and flat.max() < 1 << 20:
        counts = np.bincount(flat.astype(np.intp, copy=False))
        present = np.flatnonzero(counts)
        return {int(v): int(counts[v]) for v in present}
    values, counts = np.unique(flat, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def dice(pred_mask: Any, ref_mask: Any) -> float:
    """Dice ``2|P & R| / (|P| + |R|)`` of two binary masks (non-zero = foreground; numpy or torch,
    any shape, e.g. a batch of slices pooled). Both empty: 1.0; one empty: 0.0 (the module's rule)."""
    p, r = _as_numpy(pred_mask) != 0, _as_numpy(ref_mask) != 0
    _same_shape(p, r, "Dice")
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
    return _ratio(2 * int(np.count_nonzero(p & r)), total, both_empty=total == 0)


def dice_per_label(pred: Any, ref: Any, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice coefficient ``2|P & R| / (|P| + |R|)`` of each label of two label maps.

    Args:
        pred, ref: integer label maps of the same shape (any dimension); 0 is background.
        labels: labels to score; default: every non-zero label present in either map.

    Returns ``{label: dice}``. A label absent from both maps is skipped; absent from one -> 0.0
    (the module's rule; :func:`dice` scores one binary mask). Counting is one ``bincount`` pass
    per map (fast with tens of labels on large volumes). Torch tensors on any device are accepted.
    """
    p, r = _as_labels(pred), _as_labels(ref)
    _same_shape(p, r, "Dice")
    size_p, size_r, inter = _label_counts(p), _label_counts(r), _label_counts(p[p == r])
    if labels is None:
        wanted = sorted((set(size_p) | set(size_r)) - {0})
    else:
        wanted = [int(label) for label in labels]
    out: dict[int, float] = {}
    for label in wanted:
        n_p, n_r = size_p.get(label, 0), size_r.get(label, 0)
        if n_p + n_r == 0:
            continue
        out[label] = 2.0 * inter.get(label, 0) / (n_p + n_r)
    return out


def mean_dice(pred: Any, ref: Any, labels: Iterable[int] | None = None) -> float:
    """Unweighted mean of :func:`dice_per_label`; ``nan`` when no label is present in either map."""
    scores = dice_per_label(pred, ref, labels)
    return float(np.mean(list(scores.values()))) if scores else float("nan")


# ---- surface distance ---------------------------------------------------------------------
def hd95(pred_mask: Any, ref_mask: Any, spacing_xyz: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance (mm) between the surfaces of two binary masks.

    Definition (MONAI's ``compute_hausdorff_distance(percentile=95)`` default, which computes it):
    the surface of a mask is its foreground voxels with at least one face-neighbour in the
    background or outside the image (``mask XOR binary_erosion(mask)``); for each surface voxel
    of one mask take the Euclidean distance in mm (voxel centres, anisotropic ``spacing``) to
    the nearest surface voxel of the other; take the 95th percentile (linear interpolation) of
    each direction's distances, and return the LARGER of the two.

    Args:
        pred_mask, ref_mask: binary masks (non-zero = foreground), ``(H, W)`` or ``(D, H, W)``.
        spacing_xyz: voxel size in mm in ITK order ``(x, y[, z])`` (``Geometry.spacing``).

    Returns 0.0 when both masks are empty and ``nan`` when exactly one is (see module docstring).
    """
    p, r = _as_numpy(pred_mask) != 0, _as_numpy(ref_mask) != 0
    _same_shape(p, r, "HD95")
    if p.ndim not in (2, 3):
        raise InputError(f"HD95 needs a 2D or 3D mask, got {p.ndim} dimensions.", "Give (H, W) or (D, H, W) masks.")
    spacing = _spacing_zyx(spacing_xyz, p.ndim)
    has_p, has_r = bool(p.any()), bool(r.any())
    if not has_p and not has_r:
        return 0.0
    if not has_p or not has_r:
        return float("nan")
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        # MONAI 1.6 passes its own deprecated ``always_return_as_numpy`` argument internally.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        value = compute_hausdorff_distance(
            p[None, None], r[None, None], include_background=True, percentile=95, spacing=list(spacing)
        )
    return float(value.reshape(-1)[0])


def hd95_per_label(
    pred: Any, ref: Any, spacing_xyz: Sequence[float], labels: Iterable[int] | None = None
) -> dict[int, float]:
    """:func:`hd95` of each label of two label maps, ``{label: mm}``.

    ``labels`` default: every non-zero label present in either map. A label absent from both is
    skipped; absent from one -> ``nan``.
    """
    p, r = _as_labels(pred), _as_labels(ref)
    _same_shape(p, r, "HD95")
    if labels is None:
        wanted = sorted((set(np.unique(p).tolist()) | set(np.unique(r).tolist())) - {0})
    else:
        wanted = [int(label) for label in labels]
    out: dict[int, float] = {}
    for label in wanted:
        mp, mr = p == label, r == label
        if not mp.any() and not mr.any():
            continue
        out[label] = hd95(mp, mr, spacing_xyz)
    return out


# ---- Jacobian -----------------------------------------------------------------------------
def folding_percent(jacobian_det: Any) -> float:
    """Percentage (0-100) of voxels whose Jacobian determinant is ``<= 0`` (folded or collapsed).

    ``jacobian_det`` is any array of determinants, e.g. ``steprl.spatial.jacobian_determinant``'s
    ``(B, *S)`` output (all voxels of all batch items count equally).
    """
    det = _as_numpy(jacobian_det).astype(np.float64, copy=False)
    if det.size == 0:
        raise InputError("The Jacobian determinant array is empty.", "Give the determinant of a non-empty field.")
    return float(100.0 * np.count_nonzero(det <= 0) / det.size)


def std_log_jacobian(jacobian_det: Any) -> float:
    """Standard deviation (population, ``ddof=0``) of ``log(det J)`` over all voxels.

    det J is clipped to ``JACOBIAN_CLIP = [1e-9, 1e9]`` first, so folded voxels (det <= 0) enter
    as ``log(1e-9)`` (a strong, finite penalty) rather than ``nan`` / ``-inf``.
    """
    det = _as_numpy(jacobian_det).astype(np.float64, copy=False)
    if det.size == 0:
        raise InputError("The Jacobian determinant array is empty.", "Give the determinant of a non-empty field.")
    return float(np.std(np.log(np.clip(det, *JACOBIAN_CLIP))))


def jacobian_stats(jacobian_det: Any) -> dict[str, float]:
    """``{"folding_percent": ..., "std_log_jacobian": ...}`` of an array of Jacobian determinants."""
    return {"folding_percent": folding_percent(jacobian_det), "std_log_jacobian": std_log_jacobian(jacobian_det)}


# ---- normalised cross-correlation (torch) -------------------------------------------------
def _box_mean(maps: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:
    """Mean of ``maps`` ``(B, C, *S)`` over a box window clipped to the image, per voxel and channel.

    Separable: one box sum per axis (:func:`steprl.filters.box_sum_axis`; cost ``O(N * k)`` per
    axis, not ``O(N * prod(window))``). Zero padding gives the in-image SUM; dividing by the
    in-image voxel count (a product of per-axis counts) gives the mean over the window's part
    inside the image.
    """
    import torch

    from steprl.filters import box_sum_axis

    nd = maps.dim() - 2
    out = maps
    count = maps.new_ones(())
    for axis, k in enumerate(window):
        n, radius = maps.shape[2 + axis], k // 2
        if k > 1:
            out = box_sum_axis(out, 2 + axis, k)
        idx = torch.arange(n, device=maps.device)
        per_axis = ((idx + radius).clamp(max=n - 1) - (idx - radius).clamp(min=0) + 1).to(maps.dtype)
        view = [1] * nd
        view[axis] = n
        count = count * per_axis.view(view)
    return out / count


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise InputError(f"NCC: image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}.",
                         "Warp or resample both images onto the same grid first.")
    if a.dim() not in (4, 5) or a.shape[1] != 1:
        raise InputError(f"NCC expects (B, 1, H, W) or (B, 1, D, H, W) tensors, got {tuple(a.shape)}.",
                         "Add batch and channel axes (tensor[None, None]).")


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` per batch item (``x`` float32 or float64). Local NCC is invariant to it, but it
    removes the float32 cancellation of ``E[x^2] - E[x]^2`` for large offsets and makes
    ``NCC_EPS`` relative to each image's own contrast (exact invariance to ``a * x + b``)."""
    dims = tuple(range(1, x.dim()))
    x = x - x.mean(dim=dims, keepdim=True)
    # clamp BEFORE the sqrt: a constant image would otherwise give a nan gradient (inf * 0)
    std = x.pow(2).mean(dim=dims, keepdim=True).clamp_min(1e-24).sqrt()
    return x / std


def _float(x: torch.Tensor) -> torch.Tensor:
    """float64 stays float64; every other dtype (bf16/fp16 under autocast, ints) becomes float32."""
    import torch

    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def local_ncc(
    a: torch.Tensor, b: torch.Tensor, window: int | Sequence[int] = 9, reduction: str = "mean"
) -> torch.Tensor:
    """Mean local (windowed) normalised cross-correlation of two images, in ``[-1, 1]``; differentiable.

    For every voxel, the Pearson correlation of ``a`` and ``b`` over the ``window`` box centred
    on it, ``cov / sqrt(var_a * var_b + eps)``, then averaged over voxels (and the batch).
    Border rule: windows are clipped to the image (statistics over the in-image part), so every
    voxel counts. Flat windows (local variance ~ 0) score ~0, so for images with constant
    background ``local_ncc(x, x)`` is below 1. ``-local_ncc`` is the SPAC similarity loss.

    Why not MONAI's ``LocalNormalizedCrossCorrelationLoss``: it returns minus the SQUARED local
    correlation (range [-1, 0], blind to the sign of the correlation, so a negated image counts
    as a perfect match) with zero padding at the border; this is the signed correlation with
    the same separable box-filter algorithm. It runs in float32 (autocast disabled inside) so
    ``E[xy] - E[x]E[y]`` keeps its precision under bf16 autocast; each image is first
    standardised per batch item, so ``eps = NCC_EPS`` is relative to the image's own contrast.

    Args:
        a, b: ``(B, 1, H, W)`` or ``(B, 1, D, H, W)`` on any device.
        window: odd box size in voxels, one int for all axes or one per array axis.
        reduction: ``"mean"`` -> scalar tensor; ``"none"`` -> ``(B,)`` per-item means.
    """
    import torch

    _check_pair(a, b)
    nd = a.dim() - 2
    win = (int(window),) * nd if isinstance(window, int) else tuple(int(w) for w in window)
    if len(win) != nd or any(w < 1 or w % 2 == 0 for w in win):
        raise InputError(f"NCC window {window} must be odd and positive, one value or one per axis ({nd}).",
                         "Use e.g. window=9.")
    with torch.autocast(device_type=a.device.type, enabled=False):
        x, y = _standardise(_float(a)), _standardise(_float(b))
        stats = _box_mean(torch.cat([x, y, x * x, y * y, x * y], dim=1), win)
        mx, my, mxx, myy, mxy = stats.unbind(dim=1)
        var_x = (mxx - mx * mx).clamp_min(0)
        var_y = (myy - my * my).clamp_min(0)
        ncc = (mxy - mx * my) / torch.sqrt(var_x * var_y + NCC_EPS)
        per_item = ncc.flatten(1).mean(dim=1)
    return _reduce(per_item, reduction)


def global_ncc(a: torch.Tensor, b: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` over the whole image, per batch item, in ``[-1, 1]``.

    Shapes ``(B, 1, *S)``; returns the batch mean (scalar) or, with ``reduction="none"``, ``(B,)``.
    A constant image correlates 0 with anything. Differentiable.
    """
    import torch

    _check_pair(a, b)
    with torch.autocast(device_type=a.device.type, enabled=False):
        x, y = _float(a).flatten(1), _float(b).flatten(1)
        x = x - x.mean(dim=1, keepdim=True)
        y = y - y.mean(dim=1, keepdim=True)
        denom = torch.sqrt((x * x).sum(dim=1) * (y * y).sum(dim=1)).clamp_min(1e-12)
        per_item = (x * y).sum(dim=1) / denom
    return _reduce(per_item, reduction)


def _reduce(per_item: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_item.mean()
    if reduction == "none":
        return per_item
    raise InputError(f"Unknown reduction {reduction!r}.", 'Use "mean" or "none".')


# ---- segmentation -------------------------------------------------------------------------
def boundary_region(mask: Any, dilation_ratio: float = BOUNDARY_DILATION_RATIO) -> np.ndarray:
    """The inner boundary band of a binary mask used by Boundary IoU (Cheng et al. 2021).

    The mask voxels within ``d`` voxels (chessboard distance) of the contour, where
    ``d = max(1, round(dilation_ratio * image diagonal in voxels))``; the image border counts as
    contour. Computed as the paper does: ``mask AND NOT erode(mask, 3^n cube, d times)`` with
    the outside of the image treated as background. The band is in voxel units (no spacing),
    as in the paper; in 3D the diagonal is ``sqrt(D^2 + H^2 + W^2)``.
    """
    from scipy import ndimage

    m = _as_numpy(mask) != 0
    d = max(1, int(round(dilation_ratio * math.sqrt(sum(n * n for n in m.shape)))))
    if not m.any():
        return m
    eroded = ndimage.binary_erosion(m, structure=np.ones((3,) * m.ndim, dtype=bool), iterations=d, border_value=0)
    return m & ~eroded


def boundary_iou(pred_mask: Any, ref_mask: Any, dilation_ratio: float = BOUNDARY_DILATION_RATIO) -> float:
    """Boundary IoU: IoU of the two masks' :func:`boundary_region` bands (1.0 if both masks are empty)."""
    p, r = _as_numpy(pred_mask) != 0, _as_numpy(ref_mask) != 0
    _same_shape(p, r, "Boundary IoU")
    bp, br = boundary_region(p, dilation_ratio), boundary_region(r, dilation_ratio)
    inter = np.count_nonzero(bp & br)
    union = np.count_nonzero(bp | br)
    return _ratio(inter, union, not p.any() and not r.any())


def segmentation_metrics(pred_mask: Any, ref_mask: Any, spacing_xyz: Sequence[float]) -> dict[str, float]:
    """Overlap and surface metrics of one binary segmentation against its reference.

    Args:
        pred_mask, ref_mask: binary masks (non-zero = foreground), ``(H, W)`` or ``(D, H, W)``.
        spacing_xyz: voxel size in mm, ITK order (``Geometry.spacing``), for ``hd95``.

    Returns ``dice`` = 2TP/(2TP+FP+FN), ``ppv`` = TP/(TP+FP) (precision), ``sen`` = TP/(TP+FN)
    (sensitivity, recall), ``iou`` = TP/(TP+FP+FN), ``biou`` (:func:`boundary_iou`) and
    ``hd95`` (:func:`hd95`, mm). Both masks empty: every ratio 1.0 and hd95 0.0; only one
    empty: every ratio 0.0 and hd95 ``nan`` (see the module docstring).
    """
    p, r = _as_numpy(pred_mask) != 0, _as_numpy(ref_mask) != 0
    _same_shape(p, r, "Segmentation metrics")
    tp = int(np.count_nonzero(p & r))
    fp = int(np.count_nonzero(p & ~r))
    fn = int(np.count_nonzero(~p & r))
    both_empty = tp + fp + fn == 0
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "ppv": _ratio(tp, tp + fp, both_empty),
        "sen": _ratio(tp, tp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "biou": boundary_iou(p, r),
        "hd95": hd95(p, r, spacing_xyz),
    }
