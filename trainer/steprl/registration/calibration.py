"""Calibrate the prior step of an ``ncc-gradient`` SPAC model (its scale, and its smoothing) on validation pairs.

Why (issue 11): the actor's step is ``prior_scale * direction + correction`` (:mod:`.networks`),
where ``direction`` is the local-NCC gradient smoothed by ``prior_sigma`` voxels
(:mod:`.similarity_gradient`). The scale is a learned parameter, but at the learning rates that
keep the correction stable (5e-5) Adam moves it by at most ~5e-5 per update, and over 4,000
updates of the 3D runs it stayed at its initial 2.0. The smoothing is a setting of the network
config that training never changes. A direct scan on held-out validation pairs is far cheaper
than the updates it would take: one registration per pair and setting. The scan's figures go
into the model card, so the choice is reproducible and visible
(``trainer/tools/calibrate_prior_scale.py`` runs it).

Score per setting: mean hard Dice after the policy's last step (the policy alone, as the
acceptance measures it), with the final field's folding and std log det J; a setting whose
fields are not smooth enough (:data:`MAX_STD_LOG_JACOBIAN`, :data:`MAX_FOLDING_PERCENT`) is
never chosen.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from steprl.geometry import Image

log = logging.getLogger(__name__)

#: A scale whose mean std log det J or folding (%) exceeds these is not admissible (issue 11's bounds).
MAX_STD_LOG_JACOBIAN = 0.5
MAX_FOLDING_PERCENT = 0.5


@dataclass(frozen=True)
class LabelledPair:
    """One validation pair: scalar images and label maps (any grids)."""

    name: str
    fixed: Image
    moving: Image
    fixed_labels: Image
    moving_labels: Image


def prior_scale_of(model) -> float:
    """The model's current prior scale; ValueError if its policy has no prior step."""
    scale = getattr(model.policy.actor, "prior_scale", None)
    if scale is None or model.policy.cfg.prior_scale <= 0:
        raise ValueError(f"{model.path.name} has no prior step (features 'ncc-gradient' with prior_scale > 0): "
                         "there is nothing to calibrate")
    return float(scale.detach())


def set_prior_scale(model, scale: float) -> None:
    """Set the learned prior scale in place (the value a saved model file then carries)."""
    prior_scale_of(model)
    if not scale > 0:
        raise ValueError(f"a prior scale must be > 0, got {scale}")
    with torch.no_grad():
        model.policy.actor.prior_scale.fill_(float(scale))


def prior_sigma_of(model) -> float:
    """The smoothing (voxels of the network grid) of the model's prior direction."""
    return float(model.config.prior_sigma)


def set_prior_sigma(model, sigma: float) -> None:
    """Set the prior direction's smoothing in place: the running network, its config and the card
    (which a saved model file then carries)."""
    prior_scale_of(model)
    if not sigma >= 0:
        raise ValueError(f"a prior sigma must be >= 0, got {sigma}")
    model.config = replace(model.config, prior_sigma=float(sigma))
    model.policy.cfg = model.config
    for module in model.policy.modules():
        if hasattr(module, "prior_sigma"):
            module.prior_sigma = float(sigma)
    model.card["config"] = {**model.card.get("config", {}), "prior_sigma": float(sigma)}


def score_scale(model, pairs: Sequence[LabelledPair], scale: float, *, sigma: float | None = None,
                steps: int | None = None, prealign: bool = True, threads: int | None = None) -> dict:
    """Mean final Dice, std log det J and folding of the policy alone with ``scale`` (and ``sigma``,
    default the model's), over ``pairs``."""
    from steprl.registration.evaluation import compare_case

    set_prior_scale(model, scale)
    if sigma is not None:
        set_prior_sigma(model, sigma)
    steps = model.default_steps if steps is None else steps
    final = f"spac@{steps}"
    per_pair = []
    for pair in pairs:
        rows, _ = compare_case(pair.fixed, pair.moving, model, name=pair.name, fixed_labels=pair.fixed_labels,
                               moving_labels=pair.moving_labels, report_steps=[steps], steps=steps,
                               prealign=prealign, threads=threads, timing_run=False)
        row = next(r for r in rows if r["method"] == final)
        per_pair.append({"pair": pair.name, "dice": row["dice"], "std_log_jacobian": row["std_log_jacobian"],
                         "folding_percent": row["folding_percent"]})
    means = {k: float(np.mean([p[k] for p in per_pair])) for k in ("dice", "std_log_jacobian", "folding_percent")}
    return {"scale": float(scale), "sigma": prior_sigma_of(model), **means, "pairs": per_pair}


def calibrate_prior_scale(model, pairs: Sequence[LabelledPair], scales: Sequence[float],
                          sigmas: Sequence[float] | None = None, **kw) -> dict:
    """Score every scale (for every sigma in ``sigmas``; default only the model's own), set the model's
    prior to the best admissible setting, and say why.

    Returns ``{"previous", "chosen", "previous_sigma", "chosen_sigma", "steps", "scores": [score_scale(...)
    per setting]}``. The chosen setting has the highest mean Dice among those within the smoothness
    bounds; ValueError if none is (the model keeps its previous setting then).
    """
    if not pairs or not scales:
        raise ValueError("calibration needs at least one validation pair and one scale")
    previous, previous_sigma = prior_scale_of(model), prior_sigma_of(model)
    steps = kw.pop("steps", None) or model.default_steps
    sigmas = [previous_sigma] if not sigmas else list(sigmas)
    scores = []
    for sigma in sigmas:
        for scale in scales:
            scores.append(score_scale(model, pairs, scale, sigma=sigma, steps=steps, **kw))
            log.info("scale %g sigma %g: Dice %.4f, std log det J %.3f, folding %.3f %%", scale, sigma,
                     scores[-1]["dice"], scores[-1]["std_log_jacobian"], scores[-1]["folding_percent"])
    admissible = [s for s in scores if s["std_log_jacobian"] <= MAX_STD_LOG_JACOBIAN
                  and s["folding_percent"] < MAX_FOLDING_PERCENT]
    if not admissible:
        set_prior_scale(model, previous)
        set_prior_sigma(model, previous_sigma)
        raise ValueError(f"no scale of {list(scales)} (sigma {sigmas}) keeps std log det J <= {MAX_STD_LOG_JACOBIAN} "
                         f"and folding < {MAX_FOLDING_PERCENT} %: try smaller scales or larger sigmas")
    best = max(admissible, key=lambda s: s["dice"])
    set_prior_scale(model, best["scale"])
    set_prior_sigma(model, best["sigma"])
    return {"previous": previous, "chosen": best["scale"], "previous_sigma": previous_sigma,
            "chosen_sigma": best["sigma"], "steps": steps, "scores": scores}
