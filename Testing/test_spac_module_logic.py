"""SPACRegistration logic on a real vtkMRMLScene (slicer-core, no Qt): start -> poll -> done, geometry
through Slicer's own resampling, cancel, worker crash, bad inputs.

Each run launches the real worker (``python -m steprl worker``) on a tiny random model (16^3 grid)
and small oblique volumes, so the whole chain is exercised: Slicer's NRRD writer, the worker's
inference, its field files, Slicer's transform reader, the sequence and the reslicing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from module_support import (
    MODEL_CASES,
    NoRunner,
    assert_crash_before_any_step,
    assert_refused,
    kill_worker_mid_run,
    leftovers,
    needs_proc,
    oblique_pair,
    physical_points,
    poll_until_done,
    require_slicer_core,
    save_tiny_model,
    set_model_case,
    wait_for_steps,
    wait_group_gone,
)

slicer = require_slicer_core()

from SPACRegistrationLib.logic import RegistrationLogic, RegistrationRequest, RunState  # noqa: E402
from steprl.errors import InputError, ModelFileError  # noqa: E402

from StepRLCommon import workerlogic as logic_module  # noqa: E402
from StepRLCommon.mrmlio import export_volume, volume_from_image  # noqa: E402

STEPS = 3


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("spac_models")
    save_tiny_model(folder, ndim=3, steps=STEPS, name="tiny3d")
    save_tiny_model(folder, ndim=2, steps=STEPS, name="tiny2d")
    return folder


@pytest.fixture()
def scene_and_volumes():
    scene = slicer.vtkMRMLScene()
    fixed_image, moving_image = oblique_pair()
    fixed = volume_from_image(scene, fixed_image, "fixed")
    moving = volume_from_image(scene, moving_image, "moving")
    return scene, fixed, moving, fixed_image, moving_image


def make_logic(scene, tmp_path: Path) -> RegistrationLogic:
    return RegistrationLogic(scene, temp_root=tmp_path / "temp")


def grid_array(transform_node) -> np.ndarray:
    from vtkmodules.util import numpy_support

    grid = transform_node.GetTransformFromParent().GetDisplacementGrid()
    return numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars()).copy()


def inside_moving(points: np.ndarray, geometry, margin: float = 1.0) -> np.ndarray:
    a, b = geometry.physical_to_tensor_index()
    index = points @ a.T + b
    return np.all((index >= margin) & (index <= np.asarray(geometry.shape) - 1 - margin), axis=-1)


# ---- start -> poll -> done, and the geometry ----------------------------------------------------------
def test_run_streams_every_step_and_matches_the_worker_warp(models_dir, scene_and_volumes, tmp_path):
    """The kept step, resampled by Slicer (vtkImageReslice through the MRML transform chain, as the slice
    views do), equals steprl's own warped moving image for inputs of different size, spacing and oblique
    orientation; hardening the transform on a copy of the moving volume agrees too."""
    from steprl import io
    from steprl.registration.inference import register

    scene, fixed, moving, fixed_image, moving_image = scene_and_volumes
    logic = make_logic(scene, tmp_path)
    run = logic.start(RegistrationRequest(fixed, moving, str(models_dir / "tiny3d.safetensors"), steps=STEPS,
                                          device="cpu"))
    seen = poll_until_done(logic, run)
    assert run.error is None
    assert seen == run.steps == list(range(STEPS + 1))
    nodes = run.nodes
    assert nodes.sequence.GetNumberOfDataNodes() == STEPS + 1
    assert [nodes.step_at(i) for i in range(STEPS + 1)] == list(range(STEPS + 1))
    assert nodes.table.GetTable().GetNumberOfRows() == STEPS + 1
    assert moving.GetParentTransformNode().GetID() == nodes.proxy.GetID()
    assert nodes.browser.GetSelectedItemNumber() == STEPS  # followed the newest step
    assert np.abs(grid_array(nodes.sequence.GetNthDataNode(0))).max() == 0.0  # item 0 = identity
    assert np.abs(grid_array(nodes.sequence.GetNthDataNode(STEPS))).max() > 1.0  # mm: the policy moved
    assert leftovers(tmp_path) == []  # temp folder removed
    assert wait_group_gone(run.handle.pid) == [] if os.path.isdir("/proc/self") else True

    # The slider: selecting a step puts exactly that step's grid into the proxy.
    logic.select_step(run, 1)
    assert np.array_equal(grid_array(nodes.proxy), grid_array(nodes.sequence.GetNthDataNode(1)))

    # steprl's own result on the very files Slicer writes (the same bytes the worker read).
    export_volume(fixed, tmp_path / "fixed.nrrd")
    export_volume(moving, tmp_path / "moving.nrrd", ignore_parent=True)
    f_img, m_img = io.read_image(tmp_path / "fixed.nrrd"), io.read_image(tmp_path / "moving.nrrd")
    assert f_img.geometry.matches(fixed_image.geometry, tol=1e-4)
    assert m_img.geometry.matches(moving_image.geometry, tol=1e-4)
    expected = list(register(f_img, m_img, str(models_dir / "tiny3d.safetensors"), STEPS, "cpu"))
    for got, want in zip(run.metrics, expected):
        assert got["ncc"] == pytest.approx(want.metrics["ncc"], abs=1e-6)

    span = float(moving_image.array.max() - moving_image.array.min())
    fixed_pts = physical_points(fixed_image.geometry)
    for k in (0, STEPS // 2 + 1, STEPS):
        transform, warped = logic.keep_step(run, k, resample=True)
        assert transform.GetScene() is scene and warped.GetScene() is scene
        got = slicer.util.arrayFromVolume(warped).astype(np.float64)
        want = expected[k].warped.array.astype(np.float64)
        assert got.shape == want.shape == fixed_image.array.shape
        u = expected[k].field_on_fixed_grid()[0].movedim(0, -1).cpu().numpy()
        mask = inside_moving(fixed_pts + u, moving_image.geometry)
        assert mask.mean() > 0.5
        assert np.abs(got - want)[mask].max() < 1e-3 * span, f"step {k}"
        if k == STEPS:
            assert np.abs(want - expected[0].warped.array)[mask].max() > 0.05 * span  # a real warp

    # Slicer's "Harden transform" on a copy of the moving volume, then an identity resampling onto
    # the fixed grid: the same image up to the second interpolation.
    from SPACRegistrationLib.transforms import resample_volume

    copy = volume_from_image(scene, moving_image, "moving copy")
    copy.SetAndObserveTransformNodeID(transform.GetID())
    assert slicer.vtkSlicerTransformLogic.hardenTransform(copy)
    assert copy.GetParentTransformNode() is None
    hardened = resample_volume(copy, fixed, None, scene, "hardened on fixed grid")
    got = slicer.util.arrayFromVolume(hardened).astype(np.float64)
    want = expected[STEPS].warped.array
    mask = inside_moving(fixed_pts + expected[STEPS].field_on_fixed_grid()[0].movedim(0, -1).cpu().numpy(),
                         moving_image.geometry, margin=3.0)
    assert np.median(np.abs(got - want)[mask]) < 0.02 * span
    assert np.corrcoef(got[mask], want[mask])[0, 1] > 0.99


def test_refinement_steps_follow_the_policy_on_the_slider_and_warp_like_steprl(models_dir, scene_and_volumes,
                                                                               tmp_path):
    """Refinement steps (on a finer grid than the policy's) are further slider items, and the kept
    refined step resamples in Slicer as steprl warps it."""
    from steprl import io
    from steprl.registration.inference import register

    scene, fixed, moving, fixed_image, moving_image = scene_and_volumes
    logic = make_logic(scene, tmp_path)
    model = str(models_dir / "tiny3d.safetensors")
    with pytest.raises(InputError, match="refinement"):
        logic.check(RegistrationRequest(fixed, moving, model, refine=-1))
    run = logic.start(RegistrationRequest(fixed, moving, model, steps=STEPS, device="cpu", refine=2))
    poll_until_done(logic, run)
    assert run.error is None
    total = STEPS + 2
    assert run.steps == list(range(total + 1)) and run.nodes.sequence.GetNumberOfDataNodes() == total + 1
    export_volume(fixed, tmp_path / "fixed.nrrd")
    export_volume(moving, tmp_path / "moving.nrrd", ignore_parent=True)
    expected = list(register(io.read_image(tmp_path / "fixed.nrrd"), io.read_image(tmp_path / "moving.nrrd"), model,
                             STEPS, "cpu", refine_steps=2))
    assert expected[-1].kind == "refine"
    _, warped = logic.keep_step(run, total, resample=True)
    got = slicer.util.arrayFromVolume(warped).astype(np.float64)
    want = expected[-1].warped.array.astype(np.float64)
    u = expected[-1].field_on_fixed_grid()[0].movedim(0, -1).cpu().numpy()
    mask = inside_moving(physical_points(fixed_image.geometry) + u, moving_image.geometry)
    span = float(moving_image.array.max() - moving_image.array.min())
    assert mask.mean() > 0.5 and np.abs(got - want)[mask].max() < 1e-3 * span


def test_label_maps_give_dice_per_step_and_follow_the_steps(models_dir, scene_and_volumes, tmp_path):
    from steprl.geometry import Image

    scene, fixed, moving, fixed_image, moving_image = scene_and_volumes
    labels = []
    for image, name in ((fixed_image, "fixed labels"), (moving_image, "moving labels")):
        mask = (image.array > np.percentile(image.array, 75)).astype(np.int16)
        labels.append(volume_from_image(scene, Image(mask, image.geometry), name, labelmap=True))
    logic = make_logic(scene, tmp_path)
    run = logic.wait(logic.start(RegistrationRequest(fixed, moving, str(models_dir / "tiny3d.safetensors"), steps=1,
                                                     device="cpu", fixed_labels=labels[0], moving_labels=labels[1])),
                     timeout=120)
    assert run.state is RunState.DONE, run.error
    table = run.nodes.table.GetTable()
    columns = [table.GetColumn(i).GetName() for i in range(table.GetNumberOfColumns())]
    assert columns == ["step", "local NCC", "folding %", "Dice", "seconds"]
    dice = [table.GetValueByName(row, "Dice").ToDouble() for row in range(table.GetNumberOfRows())]
    assert len(dice) == 2 and all(0.0 < d <= 1.0 for d in dice)
    assert dice[0] == pytest.approx(run.metrics[0]["dice"])
    assert run.nodes.chart.GetNumberOfPlotSeriesNodes() == 2  # NCC and Dice
    assert labels[1].GetParentTransformNode().GetID() == run.nodes.proxy.GetID()  # labels follow the slider
    assert labels[0].GetParentTransformNode() is None


# ---- cancel and crash ------------------------------------------------------------------------------
@pytest.fixture()
def long_run(models_dir, scene_and_volumes, tmp_path):
    """A run of many steps, with its first two steps received."""
    scene, fixed, moving, *_ = scene_and_volumes
    logic = make_logic(scene, tmp_path)
    run = logic.start(RegistrationRequest(fixed, moving, str(models_dir / "tiny3d.safetensors"), steps=200,
                                          device="cpu"))
    wait_for_steps(logic, run, 2)
    return moving, logic, run


@needs_proc
def test_cancel_mid_run_keeps_the_steps_and_leaves_nothing_behind(long_run, tmp_path):
    moving, logic, run = long_run
    logic.cancel(run)
    assert run.state is RunState.CANCELLED and run.error is None
    assert 2 <= len(run.steps) < 201
    assert wait_group_gone(run.handle.pid) == []  # the whole process group is gone
    assert leftovers(tmp_path) == []  # no temporary files
    nodes = run.nodes
    assert nodes.sequence.GetNumberOfDataNodes() == len(run.steps)
    assert moving.GetParentTransformNode().GetID() == nodes.proxy.GetID()
    # The steps received stay usable. Keep step 1: the tiny untrained test policy drifts by up to
    # 3 voxels a step, so after many steps (a fast machine runs many before the cancel) the
    # moving volume has left the field of view and a late step's warp is legitimately empty.
    last, _ = logic.keep_step(run, run.steps[-1])
    assert grid_array(last).size > 0
    transform, warped = logic.keep_step(run, run.steps[1], resample=True)
    assert grid_array(transform).size > 0 and slicer.util.arrayFromVolume(warped).std() > 0
    assert logic.poll(run) == []  # a finished run ignores further polls


@needs_proc
def test_worker_killed_mid_run_gives_one_clear_error(long_run, tmp_path):
    _, logic, run = long_run
    kill_worker_mid_run(logic, run)
    assert "registration process" in run.error and f"Steps 0 to {run.steps[-1]} are kept" in run.error
    assert run.nodes.sequence.GetNumberOfDataNodes() == len(run.steps)  # only complete steps
    assert leftovers(tmp_path) == []
    assert wait_group_gone(run.handle.pid) == []


def test_worker_crash_before_any_step_creates_no_nodes(models_dir, scene_and_volumes, tmp_path):
    scene, fixed, moving, *_ = scene_and_volumes
    request = RegistrationRequest(fixed, moving, str(models_dir / "tiny3d.safetensors"), steps=STEPS)
    assert_crash_before_any_step(RegistrationLogic, scene, request, tmp_path)
    assert moving.GetParentTransformNode() is None


def test_worker_input_error_is_one_message_and_no_nodes(models_dir, tmp_path):
    from steprl.geometry import Image

    scene = slicer.vtkMRMLScene()
    fixed_image, moving_image = oblique_pair()
    fixed = volume_from_image(scene, fixed_image, "fixed")
    flat = volume_from_image(scene, Image(np.full_like(moving_image.array, 7.0), moving_image.geometry), "flat")
    before = scene.GetNumberOfNodes()
    logic = make_logic(scene, tmp_path)
    run = logic.wait(logic.start(RegistrationRequest(fixed, flat, str(models_dir / "tiny3d.safetensors"),
                                                     steps=STEPS, device="cpu")), timeout=120)
    assert run.state is RunState.FAILED
    assert "same value (7) in every voxel" in run.error and "Check that the right file" in run.error
    assert "unexpectedly" not in run.error
    assert scene.GetNumberOfNodes() == before
    assert leftovers(tmp_path) == []


# ---- checks before anything starts -------------------------------------------------------------------
@pytest.mark.parametrize(("case", "error", "words"), [
    ("no model", ModelFileError, ["No model is chosen"]),
    ("unknown model", ModelFileError, ["'nope' not found", "user models folder"]),
    ("2D model", InputError, ["2D model", "Slicer volumes are 3D", "--synthseg"]),
    ("one label map", InputError, ["Only one label map"]),
    ("same volume", InputError, ["the same volume"]),
    ("foreign transform", InputError, ["under the transform", "Harden"]),
])
def test_bad_requests_are_refused_with_one_message(models_dir, scene_and_volumes, tmp_path, case, error, words):
    scene, fixed, moving, *_ = scene_and_volumes
    model = str(models_dir / "tiny3d.safetensors")
    request = RegistrationRequest(fixed, moving, model, steps=STEPS)
    if case in MODEL_CASES:
        set_model_case(request, case, models_dir)
    elif case == "2D model":
        request.model = str(models_dir / "tiny2d.safetensors")
    elif case == "one label map":
        request.fixed_labels = fixed
    elif case == "same volume":
        request.moving = fixed
    elif case == "foreign transform":
        transform = slicer.vtkMRMLLinearTransformNode()
        scene.AddNode(transform)
        moving.SetAndObserveTransformNodeID(transform.GetID())
    assert_refused(RegistrationLogic, scene, request, tmp_path, error, words)


def test_user_model_by_name_and_default_python(models_dir, scene_and_volumes, tmp_path):
    scene, fixed, moving, *_ = scene_and_volumes
    logic = RegistrationLogic(scene, runner=NoRunner(), temp_root=tmp_path / "temp")
    entry = logic.check(RegistrationRequest(fixed, moving, "tiny3d", user_models_folder=str(models_dir)))
    assert entry.source == "user" and entry.path == models_dir / "tiny3d.safetensors"
    assert logic_module.default_python_command() == [os.sys.executable]  # no slicer.app in slicer-core
    env = logic_module.worker_environment({"PYTHONPATH": "/x"})
    assert env["PYTHONPATH"].endswith(os.pathsep + "/x") and env["PYTHONUNBUFFERED"] == "1"
