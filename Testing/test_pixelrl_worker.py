"""The worker's ``segment`` task (the PixelRLSegment module's side of ``steprl worker``).

Run in-process through ``run_job`` with an emitter that checks, when each step event is emitted,
that the mask and changed-voxel files it names are complete; one subprocess run checks that stdout
holds only events. The model is a tiny randomly initialised PixelDRL-MG network saved in the
project's model-file format (safetensors + JSON card).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from module_support import Recorder, assert_bad_job, events_when_task_raises, rotation, save_tiny_model
from steprl import io
from steprl.geometry import Geometry, Image
from steprl.modelfile import save_model
from steprl.segmentation.inference import segment
from steprl.worker import mask_paths, read_job, run_job

STEPS = 3
SHAPE = (5, 20, 18)  # (D, H, W)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_tiny_segmenter(folder: Path, name: str = "tinyseg", method: str = "pixeldrl") -> Path:
    """An untrained (randomly initialised) segmentation model file on a 24 x 24 network grid."""
    from steprl.segmentation.data import SyntheticSliceSource
    from steprl.segmentation.training import build_learner
    from steprl.training.distributed import single_process

    torch.manual_seed(0)
    source = SyntheticSliceSource((24, 24), seed=0, val_count=2)
    extra = {"widths": (4, 8, 16, 32), "t_max": 3} if method == "pixeldrl" else {"unet_channels": (4, 8)}
    learner, _ = build_learner(method, source, single_process("cpu"), batch=2, iterations_per_epoch=5, **extra)
    state, card = learner.export_model()
    return save_model(folder / name, state, card)


def oblique_volume() -> tuple[Image, Image]:
    """A small volume with anisotropic spacing and an oblique direction, and a label map on its grid."""
    geometry = Geometry(SHAPE, (0.9, 1.1, 2.5), (10.0, -20.0, 5.0), rotation(30, (1.0, 0.5, 2.0)))
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    rng = np.random.default_rng(0)
    array = (np.exp(-(x**2 + y**2) * 3) * 100 + rng.normal(0, 3, SHAPE)).astype(np.float32)
    labels = ((x**2 + y**2) < 0.3).astype(np.uint8)
    return Image(array, geometry), Image(labels, geometry)


@pytest.fixture(scope="module")
def job_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("segment_job")
    save_tiny_segmenter(folder)
    save_tiny_model(folder, ndim=3, steps=2, name="spac3d")  # a registration model: the wrong kind
    image, labels = oblique_volume()
    io.write_image(image, folder / "image.nrrd")
    io.write_image(labels, folder / "labels.nrrd")
    return folder


def write_job(folder: Path, name: str = "job.json", **changes) -> Path:
    job = {"version": 1, "task": "segment", "image": "image.nrrd", "labels": None, "model": "tinyseg.safetensors",
           "steps": STEPS, "axis": "axial", "device": "cpu", "batch_slices": 2, "output": f"out_{name}"}
    job.update(changes)
    path = folder / name
    path.write_text(json.dumps(job), encoding="utf-8")
    return path




def test_segment_job_streams_steps_with_complete_masks(job_folder):
    record = Recorder()
    assert run_job(write_job(job_folder, labels="labels.nrrd"), record) == 0
    kinds = [e["event"] for e in record.events]
    assert kinds[-1] == "done" and kinds.count("started") == 1 and "error" not in kinds
    started = record.events[kinds.index("started")]
    assert started["task"] == "segment" and started["method"] == "pixeldrl-mg" and started["steps"] == STEPS
    assert started["shape"] == list(SHAPE) and started["grid"] == [24, 24]
    steps = [e for e in record.events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(STEPS + 1)) and all(e["total"] == STEPS for e in steps)
    assert record.complete_at_emit == [True] * (STEPS + 1)  # written (atomically) BEFORE the event
    assert all("dice" in e["metrics"] and "object_fraction" in e["metrics"] for e in steps)
    slices = [e for e in record.events if e["event"] == "progress" and e["stage"] == "segmenting"]
    assert slices and slices[-1]["done"] == slices[-1]["total"] == SHAPE[0]
    assert kinds.index("started") < kinds.index("step")

    # Every file is a uint8 0/1 map on exactly the input's (oblique, anisotropic) grid, and equals
    # what segment() gives in-process; "changed" is the voxels flipped since the previous step.
    image = io.read_image(job_folder / "image.nrrd")
    labels = io.read_labels(job_folder / "labels.nrrd", image.geometry)
    expected = list(segment(image, job_folder / "tinyseg.safetensors", STEPS, "cpu", "axial", 2, labels=labels))
    previous = None
    for event, reference in zip(steps, expected, strict=True):
        assert Path(event["mask"]) == mask_paths(Path(event["mask"]).parent, event["step"])[0]
        arrays = {}
        for key in ("mask", "changed"):
            sitk_image = sitk.ReadImage(event[key])
            assert sitk_image.GetPixelIDValue() == sitk.sitkUInt8
            read = io.read_image(event[key])
            assert np.allclose(np.asarray(read.geometry.direction), image.geometry.direction, atol=1e-6)
            assert np.allclose(read.geometry.spacing, image.geometry.spacing, atol=1e-6)
            assert np.allclose(read.geometry.origin, image.geometry.origin, atol=1e-4)
            arrays[key] = sitk.GetArrayFromImage(sitk_image)
        assert np.array_equal(arrays["mask"], reference.mask.array)
        assert set(np.unique(arrays["mask"])) <= {0, 1}
        if previous is None:
            assert arrays["mask"].all() and not arrays["changed"].any()  # step 0: all object
        else:
            assert np.array_equal(arrays["changed"].astype(bool), arrays["mask"] != previous)
        assert event["metrics"]["changed_voxels"] == int(arrays["changed"].sum())
        assert event["metrics"]["dice"] == pytest.approx(reference.metrics["dice"])
        previous = arrays["mask"]


def test_unet_model_runs_one_step(job_folder):
    save_tiny_segmenter(job_folder, "tinyunet", method="unet")
    record = Recorder()
    assert run_job(write_job(job_folder, "unet.json", model="tinyunet.safetensors", steps=None), record) == 0
    steps = [e["step"] for e in record.events if e["event"] == "step"]
    assert steps == [0, 1] and record.complete_at_emit == [True, True]


@pytest.mark.parametrize(("changes", "code", "words"), [
    ({"model": "missing.safetensors"}, 3, ["not found"]),
    ({"model": "spac3d.safetensors"}, 3, ["spac"]),
    ({"steps": -1}, 2, ["'steps' must be"]),
    ({"batch_slices": 0}, 2, ["batch_slices"]),
    ({"image": None}, 2, ["lacks 'image'"]),
    ({"image": "absent.nrrd"}, 2, ["absent.nrrd"]),
    ({"axis": "diagonal"}, 2, ["diagonal"]),
])
def test_bad_segment_jobs_end_with_one_error_event(job_folder, changes, code, words):
    assert_bad_job(job_folder, write_job, changes, code, words)


def test_unexpected_exception_names_the_segmentation_worker(job_folder, monkeypatch):
    events = events_when_task_raises(job_folder, write_job, monkeypatch, "run_segment")
    assert [e["event"] for e in events] == ["error"]
    assert events[0]["message"] == "Unexpected error in the segmentation worker: ZeroDivisionError: oops"


def test_read_job_resolves_segment_paths_relative_to_the_job(job_folder):
    job = read_job(write_job(job_folder, "rel.json", labels="labels.nrrd"))
    assert job.image == str((job_folder / "image.nrrd").resolve())
    assert job.labels == str((job_folder / "labels.nrrd").resolve())
    assert job.model == str((job_folder / "tinyseg.safetensors").resolve())
    assert Path(job.output).is_absolute()


def test_cli_segment_job_prints_only_json_lines(job_folder):
    """``python -m steprl worker job.json`` end to end: every stdout line is an event."""
    job = write_job(job_folder, "cli.json", steps=1)
    proc = subprocess.run([sys.executable, "-m", "steprl", "worker", str(job)], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[-1]["event"] == "done"
    assert [e["step"] for e in events if e["event"] == "step"] == [0, 1]
