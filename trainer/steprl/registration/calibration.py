"""Calibrate the prior step's scale of an ``ncc-gradient`` SPAC model on validation pairs.

Why (issue 11): the actor's step is ``prior_scale * direction + correction`` (:mod:`.networks`),
where ``direction`` is the smoothed local-NCC gradient (:mod:`.similarity_gradient`). The scale is
a learned parameter, but at the learning rates that keep the correction stable (5e-5) Adam moves it
by at most ~5e-5 per update, and over 4,000 updates of the 3D runs it stayed at its initial 2.0.
A direct scan on held-out validation pairs is far cheaper than the updates it would take: one
registration per pair and scale. The scan's figures go into the model card, so the choice is
reproducible and visible (``trainer/tools/calibrate_prior_scale.py`` runs it).

Score per scale: mean hard Dice after the policy's last step (the policy alone, as the acceptance
measures it), with the final field's folding and std log det J; a scale whose fields are not
smooth enough (:data:`MAX_STD_LOG_JACOBIAN`, :data:`MAX_FOLDING_PERCENT`) is never chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from steprl.geometry import Image

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


def score_scale(model, pairs: Sequence[LabelledPair], scale: float, *, steps: int | None = None,
                prealign: bool = True, threads: int | None = None) -> dict:
    """Mean final Dice, std log det J and folding of the policy alone with ``scale``, over ``pairs``."""
    from steprl.registration.evaluation import compare_case

    set_prior_scale(model, scale)
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
    return {"scale": float(scale), **means, "pairs": per_pair}


def calibrate_prior_scale(model, pairs: Sequence[LabelledPair], scales: Sequence[float], **kw) -> dict:
    """Score every scale, set the model's prior scale to the best admissible one, and say why.

    Returns ``{"previous", "chosen", "steps", "scores": [score_scale(...) per scale]}``. The chosen
    scale has the highest mean Dice among those within the smoothness bounds; ValueError if none is
    (the model keeps its previous scale then).
    """
    if not pairs or not scales:
        raise ValueError("calibration needs at least one validation pair and one scale")
    previous = prior_scale_of(model)
    steps = kw.pop("steps", None) or model.default_steps
    scores = [score_scale(model, pairs, s, steps=steps, **kw) for s in scales]
    admissible = [s for s in scores if s["std_log_jacobian"] <= MAX_STD_LOG_JACOBIAN
                  and s["folding_percent"] < MAX_FOLDING_PERCENT]
    if not admissible:
        set_prior_scale(model, previous)
        raise ValueError(f"no scale of {list(scales)} keeps std log det J <= {MAX_STD_LOG_JACOBIAN} and folding "
                         f"< {MAX_FOLDING_PERCENT} %: try smaller scales")
    best = max(admissible, key=lambda s: s["dice"])
    set_prior_scale(model, best["scale"])
    return {"previous": previous, "chosen": best["scale"], "steps": steps, "scores": scores}
