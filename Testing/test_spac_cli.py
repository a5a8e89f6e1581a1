"""Tests of the SPAC command line: ``steprl register / info / evaluate / train registration``.

The CLI runs in-process through :func:`steprl.cli.main` (it returns the exit code; stdout and
stderr are captured with ``capsys``); two subprocess runs prove the ``python -m steprl`` entry
point and the torchrun (DDP) launch. The models are tiny untrained policies saved with
:func:`steprl.modelfile.save_model`; their actor's output bias is set so that every step moves
the image by a voxel or two, which makes the warped image differ from the input and the
displacement checks meaningful. Images are small synthetic blob cases on anisotropic grids;
the 2D moving image has another origin and an oblique direction than the fixed one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from steprl import modelfile
from steprl.cli import main
from steprl.registration.model import load_spac
from steprl.registration.networks import SPACConfig, SPACPolicy
from steprl.synth.toy import write_registration_dataset

STEPS = 3  # the tiny models' default number of steps (their card's "inference.steps")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- fixtures ---------------------------------------------------------------------------
def _save_tiny_model(path: Path, ndim: int, grid: tuple[int, ...], bias: tuple[float, ...],
                     method: str = "spac") -> Path:
    """A tiny untrained SPAC policy whose steps are about ``2 * bias`` voxels per axis."""
    torch.manual_seed(ndim)
    cfg = SPACConfig(ndim=ndim, grid=grid, channels=(8, 16), plan_dim=4, critic_channels=(4, 4))
    policy = SPACPolicy(cfg)
    with torch.no_grad():
        policy.actor.out.weight.normal_(0.0, 0.05)
        policy.actor.out.bias.copy_(torch.tensor(bias))
    card = {"method": method, "ndim": ndim, "config": cfg.to_dict(), "inference": {"max_step": 3.0, "steps": STEPS}}
    return modelfile.save_model(path, policy.state_dict(), card)


def _reoriented_copy(src: Path, dst: Path, origin: tuple[float, ...], degrees: float) -> Path:
    """``src`` with another origin and a direction rotated by ``degrees`` in the first two axes."""
    image = sitk.ReadImage(str(src))
    nd = image.GetDimension()
    rot = np.eye(nd)
    a = math.radians(degrees)
    rot[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    image.SetOrigin(origin)
    image.SetDirection(tuple(rot.ravel()))
    sitk.WriteImage(image, str(dst))
    return dst


def _write_array(array: np.ndarray, path: Path, like: Path) -> Path:
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    image.CopyInformation(sitk.ReadImage(str(like)))
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Models and images shared by the tests of this file (read-only: tests copy what they change)."""
    root = tmp_path_factory.mktemp("spac_cli")
    a: dict[str, Path] = {"root": root}
    (root / "models").mkdir()
    a["model2d"] = _save_tiny_model(root / "models" / "spac2d_tiny", 2, (32, 32), (0.4, -0.3))
    a["model3d"] = _save_tiny_model(root / "models" / "spac3d_tiny", 3, (16, 16, 16), (0.3, -0.2, 0.25))

    d2 = write_registration_dataset(root / "d2", 3, (24, 28), seed=0, spacing=(1.5, 1.2))
    a["d2"] = d2
    a["fixed2d"], a["fixed2d_labels"] = d2 / "images" / "case_000.nii.gz", d2 / "labels" / "case_000.nii.gz"
    a["moving2d"] = _reoriented_copy(d2 / "images" / "case_001.nii.gz", root / "moving2d.nii.gz", (2.0, -1.5), 10)
    a["moving2d_labels"] = _reoriented_copy(d2 / "labels" / "case_001.nii.gz", root / "moving2d_labels.nii.gz",
                                            (2.0, -1.5), 10)
    d3 = write_registration_dataset(root / "d3", 2, (10, 12, 14), seed=1, spacing=(1.5, 1.2, 2.0))
    a["fixed3d"], a["fixed3d_labels"] = d3 / "images" / "case_000.nii.gz", d3 / "labels" / "case_000.nii.gz"
    a["moving3d"], a["moving3d_labels"] = d3 / "images" / "case_001.nii.gz", d3 / "labels" / "case_001.nii.gz"
    a["d4"] = write_registration_dataset(root / "d4", 4, (24, 28), seed=2, spacing=(1.5, 1.2))
    return a


