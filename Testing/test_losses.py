"""steprl.losses: the training losses agree with the metrics they stand for."""

from __future__ import annotations

import pytest
import torch
from steprl import losses, metrics


def test_soft_dice_on_hard_maps_is_the_metric_dice():
    gen = torch.Generator().manual_seed(3)
    fixed = torch.randint(0, 4, (2, 1, 6, 7), generator=gen)
    moving = torch.randint(0, 4, (2, 1, 6, 7), generator=gen)
    moving[1][moving[1] == 3] = 0  # label 3 absent from one map: Dice 0 for it, still counted
    soft = losses.soft_dice(losses.one_hot(fixed, 3), losses.one_hot(moving, 3))
    for b in range(2):
        assert soft[b].item() == pytest.approx(metrics.mean_dice(moving[b], fixed[b], labels=[1, 2, 3]))
    empty = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    assert losses.soft_dice(losses.one_hot(empty, 3), losses.one_hot(empty, 3)).item() == 0.0  # nothing to score


def test_field_terms_and_kl_known_values():
    field = torch.zeros(1, 2, 4, 5)
    field[:, 0, :, 3:] = 1.0  # a step of 1 voxel along the last axis in component 0
    assert losses.gradient_penalty(field).item() == pytest.approx((4 / 32) / 2)  # 4 jumps in 2x4x4 differences
    assert losses.field_mse(field, torch.zeros_like(field)).tolist() == [pytest.approx(8 / 20)]
    assert losses.kl_to_standard_normal(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0
    assert losses.kl_to_standard_normal(torch.ones(3, 4), torch.zeros(3, 4)).item() == pytest.approx(0.5)


def test_ncc_loss_is_minus_the_metric():
    gen = torch.Generator().manual_seed(4)
    a, b = torch.rand(2, 1, 12, 12, generator=gen), torch.rand(2, 1, 12, 12, generator=gen)
    assert losses.ncc_loss(a, b, 5).item() == pytest.approx(-metrics.local_ncc(a, b, 5).item())
    assert losses.ncc_loss(a, a, 5).item() == pytest.approx(-1.0, abs=1e-4)
