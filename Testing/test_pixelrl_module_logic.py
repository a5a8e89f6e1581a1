"""PixelRLSegment logic on a real vtkMRMLScene (slicer-core, no Qt): the real worker on an oblique,
anisotropic volume; the step sequence (mask + action change per item), the segmentation node exported
through Slicer's segmentations logic against the worker's masks, the overlay toggle, Keep this step,
Dice against a reference segmentation; cancel, crash, bad inputs.

The model is a tiny untrained PixelDRL-MG network (a stand-in for a trained policy: the module's job
is to carry the worker's masks into the scene exactly, whatever they are).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from module_support import (
    MODEL_CASES,
    assert_crash_before_any_step,
    assert_refused,
    kill_worker_mid_run,
    leftovers,
    needs_proc,
    poll_until_done,
    require_slicer_core,
    rotation,
    save_tiny_model,
    set_model_case,
    wait_for_steps,
    wait_group_gone,
)
from test_pixelrl_worker import save_tiny_segmenter

slicer = require_slicer_core()

from PixelRLSegmentLib import steps as steps_module  # noqa: E402
from PixelRLSegmentLib.logic import METHODS, SegmentationLogic, SegmentationRequest  # noqa: E402
from steprl.errors import InputError, ModelFileError  # noqa: E402

from StepRLCommon import hierarchy, models, stepresults  # noqa: E402
from StepRLCommon.mrmlio import export_volume, volume_from_image, voxel_array  # noqa: E402
from StepRLCommon.workerlogic import RunState  # noqa: E402

STEPS = 3
SHAPE = (6, 32, 24)  # (D, H, W)
SEGMENT = {"name": "Tumor", "color": [0.2, 0.4, 1.0],
           "terminology": "Segmentation category and type - 3D Slicer General Anatomy list~SCT^49755003~"
                          "Morphologically Altered Structure~SCT^108369006^Neoplasm~~~"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """Untrained segmenters: ``tinyseg`` (no segment entry), ``tumor`` (a card ``segment``), and a SPAC model."""
    from safetensors.torch import load_file
    from steprl.modelfile import save_model

    folder = tmp_path_factory.mktemp("pixelrl_models")
    path = save_tiny_segmenter(folder)
    card = json.loads(path.with_suffix(".json").read_text())
    card["segment"] = SEGMENT
    save_model(folder / "tumor", load_file(str(path)), card)
    save_tiny_model(folder, ndim=3, steps=2, name="spac3d")
    return folder


def oblique_image():
    """A blob volume with anisotropic spacing and an oblique direction, and its object mask (same grid)."""
    from steprl.geometry import Geometry, Image

    geometry = Geometry(SHAPE, (0.8, 1.3, 2.2), (12.0, -30.0, 7.0), rotation(35, (1.0, -0.5, 2.0)))
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    rng = np.random.default_rng(1)
    array = (np.exp(-(x**2 + y**2) * 3) * 100 + rng.normal(0, 3, SHAPE)).astype(np.float32)
    return Image(array, geometry), Image(((x**2 + y**2) < 0.3).astype(np.uint8), geometry)


def matrix_of(volume) -> np.ndarray:
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    matrix = vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


def exported(segmentation_node, volume, scene) -> np.ndarray:
    """The segmentation's labelmap on the input's grid, exported by Slicer's segmentations logic."""
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(labelmap)
    ids = segmentation_node.GetSegmentation().GetSegmentIDs()
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, ids, labelmap, volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    assert np.allclose(matrix_of(labelmap), matrix_of(volume), atol=1e-6)  # the input's geometry
    return voxel_array(labelmap).copy()


def reference_segmentation(scene, labels, volume):
    """A segmentation node holding ``labels`` (an Image on the volume's grid), as a user would have."""
    labelmap = volume_from_image(scene, labels, "reference labelmap", labelmap=True)
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node)
    scene.RemoveNode(labelmap)
    return node


