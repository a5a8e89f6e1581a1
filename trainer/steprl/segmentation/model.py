"""Loading a segmentation model file (PixelDRL-MG or the U-Net baseline) without unpickling anything.

``model`` arguments accept a ``.safetensors`` / ``.json`` path or the name of a model bundled
with steprl (``pixeldrl_wm``; weights trained on BraTS may not ship). Segmentation networks are
2D: a 3D volume is segmented slice by slice, so every card says ``ndim: 2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from steprl.errors import ModelFileError
from steprl.modelfile import resolve_model_path
from steprl.segmentation.config import DEFAULT_SIZE, T_MAX, PixelDRLConfig

METHODS = ("pixeldrl-mg", "unet")


@dataclass
class LoadedSegmenter:
    """A network in eval mode on the CPU (move it with ``.net.to(device)``), with its card."""

    net: torch.nn.Module
    card: dict
    path: Path

    @property
    def method(self) -> str:
        return str(self.card["method"])

    @property
    def is_rl(self) -> bool:
        """True for PixelDRL-MG (a step-by-step policy), False for the one-shot U-Net."""
        return self.method == "pixeldrl-mg"

    @property
    def size(self) -> tuple[int, int]:
        """The network grid (H, W) the slices are resampled to."""
        size = self.card.get("inference", {}).get("size", DEFAULT_SIZE)
        return int(size[0]), int(size[1])

    @property
    def default_steps(self) -> int:
        return int(self.card.get("inference", {}).get("steps", T_MAX if self.is_rl else 1))

    @property
    def allow_revival(self) -> bool:
        return bool(self.card.get("inference", {}).get("allow_revival", True))


def build_network(card: dict, path: Path) -> torch.nn.Module:
    """The untrained network the card's ``config`` describes."""
    config = dict(card["config"])
    try:
        if card["method"] == "pixeldrl-mg":
            from steprl.segmentation.networks import PixelDRLNet

            return PixelDRLNet(PixelDRLConfig.from_dict(config))
        from steprl.segmentation.unet import build_unet

        return build_unet(config)
    except (TypeError, ValueError, KeyError) as err:
        raise ModelFileError(f"Model card of {path.name} has an invalid network config ({err}).",
                             "Re-export the model with `steprl train segmentation`.") from err


def load_segmenter(model: str | Path | LoadedSegmenter) -> LoadedSegmenter:
    """Read a PixelDRL-MG or U-Net model file, rebuild its network from the card, load the weights.

    Raises:
        ModelFileError: missing or corrupt files, or a model of another method (e.g. a SPAC
            registration model), or of another dimension.
    """
    from steprl.modelfile import check_state_dict, load_model

    if isinstance(model, LoadedSegmenter):
        return model
    path = resolve_model_path(model)
    state, card = load_model(path, method=METHODS, device="cpu")
    if card["ndim"] != 2:
        raise ModelFileError(f"Model card of {path.name} says ndim {card['ndim']}, but {card['method']} networks are "
                             "2D (a volume is segmented slice by slice): the card does not describe these weights.",
                             "Re-export the model with `steprl train segmentation`, or fix the card's ndim to 2.")
    net = build_network(card, path)
    check_state_dict(net, state, path)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return LoadedSegmenter(net, card, path)
