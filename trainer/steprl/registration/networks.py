"""SPAC networks: planner (encoder -> stochastic plan), actor (decoder -> displacement), critic.

2D and 3D alike (``ndim`` chooses Conv2d/Conv3d). Shapes use ``*S`` for the network grid
(``(H, W)`` or ``(D, H, W)``); every axis of ``S`` must be divisible by ``2 ** len(channels)``.

Architecture (our reading of SPAC, AAAI 2022, and its official 3D code):

- **Planner**: a strided-conv encoder of the state ``(fixed, warped moving)`` ``(B, 2, *S)``;
  its bottleneck is pooled into a diagonal Gaussian over a low-dimensional plan ``z``
  (``plan_dim``, 64 in the official 3D code). The encoder's feature maps are the actor's skips.
- **Actor**: broadcasts a linear projection of ``z`` over the bottleneck grid, then decodes with
  skip connections from the planner up to HALF the input resolution, and upsamples the
  predicted displacement (voxels, array-axis order) by 2. Predicting at half resolution is
  what makes a 20-step policy interactive on a CPU (DESIGN.md, performance notes); the fields
  SPAC predicts per step are small and smooth, so little is lost.
- **Critic**: its own strided encoder of the state, globally pooled, concatenated with ``z``,
  then an MLP -> ``Q(s, z)`` ``(B, 1)``. SAC uses two critics and two target copies.

Normalisation (``norm="instance"``): off in the original design (2D model); the 3D recipe turns
it on, because without it the plain 3D network fitted even one pair slowly and diverged at lr
3e-3 (issue 11's diagnosis). Instance statistics are per item, so a policy run on one pair at
test time behaves as in training (unlike batch norm).

Options of the 3D recipe (all off by default, so older model cards rebuild the same network):
``stem`` (a full-resolution conv before the first stride), ``features`` (``"diff"``: the planner also
sees ``fixed - warped``, where the registration error shows directly; ``"demons"`` adds the
demons force ``(fixed - warped) * grad(warped)``, which already points each voxel the way an
optical-flow step would move it), ``step_bound`` (the
actor's step is ``b * tanh(a / b)``: bounded inside the network, so the training loss sees the
step the environment applies and a large learning rate cannot blow the output up), and
``features="ncc-gradient"`` with ``prior_scale`` (the planner reads the local-NCC gradient
direction, :mod:`~.similarity_gradient`, and the actor's step is that direction times a learned
scale plus its own correction: the untrained policy is already a gradient-ascent registration).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from steprl.registration.config import SPACConfig  # defined torch-free for the command line; imported from here too


def _conv(ndim: int):
    return nn.Conv2d if ndim == 2 else nn.Conv3d


def he_init(module: nn.Module) -> None:
    """He (Kaiming) normal init of every conv for LeakyReLU(0.2), zero biases.

    PyTorch's default conv init shrinks activations at every layer; with no normalisation
    layers, the 3D planner's mean feature magnitude fell from 0.05 after the first level to
    0.01 at the bottleneck for a 0..1 input, so the actor's first updates hardly moved its
    output. He init keeps the scale through the depth (0.36 -> 0.16), so the registration
    loss's gradient reaches every level at a useful size.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
            nn.init.zeros_(m.bias)


def _block(ndim: int, cin: int, cout: int, stride: int = 1, norm: str = "none") -> nn.Sequential:
    """3x3(x3) conv -> optional InstanceNorm (affine) -> LeakyReLU(0.2)."""
    layers: list[nn.Module] = [_conv(ndim)(cin, cout, 3, stride=stride, padding=1)]
    if norm == "instance":
        layers.append((nn.InstanceNorm2d if ndim == 2 else nn.InstanceNorm3d)(cout, affine=True))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


