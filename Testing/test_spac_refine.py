"""Refinement steps after the policy (``--refine N``): the optimisation itself, and its place in register().

The refined field lives on a finer grid than the policy's; these tests check that it still
means the same thing in physical space (SimpleITK's resampling through the written field
gives the warped image that register() reports) and that the optimisation registers a pair.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from steprl import modelfile, spatial
from steprl.errors import InputError
from steprl.geometry import Geometry, Image
from steprl.metrics import local_ncc
from steprl.registration.inference import register
from steprl.registration.networks import SPACConfig, SPACPolicy
from steprl.registration.refine import RefineSettings, SingleTensorAdam, field_on, refine, refine_grid
from steprl.synth.toy import gaussian_blur

GRID = (32, 32)


def _blobs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A smooth random image ``(1, 1, *shape)`` in 0..1 (blurred noise: structure at every position)."""
    gen = torch.Generator().manual_seed(seed)
    image = gaussian_blur(torch.rand(1, 1, *shape, generator=gen), 2.0)
    return (image - image.min()) / (image.max() - image.min())


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """An untrained 2D policy whose card asks for 2 policy steps and 30 refinement steps."""
    cfg = SPACConfig(ndim=2, grid=GRID, channels=(8, 16), plan_dim=4, critic_channels=(4, 4))
    torch.manual_seed(0)
    card = {"method": "spac", "ndim": 2, "config": cfg.to_dict(),
            "inference": {"max_step": 1.0, "steps": 2, "refine": {"steps": 30, "lr": 0.2}}}
    return modelfile.save_model(tmp_path_factory.mktemp("refine") / "spac_refine", SPACPolicy(cfg).state_dict(), card)


def test_refine_recovers_a_smooth_shift():
    fixed = _blobs((40, 40), seed=1)
    true = torch.zeros(1, 2, 40, 40)
    true[:, 0], true[:, 1] = 1.5, -1.0  # moving(x + true) = fixed: a pull-back shift in voxels
    moving = spatial.warp(fixed, -true)  # moving(x) = fixed(x - true) (up to the border)
    before = local_ncc(fixed, moving, 5).item()
    fields = list(refine(fixed, moving, torch.zeros(1, 2, 40, 40), 80, RefineSettings(lr=0.1, smooth=0.1)))
    assert len(fields) == 80
    after = local_ncc(fixed, spatial.warp(moving, fields[-1]), 5).item()
    assert after > before + 0.2, (before, after)
    inner = fields[-1][..., 8:-8, 8:-8].mean((2, 3))[0]  # away from the border, where nothing is known
    np.testing.assert_allclose(inner.numpy(), [1.5, -1.0], atol=0.35)


def test_single_tensor_adam_gives_torch_adam_iterates():
    """The refinement's own Adam (kept to avoid torch.optim's 1.5 s import) follows torch.optim.Adam."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(2, 3, 5, generator=gen)
    ours, theirs = torch.zeros(2, 3, 5), torch.zeros(2, 3, 5, requires_grad=True)
    mine, reference = SingleTensorAdam(ours, lr=0.15), torch.optim.Adam([theirs], lr=0.15)
    for _ in range(25):
        mine.step(2 * (ours - target) ** 3)
        reference.zero_grad()
        ((theirs - target) ** 4 / 2).sum().backward()
        reference.step()
    assert not torch.equal(ours, torch.zeros_like(ours))
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)


def test_refine_grid_keeps_the_box_and_fields_keep_their_physical_meaning():
    net = Geometry((9, 11), (2.0, 3.0), (5.0, -4.0), np.eye(2))
    fine = refine_grid(net, 2)
    assert fine.shape == (17, 21)
    np.testing.assert_allclose(fine.spacing, (1.0, 1.5))  # xyz; the first and last voxel centres stay
    np.testing.assert_allclose(fine.origin, net.origin)
    u = torch.zeros(1, 2, 9, 11)
    u[:, 0], u[:, 1] = 0.5, -0.25  # voxels of the network grid along (row, column)
    on_fine = field_on(u, net, fine)
    physical = spatial.voxel_to_physical(on_fine, fine)
    np.testing.assert_allclose(physical[0, :, 3, 4].numpy(), [-0.25 * 2.0, 0.5 * 3.0], atol=1e-5)  # mm, xyz order


def test_register_appends_refinement_steps_that_warp_like_the_written_field(model_file):
    shape = (28, 36)
    geometry = Geometry(shape, (1.2, 0.9), (3.0, -2.0), np.eye(2))
    fixed = _blobs(shape, seed=2)[0, 0].numpy()
    shift = torch.zeros(1, 2, *shape)
    shift[:, 0] = 1.0
    moving = spatial.warp(torch.from_numpy(fixed)[None, None], shift)[0, 0].numpy()
    results = list(register(Image(fixed, geometry), Image(moving, geometry), model_file, device="cpu"))
    assert [r.step for r in results] == list(range(2 + 30 + 1))  # the card's 2 policy + 30 refinement steps
    assert [r.kind for r in results[:3]] == ["input", "policy", "policy"]
    assert {r.kind for r in results[3:]} == {"refine"}
    last = results[-1]
    assert last.displacement.geometry.shape == (63, 63)  # the refinement grid: twice the network grid
    assert last.metrics["ncc"] > results[2].metrics["ncc"] + 0.05  # refinement registers further

    # the written field means what it says: SimpleITK resamples the moving image through it
    disp = sitk.GetImageFromArray(last.displacement.array.astype(np.float64), isVector=True)
    g = last.displacement.geometry
    disp.SetSpacing(g.spacing)
    disp.SetOrigin(g.origin)
    disp.SetDirection(tuple(np.asarray(g.direction, dtype=float).ravel()))
    moving_sitk = sitk.GetImageFromArray(moving.astype(np.float64))
    for target in (moving_sitk,):
        target.SetSpacing(geometry.spacing)
        target.SetOrigin(geometry.origin)
    reference = sitk.GetImageFromArray(fixed.astype(np.float64))
    reference.SetSpacing(geometry.spacing)
    reference.SetOrigin(geometry.origin)
    warped = sitk.GetArrayFromImage(sitk.Resample(moving_sitk, reference, sitk.DisplacementFieldTransform(disp),
                                                  sitk.sitkLinear, 0.0))
    inner = (slice(3, -3), slice(3, -3))  # the field's grid ends at the outer voxel centres
    np.testing.assert_allclose(warped[inner], last.warped.array[inner], atol=2e-3)


def test_register_refine_zero_is_the_policy_alone_and_negative_is_refused(model_file):
    shape = (20, 20)
    geometry = Geometry(shape, (1.0, 1.0), (0.0, 0.0), np.eye(2))
    image = Image(_blobs(shape, 3)[0, 0].numpy(), geometry)
    results = list(register(image, image, model_file, device="cpu", refine_steps=0))
    assert [r.kind for r in results] == ["input", "policy", "policy"]
    with pytest.raises(InputError, match="refine"):
        list(register(image, image, model_file, device="cpu", refine_steps=-1))
