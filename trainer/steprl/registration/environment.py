"""The SPAC registration environment: a batch of image pairs warped step by step.

State ``s_t = (fixed, moving warped by u_t)`` ``(B, 2, *S)`` on the network grid. An action is
a voxel displacement step ``a_t`` ``(B, ndim, *S)``, clamped to ``+-max_step`` voxels per
component; the accumulated field is composed by pull-back (``u_t = a_t + u_{t-1} o (x + a_t)``)
and the ORIGINAL moving image is always warped by ``u_t`` (never a warped image re-warped).

Reward (SPAC, paper): the improvement of the mean Dice between label maps of the fixed image
and of the moving image warped by the field: ``r_t = Dice(u_t) - Dice(u_{t-1})``, times
``reward_scale``. Label maps are real labels when the data has them, else 3-class intensity
K-means pseudo-labels computed once per image (:func:`steprl.preprocess.kmeans_labels`).
Warping the moving LABELS by ``u_t`` is equivalent to clustering the warped image at every
step, up to interpolation, and costs one warp instead of one K-means per step. The one-hot
labels are warped LINEARLY and scored with a soft Dice: with nearest-neighbour labels a step
smaller than half a voxel changes nothing and earns exactly zero reward, which starves the
critic of signal exactly when the policy is learning to make small, careful steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steprl import spatial
from steprl.losses import one_hot, soft_dice


@dataclass
class StepOutcome:
    """What one environment step returns (all batched, on the environment's device)."""

    state: torch.Tensor  # (B, 2, *S) next state
    reward: torch.Tensor  # (B,)
    dice: torch.Tensor  # (B,) Dice after the step
    done: bool


class RegistrationEnv:
    """A batch of pairs on one grid. Tensors are created on ``fixed``'s device.

    Args:
        fixed, moving: ``(B, 1, *S)`` normalised intensities (0..1).
        fixed_labels, moving_labels: ``(B, 1, *S)`` integer label maps (real or pseudo).
        num_labels: largest label value (labels are ``1..num_labels``; 0 is background).
        max_steps: episode length.
        max_step: per-step clamp in voxels (official SPAC: 1 in training, 3 at test).
        reward_scale: multiplies the Dice improvement (Dice steps are ~0.01, SAC likes O(1)).
        score: what ``dice`` (and so the reward) measures: ``"soft"`` (the original: linearly
            warped one-hot labels, soft Dice) or ``"hard"`` (nearest-neighbour labels, as
            evaluation does; :mod:`steprl.registration.label_distance` says why soft Dice is
            biased against motion on coarse grids).
        field_in_state: the state also holds the accumulated field (``SPACConfig.field_input``).
    """

    def __init__(self, fixed, moving, fixed_labels, moving_labels, num_labels: int, max_steps: int,
                 max_step: float = 1.0, reward_scale: float = 10.0, score: str = "soft",
                 field_in_state: bool = False) -> None:
        if score not in ("soft", "hard"):
            raise ValueError(f"score must be 'soft' or 'hard', got {score!r}")
        self.fixed, self.moving = fixed, moving
        self.field_in_state = field_in_state
        self.fixed_labels, self.moving_labels = fixed_labels, moving_labels
        self.fixed_onehot = one_hot(fixed_labels, num_labels)
        self.moving_onehot = one_hot(moving_labels, num_labels)
        self.num_labels, self.score = num_labels, score
        self._blurred: tuple[float, torch.Tensor, torch.Tensor] | None = None
        self._distances: tuple[float, torch.Tensor, torch.Tensor] | None = None
        self.max_steps, self.max_step, self.reward_scale = max_steps, max_step, reward_scale
        self.reset()

    def reset(self) -> torch.Tensor:
        """Back to the identity field; returns the initial state ``(B, 2, *S)``."""
        b, _, *shape = self.fixed.shape
        self.field = self.fixed.new_zeros(b, len(shape), *shape)
        self.t = 0
        self.dice = self.score_of(self.field)
        return self.state()

    def score_of(self, field: torch.Tensor) -> torch.Tensor:
        """Dice ``(B,)`` as ``score`` says (the rewards' and ``dice``'s measure)."""
        if self.score == "hard":
            from steprl.registration.label_distance import hard_dice

            return hard_dice(self.fixed_labels, self.moving_labels, field, self.num_labels)
        return self.dice_of(field)

    def distance_of(self, field: torch.Tensor, clip: float = 3.0) -> torch.Tensor:
        """Mean squared difference ``(B,)`` of truncated signed distance maps (:mod:`~.label_distance`), moving
        maps warped by ``field``; the maps are computed once per environment (and per ``clip``)."""
        from steprl.registration.label_distance import distance_loss, signed_distance_maps

        if self._distances is None or self._distances[0] != clip:
            self._distances = (clip, signed_distance_maps(self.fixed_labels, self.num_labels, clip),
                               signed_distance_maps(self.moving_labels, self.num_labels, clip))
        _, fixed, moving = self._distances
        return distance_loss(fixed, moving, field)

    def state(self) -> torch.Tensor:
        return self.state_of(self.field)

    def state_of(self, field: torch.Tensor) -> torch.Tensor:
        """The state for an accumulated field: ``(fixed, moving warped by field)`` ``(B, 2, *S)``, plus the
        field itself ``(B, 2 + ndim, *S)`` when the environment was made with ``field_in_state``."""
        parts = [self.fixed, self.warped(field)]
        return torch.cat(parts + [field.detach()] if self.field_in_state else parts, dim=1)

    def warped(self, field: torch.Tensor | None = None) -> torch.Tensor:
        """The ORIGINAL moving image warped by ``field`` (default: the accumulated one)."""
        return spatial.warp(self.moving, self.field if field is None else field)

    def dice_of(self, field: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """Soft Dice ``(B,)`` of the fixed labels and the moving one-hot labels warped linearly by ``field``.

        ``sigma > 0`` (voxels) compares both label maps blurred by a Gaussian first (a training
        loss, multi-scale style). Why: on coarse grids the SynthSeg structures are 1-3 voxels
        thick, and a thin structure misaligned by more than its thickness does not overlap at
        all: its crisp Dice is flat (no gradient) until the structures touch. Blurred maps
        overlap over a wider range of shifts. (Linear interpolation still makes any warped-map
        loss piecewise linear in a shift, with kinks at whole voxels, blurred or not.)
        Rewards and validation use the crisp Dice.
        """
        if sigma <= 0:
            return soft_dice(self.fixed_onehot, spatial.warp(self.moving_onehot, field))
        if self._blurred is None or self._blurred[0] != sigma:
            from steprl.synth.toy import gaussian_blur

            self._blurred = (sigma, gaussian_blur(self.fixed_onehot, sigma), gaussian_blur(self.moving_onehot, sigma))
        _, fixed, moving = self._blurred
        return soft_dice(fixed, spatial.warp(moving, field))

    def clamp(self, step: torch.Tensor) -> torch.Tensor:
        return step.clamp(-self.max_step, self.max_step)

    def step(self, action: torch.Tensor) -> StepOutcome:
        """Apply a raw voxel step ``(B, ndim, *S)`` (clamped here) and score it."""
        return self.advance(spatial.compose(self.field, self.clamp(action.detach().float())))

    def jump(self, field: torch.Tensor, steps: int) -> None:
        """Take ``steps`` steps at once to the accumulated voxel field ``field``, unscored (no Dice, no reward)."""
        self.field = field.detach().float()
        self.t += steps

    def advance(self, field: torch.Tensor) -> StepOutcome:
        """One step to an accumulated voxel field ``(B, ndim, *S)`` composed elsewhere (a rollout trained
        through its steps composes them itself); scores it like :meth:`step`."""
        self.field = field.detach().float()
        self.t += 1
        dice = self.score_of(self.field)
        reward = (dice - self.dice) * self.reward_scale
        self.dice = dice
        return StepOutcome(self.state(), reward, dice, self.t >= self.max_steps)
