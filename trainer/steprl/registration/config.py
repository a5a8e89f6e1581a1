"""The registration settings: one dataclass per part, each setting's default and meaning written once.

- :class:`SPACConfig`: the SPAC network (:mod:`steprl.registration.networks`); stored in the
  model card, so a model file rebuilds its own network.
- :class:`SPACTrainConfig`: the learner (:mod:`steprl.registration.learner`); stored in
  checkpoints and model cards.

``steprl train registration`` makes its options from these classes (:mod:`steprl.configargs`,
:mod:`.cli_args`). No torch here: the command line imports this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

Norm = Literal["none", "instance"]
Features = Literal["pair", "diff", "demons", "ncc-gradient"]

#: the planner's input channels per ``SPACConfig.features`` (``"demons"`` and ``"ncc-gradient"`` add one per axis)
FEATURE_CHANNELS = {"pair": 2, "diff": 3, "demons": 3, "ncc-gradient": 3}

#: policy steps of a registration at test time: the model card's default (``inference.steps``), and the
#: validation depth of a run trained through its rollout (``--unroll``), as at test
TEST_STEPS = 20

#: the SPACConfig fields that decide the shapes of the policy's weights (``--init-from`` needs them equal)
LAYOUT_FIELDS = ("ndim", "channels", "plan_dim", "field_level", "norm", "stem", "features", "field_input")


@dataclass(frozen=True)
class SPACConfig:
    """Network sizes; stored in the model card so a model file rebuilds its own network.

    Attributes:
        ndim: 2 or 3.
        grid: network grid in array order, e.g. ``(128, 128)`` or ``(128, 128, 128)``.
        channels: encoder widths per level (each level halves the resolution).
        plan_dim: size of the stochastic plan ``z`` (default 32; the command line gives 64 in 3D, as the
            official 3D code).
        critic_channels: critic encoder widths.
        log_std_range: ``(min, max)`` of the plan's log standard deviation.
        field_level: the actor predicts its step on a grid ``2 ** field_level`` times coarser
            than the network grid and upsamples it linearly (1: half resolution;
            2: a quarter resolution, a smoother and cheaper step with 8x fewer outputs in 3D).
        norm: the normalisation after every conv of planner and actor: none, or instance
            (InstanceNorm; the 3D recipe).
        stem: width of a full-resolution conv block before the first stride (0: none).
        features: what the planner reads: ``pair`` (fixed, warped), ``diff`` (+ fixed - warped),
            ``demons`` (+ fixed - warped and the demons force (fixed - warped) * grad(warped), one
            channel per axis) or ``ncc-gradient`` (+ fixed - warped and the smoothed local-NCC
            gradient direction; with prior_scale the actor also steps along it).
        step_bound: if > 0, bound each step inside the network: ``step_bound * tanh(a / step_bound)``
            voxels per component (of the network grid); 0 leaves it unbounded (the environment's
            clamp alone).
        zero_mean: subtract each step's mean over the grid (no global translation per step: the
            affine pre-alignment handles it). Why: after instance normalisation the network cannot
            tell pairs apart by a global shift, so its mean output is a learned constant; Adam's
            noise walks it (measured: the same ~0.03-voxel step for every pair and step, 0.6 voxel
            of drift after 20 steps, hard Dice below the identity). Deformation, rotation and
            scaling stay free.
        field_input: the state also holds the accumulated field ``u_t`` (``ndim`` channels, voxels):
            ``(fixed, warped, u_t)``, so the policy knows how far it has moved (from the images
            alone it kept moving at the same speed past the alignment: hard Dice best after 5 of
            20 steps, then falling). ``--init-from`` a model without it widens its input layer
            with zero weights.
        prior_scale: with features ``ncc-gradient``, the actor adds a prior step
            ``scale * ncc_gradient(fixed, warped)`` to its own output, with ``scale`` a learned
            parameter starting here (the direction's RMS is about 0.07-0.18 voxel on unregistered
            64^3 T1 pairs, so 2 starts with steps of about 0.2-0.4 voxel); 0: the prior starts off.
        prior_window: the local NCC window of the ``ncc-gradient`` feature, in voxels (the command
            line gives it the loss's ``ncc_window``).
        prior_sigma: the Gaussian smoothing of the ``ncc-gradient`` feature, in voxels of the
            network grid. Training never changes it; ``trainer/tools/calibrate_prior_scale.py
            --sigmas`` chooses it after training (``spac3d_brain``: trained at 3, calibrated to 2,
            which aligns the cortex more closely at the same smoothness bounds).
        prior_iterations: inner iterations of the ``ncc-gradient`` direction within one step
            (1: the gradient at the current warp). With K > 1 the warped image is moved on by
            ``prior_scale`` (the configured start, a constant) times the direction so far, the
            gradient is taken again there and added: K small demons-like iterations per step, so
            20 steps reach further where the gradient is weak. Why: on the real MNI152 <->
            Colin27 pair the trained K = 1 policy stopped 0.014 Dice short of Elastix; applying
            K = 2 / 3 at test time alone gave +0.010 / +0.015 there. Each extra iteration costs
            about 0.4x a policy step at 64^3 on 2 cores. Trained with K = 2 (run s11) the real
            pair rose 0.757 -> 0.7645 but the synthetic heads did not, and their Dice stopped
            rising from step 10 to 20, so the bundled model keeps K = 1.
    """

    ndim: int = 2
    grid: tuple[int, ...] = (128, 128)
    channels: tuple[int, ...] = (16, 32, 32, 32)
    plan_dim: int = 32
    critic_channels: tuple[int, ...] = (8, 16, 16, 16)
    log_std_range: tuple[float, float] = (-5.0, 1.0)
    field_level: int = 1
    norm: Norm = "none"
    stem: int = 0
    features: Features = "pair"
    step_bound: float = 0.0
    zero_mean: bool = False
    field_input: bool = False
    prior_scale: float = 0.0
    prior_window: int = 5
    prior_sigma: float = 2.0
    prior_iterations: int = 1

    def __post_init__(self) -> None:
        if self.ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {self.ndim}")
        if len(self.grid) != self.ndim:
            raise ValueError(f"grid {self.grid} must have {self.ndim} axes")
        factor = 2 ** len(self.channels)
        bad = [n for n in self.grid if n % factor]
        if bad:
            raise ValueError(f"every grid axis must be divisible by {factor} (2**levels); got {self.grid}")
        if not 1 <= self.field_level < len(self.channels):
            raise ValueError(f"field_level must be in 1..{len(self.channels) - 1}, got {self.field_level}")
        if self.features not in FEATURE_CHANNELS:
            raise ValueError(f"features must be one of {sorted(FEATURE_CHANNELS)}, got {self.features!r}")
        if self.norm not in get_args(Norm):
            raise ValueError(f"norm must be 'none' or 'instance', got {self.norm!r}")
        if self.stem < 0 or self.step_bound < 0:
            raise ValueError(f"stem and step_bound must be >= 0, got {self.stem} and {self.step_bound}")
        if self.prior_scale < 0 or (self.prior_scale > 0 and self.features != "ncc-gradient"):
            raise ValueError(f"prior_scale must be >= 0 and needs features 'ncc-gradient', got {self.prior_scale}")
        if self.prior_iterations < 1:
            raise ValueError(f"prior_iterations must be >= 1, got {self.prior_iterations}")
        if self.prior_window < 1 or self.prior_window % 2 == 0 or self.prior_sigma < 0:
            raise ValueError(f"prior_window must be odd and prior_sigma >= 0, got {self.prior_window}, "
                             f"{self.prior_sigma}")

    @property
    def observation_channels(self) -> int:
        """Channels of the state tensor: fixed, warped, and with ``field_input`` the accumulated field."""
        return 2 + (self.ndim if self.field_input else 0)

    @property
    def state_channels(self) -> int:
        """Channels the planner reads (:func:`~steprl.registration.networks.planner_input`)."""
        per_axis = self.features in ("demons", "ncc-gradient")
        return FEATURE_CHANNELS[self.features] + self.ndim * (int(per_axis) + int(self.field_input))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> SPACConfig:
        """From a model card's ``config``: keys it lacks (a card older than a setting) take the
        defaults, which rebuild the network it was trained with; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


@dataclass
class SPACTrainConfig:
    """Learning hyper-parameters (stored in checkpoints and model cards); see :mod:`steprl.registration.learner`.

    Attributes:
        batch_pairs: pairs per episode.
        episode_steps: steps per training episode.
        replay_capacity: transitions the replay buffer holds.
        replay_batch: states per SAC update (the SAC update dominates a step's cost in 3D).
        gamma: SAC's discount of the returns.
        tau: Polyak rate of the target critics.
        lr: learning rate of the registration loss (planner + actor).
        planner_lr: learning rate of SAC's planner update (official SPAC uses lr / 5).
        critic_lr: learning rate of the critics.
        alpha_lr: learning rate of SAC's temperature (log alpha).
        init_log_alpha: initial log alpha.
        target_entropy: SAC's target entropy of the plan (default: -plan_dim / 2).
        ncc_window: local NCC window in voxels (loss and validation).
        ncc_weight: weight of -LNCC(fixed, warped) in the registration loss, the paper's image term
            (default 1; the command line gives 0 with --synthseg --cross-contrast: the contrasts differ).
        dice_weight: weight of (1 - label soft Dice) in the loss (SynthMorph-style; needs real labels;
            default 0; the command line gives 1 with --synthseg).
        field_weight: weight of the squared error (voxels^2) to the true field, for the pairs whose
            field the source knows (--known-pairs; without them the command line records 0).
        smooth_weight: weight of the |grad u|^2 smoothness loss (of the step; of the composed field
            with unroll).
        kl_weight: weight of the plan's KL divergence to N(0, I) in the registration loss.
        train_max_step: per-step clamp in voxels in training episodes (as official SPAC; test time
            uses test_max_step).
        test_max_step: per-step clamp in voxels at validation and in the model card (default 3; the
            command line gives train_max_step with unroll: the same clamp in training and at test).
        val_steps: policy steps of the validation rollouts (default 10; the command line gives 20 with
            unroll, as at test).
        reward_scale: factor of the Dice-improvement reward.
        sac_start: episodes before the first SAC update (a warm-up on the registration loss alone).
        grad_clip: clip the registration loss's gradient norm to this (default: no clipping).
        label_sigma: blur both label maps by this Gaussian (voxels) before the loss's Dice (thin
            structures then overlap, and give a gradient, over a wider range of misalignment).
        distance_weight: weight of the labels' truncated signed-distance loss (voxels^2; unbiased by
            interpolation blur, unlike soft Dice on coarse grids: the 3D recipe uses it instead of
            dice_weight).
        distance_clip: truncation of the signed distance maps, in voxels.
        bf16: with unroll, run the policy under bfloat16 autocast (faster on GPUs and on CPUs with
            AMX or AVX512-BF16; warps and losses stay float32). Measure first:
            trainer/benchmarks/bench_spac_updates.py.
        unroll: train through the policy's own rollout, backpropagating through windows of this
            many composed steps (the 3D recipe; 0: the paper's one-step update).
        seed: seed of the weights and of the pairs (rank r of torchrun draws from seed + 1000 r).
    """

    batch_pairs: int = 4
    episode_steps: int = 5
    replay_capacity: int = 2000
    replay_batch: int = 16
    gamma: float = 0.9
    tau: float = 0.005
    lr: float = 1e-3
    planner_lr: float = 2e-4
    critic_lr: float = 2e-4
    alpha_lr: float = 1e-4
    init_log_alpha: float = -1.0
    target_entropy: float | None = None
    ncc_window: int = 9
    ncc_weight: float = 1.0
    dice_weight: float = 0.0
    field_weight: float = 1.0
    smooth_weight: float = 1.0
    kl_weight: float = 0.01
    train_max_step: float = 1.0
    test_max_step: float = 3.0
    val_steps: int = 10
    reward_scale: float = 10.0
    sac_start: int = 0
    grad_clip: float | None = None
    label_sigma: float = 0.0
    distance_weight: float = 0.0
    distance_clip: float = 3.0
    bf16: bool = False
    unroll: int = 0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def missing_settings(config: dict) -> list[str]:
    """The settings a stored registration run config (``config.json``, checkpoints) lacks, as
    ``part.field``: a run begun by an older steprl, to convert once with
    ``trainer/tools/convert_registration_run.py``."""
    parts = (("network", SPACConfig), ("training", SPACTrainConfig))
    return [f"{part}.{f.name}" for part, cls in parts for f in fields(cls) if f.name not in config.get(part, {})]
