"""The worker's job, checked once and up front (issue 13), and the Slicer side's part in it: the one
job schema both sides use (``steprl.protocol``), the output folder made only after the checks, the
dependencies installed for each model kind, and the "keep the job folder" option.

Jobs run in-process through ``run_job`` on the bundled 2D models and sample images.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
from module_support import Recorder, assert_one_error_event
from steprl.commands import SAMPLE_DIR
from steprl.errors import InputError
from steprl.protocol import RegisterJob, SegmentJob, job_from_dict
from steprl.worker import run_job

FIXED, MOVING = SAMPLE_DIR / "sample_fixed.nrrd", SAMPLE_DIR / "sample_moving.nrrd"


def write_job(folder: Path, name: str, **changes) -> Path:
    job = {"version": 1, "task": "register", "fixed": str(FIXED), "moving": str(MOVING), "model": "spac2d_brain",
           "steps": 1, "device": "cpu", "prealign": False, "output": f"out_{Path(name).stem}"}
    job.update(changes)
    path = folder / name
    path.write_text(json.dumps(job), encoding="utf-8")
    return path


@pytest.mark.parametrize(("changes", "words"), [
    ({"version": "1"}, ["'version'", "whole number", '"1"']),
    ({"fixed": 5}, ["'fixed'", "got 5"]),
    ({"prealign": "yes"}, ["'prealign'", "true or false"]),
    ({"steps": 100000}, ["100000", "at most 1000"]),
    ({"steps": 2.5}, ["whole number"]),
    ({"model": ""}, ["'model'"]),
    ({"task": "segment", "image": str(FIXED), "axis": 7}, ["'axis'"]),
    ({"task": "segment", "image": str(FIXED), "batch_slices": "16"}, ["'batch_slices'"]),
], ids=["version_text", "fixed_number", "prealign_text", "huge_steps", "fractional_steps", "empty_model",
        "axis_number", "batch_slices_text"])
def test_a_malformed_job_is_an_input_error_before_any_work(tmp_path, monkeypatch, changes, words):
    """These were reported as "Unexpected error ... please report it" (or ran) before."""
    import steprl.registration.inference
    import steprl.segmentation.inference

    def refuse(*args, **kwargs):
        raise AssertionError("the job started although it is malformed")

    monkeypatch.setattr(steprl.registration.inference, "register", refuse)
    monkeypatch.setattr(steprl.segmentation.inference, "segment", refuse)
    record = Recorder()
    assert run_job(write_job(tmp_path, "job.json", **changes), record) == 2
    assert_one_error_event(record.events, 2, words)
    assert record.events[0]["kind"] == "InputError"
    assert [e["event"] for e in record.events] == ["error"]  # nothing read, nothing started
    assert not (tmp_path / "out_job").exists()


@pytest.mark.parametrize("kind", ["file", "under_a_file"])
def test_an_unusable_output_folder_is_an_input_error_before_any_work(tmp_path, kind):
    (tmp_path / "taken").write_text("a file")
    output = "taken" if kind == "file" else "taken/sub"
    record = Recorder()
    assert run_job(write_job(tmp_path, "job.json", output=output), record) == 2
    assert_one_error_event(record.events, 2, ["taken"])
    assert [e["event"] for e in record.events] == ["error"]
    assert (tmp_path / "taken").read_text() == "a file"


@pytest.mark.parametrize("changes", [{"moving": "absent.nrrd"}, {"model": "no_such_model"}],
                         ids=["missing_input", "missing_model"])
def test_the_output_folder_is_made_only_after_the_inputs_and_model_passed(tmp_path, changes):
    record = Recorder()
    assert run_job(write_job(tmp_path, "job.json", **changes), record) != 0
    assert record.events[-1]["event"] == "error"
    assert not (tmp_path / "out_job").exists()


def test_a_pair_that_barely_overlaps_is_refused_by_the_worker_too(tmp_path):
    image = sitk.ReadImage(str(FIXED))
    image.SetSpacing((0.001, 0.001))
    sitk.WriteImage(image, str(tmp_path / "tiny.nrrd"))
    record = Recorder()
    assert run_job(write_job(tmp_path, "job.json", fixed="tiny.nrrd"), record) == 2
    assert_one_error_event(record.events, 2, ["barely overlap", "affine pre-alignment"])


def test_the_slicer_side_and_the_worker_share_one_job_schema(tmp_path):
    register = RegisterJob(fixed="fixed.nrrd", moving="moving.nrrd", model="spac3d_brain", output="steps", steps=20,
                           fixed_labels="f.nrrd", moving_labels="m.nrrd", prealign=True)
    segment = SegmentJob(image="image.nrrd", model="pixeldrl_wm", output="steps", axis="coronal", batch_slices=8)
    for job in (register, segment):
        data = json.loads(json.dumps(job.to_dict()))
        assert data["version"] == 1 and data["task"] == job.task
        assert job_from_dict(data) == job  # without a base folder: the paths as written
        resolved = job_from_dict(data, tmp_path)
        assert Path(resolved.output) == (tmp_path / "steps").resolve()
    with pytest.raises(InputError, match="version 2"):
        job_from_dict({**register.to_dict(), "version": 2})


def test_unknown_keys_are_logged_not_silently_dropped(tmp_path, caplog):
    data = {**RegisterJob(fixed="f", moving="m", model="x", output="o").to_dict(), "colour": "blue"}
    with caplog.at_level("WARNING", logger="steprl"):
        job_from_dict(data)
    assert any("colour" in r.getMessage() for r in caplog.records)


# ---- the Slicer side ------------------------------------------------------------------------------------
BLOCKER = """
import importlib.abc, sys
hidden = set(sys.argv[1].split(","))

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: Slicer does not have it)", name=name)
        return None

