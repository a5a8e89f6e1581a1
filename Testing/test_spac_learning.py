"""Acceptance: a short CPU training of SPAC on a small synthetic 2D task learns to register.

Synthetic blob images moved by random affine + smooth elastic deformations (exact labels).
After a short training through the real training loop, the exported model file is run by
the public ``register()`` on UNSEEN pairs: Dice must rise over the steps and end clearly above
identity and above the policy's own first step (the one-shot network it contains).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from steprl.geometry import Geometry, Image
from steprl.registration.data import SyntheticPairSource
from steprl.registration.inference import register
from steprl.registration.learner import SPACLearner, SPACTrainConfig
from steprl.registration.model import load_spac
from steprl.registration.networks import SPACConfig
from steprl.synth.toy import synthetic_pair
from steprl.training.distributed import single_process
from steprl.training.loop import fit

GRID = (32, 32)
STEPS = 8


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    torch.manual_seed(0)
    source = SyntheticPairSource(GRID, max_displacement=3.0, seed=0)
    net = SPACConfig(ndim=2, grid=GRID, channels=(16, 32, 32), plan_dim=8, critic_channels=(8, 16))
    cfg = SPACTrainConfig(batch_pairs=8, episode_steps=STEPS, replay_batch=16, val_steps=STEPS, seed=0)
    learner = SPACLearner(net, cfg, source, single_process("cpu"))
    out = tmp_path_factory.mktemp("spac_learning")
    result = fit(learner, out, epochs=5, iterations_per_epoch=40, config={"test": "learning"},
                 tensorboard=False, progress=False)
    assert result.epochs_done == 5
    return out / "model_best.safetensors"


def _unseen_pairs(n: int):
    rng = np.random.default_rng(2024)  # never used in training (seeds 0 and 104729 there)
    geometry = Geometry(GRID, (1.0, 1.0), (0.0, 0.0), np.eye(2))
    for _ in range(n):
        p = synthetic_pair(GRID, rng, max_displacement=3.0)
        yield tuple(Image(p[k], geometry) for k in ("fixed", "moving", "fixed_labels", "moving_labels"))


def test_dice_rises_over_steps_on_unseen_pairs(trained_model):
    model = load_spac(trained_model)
    curves = []
    for fixed, moving, fixed_labels, moving_labels in _unseen_pairs(12):
        results = list(register(fixed, moving, model, steps=STEPS, device="cpu",
                                fixed_labels=fixed_labels, moving_labels=moving_labels))
        curves.append([r.metrics["dice"] for r in results])
        assert results[-1].metrics["folding_percent"] < 1.0
    curve = np.mean(curves, axis=0)
    print("mean Dice per step on unseen pairs:", np.round(curve, 4))
    identity, first, final = curve[0], curve[1], curve[-1]
    assert final > identity + 0.05, f"final Dice {final:.3f} not clearly above identity {identity:.3f}"
    assert final > first + 0.01, f"final Dice {final:.3f} not above the first step's {first:.3f}"
    assert first > identity, "the first step should already help"
    rising = np.diff(curve) > -0.002
    assert rising.mean() >= 0.75, f"Dice does not rise over the steps: {np.round(curve, 4)}"
