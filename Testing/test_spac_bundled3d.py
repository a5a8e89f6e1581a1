"""The bundled 3D model (``spac3d_brain``) is what ``steprl register`` uses for 3D pairs by default.

It must load, say where it came from (its card carries the training record), and register a
3D pair it has never seen: Dice rising over the policy's steps without folding, and the
default refinement steps appended after them (issue 11's "ship it").
"""

from __future__ import annotations

import json

import pytest
from steprl.cli import main
from steprl.modelfile import BUNDLED_DIR, default_model
from steprl.registration.model import load_spac
from steprl.synth.toy import write_registration_dataset


def test_the_3d_default_model_is_bundled_with_its_record():
    assert default_model(3) == "spac3d_brain"
    spac = load_spac("spac3d_brain")
    assert spac.config.ndim == 3 and spac.default_refine_steps > 0
    record = spac.card["training"]["record"]
    assert record["total_updates"] == sum(run["updates"] for run in record["runs"]) > 0
    assert all(run["command"].startswith("steprl train registration") for run in record["runs"])
    assert "licence" in json.dumps(spac.card["training_data"]).lower()
    assert (BUNDLED_DIR / "spac3d_brain.json").is_file()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = write_registration_dataset(tmp_path_factory.mktemp("pair3d") / "d", 2, (40, 44, 36), seed=3,
                                        spacing=(2.0, 2.0, 2.0), max_displacement=4.0)
    return [folder / kind / f"case_{i:03d}.nii.gz" for kind in ("images", "labels") for i in (0, 1)]


def test_default_3d_register_improves_dice_step_by_step(pair, tmp_path, capsys):
    fixed, moving, fixed_labels, moving_labels = pair
    out = tmp_path / "out"
    code = main([str(a) for a in ("register", fixed, moving, "--out", out, "--fixed-labels", fixed_labels,
                                  "--moving-labels", moving_labels, "--quiet")])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["path"].endswith("spac3d_brain.safetensors")
    steps = {s["step"]: s for s in metrics["steps"]}
    policy = metrics["policy_steps"]
    assert policy == 20 and metrics["refine_steps"] == load_spac("spac3d_brain").default_refine_steps
    dice = [steps[k]["dice"] for k in (0, 10, 20)]
    assert dice[1] > dice[0] + 0.05 and dice[2] >= dice[1] - 0.005, dice
    assert steps[policy]["folding_percent"] < 0.5
    assert steps[policy]["kind"] == "policy" and steps[policy + 1]["kind"] == "refine"
    assert metrics["final"]["dice"] > dice[0] + 0.05
