"""The segmentation settings: one dataclass per part, each setting's default and meaning written once.

- :class:`PixelDRLConfig`: the PixelDRL-MG network (:class:`~steprl.segmentation.networks.PixelDRLNet`);
  stored in the model card, so a model file rebuilds its own network.
- :class:`PA3CConfig`: the learner of PixelDRL-MG (:mod:`steprl.segmentation.pa3c`).
- :class:`SegTrainConfig`: what the PixelDRL-MG and U-Net learners share.

``steprl train segmentation`` makes its options from these classes (:mod:`steprl.configargs`,
:mod:`.cli_args`); checkpoints and model cards store them. No torch here: the command line
imports this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Literal, get_args

T_MAX = 10
"""Steps per episode in the paper (and the default number of steps of a segmentation model)."""
BATCH_SLICES = 8
"""Slices per network call at inference (``--batch-slices``), chosen by measurement: on the 2-core
AVX2 CPU (fp32, channels-last), ``pixeldrl_wm``'s image encoding took 31 ms per slice in batches of
8 (2 and 4 the same), 47 ms in batches of 16 and 77 ms in batches of 32 (the working set of larger
batches falls out of the cache). A GPU runs larger batches faster: raise it there."""
DEFAULT_SIZE = (128, 128)
"""Network grid (H, W), chosen by measurement (``trainer/benchmarks/bench_pixeldrl_speed.py``).

On the 2-core CPU (quiet, bf16), a 240 x 240 x 155 volume takes 5.0 s at 128 x 128 and 2.5 s
at 96 x 96 with late fusion. What the grid costs in accuracy, measured as the best any model
could do (the BraTS 2013 whole-tumour labels of pat0003 / pat0004 resampled onto the grid and
back): Dice 0.972 / 0.983 at 128, 0.965 / 0.979 at 96, 0.947 / 0.967 at 64 (boundary IoU
0.92 / 0.94, 0.90 / 0.93, 0.85 / 0.89). 128 keeps that ceiling above 0.97 at a cost far
inside the 60 s target; ``--size`` chooses another grid.
"""
UNET_CHANNELS = (64, 128, 256, 512, 1024)
"""The U-Net baseline's widths per level (``--unet-channels``; see :mod:`steprl.segmentation.unet`)."""

Fusion = Literal["late", "input"]
#: Where the mask enters the network (see :mod:`steprl.segmentation.networks`).
FUSIONS: tuple[str, ...] = get_args(Fusion)
Norm = Literal["group", "none"]
#: The normalisation after every convolution of PixelDRL-MG.
NORMS: tuple[str, ...] = get_args(Norm)


