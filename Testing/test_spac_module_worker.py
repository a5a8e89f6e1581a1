"""The worker protocol (``steprl worker``) and the process runner the Slicer logic uses.

The worker is run in-process through ``run_job`` (fast) with an emitter that checks, at the moment
each event is emitted, that the files it names are already complete; the subprocess path is
covered by test_spac_module_logic.py and by the CLI tests below.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from module_support import (
    Recorder,
    assert_bad_job,
    events_when_task_raises,
    group_alive,
    needs_proc,
    oblique_pair,
    save_tiny_model,
    wait_group_gone,
)
from steprl import io
from steprl.worker import read_job, run_job

STEPS = 2


@pytest.fixture(scope="module")
def job_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("worker_job")
    save_tiny_model(folder, ndim=3, steps=STEPS, name="tiny3d")
    save_tiny_model(folder, ndim=2, steps=STEPS, name="tiny2d")
    fixed, moving = oblique_pair()
    io.write_image(fixed, folder / "fixed.nrrd")
    io.write_image(moving, folder / "moving.nrrd")
    labels = (fixed.array > np.percentile(fixed.array, 70)).astype(np.uint8)
    io.write_image(type(fixed)(labels, fixed.geometry), folder / "fixed_labels.nrrd")
    labels = (moving.array > np.percentile(moving.array, 70)).astype(np.uint8)
    io.write_image(type(moving)(labels, moving.geometry), folder / "moving_labels.nrrd")
    return folder


def write_job(folder: Path, name: str = "job.json", **changes) -> Path:
    job = {"version": 1, "task": "register", "fixed": "fixed.nrrd", "moving": "moving.nrrd",
           "model": "tiny3d.safetensors", "steps": STEPS, "device": "cpu", "prealign": False, "output": f"out_{name}"}
    job.update(changes)
    path = folder / name
    path.write_text(json.dumps(job), encoding="utf-8")
    return path




def test_register_job_streams_steps_with_complete_fields(job_folder):
    from StepRLCommon.protocol import DoneEvent, StartedEvent, StepEvent, parse_line

    record = Recorder()
    code = run_job(write_job(job_folder, fixed_labels="fixed_labels.nrrd", moving_labels="moving_labels.nrrd"), record)
    assert code == 0
    kinds = [e["event"] for e in record.events]
    assert kinds[-1] == "done" and kinds.count("started") == 1 and "error" not in kinds
    steps = [e for e in record.events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(STEPS + 1)) and all(e["total"] == STEPS for e in steps)
    assert record.complete_at_emit == [True] * (STEPS + 1)  # written (atomically) BEFORE the event
    assert kinds.index("started") < kinds.index("step")
    assert all("dice" in e["metrics"] and "ncc" in e["metrics"] for e in steps)
    assert steps[0]["eta_seconds"] is None and steps[-1]["eta_seconds"] == pytest.approx(0.0)

    # Each field is an ITK displacement field on the network grid covering the fixed image (LPS).
    fixed = io.read_image(job_folder / "fixed.nrrd")
    for event in steps:
        image = sitk.ReadImage(event["field"])
        assert image.GetNumberOfComponentsPerPixel() == 3 and image.GetSize() == (16, 16, 16)
        assert image.GetPixelIDValue() == sitk.sitkVectorFloat32
        assert np.allclose(np.asarray(image.GetDirection()).reshape(3, 3), fixed.geometry.direction, atol=1e-6)
        assert np.allclose(image.GetOrigin(), fixed.geometry.origin, atol=1e-4)
        field = sitk.GetArrayFromImage(image)
        assert (np.abs(field).max() == 0.0) == (event["step"] == 0)

    # The Slicer side reads every line back as a typed event.
    parsed = [parse_line(json.dumps(e)) for e in record.events]
    assert isinstance(parsed[-1], DoneEvent) and any(isinstance(p, StartedEvent) for p in parsed)
    assert [p.step for p in parsed if isinstance(p, StepEvent)] == list(range(STEPS + 1))
    assert parse_line("some library chatter") is None and parse_line('{"event": "nonsense"}') is None


def test_register_job_with_refinement_streams_its_steps_after_the_policy(job_folder):
    """The refinement steps come after the policy's, each with its kind, and count in the total."""
    record = Recorder()
    assert run_job(write_job(job_folder, name="refine.json", refine=3), record) == 0
    started = next(e for e in record.events if e["event"] == "started")
    assert (started["steps"], started["policy_steps"], started["refine_steps"]) == (STEPS + 3, STEPS, 3)
    steps = [e for e in record.events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(STEPS + 3 + 1)) and all(e["total"] == STEPS + 3 for e in steps)
    assert [e["kind"] for e in steps] == ["input"] + ["policy"] * STEPS + ["refine"] * 3
    assert record.complete_at_emit == [True] * (STEPS + 3 + 1)
    refined = sitk.ReadImage(steps[-1]["field"])
    assert refined.GetSize() == (31, 31, 31)  # the refinement grid: twice the 16^3 network grid, same box


