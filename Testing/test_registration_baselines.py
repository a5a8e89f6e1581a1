"""Tests of the ANTs SyN / Elastix baselines and of ``steprl evaluate registration --baselines``.

The tools are optional (``pip install 'steprl[compare]'``; CI installs only ``trainer[test]``):
the tests that run them skip, with that reason, when ``ants`` / ``itk`` (with elastix) cannot
be imported; the error-path tests run everywhere.

Cases: a blob image on an OBLIQUE, ANISOTROPIC fixed grid, and a moving image that is the same
anatomy deformed by a known smooth field and sampled on ANOTHER grid (other spacing, origin and
direction). The tools must recover the deformation (Dice up), and the physical field they
return must warp the moving image exactly as the tool's own resampler did.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from steprl import spatial
from steprl.cli import main
from steprl.errors import InputError
from steprl.geometry import Geometry, Image
from steprl.metrics import mean_dice
from steprl.registration import baselines
from steprl.synth.toy import blob_image, smooth_random_field

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_SKIP = {
    "syn": pytest.mark.skipif(not baselines.available("syn"),
                              reason="antspyx is not installed (pip install 'steprl[compare]'; CI installs only "
                                     "trainer[test])"),
    "elastix": pytest.mark.skipif(not baselines.available("elastix"),
                                  reason="itk-elastix is not installed (pip install 'steprl[compare]'; CI installs "
                                         "only trainer[test])"),
}
METHODS = [pytest.param(m, marks=_SKIP[m]) for m in baselines.METHODS]


@pytest.fixture(scope="module", autouse=True)
def _one_tool_thread():
    """One ITK thread: small images, a shared machine (ANTs reads this once per process)."""
    baselines.set_tool_threads(1)


def _rotation(ndim: int, degrees: float) -> np.ndarray:
    r = np.eye(ndim)
    a = math.radians(degrees)
    r[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    return r


def _case(ndim: int, n: int, seed: int = 3) -> dict:
    """Fixed blob image on an oblique anisotropic grid; moving = the same anatomy deformed by a
    known smooth field, sampled on another oblique grid (spacing, origin, direction differ)."""
    rng = np.random.default_rng(seed)
    shape = (n,) * ndim
    base, base_labels = blob_image(shape, rng)
    fixed_g = Geometry(shape, (1.3, 0.9, 1.1)[:ndim], (12.0, -7.0, 4.0)[:ndim], _rotation(ndim, 25.0))
    moving_g = Geometry(shape, (1.2, 1.0, 1.15)[:ndim], (10.5, -6.0, 3.0)[:ndim], _rotation(ndim, 33.0))
    voxel = torch.from_numpy(smooth_random_field(shape, 0.12 * n, n / 3, rng))[None]
    field = spatial.voxel_to_physical(voxel, moving_g)  # mm on the moving grid: moving(y) = base(y + u(y))
    image = spatial.resample(torch.from_numpy(base)[None, None], fixed_g, moving_g, field)[0, 0].numpy()
    labels = spatial.resample(torch.from_numpy(base_labels.astype(np.float32))[None, None], fixed_g, moving_g,
                              field, mode="nearest")[0, 0].numpy()
    return {"fixed": Image(base, fixed_g), "moving": Image(image, moving_g),
            "fixed_labels": base_labels.astype(np.int32), "moving_labels": Image(np.rint(labels).astype(np.int32),
                                                                               moving_g)}


def _maps_inside(displacement: Image, moving: Geometry, margin: float = 1.0) -> np.ndarray:
    """Fixed voxels whose moving point ``x + d(x)`` lies ``margin`` voxels inside the moving grid."""
    g = displacement.geometry
    a, b = g.tensor_index_to_physical()
    index = np.stack(np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij"), axis=-1)
    points = index @ a.T + b + displacement.array
    to_index, offset = moving.physical_to_tensor_index()
    moving_index = points @ to_index.T + offset
    return np.all((moving_index >= margin) & (moving_index <= np.asarray(moving.shape) - 1 - margin), axis=-1)


def _identity_dice(case: dict) -> float:
    moving = case["moving_labels"]
    t = torch.from_numpy(moving.array.astype(np.float32))[None, None]
    on_fixed = spatial.resample(t, moving.geometry, case["fixed"].geometry, mode="nearest")[0, 0].numpy()
    return mean_dice(np.rint(on_fixed).astype(np.int32), case["fixed_labels"])


# ---- errors, everywhere ------------------------------------------------------------------------
def test_missing_package_is_an_input_error_saying_how_to_install(monkeypatch):
    monkeypatch.setattr(baselines, "available", lambda method: False)
    case = _case(2, 24)
    for method in baselines.METHODS:
        with pytest.raises(InputError, match=r"pip install 'steprl\[compare\]'"):
            baselines.run_baseline(method, case["fixed"], case["moving"])


def test_unknown_method_and_bad_threads_are_input_errors():
    case = _case(2, 24)
    with pytest.raises(InputError, match="Unknown baseline"):
        baselines.run_baseline("demons", case["fixed"], case["moving"])
    with pytest.raises(InputError, match="threads"):
        baselines.resolve_threads(0)
    assert baselines.resolve_threads(None) >= 1


def test_evaluate_cli_without_the_tools_fails_cleanly(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(baselines, "available", lambda method: False)
    paths = _write_images(tmp_path, n=2)
    code = main(["evaluate", "registration", "--images", *paths["images"], "--model", "spac2d_brain",
                 "--baselines", "syn", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'steprl[compare]'" in err and "Traceback" not in err


# ---- the tools on known deformations ------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ndim,n", [(2, 64), (3, 28)])
def test_tool_recovers_a_known_deformation_and_its_field_reproduces_its_warp(method, ndim, n):
    case = _case(ndim, n)
    result = baselines.run_baseline(method, case["fixed"], case["moving"], moving_labels=case["moving_labels"],
                                    threads=1, quick=True)
    fixed_g = case["fixed"].geometry
    # the outputs live on the fixed grid, in the documented shapes
    assert result.displacement.geometry.matches(fixed_g) and result.displacement.array.shape == (*fixed_g.shape, ndim)
    assert result.warped.geometry.matches(fixed_g) and result.warped_labels.shape == fixed_g.shape
    assert result.seconds > 0 and result.method == method
    # registration helps: Dice of the structures goes up clearly
    before, after = _identity_dice(case), mean_dice(result.warped_labels, case["fixed_labels"])
    assert after > before + 0.08 and after > 0.8, (before, after)
    # the physical field (total, affine included) warps the moving image like the tool did
    ours = baselines.warp_through(case["moving"], result.displacement, padding="zeros")
    theirs = result.warped.array
    inside = _maps_inside(result.displacement, case["moving"].geometry)  # the tools pad differently outside
    assert inside.mean() > 0.5
    err = np.abs(ours - theirs)[inside]
    scale = float(np.ptp(case["moving"].array))
    assert np.percentile(err, 99) < 0.01 * scale and err.mean() < 0.002 * scale, (err.mean(), err.max())
    # and it is not a trivial field: the moving grid differs from the fixed one by several mm
    assert np.abs(result.displacement.array).max() > 2.0


@pytest.mark.parametrize("method", METHODS)
def test_labels_follow_the_returned_field_and_no_files_are_left(method, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # transformix, for one, writes its field into the working folder unless told
    case = _case(2, 48, seed=5)
    result = baselines.run_baseline(method, case["fixed"], case["moving"], moving_labels=case["moving_labels"],
                                    threads=1, quick=True)
    assert list(tmp_path.iterdir()) == []
    again = baselines.warp_through(case["moving_labels"], result.displacement, mode="nearest")
    assert again.dtype == np.int32 and np.array_equal(again, result.warped_labels)
    assert set(np.unique(result.warped_labels)) <= set(np.unique(case["moving_labels"].array))


# ---- evaluate CLI -------------------------------------------------------------------------------
def _write_images(folder, n: int, size: int = 40) -> dict[str, list]:
    """``n`` deformations of one blob image (2D, anisotropic spacing): images and label maps."""
    from steprl.synth.toy import write_registration_dataset

    write_registration_dataset(folder, n, (size, size), seed=7, spacing=(1.2, 0.9), max_displacement=5.0)
    return {kind: sorted(str(p) for p in (folder / kind).iterdir()) for kind in ("images", "labels")}


@pytest.mark.parametrize("method", METHODS)  # one run per tool keeps the skip reasons honest
def test_evaluate_cli_one_row_per_method_and_mean_rows(method, tmp_path, capsys):
    paths = _write_images(tmp_path, n=3)
    report = tmp_path / "eval.json"
    code = main(["evaluate", "registration", "--images", *paths["images"], "--labels",
                 *paths["labels"], "--model", "spac2d_brain", "--baselines", method, "--report-steps", "1",
                 "2", "--threads", "1", "--json", str(report), "--quiet", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(report.read_text())
    methods = ["identity", method, "spac@1", "spac@2"]
    assert [r["method"] for r in data["rows"]] == methods * 3
    assert [m["method"] for m in data["means"]] == methods and all(m["cases"] == 3 for m in data["means"])
    for row in data["rows"]:
        assert 0.0 <= row["dice"] <= 1.0 and math.isfinite(row["hd95"]) and math.isfinite(row["ncc"])
        assert set(row["dice_per_label"]) and all(0.0 <= v <= 1.0 for v in row["dice_per_label"].values())
        assert row["folding_percent"] >= 0.0 and row["seconds"] >= 0.0
    by = {m["method"]: m for m in data["means"]}
    assert by["identity"]["folding_percent"] == 0.0 and by["identity"]["std_log_jacobian"] == 0.0
    assert by[method]["dice"] > by["identity"]["dice"]
    assert by[method]["dice"] == pytest.approx(np.mean([r["dice"] for r in data["rows"] if r["method"] == method]))
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["case", "method", "Dice"]
    assert [line.split()[:2] for line in lines[-4:]] == [["mean", m] for m in methods]


def test_evaluate_cli_report_steps_beyond_steps_is_an_input_error(tmp_path, capsys):
    paths = _write_images(tmp_path, n=2)
    code = main(["evaluate", "registration", "--images", *paths["images"], "--model", "spac2d_brain",
                 "--steps", "2", "--report-steps", "1", "5", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--report-steps" in err
