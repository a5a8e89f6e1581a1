"""Calibrating the prior step's scale on validation pairs (steprl.registration.calibration, issue 11).

A 2D policy whose learned correction is zero moves only along the smoothed NCC gradient, so its
Dice after a few steps depends on the prior scale alone: a near-zero scale barely moves, a
useful one aligns. The calibration must pick the useful one, carry it in the saved weights, and
refuse (keeping the old scale) when no scale keeps the fields smooth enough.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from steprl import modelfile
from steprl.geometry import Geometry, Image
from steprl.registration import calibration
from steprl.registration.calibration import LabelledPair, calibrate_prior_scale, prior_scale_of, prior_sigma_of
from steprl.registration.model import load_spac
from steprl.registration.networks import SPACConfig, SPACPolicy
from steprl.synth.toy import synthetic_pair


def _model(tmp_path, prior_scale: float = 1.0):
    cfg = SPACConfig(ndim=2, grid=(32, 32), channels=(8, 8), plan_dim=4, critic_channels=(4, 4), norm="instance",
                     features="ncc-gradient", prior_scale=prior_scale, prior_sigma=1.5, step_bound=1.0)
    torch.manual_seed(0)
    policy = SPACPolicy(cfg)
    with torch.no_grad():  # no learned correction: the prior alone moves
        policy.actor.out.weight.zero_()
        policy.actor.out.bias.zero_()
    card = {"method": "spac", "ndim": 2, "config": cfg.to_dict(), "inference": {"max_step": 1.0, "steps": 6}}
    return load_spac(modelfile.save_model(tmp_path / "prior", policy.state_dict(), card), "cpu")


def _pairs(n: int = 2) -> list[LabelledPair]:
    rng = np.random.default_rng(3)
    geometry = Geometry((32, 32), (1.0, 1.0), (0.0, 0.0), np.eye(2))
    out = []
    for k in range(n):
        p = synthetic_pair((32, 32), rng, max_displacement=2.5)
        out.append(LabelledPair(f"pair {k}", *(Image(p[key], geometry) for key in
                                               ("fixed", "moving", "fixed_labels", "moving_labels"))))
    return out


def test_calibration_picks_the_scale_that_aligns_and_the_weights_carry_it(tmp_path):
    model = _model(tmp_path, prior_scale=1.0)
    result = calibrate_prior_scale(model, _pairs(), [0.01, 2.0, 20.0], prealign=False)
    tiny, useful, overshoot = result["scores"]
    # measured: Dice 0.68 / 0.91 / 0.80, std log det J 0.01 / 0.37 / 3.3 (folding 2.3 %)
    assert useful["dice"] > tiny["dice"] + 0.1 and useful["dice"] > overshoot["dice"], result
    assert overshoot["std_log_jacobian"] > calibration.MAX_STD_LOG_JACOBIAN
    assert result["previous"] == 1.0 and result["chosen"] == 2.0 and result["steps"] == 6
    assert prior_scale_of(model) == 2.0
    saved = modelfile.save_model(tmp_path / "calibrated", model.policy.state_dict(), model.card)
    assert prior_scale_of(load_spac(saved, "cpu")) == 2.0


def test_a_scale_with_rough_fields_is_not_chosen_even_with_the_best_dice(tmp_path, monkeypatch):
    model = _model(tmp_path)
    monkeypatch.setattr(calibration, "MAX_STD_LOG_JACOBIAN", 0.2)  # scale 2's fields (0.37) are now too rough
    result = calibrate_prior_scale(model, _pairs(), [0.01, 2.0], prealign=False)
    assert result["scores"][1]["dice"] > result["scores"][0]["dice"]
    assert result["chosen"] == 0.01


def test_no_admissible_scale_is_refused_and_the_old_scale_kept(tmp_path, monkeypatch):
    model = _model(tmp_path, prior_scale=1.0)
    monkeypatch.setattr(calibration, "MAX_STD_LOG_JACOBIAN", -1.0)  # nothing can be this smooth
    with pytest.raises(ValueError, match="no scale"):
        calibrate_prior_scale(model, _pairs(1), [0.5, 2.0], prealign=False)
    assert prior_scale_of(model) == 1.0


def test_calibration_over_sigmas_picks_the_smoothing_that_aligns_and_the_card_carries_it(tmp_path):
    model = _model(tmp_path, prior_scale=1.0)  # prior_sigma 1.5
    result = calibrate_prior_scale(model, _pairs(), [2.0], sigmas=[12.0, 1.5], prealign=False)
    blurred, sharp = result["scores"]
    # a 12-voxel blur on a 32-pixel grid averages the direction away: the prior barely aligns
    assert (blurred["sigma"], sharp["sigma"]) == (12.0, 1.5)
    assert sharp["dice"] > blurred["dice"] + 0.05, result
    assert result["previous_sigma"] == 1.5 and result["chosen_sigma"] == 1.5 and result["chosen"] == 2.0
    assert prior_sigma_of(model) == 1.5 and model.card["config"]["prior_sigma"] == 1.5
    calibration.set_prior_sigma(model, 12.0)  # what a saved model carries is what ran last
    saved = modelfile.save_model(tmp_path / "blurred", model.policy.state_dict(), model.card)
    reloaded = load_spac(saved, "cpu")
    assert prior_sigma_of(reloaded) == 12.0 and reloaded.policy.planner.prior_sigma == 12.0


def test_a_refused_calibration_keeps_the_old_sigma_too(tmp_path, monkeypatch):
    model = _model(tmp_path, prior_scale=1.0)
    monkeypatch.setattr(calibration, "MAX_STD_LOG_JACOBIAN", -1.0)
    with pytest.raises(ValueError, match="no scale"):
        calibrate_prior_scale(model, _pairs(1), [2.0], sigmas=[0.5, 3.0], prealign=False)
    assert prior_sigma_of(model) == 1.5 and prior_scale_of(model) == 1.0
    assert all(m.prior_sigma == 1.5 for m in model.policy.modules() if hasattr(m, "prior_sigma"))


def test_a_model_without_a_prior_step_is_refused(tmp_path):
    cfg = SPACConfig(ndim=2, grid=(16, 16), channels=(8, 8), plan_dim=4, critic_channels=(4, 4))
    card = {"method": "spac", "ndim": 2, "config": cfg.to_dict(), "inference": {"max_step": 1.0, "steps": 2}}
    model = load_spac(modelfile.save_model(tmp_path / "plain", SPACPolicy(cfg).state_dict(), card), "cpu")
    with pytest.raises(ValueError, match="no prior step"):
        calibrate_prior_scale(model, _pairs(1), [1.0], prealign=False)


def test_the_tool_calibrates_the_bundled_model_on_its_validation_subjects(shared_data, tmp_path, repo_root):
    """trainer/tools/calibrate_prior_scale.py on small synthetic heads: it scores only the model's
    validation subjects (never compare_registration's held-out test subjects), whole and brain-extracted,
    and the saved model carries the chosen scale and the figures behind it."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("calibrate_prior_scale",
                                                  repo_root / "trainer" / "tools" / "calibrate_prior_scale.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "calibrated"
    assert tool.main(["spac3d_brain", "--out", str(out), "--scales", "2", "3", "--size", "40", "--spacing", "5",
                      "--synthseg", str(shared_data / "synthseg")]) == 0
    card = json.loads((out / "model_best.json").read_text())
    cal = card["calibration"]
    validation = card["training"]["data"]["validation_subjects"]
    assert len(cal["pairs"]) == 2 * len(validation) * (len(validation) - 1)
    from steprl.synth import synthseg

    test = synthseg.split_subjects(synthseg.list_label_maps(shared_data / "synthseg")).test
    assert all(t.name.removesuffix(".nii.gz") not in p for t in test for p in cal["pairs"])
    assert [s["scale"] for s in cal["scores"]] == [2.0, 3.0] and cal["chosen"] in (2.0, 3.0)
    assert cal["contrast"] == "same" and cal["chosen_sigma"] == card["config"]["prior_sigma"]
    assert prior_scale_of(load_spac(out / "model_best.safetensors", "cpu")) == cal["chosen"]
    assert "calibrate_prior_scale.py spac3d_brain" in cal["command"]


def test_same_contrast_heads_share_one_contrast_draw(shared_data, repo_root, monkeypatch):
    """--contrast same (the tool's default): every subject is synthesised with ONE T1-like contrast draw
    (class means and stds), as scans of one sequence; otherwise each subject draws its own."""
    import importlib

    monkeypatch.syspath_prepend(str(repo_root / "trainer" / "benchmarks"))
    bench = importlib.import_module("compare_registration")
    from steprl.synth import from_labels, synthseg

    subjects = synthseg.split_subjects(synthseg.list_label_maps(shared_data / "synthseg")).validation[:2]
    real_synthesize, seen = from_labels.synthesize, []

    def spy(labels, model, rng, **kw):
        seen.append(kw.get("contrast"))
        return real_synthesize(labels, model, rng, **kw)

    monkeypatch.setattr(from_labels, "synthesize", spy)
    heads = bench.synthetic_heads(shared_data / "synthseg", subjects, 5.0, 40, 4, same_contrast=True)
    assert len(heads) == 2 and len(seen) == 2 and seen[0] is not None and seen[0] is seen[1]
    means, stds = seen[0]
    assert means.shape == stds.shape and 0 < means.max() <= 1  # a T1-like draw on the 0..1 scale
    seen.clear()
    bench.synthetic_heads(shared_data / "synthseg", subjects, 5.0, 40, 4)
    assert seen == [None, None]  # a draw per subject, inside synthesize