def planner_input(state: torch.Tensor, features: str, direction: torch.Tensor | None = None) -> torch.Tensor:
    """The state ``(B, 2[+ndim], *S)`` as the planner reads it (``SPACConfig.features``); the field channels
    of a ``field_input`` state are passed through after the image features.

    ``"pair"``: as is; ``"diff"``: ``(B, 3, *S)`` with ``fixed - warped``; ``"demons"``:
    ``(B, 3 + ndim, *S)`` with also ``(fixed - warped) * d(warped)/d(axis k)`` (central
    differences, voxel units), the demons / optical-flow force; ``"ncc-gradient"``: the same
    with ``direction`` ``(B, ndim, *S)`` (:func:`~.similarity_gradient.ncc_gradient`) instead.
    """
    pair, rest = state[:, :2], state[:, 2:]  # rest: the accumulated field with SPACConfig.field_input
    if features == "pair":
        return state
    diff = pair[:, :1] - pair[:, 1:2]
    if features == "diff":
        return torch.cat([pair, diff, rest], dim=1)
    if features == "ncc-gradient":
        if direction is None:
            raise ValueError("features 'ncc-gradient' needs the direction (Planner computes it)")
        return torch.cat([pair, diff, direction.to(pair.dtype), rest], dim=1)
    axes = tuple(range(2, state.ndim))
    grads = torch.gradient(pair[:, 1:2], dim=axes)
    return torch.cat([pair, diff, *(diff * g for g in grads), rest], dim=1)


class PlannerFeatures(list):
    """The planner's feature maps per level (a list, finest first) for the actor's skips, plus
    ``direction``: the ``"ncc-gradient"`` feature ``(B, ndim, *S)`` the actor's prior step follows
    (``None`` for the other features)."""

    def __init__(self, levels, direction: torch.Tensor | None = None) -> None:
        super().__init__(levels)
        self.direction = direction


class Planner(nn.Module):
    """State ``(B, 2, *S)`` -> ``(mu, log_std)`` each ``(B, plan_dim)``, plus skip features."""

    def __init__(self, cfg: SPACConfig) -> None:
        super().__init__()
        nd, chans, norm = cfg.ndim, cfg.channels, cfg.norm
        cin = cfg.state_channels
        self.stem = _block(nd, cin, cfg.stem, norm=norm) if cfg.stem else nn.Identity()
        cin = cfg.stem or cin
        self.levels = nn.ModuleList()
        for cout in chans:
            self.levels.append(nn.Sequential(_block(nd, cin, cout, 2, norm), _block(nd, cout, cout, norm=norm)))
            cin = cout
        self.head = nn.Linear(cin, 2 * cfg.plan_dim)
        he_init(self)
        self.log_std_range = cfg.log_std_range
        self.features = cfg.features
        self.prior_window, self.prior_sigma = cfg.prior_window, cfg.prior_sigma
        self.prior_iterations, self.inner_scale = cfg.prior_iterations, cfg.prior_scale

    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, PlannerFeatures]:
        direction = None
        if self.features == "ncc-gradient":
            from steprl.registration.similarity_gradient import iterated_ncc_gradient

            direction = iterated_ncc_gradient(state[:, :1], state[:, 1:2], self.prior_window, self.prior_sigma,
                                              self.prior_iterations, self.inner_scale)
        skips = PlannerFeatures([], direction)
        x = self.stem(planner_input(state, self.features, direction))
        for level in self.levels:
            x = level(x)
            skips.append(x)
        pooled = x.flatten(2).mean(-1)
        mu, raw = self.head(pooled.float()).chunk(2, dim=1)
        lo, hi = self.log_std_range
        log_std = lo + 0.5 * (hi - lo) * (torch.tanh(raw) + 1.0)
        return mu, log_std, skips


