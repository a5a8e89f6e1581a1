"""Helpers shared by the module tests (SPACRegistration, PixelRLSegment, the worker); no tests here.

The module's Lib and the shared ``StepRLCommon`` are imported from the source tree (conftest.py
puts their folders on ``sys.path``), as Slicer does with the scripted modules' folder. ``slicer``
is slicer-core's MRML package (no Qt).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
import unittest
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO_ROOT / "SPACRegistration"


def require_slicer_core():
    """Skip (with the reason) when slicer-core's MRML classes are not importable."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install -e 'trainer[test]')")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the importable 'slicer' package is not slicer-core (no vtkMRMLScene)")
    return slicer


#: Stand-ins for the modules only the Slicer application has, enough to import the Qt-side files
#: (the module files and StepRLCommon/widgetbase.py) headless: what runs at import time, and the
#: base classes the module classes subclass. Nothing here draws a widget.
class _ScriptedLoadableModule:
    def __init__(self, parent=None):
        self.parent = parent


class _ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.parent = parent

    def getParameterNode(self):  # noqa: N802 - Slicer's name
        return None


class _ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent


def _qt_side_stubs() -> dict[str, types.ModuleType]:
    qt = types.ModuleType("qt")
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = _ScriptedLoadableModule
    scripted.ScriptedLoadableModuleLogic = _ScriptedLoadableModuleLogic
    scripted.ScriptedLoadableModuleWidget = _ScriptedLoadableModuleWidget
    scripted.ScriptedLoadableModuleTest = unittest.TestCase
    return {"qt": qt, "slicer.i18n": i18n, "slicer.ScriptedLoadableModule": scripted}