# ---- a whole run -----------------------------------------------------------------------------------
def test_segmentation_equals_the_worker_masks_with_the_input_geometry(models_dir, tmp_path):
    from steprl import io
    from steprl.segmentation.inference import segment

    scene = slicer.vtkMRMLScene()
    image, labels = oblique_image()
    volume = volume_from_image(scene, image, "head")
    reference = reference_segmentation(scene, labels, volume)
    before = scene.GetNumberOfNodes()
    logic = SegmentationLogic(scene, temp_root=tmp_path / "temp")
    run = logic.start(SegmentationRequest(volume, "tumor", steps=STEPS, device="cpu", reference=reference,
                                          create_labelmap=True, user_models_folder=models_dir))
    seen = poll_until_done(logic, run)
    assert seen == run.steps == list(range(STEPS + 1)) and run.total_steps == STEPS
    assert run.progress is not None and run.progress[0] == run.progress[1]  # slice progress was streamed
    assert leftovers(tmp_path) == []

    # What the worker computed, in-process on the very file Slicer wrote (the same bytes it read).
    export_volume(volume, tmp_path / "image.nrrd")
    read = io.read_image(tmp_path / "image.nrrd")
    assert read.geometry.matches(image.geometry, tol=1e-4)
    expected = list(segment(read, models_dir / "tumor.safetensors", STEPS, "cpu", "axial", 16, labels=labels))

    nodes = run.nodes
    assert nodes.count == STEPS + 1  # steps + 1 items
    table = nodes.table.GetTable()
    columns = [table.GetColumn(i).GetName() for i in range(table.GetNumberOfColumns())]
    assert columns == ["step", "object fraction", "changed voxels", "Dice", "seconds"]
    assert table.GetNumberOfRows() == STEPS + 1
    assert nodes.chart.GetNumberOfPlotSeriesNodes() == 2  # object fraction and Dice
    for k, want in enumerate(expected):
        item = nodes.sequence.GetNthDataNode(nodes.item_of(k))
        values = voxel_array(item)
        assert np.array_equal(values, steps_module.encode(want.mask.array, want.changed.array)), f"step {k}"
        assert np.allclose(matrix_of(item), matrix_of(volume))
        assert run.metrics[k]["dice"] == pytest.approx(want.metrics["dice"], abs=1e-6)  # reference exported exactly
        assert table.GetValueByName(k, "Dice").ToDouble() == pytest.approx(want.metrics["dice"], abs=1e-6)
    assert set(np.unique(voxel_array(nodes.sequence.GetNthDataNode(1)))) <= {0, 1, 2, 3}
    assert int((voxel_array(nodes.sequence.GetNthDataNode(1)) >= 2).sum()) == run.metrics[1]["changed_voxels"]

    # The finished run's segmentation: the last mask, voxel for voxel, named and coloured from the card.
    seg = run.segmentation
    assert seg.IsA("vtkMRMLSegmentationNode") and seg.GetScene() is scene
    assert seg.GetName() == f"head PixelRL step {STEPS}"
    assert np.array_equal(exported(seg, volume, scene) > 0, expected[-1].mask.array.astype(bool))
    assert seg.GetSegmentation().GetNumberOfSegments() == 1
    segment_node = seg.GetSegmentation().GetNthSegment(0)
    assert segment_node.GetName() == "Tumor"
    assert segment_node.GetColor() == pytest.approx(SEGMENT["color"])
    assert segment_node.GetTerminology() == SEGMENT["terminology"]
    assert seg.GetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole()) == volume.GetID()
    assert np.array_equal(voxel_array(run.labelmap) > 0, expected[-1].mask.array.astype(bool))
    assert np.allclose(matrix_of(run.labelmap), matrix_of(volume), atol=1e-6)
    sh = hierarchy.hierarchy(scene)
    assert hierarchy.parent_of(seg) == hierarchy.parent_of(volume) == hierarchy.parent_of(run.labelmap)
    folder = hierarchy.parent_of(nodes.browser)
    assert sh.GetItemName(folder) == "head PixelRL" and sh.GetItemParent(folder) == hierarchy.parent_of(volume)
    assert hierarchy.parent_of(nodes.sequence) == hierarchy.parent_of(nodes.proxy) == folder
    # The reference export left nothing behind: the new nodes are this result's, the outputs, display nodes.
    roles = {scene.GetNthNode(i).GetAttribute(steps_module.KIND.role_attribute)
             for i in range(before, scene.GetNumberOfNodes())}
    assert roles <= {None, "steps", "metrics", "chart", "series", "browser", "proxy", "colors"}
    assert not any("reference" in scene.GetNthNode(i).GetName() and scene.GetNthNode(i).IsA("vtkMRMLVolumeNode")
                   for i in range(scene.GetNumberOfNodes()))

    # The slider and the action-change overlay.
    logic.select_step(run, 1)
    assert np.array_equal(voxel_array(nodes.proxy), voxel_array(nodes.sequence.GetNthDataNode(1)))
    assert not steps_module.changes_shown(nodes)
    logic.show_changes(run, True)
    assert steps_module.changes_shown(nodes)
    changes = nodes.proxy.GetDisplayNode().GetColorNode()
    rgba = [0.0] * 4
    changes.GetColor(steps_module.TURNED_OFF, rgba)
    assert rgba[0] > 0.9 and rgba[1] < 0.3 and rgba[3] == 1.0  # turned background: red
    logic.show_changes(run, False)
    nodes.proxy.GetDisplayNode().GetColorNode().GetColor(steps_module.TURNED_OFF, rgba)
    assert rgba[3] == 0.0  # the plain mask hides what turned background

    # Keep this step, from the run and from the browser alone (as after reloading a scene).
    kept, no_labelmap = logic.keep_step(run, 1)
    assert no_labelmap is None
    assert np.array_equal(exported(kept, volume, scene) > 0, expected[1].mask.array.astype(bool))
    browser_only = stepresults.from_browser(nodes.browser, steps_module.KIND)
    assert browser_only is not None and browser_only.count == STEPS + 1
    again, labelmap = logic.keep_step(nodes.browser, labelmap=True)  # the step shown: 1
    assert again.GetSegmentation().GetNthSegment(0).GetName() == "Tumor"
    assert np.array_equal(voxel_array(labelmap) > 0, expected[1].mask.array.astype(bool))
    assert logic.poll(run) == []  # a finished run ignores further polls


