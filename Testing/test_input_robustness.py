"""Inputs tried as a hostile user would (issue 13): truncated or non-finite files, damaged model
files and checkpoints, absurd step counts, pairs that barely overlap, empty label maps. Each is
refused with one clear line (no traceback) or run with a warning, never silently.

Runs use the bundled 2D models on the bundled sample images (well under a second each).
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from cli_support import assert_one_error, forbid_model_loading, run
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from steprl import modelfile
from steprl.commands import SAMPLE_DIR
from steprl.errors import CheckpointError
from steprl.modelfile import BUNDLED_DIR
from steprl.registration.overlap import check_overlap
from steprl.training.checkpoint import load_checkpoint, save_checkpoint

FIXED, MOVING = SAMPLE_DIR / "sample_fixed.nrrd", SAMPLE_DIR / "sample_moving.nrrd"


def strict_json(path) -> dict:
    """The file parsed as strict JSON: a bare NaN or Infinity fails."""
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def sample_as(tmp_path, name: str, *, spacing=None, origin=None, direction=None, array=None):
    """The sample fixed image written as ``name`` (float32), with header or voxels replaced."""
    image = sitk.Cast(sitk.ReadImage(str(FIXED)), sitk.sitkFloat32)
    if array is not None:
        replaced = sitk.GetImageFromArray(array)
        replaced.CopyInformation(image)
        image = replaced
    for value, setter in ((spacing, image.SetSpacing), (origin, image.SetOrigin), (direction, image.SetDirection)):
        if value is not None:
            setter(value)
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


def truncated(path, fraction: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


# ---- files that ITK reads without a word ----------------------------------------------------------
@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.nii"])
def test_a_truncated_nifti_is_refused(tmp_path, capsys, name):
    path = truncated(sample_as(tmp_path, name))
    code, err = run(capsys, "segment", path, "--model", "pixeldrl_wm", "--out", tmp_path / "out", "--quiet")
    assert_one_error(code, err, [name, "truncated"])
    assert not (tmp_path / "out").exists()


def test_a_truncated_jpeg_is_refused(tmp_path, capsys):
    image = sitk.ReadImage(str(FIXED))
    path = tmp_path / "cut.jpg"
    sitk.WriteImage(image, str(path))
    truncated(path, 0.6)
    code, err = run(capsys, "segment", path, "--model", "pixeldrl_wm", "--out", tmp_path / "out", "--quiet")
    assert_one_error(code, err, ["cut.jpg", "truncated"])


def test_nan_voxels_in_a_nifti_label_map_are_refused(tmp_path, capsys):
    labels = np.zeros((257, 221), np.float32)
    labels[100:150, 80:140] = 1
    labels[0, 0] = np.nan
    path = sample_as(tmp_path, "labels.nii.gz", array=labels)
    code, err = run(capsys, "segment", FIXED, "--model", "pixeldrl_wm", "--labels", path, "--out", tmp_path / "out",
                    "--quiet")
    assert_one_error(code, err, ["labels.nii.gz", "NaN"])


# ---- damaged model files and checkpoints ------------------------------------------------------------
def _rewritten_model(tmp_path, name: str, *, card_changes=None, poison: bool = False):
    """A bundled model saved again (a valid card with a matching sha256), changed as asked."""
    state = load_file(str(BUNDLED_DIR / f"{name}.safetensors"))
    card = json.loads((BUNDLED_DIR / f"{name}.json").read_text())
    card.update(card_changes or {})
    if poison:
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key].view(-1)[0] = float("nan")
    return modelfile.save_model(tmp_path / f"{name}_changed", state, card)


def test_model_weights_with_nan_are_refused(tmp_path, capsys):
    model = _rewritten_model(tmp_path, "pixeldrl_wm", poison=True)
    code, err = run(capsys, "segment", FIXED, "--model", model, "--out", tmp_path / "out", "--quiet")
    assert_one_error(code, err, ["NaN", "pixeldrl_wm_changed"], exit_code=3)


def test_a_spac_card_whose_ndim_disagrees_with_its_config_is_refused(tmp_path, capsys):
    model = _rewritten_model(tmp_path, "spac2d_brain", card_changes={"ndim": 3})
    code, err = run(capsys, "register", FIXED, MOVING, "--model", model, "--out", tmp_path / "out", "--quiet")
    assert_one_error(code, err, ["ndim 3", "2D"], exit_code=3)


def test_a_3d_segmentation_card_says_what_is_wrong(tmp_path, capsys):
    """A segmentation card claiming 3D, on a 3D volume: the card is wrong (the networks are 2D),
    not the volume ("given for a 2D image" was the message)."""
    model = _rewritten_model(tmp_path, "pixeldrl_wm", card_changes={"ndim": 3})
    volume = tmp_path / "volume.nrrd"
    sitk.WriteImage(sitk.JoinSeries([sitk.ReadImage(str(FIXED))] * 4), str(volume))
    code, err = run(capsys, "segment", volume, "--model", model, "--out", tmp_path / "out", "--quiet")
    assert_one_error(code, err, ["ndim 3", "slice by slice"], exit_code=3)
    assert "2D image" not in err


def _checkpoint(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    return save_checkpoint(tmp_path / "last.safetensors", {"net": net}, {"opt": opt}, {"epoch": 1}), net, opt


@pytest.mark.parametrize("with_checksum", [True, False], ids=["checksum", "older_checkpoint_without_checksum"])
def test_a_well_formed_checkpoint_with_nan_is_refused_like_a_corrupt_one(tmp_path, with_checksum):
    path, net, opt = _checkpoint(tmp_path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    if not with_checksum:
        meta = json.loads(metadata["steprl"])
        meta.pop("tensor_sha256", None)
        metadata["steprl"] = json.dumps(meta)
    tensors = load_file(str(path))
    tensors["optim.opt.state.0.exp_avg"].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    before = net.weight.detach().clone()
    with pytest.raises(CheckpointError, match="unreadable or corrupt") as info:
        load_checkpoint(path, {"net": net}, {"opt": opt})
    assert "Delete it to start afresh" in info.value.fix
    assert torch.equal(net.weight, before)  # nothing was loaded


# ---- absurd step counts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["segment", "register"])
def test_a_huge_step_count_is_refused_before_any_work(tmp_path, capsys, monkeypatch, command):
    forbid_model_loading(monkeypatch)
    inputs = [FIXED] if command == "segment" else [FIXED, MOVING]
    model = "pixeldrl_wm" if command == "segment" else "spac2d_brain"
    code, err = run(capsys, command, *inputs, "--model", model, "--steps", "100000", "--out", tmp_path / "out",
                    "--quiet")
    assert_one_error(code, err, ["100000", "at most 1000"])


def test_large_per_step_outputs_are_announced(tmp_path, capsys, caplog, monkeypatch):
    import steprl.limits

    monkeypatch.setattr(steprl.limits, "LARGE_OUTPUT_BYTES", 1_000_000)  # 2 fields of the sample: 1.8 MB
    with caplog.at_level(logging.WARNING, logger="steprl"):
        code, err = run(capsys, "register", FIXED, MOVING, "--model", "spac2d_brain", "--steps", "2", "--out",
                        tmp_path / "out", "--quiet")
    assert code == 0, err
    assert any("--no-step-fields" in r.getMessage() for r in caplog.records)


# ---- pairs that barely overlap ------------------------------------------------------------------------------
@pytest.mark.parametrize(("header", "words"), [
    ({"spacing": (0.001, 0.001)}, ["barely overlap"]),  # 0.2 mm of image against 22 cm
    ({"direction": (-1.0, 0.0, 0.0, -1.0)}, ["barely overlap"]),  # turned away: the boxes touch at a corner
], ids=["scale", "oblique"])
def test_a_pair_that_barely_overlaps_is_refused(tmp_path, capsys, header, words):
    fixed = sample_as(tmp_path, "fixed.nrrd", **header)
    code, err = run(capsys, "register", fixed, MOVING, "--out", tmp_path / "out", "--quiet")
    assert_one_error(code, err, [*words, "--prealign"])


def test_a_partly_covered_fixed_image_runs_with_a_warning(tmp_path, capsys, caplog):
    fixed = sample_as(tmp_path, "fixed.nrrd", origin=(150.0, 0.0))
    with caplog.at_level(logging.WARNING, logger="steprl"):
        code, err = run(capsys, "register", fixed, MOVING, "--out", tmp_path / "out", "--quiet", "--steps", "1")
    assert code == 0, err
    assert any("covered" in r.getMessage() for r in caplog.records)


def test_with_prealignment_a_tiny_overlap_is_only_a_warning(caplog):
    from steprl import io

    fixed, moving = io.read_image(FIXED).geometry, io.read_image(MOVING).geometry
    far = type(fixed)(fixed.shape, fixed.spacing, (1000.0, 1000.0), fixed.direction)
    with caplog.at_level(logging.WARNING, logger="steprl"):
        result = check_overlap(far, moving, prealign=True)
    assert result.iou == 0.0 and any("barely overlap" in r.getMessage() for r in caplog.records)


# ---- empty label maps -------------------------------------------------------------------------------------------
def test_empty_label_maps_warn_and_write_null_not_nan(tmp_path, capsys, caplog):
    empty = sample_as(tmp_path, "empty.nii.gz", array=np.zeros((257, 221), np.float32))
    with caplog.at_level(logging.WARNING, logger="steprl"):
        code, err = run(capsys, "register", FIXED, MOVING, "--fixed-labels", empty, "--moving-labels", empty,
                        "--out", tmp_path / "reg", "--quiet", "--steps", "1")
        assert code == 0, err
        code, err = run(capsys, "segment", FIXED, "--model", "pixeldrl_wm", "--labels", empty, "--out",
                        tmp_path / "seg", "--quiet", "--steps", "1")
        assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("no label" in w or "no object" in w for w in warnings) >= 3, warnings
    registration = strict_json(tmp_path / "reg" / "metrics.json")
    assert registration["final"]["hd95"] is None
    segmentation = strict_json(tmp_path / "seg" / "metrics.json")
    assert all(v is None or math.isfinite(v) for v in segmentation["final"].values() if not isinstance(v, int))
