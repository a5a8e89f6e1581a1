"""Label losses on coarse grids: the signed-distance loss and hard Dice rank a true field above no motion;
the soft Dice of linearly warped one-hot labels does not (why the 3D recipe uses the distance loss)."""

from __future__ import annotations

import numpy as np
import torch
from steprl import spatial
from steprl.registration.environment import RegistrationEnv
from steprl.registration.label_distance import distance_loss, hard_dice, signed_distance_maps


def _thin_structures_pair(shift: float = 0.6, fine: int = 4, size: int = 32):
    """Thin stripes (1-2 voxels thick, 3 labels) seen on a coarse grid, and the same anatomy moved by a
    smooth sub-voxel field: labels sampled from a ``fine`` times finer map, as the synthesis does.

    Returns fixed and moving labels ``(1, 1, size, size)`` and the true pull-back field ``(1, 2, size, size)``.
    """
    n = size * fine
    rows = torch.arange(n)[:, None].expand(n, n)
    stripes = torch.zeros(n, n, dtype=torch.long)
    for k, start in enumerate((6, 13, 21), start=1):
        stripes[(rows >= start * fine) & (rows < start * fine + fine + k * fine // 2)] = k
    coarse = spatial.identity_coords((size, size)) * fine + fine // 2  # coarse voxel centres on the fine grid
    y = torch.linspace(0, 1, size)
    field = torch.zeros(1, 2, size, size)
    field[:, 0] = shift * torch.sin(np.pi * y)[None, :]  # a smooth, sub-voxel vertical motion
    fixed = spatial.sample(stripes[None, None].float(), coarse + fine * field, "nearest").long()
    moving = spatial.sample(stripes[None, None].float(), coarse, "nearest").long()
    return fixed, moving, field  # fixed(x) = moving(x + field(x))


def test_distance_loss_and_hard_dice_prefer_the_true_field():
    fixed, moving, true = _thin_structures_pair(shift=0.9)
    zero = torch.zeros_like(true)
    assert hard_dice(fixed, moving, true, 3).item() > hard_dice(fixed, moving, zero, 3).item() + 0.1
    f_sdf, m_sdf = signed_distance_maps(fixed, 3), signed_distance_maps(moving, 3)
    assert distance_loss(f_sdf, m_sdf, true).item() < 0.5 * distance_loss(f_sdf, m_sdf, zero).item()


def test_soft_dice_of_linearly_warped_labels_prefers_no_motion_to_a_true_sub_voxel_field():
    """The bias the distance loss removes: interpolation blur costs soft Dice more than the alignment gains."""
    fixed, moving, true = _thin_structures_pair(shift=0.4)
    zero = torch.zeros_like(true)
    env = RegistrationEnv(fixed.float(), moving.float(), fixed, moving, 3, 4)
    assert env.dice_of(true).item() < env.dice_of(zero).item() - 0.05
    f_sdf, m_sdf = signed_distance_maps(fixed, 3), signed_distance_maps(moving, 3)
    assert distance_loss(f_sdf, m_sdf, true).item() < 0.8 * distance_loss(f_sdf, m_sdf, zero).item()


def test_signed_distance_maps_sign_clip_and_absent_labels():
    labels = torch.zeros(1, 1, 9, 9, dtype=torch.long)
    labels[0, 0, 3:6, 3:6] = 1
    sdf = signed_distance_maps(labels, 2, clip=2.0)
    assert sdf.shape == (1, 2, 9, 9)
    assert sdf[0, 0, 4, 4] < 0 < sdf[0, 0, 0, 0]  # negative inside, positive outside
    assert sdf[0, 0].abs().max() <= 2.0 and sdf[0, 0, 0, 0] == 2.0  # clipped
    assert torch.all(sdf[0, 1] == 2.0)  # label 2 is absent: far outside everywhere


def test_hard_env_scores_with_nearest_neighbour_labels():
    fixed, moving, true = _thin_structures_pair(shift=0.9)
    env = RegistrationEnv(fixed.float(), moving.float(), fixed, moving, 3, 4, score="hard")
    assert env.dice.item() == hard_dice(fixed, moving, torch.zeros_like(true), 3).item()
    out = env.advance(true)
    assert out.reward.item() > 0  # moving to the true field is rewarded
