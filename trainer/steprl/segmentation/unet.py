"""The U-Net baseline of the PixelDRL-MG comparisons: MONAI's ``UNet``, 2D, one output logit per pixel.

The paper compares PixelDRL-MG (7.14M parameters) with a U-Net about four times larger. The
default here is MONAI's residual U-Net with channels 64-128-256-512-1024, strides 2 and two
residual units per level (26.0M parameters, 3.5x our PixelDRL-MG's 7.48M): the classic
U-Net widths. ``--unet-channels`` chooses others (e.g. ``32 64 128 256 512``: 6.5M).

It is trained by ``steprl train segmentation --method unet`` on the same slices, batch size
and number of updates as PixelDRL-MG, with Dice + binary cross-entropy (MONAI's
``DiceCELoss`` with a sigmoid), and predicts the object where ``sigmoid(logit) >= 0.5``.
Its grid must be divisible by ``2 ** len(strides)`` (16 by default).

MONAI is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from steprl.errors import InputError
from steprl.segmentation.config import UNET_CHANNELS


def unet_config(channels: Sequence[int] = UNET_CHANNELS, num_res_units: int = 2, norm: str = "instance",
                dropout: float = 0.0) -> dict:
    """The JSON-able constructor arguments stored in the model card's ``config``."""
    channels = [int(c) for c in channels]
    if len(channels) < 2:
        raise InputError(f"--unet-channels needs at least 2 levels, got {channels}.", "E.g. 64 128 256 512 1024.")
    return {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "channels": channels,
            "strides": [2] * (len(channels) - 1), "num_res_units": int(num_res_units), "norm": norm,
            "dropout": float(dropout)}


def build_unet(config: dict) -> nn.Module:
    """MONAI ``UNet`` from a card config (see :func:`unet_config`). ``(B, 1, H, W)`` -> logits ``(B, 1, H, W)``."""
    from monai.networks.nets import UNet

    return UNet(**config)


def required_multiple(config: dict) -> int:
    """Height and width of the input must be multiples of this (the product of the strides)."""
    multiple = 1
    for stride in config.get("strides", []):
        multiple *= int(stride)
    return multiple


def check_grid(config: dict, size: Sequence[int]) -> None:
    """Raise :class:`InputError` when the network grid does not suit the U-Net's strides."""
    multiple = required_multiple(config)
    if any(int(s) % multiple for s in size):
        raise InputError(f"The U-Net needs a grid divisible by {multiple}, got {list(size)}.",
                         f"Use --size with multiples of {multiple} (e.g. 128 128), or fewer --unet-channels.")


def dice_ce_loss() -> nn.Module:
    """Dice + binary cross-entropy on logits (MONAI ``DiceCELoss``, sigmoid, means over the batch)."""
    from monai.losses import DiceCELoss

    return DiceCELoss(sigmoid=True, batch=True)
