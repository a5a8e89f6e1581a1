"""The README's main job: ``steprl demo`` registers the bundled sample pair with the bundled model."""

from __future__ import annotations

import json

import numpy as np
from steprl.cli import main
from steprl.modelfile import BUNDLED_DIR, read_card


def test_bundled_2d_model_has_a_complete_card():
    card = read_card(BUNDLED_DIR / "spac2d_brain.json")
    assert card["method"] == "spac" and card["ndim"] == 2
    for key in ("task", "modality", "training_data", "intended_use", "limitations", "validation", "attribution"):
        assert card.get(key), f"model card misses {key!r}"
    assert "licence" in json.dumps(card["training_data"]).lower()


def test_demo_registers_the_sample_pair(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ncc = [s["ncc"] for s in metrics["steps"]]
    assert len(ncc) == 21  # step 0 + the card's 20 steps
    assert ncc[-1] > ncc[0] + 0.1, f"the demo registration does not improve local NCC: {np.round(ncc, 3)}"
    assert metrics["final"]["folding_percent"] < 0.5
    for name in ("warped.nii.gz", "displacement.nii.gz", "steps.png", "steps/displacement_step_020.nii"):
        assert (out / name).is_file(), name
    assert "steps.png" in capsys.readouterr().out