def test_register_job_with_the_bundled_3d_model_and_its_default_refinement(job_folder):
    """What the Slicer module sends by default: the bundled spac3d_brain, steps and refinement from its card."""
    from steprl.registration.model import load_spac

    card = load_spac("spac3d_brain")
    record = Recorder()
    job = write_job(job_folder, name="bundled.json", model="spac3d_brain", steps=None,
                    fixed_labels="fixed_labels.nrrd", moving_labels="moving_labels.nrrd")
    assert run_job(job, record) == 0
    started = next(e for e in record.events if e["event"] == "started")
    assert (started["policy_steps"], started["refine_steps"]) == (card.default_steps, card.default_refine_steps)
    steps = [e for e in record.events if e["event"] == "step"]
    assert len(steps) == card.default_steps + card.default_refine_steps + 1
    assert record.complete_at_emit == [True] * len(steps)
    assert sitk.ReadImage(steps[card.default_steps]["field"]).GetSize() == (64, 64, 64)  # the policy's grid
    policy = steps[1:card.default_steps + 1]
    assert all(e["kind"] == "policy" and e["metrics"]["folding_percent"] < 0.5 for e in policy)
    assert policy[-1]["metrics"]["ncc"] > steps[0]["metrics"]["ncc"] + 0.1  # the policy registers


@pytest.mark.parametrize(("changes", "code", "words"), [
    ({"refine": -2}, 2, ["'refine' must be"]),
    ({"model": "missing.safetensors"}, 3, ["not found"]),
    ({"model": "tiny2d.safetensors"}, 2, ["3D", "2D"]),
    ({"fixed_labels": "fixed_labels.nrrd"}, 2, ["Only one label map"]),
    ({"steps": -1}, 2, ["'steps' must be"]),
    ({"fixed": None}, 2, ["lacks 'fixed'"]),
    ({"task": "dance"}, 2, ["no known task"]),
    ({"device": "tpu"}, 2, ["Unknown device"]),
])
def test_bad_jobs_end_with_one_error_event(job_folder, changes, code, words):
    assert_bad_job(job_folder, write_job, changes, code, words)


def test_unexpected_exception_is_reported_as_a_bug(job_folder, monkeypatch):
    events = events_when_task_raises(job_folder, write_job, monkeypatch, "run_register")
    assert events == [{"event": "error", "kind": "ZeroDivisionError", "exit_code": 1,
                              "message": "Unexpected error in the registration worker: ZeroDivisionError: oops",
                              "fix": "Please report it with the Slicer log (it holds the worker's traceback)."}]


def test_read_job_resolves_paths_relative_to_the_job(job_folder):
    job = read_job(write_job(job_folder, "rel.json"))
    assert job.fixed == str((job_folder / "fixed.nrrd").resolve())
    assert job.model == str((job_folder / "tiny3d.safetensors").resolve())
    assert Path(job.output).is_absolute()


def test_cli_worker_prints_only_json_lines(job_folder):
    """``python -m steprl worker --devices``: stdout holds nothing but events (logs go to stderr)."""
    proc = subprocess.run([sys.executable, "-m", "steprl", "worker", "--devices", "--debug"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["event"] for e in events] == ["devices", "done"]
    assert {"value": "cpu"}.items() <= events[0]["devices"][0].items()
    bad = subprocess.run([sys.executable, "-m", "steprl", "worker", str(job_folder / "absent.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert json.loads(bad.stdout)["message"].startswith("Job file")


# ---- the process runner ----------------------------------------------------------------------------
CHILD = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a grandchild
for k in range(3):
    print(f'{{"event": "progress", "stage": "s{k}", "message": "m{k}"}}', flush=True)
print("plain text", flush=True)
sys.stderr.write("warning: something\\n"); sys.stderr.flush()
time.sleep(60)
"""


@needs_proc
def test_runner_streams_lines_and_kills_the_whole_tree():
    from StepRLCommon.process import SubprocessRunner
    from StepRLCommon.protocol import ProgressEvent, parse_line

    handle = SubprocessRunner().start([sys.executable, "-c", CHILD])
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while len(lines) < 4:
        lines += handle.read_lines()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert [type(parse_line(line)) for line in lines] == [ProgressEvent] * 3 + [type(None)]
    deadline = time.monotonic() + 10
    while len(group_alive(handle.pid)) < 2:  # the worker and its grandchild
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not handle.finished() and handle.returncode() is None
    handle.kill(grace_seconds=0.2)
    assert wait_group_gone(handle.pid) == []
    assert handle.finished() and handle.returncode() is not None and handle.returncode() < 0
    assert "warning: something" in handle.stderr_tail()


def test_runner_reports_exit_codes_in_words():
    from StepRLCommon.process import SubprocessRunner
    from StepRLCommon.protocol import describe_exit

    handle = SubprocessRunner().start([sys.executable, "-c", "import sys; print('{\"event\": \"done\"}'); sys.exit(3)"])
    deadline = time.monotonic() + 30
    lines: list[str] = []
    while not handle.finished():
        lines += handle.read_lines()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    lines += handle.read_lines()
    assert lines == ['{"event": "done"}'] and handle.returncode() == 3
    assert describe_exit(3) == "exit code 3 (a model file problem)"
    assert describe_exit(-9) == "killed by signal 9"