@dataclass(frozen=True)
class PixelDRLConfig:
    """The PixelDRL-MG network's layout (see :mod:`steprl.segmentation.networks` for the readings).

    Attributes:
        in_channels: state channels; 2 for [image, current mask] (the mask is the last one).
        widths: encoder widths of VGG16 blocks 1-4 (the paper's: half of VGG16's 64 128 256 512).
        head_widths: decoder widths at full, 1/2 and 1/4 resolution (default: twice the first
            three encoder widths).
        head_depths: convolutions per decoder level, finest first (VGG16's).
        norm: the normalisation after every convolution: group (GroupNorm) or none (as in VGG16
            and PixelRL).
        attention: the self-attention module (off: s = f, an ablation).
        fusion: where the mask enters the network: late (after the decoders, the trunk runs once
            per slice: fast) or input (with the image at conv1_1, the paper's reading).
        fusion_width: channels of the late-fusion blocks (they dominate a step's cost).
        fusion_depth: dilated convolutions per late-fusion block.
    """

    in_channels: int = 2
    widths: tuple[int, int, int, int] = (32, 64, 128, 256)
    head_widths: tuple[int, int, int] | None = None
    head_depths: tuple[int, int, int] = (2, 2, 3)
    norm: Norm = "group"
    attention: bool = True
    fusion: Fusion = "late"
    fusion_width: int = 32
    fusion_depth: int = 3

    def __post_init__(self) -> None:
        widths = tuple(int(w) for w in self.widths)
        if len(widths) != 4:
            raise ValueError(f"widths needs 4 entries (VGG16 blocks 1-4), got {widths}")
        head_widths = tuple(int(w) for w in (self.head_widths or [2 * w for w in widths[:3]]))
        head_depths = tuple(int(d) for d in self.head_depths)
        if len(head_widths) != 3 or len(head_depths) != 3:
            raise ValueError("head_widths and head_depths need 3 entries (full, 1/2, 1/4 resolution)")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, not {self.fusion!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, not {self.norm!r}")
        if int(self.in_channels) < 2:
            raise ValueError(f"the state has at least 2 channels (image(s), mask), got in_channels={self.in_channels}")
        for name, value in (("widths", widths), ("head_widths", head_widths), ("head_depths", head_depths),
                            ("in_channels", int(self.in_channels)), ("attention", bool(self.attention)),
                            ("fusion_width", int(self.fusion_width)), ("fusion_depth", int(self.fusion_depth))):
            object.__setattr__(self, name, value)

    @property
    def late_fusion(self) -> bool:
        return self.fusion == "late"

    def to_dict(self) -> dict:
        """The model card's ``config`` (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> PixelDRLConfig:
        """From a model card's ``config``; TypeError for a key that is not a field."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class PA3CConfig:
    """The learner of PixelDRL-MG: the paper's settings, and PixelRL's where the paper is silent.

    Attributes:
        t_max: steps per episode (the paper's value).
        gamma: discount of the returns (the paper's value).
        entropy_coef: weight of the entropy bonus in the loss.
        value_coef: weight of the value term in the loss.
        reward_conv_size: side of PixelRL's learnable reward-map kernel (odd).
        allow_revival: a pixel set to zero may come back (off: a zero is final; see
            steprl.segmentation.environment).
        reward_conv_in_policy: the policy term of the loss also trains the reward-map kernel (as
            we read the PixelRL paper; its code trains the kernel by the value term only).
        mask_inactive: without revival, the pixels already at zero leave the policy and entropy
            terms (their advantage is 0: only noise).
        class_balance: weight each pixel's rewards so that object and background count equally
            (a deviation from the paper, against the all-background collapse on small objects;
            see steprl.segmentation.pa3c.class_weights).
        class_balance_anneal: fade the class-balance weights out to the paper's plain rewards
            over the first N updates (implies class_balance; 0: constant weights).
        class_balance_floor: with class_balance_anneal, the share of the balancing kept after
            the fade.
    """

    t_max: int = T_MAX
    gamma: float = 0.95
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    reward_conv_size: int = 33
    allow_revival: bool = True
    reward_conv_in_policy: bool = False
    mask_inactive: bool = True
    class_balance: bool = False
    class_balance_anneal: int = 0
    class_balance_floor: float = 0.0

    def __post_init__(self) -> None:
        if self.class_balance_anneal > 0:
            self.class_balance = True


@dataclass
class SegTrainConfig:
    """What the PixelDRL-MG and U-Net learners share (stored in checkpoints and model cards).

    Attributes:
        batch: slices per update.
        iterations_per_epoch: updates per epoch (episodes for PixelDRL-MG).
        lr: Adam learning rate.
        lr_decay: the learning rate is multiplied by this every lr_decay_every epochs (the
            paper's step decay).
        lr_decay_every: epochs between two learning-rate decays.
        val_batch: slices per forward pass in validation.
        seed: seed of the weights and of the batches (rank r of torchrun draws from seed + 1000 r).
        bf16: bfloat16 autocast in training and validation (default: steprl.device's choice, on
            for CUDA with bf16 and off on CPUs).
        grad_clip: clip the global gradient norm to this (default: no clipping, as in the paper).
        ema_decay: validate and export an exponential moving average of the network's weights,
            updated after every optimiser step with this decay (e.g. 0.99: about the last 100
            updates), instead of the latest weights (default 0: off, as in the paper). Why: with
            per-pixel rewards the weights wander from update to update, so the validation Dice
            of the latest weights swings from epoch to epoch and the best epoch is partly chance;
            the average's curve is smooth (white-matter run w16: 0.887 -> 0.8995, where the raw
            weights of the same run gave 0.854 / 0.890). It does not hold on its own where a run
            drifts to (runs w16-w18 in ``training_record_pixeldrl_wm.md``). The model card's
            ``training.ema_decay`` says its weights are an average.
    """

    batch: int = 8
    iterations_per_epoch: int = 50
    lr: float = 1e-3
    lr_decay: float = 0.9
    lr_decay_every: int = 25
    val_batch: int = 16
    seed: int = 0
    bf16: bool | None = None
    grad_clip: float | None = None
    ema_decay: float = 0.0

    def to_dict(self) -> dict:
        """The fields as JSON values; ``ema_decay`` only when on, so that the config of a run begun
        before the option existed still equals this one's and the run resumes."""
        out = asdict(self)
        if not self.ema_decay:
            del out["ema_decay"]
        return out


#: Each segmentation setting's class, by field name (for :func:`segmentation_configs`).
_CLASSES = (SegTrainConfig, PA3CConfig, PixelDRLConfig)


def segmentation_configs(**settings) -> tuple[SegTrainConfig, PA3CConfig, PixelDRLConfig]:
    """The three configs from settings named by their fields (each class takes its own; the rest
    keep their defaults); TypeError for a name no class has."""
    parts = []
    left = dict(settings)
    for cls in _CLASSES:
        names = {f.name for f in dataclasses.fields(cls)}
        parts.append(cls(**{k: left.pop(k) for k in list(left) if k in names}))
    if left:
        raise TypeError(f"unknown segmentation setting(s): {', '.join(sorted(left))}")
    return parts[0], parts[1], parts[2]