class Actor(nn.Module):
    """Plan ``z`` ``(B, plan_dim)`` + planner skips -> voxel displacement ``(B, ndim, *S)``."""

    def __init__(self, cfg: SPACConfig) -> None:
        super().__init__()
        nd, chans = cfg.ndim, cfg.channels
        self.ndim = nd
        self.plan_proj = nn.Linear(cfg.plan_dim, chans[-1])
        self.ups = nn.ModuleList()
        self.field_level = cfg.field_level
        cin = 2 * chans[-1]  # bottleneck features + broadcast plan
        for skip_c in reversed(chans[cfg.field_level - 1:-1]):  # skip level i has 1 / 2**(i+1) resolution
            cout = skip_c
            self.ups.append(_block(nd, cin + skip_c, cout, norm=cfg.norm))
            cin = cout
        self.out = _conv(nd)(cin, nd, 3, padding=1)
        he_init(self)
        # Start near the identity: small initial steps keep early rollouts sane.
        nn.init.normal_(self.out.weight, std=1e-3)
        nn.init.zeros_(self.out.bias)
        self.step_bound, self.zero_mean = cfg.step_bound, cfg.zero_mean
        # the learned factor of the prior step along the "ncc-gradient" direction (SPACConfig.prior_scale)
        self.prior_scale = nn.Parameter(torch.tensor(float(cfg.prior_scale))) if cfg.features == "ncc-gradient" \
            else None

    def forward(self, plan: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        bottom = skips[-1]
        z = self.plan_proj(plan).to(bottom.dtype)
        z = z.view(*z.shape, *([1] * self.ndim)).expand(-1, -1, *bottom.shape[2:])
        x = torch.cat([bottom, z], dim=1)
        mode = "bilinear" if self.ndim == 2 else "trilinear"
        for up, skip in zip(self.ups, reversed(skips[self.field_level - 1:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode=mode, align_corners=False)
            x = up(torch.cat([x, skip], dim=1))
        coarse = self.out(x)  # displacement in voxels of the coarse grid
        factor = 2**self.field_level
        full = factor * F.interpolate(coarse.float(), scale_factor=factor, mode=mode, align_corners=False)
        direction = getattr(skips, "direction", None)
        if self.prior_scale is not None and direction is not None:
            full = full + self.prior_scale * direction
        if self.zero_mean:
            full = full - full.mean(dim=tuple(range(2, full.ndim)), keepdim=True)
        if self.step_bound > 0:  # coarse-grid voxels -> full-grid voxels, bounded inside the network
            full = self.step_bound * torch.tanh(full / self.step_bound)
        return full


class Critic(nn.Module):
    """``Q(state, plan)``: state ``(B, 2, *S)``, plan ``(B, plan_dim)`` -> ``(B, 1)``."""

    def __init__(self, cfg: SPACConfig) -> None:
        super().__init__()
        nd, chans = cfg.ndim, cfg.critic_channels
        layers, cin = [], cfg.observation_channels
        for cout in chans:
            layers.append(_block(nd, cin, cout, stride=2))
            cin = cout
        self.encoder = nn.Sequential(*layers)
        he_init(self.encoder)
        hidden = 128
        self.mlp = nn.Sequential(
            nn.Linear(cin + cfg.plan_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, state: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        feat = self.encoder(state).flatten(2).mean(-1).float()
        return self.mlp(torch.cat([feat, plan.float()], dim=1))


class SPACPolicy(nn.Module):
    """What inference needs: planner + actor. ``act`` runs one step.

    This is the module saved in a model file (keys ``planner.*`` and ``actor.*``).
    """

    def __init__(self, cfg: SPACConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.planner = Planner(cfg)
        self.actor = Actor(cfg)

    def act(self, state: torch.Tensor, deterministic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """State ``(B, 2, *S)`` -> (plan ``(B, plan_dim)``, raw voxel step ``(B, ndim, *S)``).

        ``deterministic`` uses the plan mean (test time); otherwise a reparameterised sample.
        The plan is squashed into ``[-1, 1]`` by tanh (see :func:`squash`). The step is NOT
        clamped here: the environment / inference clamps it.
        """
        mu, log_std, skips = self.planner(state)
        plan, _ = squash(mu, log_std, deterministic)
        return plan, self.actor(plan, skips)


def squash(mu: torch.Tensor, log_std: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample a plan ``tanh(mu + std * eps)`` (or ``tanh(mu)``) and its log-density ``(B,)``.

    The standard SAC squashing: a bounded plan keeps the critic's maximisation from pushing
    the plan to infinity (the official SPAC code instead penalises a KL term in the planner
    loss). The log-density includes the tanh change of variables.
    """
    import math

    pre = mu if deterministic else mu + log_std.exp() * torch.randn_like(mu)
    plan = torch.tanh(pre)
    noise = (pre - mu) / log_std.exp()
    log_prob = (-0.5 * noise**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_prob = log_prob - (2 * (math.log(2) - pre - F.softplus(-2 * pre))).sum(-1)
    return plan, log_prob


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (frozen ones included: a loaded policy is frozen)."""
    return sum(p.numel() for p in module.parameters())
