"""Loading a SPAC model file into a ready-to-run policy (never unpickling anything).

``model`` arguments across steprl accept a path to a ``.safetensors`` / ``.json`` model file,
or the name of a model bundled with steprl (``steprl.models``; see
:func:`steprl.modelfile.resolve_model_path`), e.g. ``"spac2d_brain"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from steprl.errors import ModelFileError
from steprl.geometry import Geometry
from steprl.modelfile import resolve_model_path
from steprl.registration.networks import SPACConfig, SPACPolicy


@dataclass
class LoadedSPAC:
    """A policy in eval mode on its device, with its card and network config."""

    policy: SPACPolicy
    card: dict
    config: SPACConfig
    path: Path

    @property
    def grid(self) -> tuple[int, ...]:
        return self.config.grid

    @property
    def max_step(self) -> float:
        return float(self.card.get("inference", {}).get("max_step", 3.0))

    @property
    def axis_aligned(self) -> bool:
        """True when the network was trained on axis-aligned LPS grids (card ``inference.orientation: "lps"``)."""
        return self.card.get("inference", {}).get("orientation") == "lps"

    def network_grid(self, fixed: Geometry) -> Geometry:
        """The grid the policy runs on, covering the fixed image (see :meth:`Geometry.axis_aligned`)."""
        return fixed.axis_aligned(self.grid) if self.axis_aligned else fixed.resized(self.grid)

    @property
    def default_steps(self) -> int:
        return int(self.card.get("inference", {}).get("steps", 20))

    @property
    def default_refine_steps(self) -> int:
        """Refinement steps after the policy's (card ``inference.refine.steps``; 0 when the card has none)."""
        return int(self.card.get("inference", {}).get("refine", {}).get("steps", 0))

    def refine_settings(self):
        """The card's :class:`steprl.registration.refine.RefineSettings` (its defaults where the card is silent)."""
        from steprl.registration.refine import RefineSettings

        given = self.card.get("inference", {}).get("refine", {})
        return RefineSettings(**{k: given[k] for k in RefineSettings.__dataclass_fields__ if k in given})


def load_spac(model: str | Path, device: torch.device | str = "cpu") -> LoadedSPAC:
    """Read a SPAC model file, rebuild its network from the card and load the weights."""
    from steprl.modelfile import check_state_dict, load_model

    path = resolve_model_path(model)
    state, card = load_model(path, method="spac", device="cpu")
    try:
        cfg = SPACConfig.from_dict(card["config"])
    except (TypeError, ValueError, KeyError) as err:
        raise ModelFileError(f"Model card of {path.name} has an invalid network config ({err}).",
                             "Re-export the model with `steprl train registration`.") from err
    if card["ndim"] != cfg.ndim:
        raise ModelFileError(f"Model card of {path.name} says ndim {card['ndim']}, but its network config is "
                             f"{cfg.ndim}D (grid {list(cfg.grid)}): the card does not describe these weights.",
                             "Re-export the model with `steprl train registration`, or fix the card's ndim.")
    policy = SPACPolicy(cfg)
    check_state_dict(policy, state, path)
    policy.to(device).eval()
    for p in policy.parameters():
        p.requires_grad_(False)
    return LoadedSPAC(policy, card, cfg, path)
