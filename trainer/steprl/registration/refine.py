"""Refinement steps after the policy: test-time optimisation of the composed field (``--refine N``).

Why: a policy trained on a CPU budget leaves residual misalignment that a few dozen gradient
steps on the pair itself remove (uniGradICON's instance optimisation, ConvexAdam's Adam stage).
Each refinement step is one Adam update of the field on

    loss(u) = -LNCC(fixed, moving o (x + u)) + smooth * |grad u|^2

starting from the policy's final field, so the slider simply continues past the policy's
steps. The field lives on a grid ``factor`` times finer than the network grid (same box, same
axis-aligned directions: :meth:`Geometry.axis_aligned`) and is parameterised at half that
resolution, upsampled linearly (a smooth field with 8x fewer unknowns in 3D, the way the
policy's actor predicts its steps). Everything stays on the device of the inputs.

Shapes: images ``(1, 1, *S)``, fields ``(1, ndim, *S)`` in voxels of their grid (array order).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from steprl import spatial
from steprl.geometry import Geometry


@dataclass(frozen=True)
class RefineSettings:
    """How the refinement optimises (the defaults are what ``steprl register --refine N`` uses).

    Attributes:
        factor: the refinement grid has ``factor`` times the network grid's voxels per axis.
        lr: Adam learning rate, in voxels of the refinement grid per step.
        smooth: weight of the mean squared gradient of the field (voxels of the refinement grid).
        window: local NCC window in voxels of the refinement grid.

    The defaults were chosen on MNI152 <-> Colin27 (brain-extracted T1) and held-out synthetic whole
    heads, 30 steps from the affine alone: smoothness 1 gave the best Dice on the real pair (GM/WM
    0.783 / 0.795) but folded 0.3-1.7 % of the voxels of the synthetic whole heads (noisy air and
    skull); 4 folded <= 0.04 % for ~0.01 less Dice; 1.5 with lr 0.15 sits between.
    """

    factor: int = 2
    lr: float = 0.15
    smooth: float = 1.5
    window: int = 5

    def __post_init__(self) -> None:
        if self.factor < 1 or self.window < 1 or self.window % 2 == 0 or not self.lr > 0 or self.smooth < 0:
            raise ValueError(f"invalid refinement settings {self}: factor >= 1, odd window, lr > 0, smooth >= 0")


def refine_grid(net: Geometry, factor: int) -> Geometry:
    """The grid the refinement optimises on: ``factor`` times the network grid's voxels, same box."""
    if factor == 1:
        return net
    return net.axis_aligned(tuple(factor * n - (factor - 1) for n in net.shape))


def field_on(field: torch.Tensor, source: Geometry, target: Geometry) -> torch.Tensor:
    """A voxel field ``(1, ndim, *S_source)`` on ``source`` as a voxel field on ``target``, through physical space."""
    physical = spatial.voxel_to_physical(field, source)
    return spatial.physical_to_voxel(spatial.resample(physical, source, target), target)


def refine(fixed: torch.Tensor, moving: torch.Tensor, start: torch.Tensor, steps: int,
           settings: RefineSettings = RefineSettings()) -> Iterator[torch.Tensor]:
    """Yield the field after each of ``steps`` Adam updates (detached, ``(1, ndim, *S)``).

    Args:
        fixed, moving: normalised images ``(1, 1, *S)`` on the refinement grid (moving NOT warped).
        start: the policy's composed field ``(1, ndim, *S)`` on the same grid, in its voxels.
    """
    ndim = start.shape[1]
    mode = "bilinear" if ndim == 2 else "trilinear"
    full = tuple(start.shape[2:])
    coarse_shape = tuple(max(2, (n + 1) // 2) for n in full)
    from steprl.losses import gradient_penalty, ncc_loss

    with torch.no_grad():
        base = F.interpolate(start.float(), size=coarse_shape, mode=mode, align_corners=True)
        residual0 = start.float() - F.interpolate(base, size=full, mode=mode, align_corners=True)
    params = base.clone().requires_grad_(True)
    optimiser = SingleTensorAdam(params, lr=settings.lr)
    with torch.enable_grad():
        for _ in range(steps):
            field = F.interpolate(params, size=full, mode=mode, align_corners=True) + residual0
            loss = ncc_loss(fixed, spatial.warp(moving, field), settings.window)
            loss = loss + settings.smooth * gradient_penalty(field)
            (grad,) = torch.autograd.grad(loss, params)
            optimiser.step(grad)
            yield field.detach()


class SingleTensorAdam:
    """Adam (Kingma & Ba; the update of ``torch.optim.Adam`` with its defaults) on one tensor, in place.

    Why not ``torch.optim.Adam``: constructing the first ``torch.optim`` optimiser of a process
    imports ``torch._dynamo``, 1.5 s of the 10 s that issue 11 gives the whole ``steprl register``
    command; the refinement needs nothing of it. ``Testing/test_spac_refine.py`` checks that the two
    give the same iterates.

    Args:
        param: the tensor to optimise (updated in place, under ``no_grad``).
        lr, betas, eps: as ``torch.optim.Adam``.
    """

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.first = torch.zeros_like(param)
        self.second = torch.zeros_like(param)
        self.count = 0

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        """One update with the loss gradient ``grad`` (same shape as the parameter)."""
        b1, b2 = self.betas
        self.count += 1
        self.first.lerp_(grad, 1 - b1)
        self.second.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        step_size = self.lr / (1 - b1 ** self.count)
        denominator = (self.second / (1 - b2 ** self.count)).sqrt_().add_(self.eps)
        self.param.addcdiv_(self.first, denominator, value=-step_size)
