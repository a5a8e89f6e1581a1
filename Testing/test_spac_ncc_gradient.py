"""The ``"ncc-gradient"`` state feature and the actor's prior step along it (issue 11's 3D recipe).

The direction must point the way a displacement raises the local NCC, so that an UNTRAINED
policy with a prior step already registers; the tests check that on pairs with a known shift.
"""

from __future__ import annotations

import pytest
import torch
from steprl import spatial
from steprl.metrics import local_ncc
from steprl.registration.networks import SPACConfig, SPACPolicy, planner_input
from steprl.registration.similarity_gradient import iterated_ncc_gradient, ncc_gradient
from steprl.synth.toy import gaussian_blur


def _blobs(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A smooth random image ``(1, 1, *shape)`` in 0..1 (structure at every scale the tests use)."""
    g = torch.Generator().manual_seed(seed)
    image = gaussian_blur(torch.rand(1, 1, *shape, generator=g), 2.0)
    return (image - image.min()) / (image.max() - image.min())


@pytest.mark.parametrize("axis", [0, 1])
def test_direction_points_towards_the_shift(axis):
    """moving = fixed shifted by +1.5 voxels: the pull-back field that registers it is -1.5 along the axis."""
    fixed = _blobs((32, 32))
    true = torch.zeros(1, 2, 32, 32)
    true[:, axis] = -1.5
    moving = spatial.warp(fixed, -true)  # moving(x) = fixed(x - true), so moving(x + true) = fixed(x)
    direction = ncc_gradient(fixed, moving, window=5, sigma=1.0)
    assert direction.shape == (1, 2, 32, 32)
    inner = direction[:, :, 6:-6, 6:-6]  # away from the border, where shifted content is missing
    assert inner[:, axis].mean() < 0 and inner[:, axis].mean().abs() > 3 * inner[:, 1 - axis].mean().abs()
    before = local_ncc(fixed, moving, 5)
    after = local_ncc(fixed, spatial.warp(moving, 0.5 * direction / direction.abs().max()), 5)
    assert after > before + 1e-3


def test_direction_vanishes_when_aligned():
    fixed = _blobs((24, 24, 24), seed=1)
    moving = spatial.warp(fixed, torch.full((1, 3, 24, 24, 24), 0.8))
    aligned = ncc_gradient(fixed, fixed, 5, 1.0).abs().mean()
    assert aligned < 0.05 * ncc_gradient(fixed, moving, 5, 1.0).abs().mean()


def test_untrained_policy_with_a_prior_step_registers():
    """With the actor's own output near zero (its initialisation), the policy follows the prior step:
    the NCC rises over the first steps from the identity's, and the field stays smooth."""
    torch.manual_seed(0)
    cfg = SPACConfig(ndim=2, grid=(32, 32), channels=(8, 16, 16), plan_dim=4, critic_channels=(4, 4),
                     norm="instance", features="ncc-gradient", prior_scale=2.0, prior_window=5, prior_sigma=1.5,
                     step_bound=1.0, zero_mean=True, field_input=True)
    policy = SPACPolicy(cfg).eval()
    fixed = _blobs((32, 32), seed=2)
    bump = torch.zeros(1, 2, 32, 32)
    bump[:, 0, 10:22, 10:22] = 2.0
    moving = spatial.warp(fixed, gaussian_blur(bump, 3.0))
    field = torch.zeros(1, 2, 32, 32)
    scores = [local_ncc(fixed, moving, 5).item()]
    with torch.no_grad():
        for _ in range(5):
            _, step = policy.act(torch.cat([fixed, spatial.warp(moving, field), field], 1))
            field = spatial.compose(field, step.clamp(-1, 1))
            scores.append(local_ncc(fixed, spatial.warp(moving, field), 5).item())
    assert scores[1] > scores[0] and scores[-1] > scores[0] + 0.02, scores
    assert (spatial.jacobian_determinant(field) > 0).all()


def test_prior_scale_is_learned_and_checked():
    cfg = SPACConfig(ndim=2, grid=(32, 32), channels=(8, 16, 16), plan_dim=4, features="ncc-gradient",
                     prior_scale=1.5)
    policy = SPACPolicy(cfg)
    assert "actor.prior_scale" in dict(policy.named_parameters())
    assert policy.actor.prior_scale.item() == 1.5
    assert "actor.prior_scale" not in dict(SPACPolicy(SPACConfig(ndim=2, grid=(32, 32))).named_parameters())
    with pytest.raises(ValueError, match="prior_scale"):
        SPACConfig(ndim=2, grid=(32, 32), features="diff", prior_scale=1.0)
    with pytest.raises(ValueError, match="prior_window"):
        SPACConfig(ndim=2, grid=(32, 32), features="ncc-gradient", prior_window=4)
    with pytest.raises(ValueError, match="direction"):
        planner_input(torch.rand(1, 2, 8, 8), "ncc-gradient")
    assert SPACConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="prior_iterations"):
        SPACConfig(ndim=2, grid=(32, 32), features="ncc-gradient", prior_iterations=0)


def test_inner_iterations_reach_further_along_the_shift():
    """Two inner iterations (SPACConfig.prior_iterations) move a 3-voxel shift further than one, in the
    right direction, and one iteration is exactly the plain direction."""
    fixed = _blobs((32, 32), seed=3)
    true = torch.zeros(1, 2, 32, 32)
    true[:, 0] = -3.0
    moving = spatial.warp(fixed, -true)
    one = ncc_gradient(fixed, moving, 5, 1.0)
    torch.testing.assert_close(iterated_ncc_gradient(fixed, moving, 5, 1.0, 1, 2.0), one)
    two = iterated_ncc_gradient(fixed, moving, 5, 1.0, 2, 2.0)
    inner = (slice(None), 0, slice(8, -8), slice(8, -8))
    assert two[inner].mean() < one[inner].mean() < 0
    cfg = SPACConfig(ndim=2, grid=(32, 32), channels=(8, 16, 16), plan_dim=4, features="ncc-gradient",
                     prior_scale=2.0, prior_sigma=1.0, prior_iterations=2)
    _, _, skips = SPACPolicy(cfg).planner(torch.cat([fixed, moving], 1))
    torch.testing.assert_close(skips.direction, two)