def test_default_segment_and_a_labelmap_reference_on_another_grid(models_dir, tmp_path):
    """No ``segment`` in the card: "Object" in the default colour; a labelmap reference is resampled by the worker."""
    from steprl.geometry import Geometry, Image

    scene = slicer.vtkMRMLScene()
    image, labels = oblique_image()
    volume = volume_from_image(scene, image, "input")
    coarse = Geometry((3, 16, 12), tuple(2 * s for s in image.geometry.spacing), image.geometry.origin,
                      image.geometry.direction)
    reference = volume_from_image(scene, Image(labels.array[::2, ::2, ::2].copy(), coarse), "ref", labelmap=True)
    logic = SegmentationLogic(scene, temp_root=tmp_path / "temp")
    run = logic.wait(logic.start(SegmentationRequest(volume, str(models_dir / "tinyseg.safetensors"), steps=1,
                                                     device="cpu", reference=reference)), timeout=120)
    assert run.state is RunState.DONE, run.error
    assert all(0.0 <= m["dice"] <= 1.0 for m in run.metrics)
    segment = run.segmentation.GetSegmentation().GetNthSegment(0)
    assert segment.GetName() == "Object" and segment.GetColor() == pytest.approx(steps_module.DEFAULT_COLOR)
    assert run.labelmap is None  # not asked for


# ---- cancel and crash ------------------------------------------------------------------------------
@pytest.fixture()
def long_run(models_dir, tmp_path):
    """A run of many steps on a larger volume, with its first step (the all-object start) received."""
    from steprl.geometry import Geometry, Image

    scene = slicer.vtkMRMLScene()
    array = np.random.default_rng(0).normal(100, 20, (40, 48, 40)).astype(np.float32)
    volume = volume_from_image(scene, Image(array, Geometry(array.shape, (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3))), "v")
    logic = SegmentationLogic(scene, temp_root=tmp_path / "temp")
    run = logic.start(SegmentationRequest(volume, str(models_dir / "tinyseg.safetensors"), steps=500, device="cpu",
                                          batch_slices=1))
    wait_for_steps(logic, run, 1)
    return scene, volume, logic, run


@needs_proc
def test_cancel_keeps_the_steps_received_and_leaves_nothing_behind(long_run, tmp_path):
    scene, volume, logic, run = long_run
    assert not run.finished, "the worker finished before the cancel: make the test run longer"
    logic.cancel(run)
    assert run.state is RunState.CANCELLED and run.error is None and run.message == "Cancelled"
    assert run.steps == [0]  # steps 1..n come together at the end: only the start was received
    assert run.nodes.count == len(run.steps) and run.segmentation is None  # no output made for a cancelled run
    assert wait_group_gone(run.handle.pid) == []
    assert leftovers(tmp_path) == []
    kept, _ = logic.keep_step(run, 0)  # the steps received stay usable
    assert exported(kept, volume, scene).all()  # step 0: everything is object
    assert logic.poll(run) == []


@needs_proc
def test_worker_killed_mid_run_gives_one_clear_error(long_run, tmp_path):
    scene, volume, logic, run = long_run
    kill_worker_mid_run(logic, run)
    assert "segmentation process" in run.error and "Steps 0 to 0 are kept" in run.error
    assert run.nodes.count == 1 and run.segmentation is None
    assert leftovers(tmp_path) == []


def test_worker_crash_before_any_step_creates_no_nodes(models_dir, tmp_path):
    scene = slicer.vtkMRMLScene()
    request = SegmentationRequest(volume_from_image(scene, oblique_image()[0], "input"),
                                  str(models_dir / "tinyseg.safetensors"))
    assert assert_crash_before_any_step(SegmentationLogic, scene, request, tmp_path).segmentation is None