@pytest.fixture(scope="session")
def bad_inputs(assets) -> dict[str, Path]:
    """Broken images and model files, each in its own file."""
    root = assets["root"] / "bad"
    root.mkdir()
    moving = sitk.GetArrayFromImage(sitk.ReadImage(str(assets["moving2d"])))
    b: dict[str, Path] = {}
    b["constant"] = _write_array(np.full_like(moving, 7.0), root / "constant.nii.gz", assets["moving2d"])
    # NaN / Inf in NRRD: ITK's NIfTI reader (ITK 5.4) silently turns non-finite voxels into 0.
    with_nan, with_inf = moving.copy(), moving.copy()
    with_nan[5, 6] = np.nan
    with_inf[5, 6] = np.inf
    b["nan"] = _write_array(with_nan, root / "nan.nrrd", assets["moving2d"])
    b["inf"] = _write_array(with_inf, root / "inf.nrrd", assets["moving2d"])
    b["nan_nifti"] = _write_array(with_nan, root / "nan.nii.gz", assets["moving2d"])
    b["empty"] = root / "empty.nii.gz"
    b["empty"].write_bytes(b"")
    b["garbage"] = root / "garbage.nii.gz"
    b["garbage"].write_bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes())
    b["missing"] = root / "does_not_exist.nii.gz"

    b["pixelrl_model"] = modelfile.save_model(root / "pixelrl_like", {"w": torch.zeros(3)},
                                              {"method": "pixeldrl-mg", "ndim": 2, "config": {"width": 4}})
    flipped = root / "flipped.safetensors"
    shutil.copy(assets["model2d"], flipped)
    shutil.copy(assets["model2d"].with_suffix(".json"), flipped.with_suffix(".json"))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    b["flipped_model"] = flipped

    # A pickle whose unpickling would create a marker file, renamed .safetensors: once without
    # a card, once with a valid card whose sha256 matches it (so the weights are really opened).
    b["marker"] = root / "UNPICKLED_MARKER"
    payload = pickle.dumps(_Trap(str(b["marker"])))
    b["pickle_model"] = root / "pickled.safetensors"
    b["pickle_model"].write_bytes(payload)
    b["pickle_model_with_card"] = root / "pickled_carded.safetensors"
    b["pickle_model_with_card"].write_bytes(payload)
    card = json.loads(assets["model2d"].with_suffix(".json").read_text())
    card["sha256"] = hashlib.sha256(payload).hexdigest()
    b["pickle_model_with_card"].with_suffix(".json").write_text(json.dumps(card))
    return b