sys.meta_path.insert(0, Hide())
from steprl.cli import main
sys.exit(main(["worker", sys.argv[2]]))
"""
#: What a stock Slicer lacks among what steprl (and its tests) can import; numpy and SimpleITK ship with it.
NOT_IN_SLICER = ("torch", "safetensors", "monai", "tqdm", "matplotlib", "scipy", "tensorboard", "ants", "itk",
                 "nilearn", "pydicom")


def _import_name(requirement: str) -> str:
    return requirement.split(">=")[0].split("==")[0].strip().lower()


@pytest.fixture(scope="module")
def unet_model(tmp_path_factory) -> Path:
    from test_pixelrl_worker import save_tiny_segmenter

    return save_tiny_segmenter(tmp_path_factory.mktemp("unet"), "tinyunet", method="unet")


def test_the_install_list_covers_every_model_kind(tmp_path, unet_model):
    """The worker runs a model of each kind with only what ``install.requirements_for`` installs
    (everything else that a stock Slicer lacks is hidden from it)."""
    from steprl.segmentation.model import METHODS

    from StepRLCommon import install

    assert set(install.METHOD_REQUIREMENTS) == {"spac", *METHODS}  # every model kind the package has
    labels = tmp_path / "labels.nrrd"
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(FIXED)) > 100, sitk.sitkUInt8), str(labels))
    jobs = {
        "spac": write_job(tmp_path, "spac.json", fixed_labels=str(labels), moving_labels=str(labels)),
        "pixeldrl-mg": write_job(tmp_path, "pixeldrl.json", task="segment", image=str(FIXED), model="pixeldrl_wm",
                                 labels=str(labels)),
        "unet": write_job(tmp_path, "unet.json", task="segment", image=str(FIXED), model=str(unet_model),
                          labels=str(labels)),
    }
    for method, job in jobs.items():
        allowed = {_import_name(r) for r in install.requirements_for(method)}
        hidden = [name for name in NOT_IN_SLICER if name not in allowed]
        proc = subprocess.run([sys.executable, "-c", BLOCKER, ",".join(hidden), str(job)], capture_output=True,
                              text=True, timeout=300)
        events = [json.loads(line) for line in proc.stdout.splitlines()]
        assert proc.returncode == 0 and events[-1]["event"] == "done", (method, events[-1:], proc.stderr[-2000:])
        if method == "pixeldrl-mg":  # its card asks for the border: the last step, counted in every total
            started = next(e for e in events if e["event"] == "started")
            last = [e for e in events if e["event"] == "step"][-1]
            assert last["metrics"]["stage"] == "border" and last["step"] == last["total"] == started["results"]
            assert started["results"] == started["steps"] + 1


def test_keep_job_folder_keeps_the_inputs_job_and_step_files(tmp_path):
    from module_support import require_slicer_core

    slicer = require_slicer_core()
    from PixelRLSegmentLib.logic import SegmentationLogic, SegmentationRequest
    from steprl import io

    from StepRLCommon.mrmlio import volume_from_image

    scene = slicer.vtkMRMLScene()
    image = io.read_image(FIXED)
    volume_3d = type(image)(image.array[None].repeat(2, 0), type(image.geometry)(
        (2, *image.array.shape), (*image.geometry.spacing, 3.0), (*image.geometry.origin, 0.0),
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]]))
    volume = volume_from_image(scene, volume_3d, "input")
    logic = SegmentationLogic(scene, temp_root=tmp_path / "temp")
    run = logic.wait(logic.start(SegmentationRequest(volume, "pixeldrl_wm", steps=1, device="cpu",
                                                     keep_job_folder=True)), timeout=300)
    assert run.error is None, run.error
    kept = sorted(p.relative_to(run.temp_dir).as_posix() for p in run.temp_dir.rglob("*") if p.is_file())
    assert "job.json" in kept and "image.nrrd" in kept
    assert {"steps/mask_step_000.nrrd", "steps/mask_step_001.nrrd"} <= set(kept)
    run = logic.wait(logic.start(SegmentationRequest(volume, "pixeldrl_wm", steps=1, device="cpu")), timeout=300)
    assert run.error is None and not run.temp_dir.exists()  # the default still removes it
