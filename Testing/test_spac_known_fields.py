"""Known-field training pairs (one subject, two views, exact field) and the coarse actor output.

Why these matter: the 3D starter model learns from pairs whose registering field is known
exactly, so the field must be the PULL-BACK field from moving to fixed (a sign or axis slip
would train the policy to move the wrong way), the loss must use it only where it is known,
and ``field_level`` must give a step of the network grid's shape whatever the level.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from steprl import spatial
from steprl.losses import one_hot, soft_dice
from steprl.registration.data import PairBatch
from steprl.registration.learner import SPACLearner, SPACTrainConfig
from steprl.registration.networks import SPACConfig, SPACPolicy
from steprl.synth.from_labels import SpatialAugment, known_pair, pick_labels, pool_image, random_field, scaled_augment
from steprl.training.distributed import single_process


def _blocks(n: int = 40) -> torch.Tensor:
    """A label map ``(1, 1, n, n, n)`` of 8 large blocks (values 1..8) inside a background margin."""
    labels = torch.zeros(1, 1, n, n, n, dtype=torch.long)
    h, m = n // 2, n // 8
    for k, (i, j, l) in enumerate(np.ndindex(2, 2, 2)):
        labels[0, 0, m + i * (h - m):h + i * (h - m), m + j * (h - m):h + j * (h - m),
               m + l * (h - m):h + l * (h - m)] = k + 1
    return labels


def _dice(fixed: torch.Tensor, moving: torch.Tensor, field: torch.Tensor) -> float:
    warped = spatial.warp(moving.float(), field, "nearest").round().long()
    return soft_dice(one_hot(fixed, 8), one_hot(warped, 8)).item()


def test_known_pair_field_registers_moving_onto_fixed():
    aug = SpatialAugment(rotation_deg=3, scaling=0.03, shift_mm=2, elastic_mm=2)
    pair_aug = SpatialAugment(rotation_deg=8, scaling=0.08, shift_mm=8, elastic_mm=4, elastic_control_mm=24)
    fixed, moving, field = known_pair(_blocks(), 2.0, (24, 24, 24), 3.0, np.random.default_rng(3), aug, pair_aug)
    assert fixed.shape == moving.shape == (1, 1, 24, 24, 24) and field.shape == (1, 3, 24, 24, 24)
    assert field.abs().max() > 1.0  # a real deformation, several voxels at the rim
    zero, true, reverse = (_dice(fixed, moving, f) for f in (torch.zeros_like(field), field, -field))
    assert true > 0.93 and true > zero + 0.05 and reverse < zero


def test_supersampled_known_pair_keeps_the_coarse_field_and_pools_to_the_grid():
    aug = SpatialAugment(rotation_deg=0, scaling=0, shear=0, shift_mm=0, elastic_mm=0)
    pair_aug = SpatialAugment(rotation_deg=8, scaling=0.08, shift_mm=8, elastic_mm=4, elastic_control_mm=24)
    fixed, moving, field = known_pair(_blocks(), 2.0, (24, 24, 24), 3.0, np.random.default_rng(3), aug, pair_aug, 2)
    assert fixed.shape == moving.shape == (1, 1, 48, 48, 48) and field.shape == (1, 3, 24, 24, 24)
    # the coarse field registers the labels picked on the coarse grid (up to the nearest-neighbour
    # rounding of the picked voxels: 1.0 exactly without supersampling and this identity ``aug``)
    picked = _dice(pick_labels(fixed, 2), pick_labels(moving, 2), field)
    assert picked > 0.9 and picked > _dice(pick_labels(fixed, 2), pick_labels(moving, 2), torch.zeros_like(field)) + 0.1
    fraction = pool_image((fixed == 1).float(), 2)  # partial volume: fractions at the deformed block's faces
    assert fraction.shape == (1, 1, 24, 24, 24) and ((fraction > 0) & (fraction < 1)).any()
    assert fraction.mean().item() == pytest.approx((fixed == 1).float().mean().item())


def test_random_field_is_zero_without_augmentation():
    none = SpatialAugment(rotation_deg=0, scaling=0, shear=0, shift_mm=0, elastic_mm=0)
    field = random_field((8, 10, 12), 2.0, none, np.random.default_rng(0))
    assert field.shape == (1, 3, 8, 10, 12) and field.abs().max() < 1e-5


def test_scaled_augment_scales_every_range_but_the_control_spacing():
    base = SpatialAugment(rotation_deg=5, scaling=0.06, shear=0.03, shift_mm=4, elastic_mm=4, elastic_control_mm=24)
    big = scaled_augment(base, 2.0)
    assert (big.rotation_deg, big.scaling, big.shear, big.shift_mm, big.elastic_mm) == (10, 0.12, 0.06, 8, 8)
    assert big.elastic_control_mm == 24
    small = random_field((16, 16, 16), 3.0, base, np.random.default_rng(1)).abs().mean().item()
    large = random_field((16, 16, 16), 3.0, big, np.random.default_rng(1)).abs().mean().item()
    assert large == pytest.approx(2 * small, rel=0.05)  # same draws, twice the ranges: about twice the field
    with pytest.raises(ValueError, match="positive"):
        scaled_augment(base, 0.0)


def test_field_level_gives_full_grid_steps_and_is_checked():
    state = torch.rand(1, 2, 32, 32, 32)
    for level in (1, 2, 3):
        step = SPACPolicy(SPACConfig(ndim=3, grid=(32, 32, 32), plan_dim=8, field_level=level)).act(state)[1]
        assert step.shape == (1, 3, 32, 32, 32)
    with pytest.raises(ValueError, match="field_level"):
        SPACConfig(ndim=2, grid=(32, 32), field_level=4)
    assert SPACConfig.from_dict({"ndim": 2, "grid": [32, 32]}).field_level == 1  # older cards: half resolution


class _KnownSource:
    """Two 2D pairs; the first has a known field, the second none."""

    num_labels, labels_are_real = 8, True

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.labels = torch.from_numpy(rng.integers(0, 9, size=(2, 1, 32, 32)))
        self.field = torch.zeros(2, 2, 32, 32)
        self.field[0] = 2.0  # a constant shift of two voxels on both axes

    def sample(self, n, rng) -> PairBatch:
        images = self.labels.float() / 8
        return PairBatch(images, images, self.labels, self.labels, self.field, torch.tensor([True, False]))

    def validation(self) -> PairBatch:
        return self.sample(2, None)


def test_field_loss_counts_only_the_known_items():
    cfg = SPACTrainConfig(batch_pairs=2, episode_steps=1, replay_batch=64, ncc_weight=0.0, field_weight=1.0)
    learner = SPACLearner(SPACConfig(ndim=2, grid=(32, 32), plan_dim=4), cfg, _KnownSource(), single_process("cpu"))
    logs = learner.train_iteration(0)
    # the policy starts near the identity: the error is the known item's 2^2 + 2^2 = 8 voxels^2, not half of it
    assert logs["field_mse"] == pytest.approx(8.0, abs=0.2)