class _Trap:
    """Unpickling this calls ``open(marker, "w")``, which creates the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``steprl ARGS`` in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def _assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


# ---- register: happy paths ---------------------------------------------------------------
@pytest.mark.parametrize("nd", [2, 3])
def test_register_with_labels_writes_consistent_outputs(assets, tmp_path, capsys, nd):
    out = tmp_path / f"result{nd}d"
    fixed, moving = assets[f"fixed{nd}d"], assets[f"moving{nd}d"]
    code, stdout, err = run_cli(capsys, "register", fixed, moving, "--model", assets[f"model{nd}d"], "--out", out,
                                "--fixed-labels", assets[f"fixed{nd}d_labels"],
                                "--moving-labels", assets[f"moving{nd}d_labels"], "--quiet")
    assert code == 0, err
    assert "Dice" in stdout and str(out) in stdout

    # warped.nii.gz: on the fixed grid, exactly
    fixed_img = sitk.ReadImage(str(fixed))
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    _assert_same_geometry(warped, fixed_img)

    # displacement.nii.gz: an ITK displacement field that SimpleITK turns into a transform
    disp = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    assert disp.GetDimension() == nd and disp.GetNumberOfComponentsPerPixel() == nd
    disp_array = sitk.GetArrayFromImage(disp)  # before the transform takes the image's buffer
    assert np.abs(disp_array).max() > 0.5  # the steps moved the image (mm)
    transform = sitk.DisplacementFieldTransform(disp)

    # one accumulated field per step, and nothing else; the last one is the final field
    steps = sorted(p.name for p in (out / "steps").iterdir())
    assert steps == [f"displacement_step_{k:03d}.nii" for k in range(1, STEPS + 1)]
    last_step = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "steps" / steps[-1]), sitk.sitkVectorFloat64))
    np.testing.assert_allclose(last_step, disp_array, atol=1e-6)

    # metrics.json
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["step"] for s in metrics["steps"]] == list(range(STEPS + 1))
    for entry in metrics["steps"]:
        assert math.isfinite(entry["ncc"])
        assert 0.0 <= entry["dice"] <= 1.0
        assert entry["dice_per_label"] and all(0.0 <= v <= 1.0 for v in entry["dice_per_label"].values())
    final = metrics["final"]
    for key in ("folding_percent", "std_log_jacobian", "hd95"):
        assert math.isfinite(final[key]), key
    assert final["step"] == STEPS and final["ncc"] == metrics["steps"][-1]["ncc"]
    assert metrics["steps"][-1]["ncc"] != metrics["steps"][0]["ncc"]  # the steps changed the image

    # steps.png: a real, decodable PNG
    png = out / "steps.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    picture = matplotlib.image.imread(str(png))
    assert picture.ndim == 3 and min(picture.shape[:2]) > 50

    # SimpleITK applying displacement.nii.gz to the moving image reproduces warped.nii.gz
    moving_img = sitk.Cast(sitk.ReadImage(str(moving)), sitk.sitkFloat64)
    reference = sitk.GetArrayFromImage(sitk.Resample(moving_img, fixed_img, transform, sitk.sitkLinear, math.nan))
    inside = ndimage.binary_erosion(np.isfinite(reference), iterations=1)  # steprl pads by the border value
    assert inside.mean() > 0.3
    warped_array = sitk.GetArrayFromImage(warped)
    np.testing.assert_allclose(warped_array[inside], reference[inside], atol=1e-3)
    unwarped = sitk.GetArrayFromImage(sitk.Resample(moving_img, fixed_img, sitk.Transform(nd, sitk.sitkIdentity),
                                                    sitk.sitkLinear, math.nan))
    both = inside & np.isfinite(unwarped)
    assert np.abs(unwarped[both] - warped_array[both]).max() > 0.05  # the comparison above is not trivial

    assert not _partials(out)


def test_register_no_step_fields(assets, tmp_path, capsys):
    out = tmp_path / "nosteps"
    code, _, err = run_cli(capsys, "register", assets["fixed2d"], assets["moving2d"], "--model", assets["model2d"],
                           "--out", out, "--no-step-fields", "--quiet")
    assert code == 0, err
    assert not (out / "steps").exists()
    assert {p.name for p in out.iterdir()} == {"warped.nii.gz", "displacement.nii.gz", "metrics.json", "steps.png",
                                               ".steprl-outputs.json"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["steps"]) == STEPS + 1 and "dice" not in metrics["steps"][0]
    assert not _partials(out)


def test_register_zero_steps_writes_the_identity(assets, tmp_path, capsys):
    out = tmp_path / "zero"
    code, _, err = run_cli(capsys, "register", assets["fixed2d"], assets["moving2d"], "--model", assets["model2d"],
                           "--out", out, "--steps", "0", "--quiet")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["step"] for s in metrics["steps"]] == [0] and metrics["final"]["folding_percent"] == 0.0
    assert np.abs(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz")))).max() == 0.0
    assert not (out / "steps").exists() and (out / "steps.png").is_file()


def test_register_refuses_negative_max_step(assets, tmp_path, capsys):
    out = tmp_path / "result"
    code, _, err = run_cli(capsys, "register", assets["fixed2d"], assets["moving2d"], "--model", assets["model2d"],
                           "--out", out, "--max-step", "-1", "--quiet")
    _assert_one_error_line(code, err, ["max"])
    assert not out.exists()


def test_register_rerun_leaves_no_stale_step_fields(assets, tmp_path, capsys):
    out = tmp_path / "rerun"
    args = ["register", assets["fixed2d"], assets["moving2d"], "--model", assets["model2d"], "--out", out, "--quiet"]
    assert run_cli(capsys, *args, "--steps", "3")[0] == 0
    assert run_cli(capsys, *args, "--steps", "1")[0] == 0
    assert len(json.loads((out / "metrics.json").read_text())["steps"]) == 2
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["displacement_step_001.nii"]


# ---- register: bad inputs ----------------------------------------------------------------
# case -> (function of (assets, bad) giving the argument list after "register", key words of the message)
BAD_CASES = {
    "2d_fixed_3d_moving": (lambda a, b: [a["fixed2d"], a["moving3d"], "--model", a["model2d"]], ["3D", "2D"]),
    "constant_image": (lambda a, b: [a["fixed2d"], b["constant"], "--model", a["model2d"]],
                       ["moving image", "same value"]),
    "empty_file": (lambda a, b: [a["fixed2d"], b["empty"], "--model", a["model2d"]],
                   ["cannot read", "empty.nii.gz"]),
    "nan": (lambda a, b: [b["nan"], a["moving2d"], "--model", a["model2d"]], ["fixed image", "NaN"]),
    "inf": (lambda a, b: [a["fixed2d"], b["inf"], "--model", a["model2d"]], ["moving image", "infinite"]),
    "unreadable": (lambda a, b: [a["fixed2d"], b["garbage"], "--model", a["model2d"]],
                   ["cannot read", "garbage.nii.gz"]),
    "missing": (lambda a, b: [b["missing"], a["moving2d"], "--model", a["model2d"]],
                ["does_not_exist.nii.gz", "does not exist"]),
    "pixelrl_model": (lambda a, b: [a["fixed2d"], a["moving2d"], "--model", b["pixelrl_model"]],
                      ["pixeldrl-mg", "spac model"]),
    "3d_model_2d_images": (lambda a, b: [a["fixed2d"], a["moving2d"], "--model", a["model3d"]],
                           ["2D", "3D", "model"]),
    "corrupt_weights": (lambda a, b: [a["fixed2d"], a["moving2d"], "--model", b["flipped_model"]],
                        ["flipped.safetensors", "corrupt"]),
    "unknown_model_name": (lambda a, b: [a["fixed2d"], a["moving2d"], "--model", "no_such_spac_model"],
                           ["no_such_spac_model", "not found", "bundled models"]),
    "pickle_model": (lambda a, b: [a["fixed2d"], a["moving2d"], "--model", b["pickle_model"]], ["pickled", "card"]),
    "pickle_model_with_card": (lambda a, b: [a["fixed2d"], a["moving2d"], "--model", b["pickle_model_with_card"]],
                               ["pickled_carded.safetensors", "not a readable safetensors"]),
    "one_label_map": (lambda a, b: [a["fixed2d"], a["moving2d"], "--model", a["model2d"],
                                    "--fixed-labels", a["fixed2d_labels"]], ["--fixed-labels", "--moving-labels"]),
    "negative_steps": (lambda a, b: [a["fixed2d"], a["moving2d"], "--model", a["model2d"], "--steps", "-1"],
                       ["steps", "-1"]),
}


def _assert_one_error_line(code: int, err: str, words: list[str]) -> None:
    assert code != 0
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("steprl: error:")]
    assert len(errors) == 1, err
    assert err.count("steprl: error:") == 1
    line = errors[0].lower()
    for word in words:
        assert word.lower() in line, f"{word!r} not in {errors[0]!r}"


@pytest.mark.parametrize("existing_out", [False, True], ids=["new_out", "existing_out"])
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_register_refuses_bad_input(assets, bad_inputs, tmp_path, capsys, case, existing_out):
    make_args, words = BAD_CASES[case]
    out = tmp_path / "result"
    if existing_out:
        out.mkdir()
        (out / "keep.txt").write_text("earlier result")
    code, _, err = run_cli(capsys, "register", *make_args(assets, bad_inputs), "--out", out, "--quiet")
    _assert_one_error_line(code, err, words)
    if existing_out:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
        assert (out / "keep.txt").read_text() == "earlier result"
    else:
        assert not out.exists()
    assert not _partials(out)
    assert not bad_inputs["marker"].exists(), "a pickled model file was unpickled"


def test_register_refuses_nan_in_nifti(assets, bad_inputs, tmp_path, capsys):
    out = tmp_path / "result"
    code, _, err = run_cli(capsys, "register", assets["fixed2d"], bad_inputs["nan_nifti"], "--model",
                           assets["model2d"], "--out", out, "--quiet")
    _assert_one_error_line(code, err, ["NaN"])
    assert not out.exists()


# ---- info --------------------------------------------------------------------------------
def _parameters_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.strip().startswith("parameters")]
    assert len(lines) == 1, out
    return lines[0]


def test_info_prints_card_and_parameter_counts(assets, capsys):
    code, out, err = run_cli(capsys, "info", assets["model2d"])
    assert code == 0, err
    card = json.loads(assets["model2d"].with_suffix(".json").read_text())
    assert "method        spac, 2D, network grid 32 x 32, 3 steps by default" in out and card["sha256"] in out
    line = _parameters_line(out)
    assert "critic" in line and "policy" in line
    assert any(int(tok.replace(",", "")) > 0 for tok in line.replace(";", " ").split()
               if tok.replace(",", "").isdigit())


def test_info_json_prints_the_raw_card(assets, capsys):
    code, out, err = run_cli(capsys, "info", assets["model2d"], "--json")
    assert code == 0, err
    assert json.loads(out) == json.loads(assets["model2d"].with_suffix(".json").read_text())


def test_info_policy_parameter_count_matches_the_weights(assets, capsys):
    # Regression: the loaded (frozen) policy was once counted as 0 trainable parameters.
    code, out, _ = run_cli(capsys, "info", assets["model2d"])
    assert code == 0
    expected = json.loads(assets["model2d"].with_suffix(".json").read_text())["parameters"]
    assert f"policy (planner + actor) {expected:,};" in _parameters_line(out)


# ---- evaluate ----------------------------------------------------------------------------
def test_evaluate_images_folder_table_and_json(assets, tmp_path, capsys):
    d2 = assets["d2"]
    report = tmp_path / "eval.json"
    code, out, err = run_cli(capsys, "evaluate", "registration", "--images", d2 / "images", "--labels", d2 / "labels",
                             "--model", assets["model2d"], "--steps", "1", "--json", report, "--quiet")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[0] == "pair" and "Dice" in lines[0]
    assert lines[-1].split()[0] == "mean"
    rows = json.loads(report.read_text())["pairs"]
    assert [r["pair"] for r in rows] == ["case_001 -> case_000", "case_002 -> case_001", "case_000 -> case_002"]
    for row in rows:
        assert row["steps"] == 1
        assert 0.0 <= row["dice_final"] <= 1.0 and math.isfinite(row["ncc_final"]) and math.isfinite(row["hd95"])
    assert lines[0].split()[1:3] == ["Dice", "id"]  # the first value column
    assert float(lines[-1].split()[1]) == pytest.approx(np.mean([r["dice_identity"] for r in rows]), abs=6e-4)


def test_evaluate_pairs_csv_with_relative_paths(assets, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(assets["d2"], data)
    (data / "pairs.csv").write_text("fixed,moving,fixed_labels,moving_labels\n"
                                    "images/case_000.nii.gz,images/case_002.nii.gz,"
                                    "labels/case_000.nii.gz,labels/case_002.nii.gz\n")
    monkeypatch.chdir(tmp_path)  # the CSV's paths are relative to the CSV, not to the working folder
    code, out, err = run_cli(capsys, "evaluate", "registration", "--pairs", "data/pairs.csv",
                             "--model", assets["model2d"], "--steps", "1", "--json", "eval.json", "--quiet")
    assert code == 0, err
    rows = json.loads((tmp_path / "eval.json").read_text())["pairs"]
    assert len(rows) == 1 and rows[0]["pair"] == "case_002 -> case_000" and "dice_final" in rows[0]
    assert out.strip().splitlines()[-1].startswith("mean")


# ---- train -------------------------------------------------------------------------------
TRAIN_SMALL = ["--channels", "8", "16", "--plan-dim", "4", "--iterations", "2", "--batch", "2",
               "--episode-steps", "2", "--no-tensorboard", "--quiet"]


def test_train_synthetic_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "registration", "--synthetic", "32", "32", *TRAIN_SMALL, "--out", out]
    code, stdout, err = run_cli(capsys, *args, "--epochs", "1")
    assert code == 0, err
    assert "model_best.safetensors" in stdout
    spac = load_spac(out / "model_best.safetensors")
    assert spac.config.grid == (32, 32) and spac.config.channels == (8, 16) and spac.config.plan_dim == 4
    assert (out / "checkpoints" / "last.safetensors").is_file()
    first = (out / "history.jsonl").read_text().splitlines()
    assert len(first) == 1 and json.loads(first[0])["epoch"] == 1

    code, _, err = run_cli(capsys, *args, "--epochs", "2")
    assert code == 0, err
    history = (out / "history.jsonl").read_text().splitlines()
    assert len(history) == 2
    assert history[0] == first[0]  # resumed: epoch 1 was not redone
    assert json.loads(history[1])["epoch"] == 2


def test_a_run_begun_by_an_older_steprl_is_refused_then_converts_once_and_resumes(tmp_path, capsys):
    """trainer/tools/convert_registration_run.py: the one-off conversion of the stored settings."""
    import importlib.util

    from steprl.training.checkpoint import rewrite_checkpoint_state

    path = Path(__file__).resolve().parent.parent / "trainer" / "tools" / "convert_registration_run.py"
    spec = importlib.util.spec_from_file_location("convert_registration_run", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def the_old_form(state: dict) -> dict:  # as steprl wrote it before: shimmed keys, older network and learner
        config = state["config"]
        training = {k: v for k, v in config["training"].items()
                    if k not in tool.ORIGINAL_VALUES or v != tool.ORIGINAL_VALUES[k]}
        network = {k: v for k, v in config["network"].items() if not k.startswith("prior_")}
        learner = {k: v for k, v in state["learner"].items() if k in ("rng", "replay_next")}
        return {**state, "config": {**config, "training": training, "network": network}, "learner": learner}

    run = tmp_path / "run"
    args = ["train", "registration", "--synthetic", "32", "32", *TRAIN_SMALL, "--out", run]
    assert run_cli(capsys, *args, "--epochs", "1")[0] == 0
    for checkpoint in (run / "checkpoints").glob("*.safetensors"):
        assert rewrite_checkpoint_state(checkpoint, the_old_form)
    code, _, err = run_cli(capsys, *args, "--epochs", "2")
    assert code != 0 and "convert_registration_run.py" in err and "network.prior_scale" in err
    assert tool.main([str(run)]) == 0
    assert "checkpoints/last.safetensors" in capsys.readouterr().out
    assert tool.convert_run(run) == []  # once is enough
    code, _, err = run_cli(capsys, *args, "--epochs", "2")
    assert code == 0, err
    assert [json.loads(line)["epoch"] for line in (run / "history.jsonl").read_text().splitlines()] == [1, 2]


def test_train_from_files(assets, tmp_path, capsys):
    d4 = assets["d4"]
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "registration", "--images", d4 / "images", "--labels", d4 / "labels",
                           "--grid", "32", "32", *TRAIN_SMALL, "--epochs", "1", "--out", out)
    assert code == 0, err
    spac = load_spac(out / "model_best.safetensors")
    assert spac.config.grid == (32, 32)
    assert spac.card["training"]["labels"] == "real"
    assert spac.card["training"]["data"]["kind"] == "files"


def test_train_grid_not_divisible_is_a_clear_error(assets, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "registration", "--images", assets["d4"] / "images",
                           "--grid", "30", "30", *TRAIN_SMALL, "--epochs", "1", "--out", out)
    _assert_one_error_line(code, err, ["grid", "divisible", "30"])
    assert not out.exists()


@pytest.mark.parametrize("args, words", [
    (["--known-pairs", "0.5"], ["--known-pairs needs --synthseg"]),
    (["--field-level", "4"], ["field_level", "--field-level"]),
])
def test_train_bad_options_are_clear_errors(assets, tmp_path, capsys, args, words):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "registration", "--images", assets["d4"] / "images",
                           "--grid", "32", "32", *TRAIN_SMALL, *args, "--epochs", "1", "--out", out)
    _assert_one_error_line(code, err, words)
    assert not out.exists()


@pytest.mark.parametrize("args, words", [
    (["--known-pairs", "1.5"], ["--known-pairs", "1.5", "from 0 to 1"]),
    (["--known-pairs", "0.5", "--known-field-scale", "0"], ["--known-field-scale", "positive"]),
    (["--supersample", "0"], ["--supersample", ">= 1"]),
])
def test_train_synthseg_bad_options_are_clear_errors_before_any_loading(tmp_path, capsys, args, words):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "registration", "--synthseg", tmp_path, *args, "--epochs", "1",
                           "--out", out)
    _assert_one_error_line(code, err, words)
    assert not out.exists()


def test_train_folder_without_images_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "registration", "--images", empty, "--grid", "32", "32",
                           *TRAIN_SMALL, "--epochs", "1", "--out", out)
    _assert_one_error_line(code, err, ["no image files", str(empty)])
    assert not out.exists()


# ---- subprocesses: entry point and torchrun ----------------------------------------------
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_python_m_steprl_help():
    proc = subprocess.run([sys.executable, "-m", "steprl", "--help"], capture_output=True, text=True, timeout=120,
                          env=_env())
    assert proc.returncode == 0, proc.stderr
    for command in ("register", "train", "evaluate", "info", "demo"):
        assert command in proc.stdout


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_train_ddp_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "steprl", "train", "registration", "--synthetic", "32", "32", *TRAIN_SMALL,
           "--epochs", "1", "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    spac = load_spac(out / "model_best.safetensors")
    assert spac.config.ndim == 2
    assert (out / "checkpoints" / "last.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["fit"]["world_size"] == 2
    assert len((out / "history.jsonl").read_text().splitlines()) == 1


def test_3d_register_without_model_names_the_way_out_when_none_is_bundled(assets, tmp_path, capsys, monkeypatch):
    """An installation without a bundled 3D model (e.g. a slimmed package) refuses with the way out."""
    import steprl.modelfile

    monkeypatch.setattr(steprl.modelfile, "BUNDLED_DIR", tmp_path / "no_models")
    code, _, err = run_cli(capsys, "register", assets["fixed3d"], assets["moving3d"], "--out", tmp_path / "o")
    assert code == 2 and "No 3D registration model is bundled" in err and "--model" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, expected", [("--no-bf16", "fp32"), ("--bf16", "bf16"), (None, None)])
def test_register_precision_flag_is_applied_and_recorded(assets, tmp_path, capsys, flag, expected):
    from steprl.device import default_inference_bf16

    out = tmp_path / "o"
    extra = [flag] if flag else []
    code, _, err = run_cli(capsys, "register", assets["fixed2d"], assets["moving2d"], "--model", assets["model2d"],
                           "--out", out, "--quiet", "--steps", "2", "--no-step-fields", *extra)
    assert code == 0, err
    if expected is None:  # the device's default policy
        expected = "bf16" if default_inference_bf16("cpu") else "fp32"
    assert json.loads((out / "metrics.json").read_text())["precision"] == expected
