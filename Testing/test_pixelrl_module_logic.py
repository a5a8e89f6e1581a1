"""PixelRLSegment logic skeleton on a real vtkMRMLScene (slicer-core, no Qt): a real worker run on an
oblique volume (labelmap equal to segment()'s mask with the input's geometry), bad inputs, a crash.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from test_pixelrl_worker import oblique_volume, save_tiny_segmenter
from test_spac_module_support import REPO_ROOT, require_slicer_core, save_tiny_model

slicer = require_slicer_core()

if str(REPO_ROOT / "PixelRLSegment") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "PixelRLSegment"))

from PixelRLSegmentLib.logic import SegmentationLogic, SegmentationRequest, parse_line  # noqa: E402
from SPACRegistrationLib.logic import RunState  # noqa: E402
from SPACRegistrationLib.mrmlio import volume_from_image  # noqa: E402
from steprl.errors import InputError, ModelFileError  # noqa: E402

STEPS = 2


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("seg_models")
    save_tiny_segmenter(folder)
    save_tiny_model(folder, ndim=3, steps=2, name="spac3d")
    return folder


def leftovers(tmp_path: Path) -> list[str]:
    root = tmp_path / "temp"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def matrix_of(volume) -> np.ndarray:
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    matrix = vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


def test_segment_a_volume_into_a_labelmap_with_its_geometry(models_dir, tmp_path):
    from steprl.segmentation.inference import segment
    from vtkmodules.util import numpy_support

    scene = slicer.vtkMRMLScene()
    image, _ = oblique_volume()
    volume = volume_from_image(scene, image, "input")
    logic = SegmentationLogic(scene, temp_root=tmp_path / "temp")
    run = logic.start(SegmentationRequest(volume, str(models_dir / "tinyseg.safetensors"), steps=STEPS,
                                          device="cpu"))
    logic.wait(run, timeout=120)
    assert run.state is RunState.DONE, run.error
    assert run.steps == list(range(STEPS + 1)) and run.total_steps == STEPS
    assert all("object_fraction" in m for m in run.metrics)
    labelmap = run.labelmap
    assert labelmap is not None and labelmap.GetScene() is scene and labelmap.IsA("vtkMRMLLabelMapVolumeNode")
    assert np.allclose(matrix_of(labelmap), matrix_of(volume), atol=1e-5)
    data = labelmap.GetImageData()
    array = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(data.GetDimensions()[::-1])
    expected = list(segment(image, models_dir / "tinyseg.safetensors", STEPS, "cpu"))[-1].mask.array
    assert np.array_equal(array, expected)
    assert leftovers(tmp_path) == []  # the temporary folder is gone


def test_bad_inputs_fail_before_anything_is_created(models_dir, tmp_path):
    scene = slicer.vtkMRMLScene()
    image, _ = oblique_volume()
    volume = volume_from_image(scene, image, "input")
    nodes = scene.GetNumberOfNodes()
    logic = SegmentationLogic(scene, temp_root=tmp_path / "temp")
    model = str(models_dir / "tinyseg.safetensors")
    cases = [
        (SegmentationRequest(None, model), InputError, "input volume"),
        (SegmentationRequest(volume, model, steps=-1), InputError, "steps"),
        (SegmentationRequest(volume, ""), ModelFileError, "No model"),
        (SegmentationRequest(volume, "nonexistent_model"), ModelFileError, "not found"),
        (SegmentationRequest(volume, str(models_dir / "spac3d.safetensors")), ModelFileError, "segmentation"),
    ]
    for request, error, words in cases:
        with pytest.raises(error, match=words) as info:
            logic.start(request)
        assert info.value.fix
    assert scene.GetNumberOfNodes() == nodes and leftovers(tmp_path) == []


def test_a_crashing_worker_fails_with_its_last_messages(models_dir, tmp_path):
    scene = slicer.vtkMRMLScene()
    image, _ = oblique_volume()
    volume = volume_from_image(scene, image, "input")
    crash = [sys.executable, "-c", "import sys; sys.stderr.write('boom happened\\n'); sys.exit(1)"]
    logic = SegmentationLogic(scene, temp_root=tmp_path / "temp", python=crash)
    run = logic.wait(logic.start(SegmentationRequest(volume, str(models_dir / "tinyseg.safetensors"))), timeout=60)
    assert run.state is RunState.FAILED and run.labelmap is None
    assert "stopped unexpectedly" in run.error and "boom happened" in run.error
    assert leftovers(tmp_path) == []


def test_parse_line_knows_segment_steps_and_the_shared_events():
    step = parse_line('{"event": "step", "step": 2, "total": 3, "mask": "/m.nrrd", "changed": "/c.nrrd",'
                      ' "metrics": {"dice": 0.5}}')
    assert (step.step, step.total, step.mask, step.changed, step.metrics) == (2, 3, "/m.nrrd", "/c.nrrd",
                                                                              {"dice": 0.5})
    assert type(parse_line('{"event": "done", "steps": 3}')).__name__ == "DoneEvent"
    assert parse_line("chatter") is None and parse_line('{"event": "step", "mask": "/m"}') is None