def load_module_file(name: str) -> types.ModuleType:
    """Import a module file (``SPACRegistration/SPACRegistration.py``) headless, on slicer-core with
    stand-ins for Qt and Slicer's application modules; its classes are the real ones, so their
    descriptions and class keywords are checked as Slicer checks them at import. The stand-ins are
    removed from ``sys.modules`` afterwards (the returned module keeps using them)."""
    require_slicer_core()
    stubs = _qt_side_stubs()
    shared = "StepRLCommon.widgetbase"
    saved = {key: sys.modules.get(key) for key in [*stubs, shared]}
    sys.modules.update(stubs)
    try:
        sys.modules.pop(shared, None)
        spec = importlib.util.spec_from_file_location(f"{name}_qt_side", REPO_ROOT / name / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    return module


def save_tiny_model(folder: Path, *, ndim: int = 3, steps: int = 3, name: str = "tiny") -> Path:
    """A random SPAC policy on a 16^ndim grid whose steps move a few voxels (a near-zero step tests nothing)."""
    import torch
    from steprl.modelfile import save_model
    from steprl.registration.networks import SPACConfig, SPACPolicy

    torch.manual_seed(0)
    grid = (16,) * ndim
    cfg = SPACConfig(ndim=ndim, grid=grid, channels=(8, 8), plan_dim=4, critic_channels=(4, 4))
    policy = SPACPolicy(cfg)
    with torch.no_grad():
        policy.actor.out.weight.normal_(0.0, 0.05)
        policy.actor.out.bias.copy_(torch.tensor([0.6, -0.5, 0.4][:ndim]))
    card = {"method": "spac", "ndim": ndim, "config": cfg.to_dict(), "inference": {"max_step": 3.0, "steps": steps}}
    folder.mkdir(parents=True, exist_ok=True)
    return save_model(folder / name, policy.state_dict(), card)


def rotation(degrees: float, axis) -> np.ndarray:
    """3x3 rotation matrix about ``axis`` (Rodrigues)."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.radians(degrees)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def physical_points(geometry) -> np.ndarray:
    """LPS positions (mm) of every voxel centre, ``(D, H, W, 3)``."""
    a, b = geometry.tensor_index_to_physical()
    index = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij"), axis=-1)
    return index @ a.T + b


BLOBS = np.array([[-6.0, 8.0, -12.0], [5.0, 14.0, -20.0], [0.0, 6.0, -16.0], [-3.0, 12.0, -8.0]])


def blob_image(points: np.ndarray) -> np.ndarray:
    """A smooth analytic image of physical (LPS) position: Gaussian blobs on a ramp and a soft 3D
    chequer pattern (12 mm period), so that a warp shows in every part of a picture."""
    period = 2 * np.pi / 12.0
    out = 0.02 * points[..., 0] + 0.01 * points[..., 2]
    waves = np.sin(period * points)
    out = out + 0.4 * waves[..., 0] * waves[..., 1] * waves[..., 2]
    for k, centre in enumerate(BLOBS):
        out = out + (1.0 + 0.5 * k) * np.exp(-np.sum((points - centre) ** 2, axis=-1) / (2 * 3.5**2))
    return out.astype(np.float32)


def oblique_pair(scale: float = 1.0):
    """Fixed and moving steprl Images that differ in size, spacing, origin and (oblique, one left-handed)
    orientation, sampling the same analytic image (no motion: any change comes from the policy)."""
    from steprl.geometry import Geometry, Image

    fixed_geom = Geometry((int(14 * scale), int(16 * scale), int(15 * scale)), (1.7, 1.4, 2.0),
                          (-16.0, 0.0, -28.0), rotation(25, (1.0, 2.0, 3.0)))
    centre = fixed_geom.center()
    direction = rotation(-20, (0.3, -1.0, 2.0)) @ np.diag([1.0, 1.0, -1.0])
    shape = (int(22 * scale), int(24 * scale), int(26 * scale))
    spacing = (1.3, 1.45, 1.2)
    half = direction @ (np.asarray(spacing) * (np.asarray(shape[::-1]) - 1) / 2)
    moving_geom = Geometry(shape, spacing, tuple(centre - half), direction)
    fixed = Image(blob_image(physical_points(fixed_geom)), fixed_geom)
    moving = Image(blob_image(physical_points(moving_geom)), moving_geom)
    return fixed, moving


def group_alive(pgid: int) -> list[int]:
    """Pids of live (not zombie) processes in process group ``pgid`` (Linux /proc)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            alive.append(int(entry.name))
    return alive


def wait_group_gone(pgid: int, timeout: float = 5.0) -> list[int]:
    """Live processes of group ``pgid`` once they are gone, or when ``timeout`` passed (a kill is asynchronous)."""
    import time

    deadline = time.monotonic() + timeout
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return group_alive(pgid)


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc to list processes")


def assert_one_error_event(events: list[dict], code: int, words: list[str]) -> None:
    """A failed worker job emitted exactly one ``error`` event, last, with ``code``, a fix, the
    key ``words`` in its text, and no ``step`` event."""
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and events[-1] is errors[0]
    assert errors[0]["exit_code"] == code and errors[0]["fix"]
    text = errors[0]["message"] + " " + errors[0]["fix"]
    for word in words:
        assert word in text
    assert not any(e["event"] == "step" for e in events)


# ---- helpers of the module logic and render tests (both modules) ------------------------------------
def leftovers(tmp_path: Path) -> list[str]:
    """What a logic left in its temporary root ``tmp_path / "temp"`` (nothing, once a run ended)."""
    root = tmp_path / "temp"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def wait_for_steps(logic, run, count: int, timeout: float = 120.0) -> None:
    """Poll ``run`` until ``count`` steps arrived (or it ended); fails after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while len(run.steps) < count and not run.finished:
        logic.poll(run)
        assert time.monotonic() < deadline, "the worker produced no steps in time"
        time.sleep(0.02)


def poll_until_done(logic, run, timeout: float = 120.0) -> list[int]:
    """Poll ``run`` as the panel's timer does until it ends; the steps each poll added, in order.
    Fails after ``timeout`` seconds, or when the run did not end as DONE (with its error)."""
    import time

    from StepRLCommon.workerlogic import RunState

    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while not run.finished:
        seen += logic.poll(run)
        assert time.monotonic() < deadline, "the run did not finish in time"
        time.sleep(0.02)
    assert run.state is RunState.DONE, run.error
    return seen


def kill_worker_mid_run(logic, run) -> None:
    """SIGKILL the worker of a running ``run`` (a crash, e.g. out of memory): the run fails with one message."""
    import signal

    from StepRLCommon.workerlogic import RunState

    os.kill(run.handle.pid, signal.SIGKILL)
    logic.wait(run, timeout=60)
    assert run.state is RunState.FAILED
    assert "process stopped unexpectedly" in run.error and "killed by signal 9" in run.error


#: A worker interpreter that dies at once with a message on stderr, as a broken torch install would.
CRASHING_PYTHON = [sys.executable, "-c", "import sys; sys.stderr.write('boom happened\\n'); sys.exit(1)"]


def assert_crash_before_any_step(logic_class, scene, request, tmp_path: Path):
    """A worker dying before its first step fails the run with its exit and stderr, and creates no node."""
    from StepRLCommon.workerlogic import RunState

    before = scene.GetNumberOfNodes()
    logic = logic_class(scene, temp_root=tmp_path / "temp", python=CRASHING_PYTHON)
    run = logic.wait(logic.start(request), timeout=60)
    assert run.state is RunState.FAILED and run.nodes is None
    assert "stopped unexpectedly (exit code 1" in run.error and "boom happened" in run.error
    assert scene.GetNumberOfNodes() == before
    assert leftovers(tmp_path) == []
    return run


class NoRunner:
    """A ProcessRunner for requests that must be refused before anything starts."""

    def start(self, *args, **kwargs):  # pragma: no cover - must never be reached
        raise AssertionError("the worker must not start for a bad request")


#: The bad-request cases every module's logic shares (its model lookup): see :func:`set_model_case`.
MODEL_CASES = ("no model", "unknown model")


def set_model_case(request, case: str, models_dir: Path) -> None:
    """Make ``request`` a :data:`MODEL_CASES` case: no model chosen, or a name no folder has."""
    if case == "no model":
        request.model = ""
    else:
        request.model, request.user_models_folder = "nope", str(models_dir)


def assert_refused(logic_class, scene, request, tmp_path: Path, error: type, words: list[str]) -> None:
    """``request`` is refused with one ``error`` naming ``words`` and saying what to do; nothing is
    created, started or left in the temporary folder."""
    before = scene.GetNumberOfNodes()
    logic = logic_class(scene, runner=NoRunner(), temp_root=tmp_path / "temp")
    with pytest.raises(error) as info:
        logic.start(request)
    message = str(info.value)
    for word in words:
        assert word in message
    assert info.value.fix
    assert scene.GetNumberOfNodes() == before
    assert leftovers(tmp_path) == []


def grab(view) -> np.ndarray:
    """Render a trame-slicer view once and return its pixels, ``(H, W, 3)`` uint8, top row first."""
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

    view.render()
    grabber = vtkWindowToImageFilter()
    grabber.SetInput(view.render_window())
    grabber.ReadFrontBufferOff()
    grabber.Update()
    image = grabber.GetOutput()
    nx, ny, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(ny, nx, -1)
    return pixels[::-1, :, :3].copy()


class Recorder:
    """A worker emitter that records events and checks, when a step event is emitted, that every
    file it names (``field`` / ``mask`` / ``changed``) is complete: written, no temporary left."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.complete_at_emit: list[bool] = []

    def __call__(self, event: dict) -> None:
        json.dumps(event, allow_nan=False)  # strict JSON, as the real emitter writes it
        if event["event"] == "step":
            paths = [Path(event[key]) for key in ("field", "mask", "changed") if key in event]
            partial = [p for p in paths[0].parent.iterdir() if p.name.startswith(".steprl-tmp-")]
            self.complete_at_emit.append(all(p.is_file() for p in paths) and not partial)
        self.events.append(event)


def assert_bad_job(job_folder: Path, write_job, changes: dict, code: int, words: list[str]) -> None:
    """A job written with ``changes`` ends with exit ``code`` and exactly one error event naming ``words``."""
    from steprl.worker import run_job

    record = Recorder()
    name = "bad_" + "_".join(f"{k}" for k in changes) + ".json"
    assert run_job(write_job(job_folder, name, **changes), record) == code
    assert_one_error_event(record.events, code, words)


def events_when_task_raises(job_folder: Path, write_job, monkeypatch, task_function: str) -> list[dict]:
    """The events of a job whose task function (e.g. ``run_register``) raises an unexpected error."""
    import steprl.worker as worker

    def explode(job, emit):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(worker, task_function, explode)
    record = Recorder()
    assert worker.run_job(write_job(job_folder, "bug.json"), record) == 1
    return record.events