# ---- checks before anything starts -------------------------------------------------------------------
@pytest.mark.parametrize(("case", "error", "words"), [
    ("no volume", InputError, ["Choose an input volume"]),
    ("negative steps", InputError, ["steps must be 0 or more"]),
    ("bad axis", InputError, ["Unknown slice axis", "axial"]),
    ("no model", ModelFileError, ["No model is chosen"]),
    ("unknown model", ModelFileError, ["'nope' not found", "tinyseg", "user models folder"]),
    ("registration model", ModelFileError, ["spac model", "segmentation model"]),
    ("scalar reference", InputError, ["neither a segmentation nor a labelmap"]),
    ("empty reference", InputError, ["has no segments"]),
    ("volume of another scene", InputError, ["not in the scene"]),
])
def test_bad_requests_are_refused_with_one_message(models_dir, tmp_path, case, error, words):
    scene = slicer.vtkMRMLScene()
    image, _ = oblique_image()
    volume = volume_from_image(scene, image, "input")
    request = SegmentationRequest(volume, str(models_dir / "tinyseg.safetensors"), steps=STEPS)
    if case == "no volume":
        request.volume = None
    elif case == "negative steps":
        request.steps = -1
    elif case == "bad axis":
        request.axis = "diagonal"
    elif case in MODEL_CASES:
        set_model_case(request, case, models_dir)
    elif case == "registration model":
        request.model = str(models_dir / "spac3d.safetensors")
    elif case == "scalar reference":
        request.reference = volume_from_image(scene, image, "another volume")
    elif case == "empty reference":
        request.reference = slicer.vtkMRMLSegmentationNode()
        scene.AddNode(request.reference)
    elif case == "volume of another scene":
        request.volume = volume_from_image(slicer.vtkMRMLScene(), image, "elsewhere")
    assert_refused(SegmentationLogic, scene, request, tmp_path, error, words)


# ---- progress and models, without a worker ------------------------------------------------------------
class _ScriptedHandle:
    """A ProcessHandle that replays worker lines, one batch per poll."""

    pid = 0

    def __init__(self, batches: list[list[str]]) -> None:
        self.batches = batches

    def read_lines(self) -> list[str]:
        return self.batches.pop(0) if self.batches else []

    def finished(self) -> bool:
        return not self.batches

    def returncode(self) -> int | None:
        return None if self.batches else 0

    def stderr_tail(self) -> str:
        return ""

    def kill(self, grace_seconds: float = 1.0) -> None:
        self.batches = []


class _ScriptedRunner:
    def __init__(self, batches) -> None:
        self.batches = batches

    def start(self, command, env=None, cwd=None):
        return _ScriptedHandle(self.batches)


def test_progress_counts_slices_until_the_steps_arrive(models_dir, tmp_path):
    scene = slicer.vtkMRMLScene()
    volume = volume_from_image(scene, oblique_image()[0], "input")
    lines = [
        ['{"event": "started", "task": "segment", "device": "cpu", "model": "m", "steps": 10, "grid": [24, 24]}'],
        ['{"event": "progress", "stage": "segmenting", "message": "Slices 2 of 8", "done": 2, "total": 8, '
         '"eta_seconds": 6.2}', "a stray library line"],
        ['{"event": "error", "kind": "InputError", "message": "Bad.", "fix": "Do this.", "exit_code": 2}'],
    ]
    logic = SegmentationLogic(scene, runner=_ScriptedRunner(lines), temp_root=tmp_path / "temp")
    run = logic.start(SegmentationRequest(volume, str(models_dir / "tinyseg.safetensors")))
    logic.poll(run)
    assert run.device == "cpu" and run.total_steps == 10 and run.progress_text == "Running on cpu"
    logic.poll(run)
    assert run.progress == (2, 8) and run.fraction == pytest.approx(0.25)
    assert run.progress_text == "Slices 2 of 8, about 6 s left"
    logic.poll(run)
    assert run.state is RunState.FAILED and run.error == "Bad. Do this."  # the worker's own message, once
    assert run.nodes is None and leftovers(tmp_path) == []


def test_models_lists_segmentation_models_only(models_dir, tmp_path):
    entries = models.list_models(models_dir, method=METHODS, bundled_folder=tmp_path / "none")
    assert [e.name for e in entries] == ["tinyseg", "tumor"]
    assert models.index_of(entries, "tumor") == 1 and models.index_of(entries, "absent") == 0
    assert models.index_of([], "tumor") == -1
    text = models.describe_card(entries[1].card)
    assert "PIXELDRL-MG model, 2D" in text and "24 x 24 (per slice)" in text and "segment: Tumor" in text
    assert steps_module.SegmentInfo.from_card({"segment": {"color": [2, 0, 0]}}) == steps_module.SegmentInfo()
