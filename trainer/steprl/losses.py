"""The training losses of the learners, in one place (as voxelmorph keeps its losses together).

Shapes: fields ``(B, ndim, *S)`` in voxels (pull-back), images ``(B, 1, *S)``, one-hot label
maps ``(B, K, *S)`` (background excluded). All differentiable; torch is imported here.

- :func:`ncc_loss`: minus the local normalised cross-correlation. The NCC itself is
  :func:`steprl.metrics.local_ncc`, one implementation that evaluation reports as a metric.
- :func:`gradient_penalty`: the ``|grad u|^2`` smoothness of a field.
- :func:`soft_dice` (with :func:`one_hot`): a differentiable Dice of soft label maps.
- :func:`kl_to_standard_normal`: the plan's prior term (SPAC's planner).
- :func:`field_mse`: squared distance of a field to a known true field.

The segmentation learners' losses (PA3C's policy/value loss, MONAI's Dice + cross-entropy for
the U-Net) live with their learners: they belong to one method each.
"""

from __future__ import annotations

import torch


def ncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int) -> torch.Tensor:
    """``-local_ncc(fixed, warped, window)`` (mean over the batch): 0 is no similarity, -1 a perfect match."""
    from steprl.metrics import local_ncc

    return -local_ncc(fixed, warped, window)


def gradient_penalty(displacement: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of a field ``(B, ndim, *S)``: the ``|grad u|^2`` smoothness loss."""
    nd = displacement.shape[1]
    total = displacement.new_zeros(())
    for axis in range(2, 2 + nd):
        total = total + displacement.diff(dim=axis).pow(2).mean()
    return total / nd


def soft_dice(fixed_onehot: torch.Tensor, moving_onehot: torch.Tensor) -> torch.Tensor:
    """Mean Dice over the label channels present in either map, per batch item.

    Shapes: ``(B, K, *S)`` one-hot (or soft) maps, background excluded by the caller -> ``(B,)``.
    A label absent from both maps does not count, the rule of :mod:`steprl.metrics` (whose
    :func:`~steprl.metrics.dice_per_label` scores hard label maps for evaluation). Separate from
    it because training needs a Dice of SOFT maps (linearly warped one-hot labels) that is
    differentiable in the field and stays on the device; on hard one-hot maps the two agree.
    """
    dims = tuple(range(2, fixed_onehot.ndim))
    inter = (fixed_onehot * moving_onehot).sum(dims)
    total = fixed_onehot.sum(dims) + moving_onehot.sum(dims)
    present = (total > 0).to(inter.dtype)
    dice = 2 * inter / total.clamp(min=1e-6)
    return (dice * present).sum(1) / present.sum(1).clamp(min=1)


def one_hot(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Integer labels ``(B, 1, *S)`` in ``0..num_labels`` -> one-hot WITHOUT background ``(B, num_labels, *S)``."""
    classes = torch.arange(1, num_labels + 1, device=labels.device).view(1, -1, *([1] * (labels.ndim - 2)))
    return (labels == classes).float()


def kl_to_standard_normal(mu: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Mean KL(N(mu, std) || N(0, I)) over batch and plan dimensions."""
    var = (2 * log_std).exp()
    return 0.5 * (var + mu**2 - 1 - 2 * log_std).mean()


def field_mse(field: torch.Tensor, true_field: torch.Tensor) -> torch.Tensor:
    """Squared distance ``(B,)`` (voxels^2) of ``field`` to ``true_field``, summed over components, mean over voxels."""
    return (field - true_field).pow(2).sum(1).flatten(1).mean(1)
