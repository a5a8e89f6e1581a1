"""Render check: real Slicer slice views (trame-slicer, offscreen) follow the registration steps.

A registration result is browsed at steps 0, middle and last; the axial slice view of the moving
volume (under the browser's proxy transform, resliced on the fly by Slicer's slice logic) is
rendered offscreen and saved as PNG. The test asserts that the view at step 0 is the untransformed
volume, that the view changes as the steps accumulate, and that each view shows what "Keep this
step" resamples for that step (and not what another step gives).

Set ``STEPRL_UPDATE_SCREENSHOTS=1`` to also refresh the README picture
``Resources/Screenshots/SPACRegistration_steps.png`` from this run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from module_support import REPO_ROOT, grab, oblique_pair, require_slicer_core, save_tiny_model

slicer = require_slicer_core()
pytest.importorskip("trame_slicer", reason="trame-slicer is not installed (pip install -e 'trainer[test]')")

STEPS = 4
SIZE = 192
SCREENSHOT = REPO_ROOT / "Resources" / "Screenshots" / "SPACRegistration_steps.png"

_PROBE = """
from trame_slicer.core import SlicerApp
from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
app = SlicerApp()
app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
view = app.view_manager.create_view(ViewLayoutDefinition.axial_view())
view.render_window().SetSize(16, 16)
view.render()
print(view.render_window().GetClassName())
"""


@pytest.fixture(scope="module")
def offscreen_env():
    """An environment in which VTK renders offscreen (EGL, else OSMesa); skips with the reason otherwise.

    Probed in a child process: a missing OpenGL driver can abort the process that tries it.
    """
    reasons = []
    candidates = ([None] if os.environ.get("DISPLAY") else []) + ["vtkEGLRenderWindow", "vtkOSOpenGLRenderWindow"]
    for window in candidates:
        env = dict(os.environ)
        if window:
            env["VTK_DEFAULT_OPENGL_WINDOW"] = window
        proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=120)
        if proc.returncode == 0:
            return {"VTK_DEFAULT_OPENGL_WINDOW": window} if window else {}
        reasons.append(f"{window or 'X11'}: exit {proc.returncode} {proc.stderr.strip().splitlines()[-1:]}")
    pytest.skip("no offscreen OpenGL (EGL or OSMesa) for VTK here: " + "; ".join(reasons))


def _set_window_level(volume, low: float, high: float) -> None:
    if volume.GetDisplayNode() is None:
        volume.CreateDefaultDisplayNodes()
    display = volume.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(high - low, (high + low) / 2)


def test_slice_view_follows_the_steps(offscreen_env, tmp_path, monkeypatch):
    for key, value in offscreen_env.items():
        monkeypatch.setenv(key, value)
    from PIL import Image as PILImage
    from SPACRegistrationLib.logic import RegistrationLogic, RegistrationRequest, RunState
    from steprl.geometry import Image
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
    from trame_slicer.views.render_scheduler import NoScheduleRendering

    from StepRLCommon.mrmlio import volume_from_image

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    view = app.view_manager.create_view(ViewLayoutDefinition.axial_view())
    view.set_scheduled_render(NoScheduleRendering())  # render only when asked, as Slicer's views coalesce
    view.render_window().SetSize(SIZE, SIZE)

    def shot() -> np.ndarray:
        return grab(view)

    fixed_image, moving_image = oblique_pair(scale=1.5)
    fixed = volume_from_image(app.scene, fixed_image, "fixed")
    moving = volume_from_image(app.scene, moving_image, "moving")
    footprint = volume_from_image(app.scene, Image(np.ones_like(fixed_image.array), fixed_image.geometry), "footprint")
    low, high = float(moving_image.array.min()), float(moving_image.array.max())
    for volume in (fixed, moving):
        _set_window_level(volume, low, high)
    _set_window_level(footprint, 0.0, 1.0)

    model = save_tiny_model(tmp_path / "model", steps=STEPS)
    logic = RegistrationLogic(app.scene, temp_root=tmp_path / "temp")
    run = logic.wait(logic.start(RegistrationRequest(fixed, moving, str(model), steps=STEPS, device="cpu")),
                     timeout=300)
    assert run.state is RunState.DONE, run.error

    view.set_background_volume_id(fixed.GetID())
    view.fit_view_to_content()  # the same field of view for every picture
    fixed_view = shot()
    view.set_background_volume_id(footprint.GetID())
    inside = shot()[..., 0] > 250  # where the fixed grid (hence a kept, resampled step) is defined
    assert 0.2 < inside.mean() < 0.95

    shown = (0, STEPS // 2, STEPS)
    live = {}
    view.set_background_volume_id(moving.GetID())
    for step in shown:
        logic.select_step(run, step)
        live[step] = shot()
        PILImage.fromarray(live[step]).save(tmp_path / f"step_{step}.png")
    kept = {}
    for step in shown:
        _, warped = logic.keep_step(run, step, resample=True)
        _set_window_level(warped, low, high)
        view.set_background_volume_id(warped.GetID())
        kept[step] = shot()
    moving.SetAndObserveTransformNodeID(None)
    view.set_background_volume_id(moving.GetID())
    untransformed = shot()

    assert all((tmp_path / f"step_{s}.png").is_file() for s in shown)
    assert np.array_equal(live[0], untransformed)  # step 0 is the identity
    change = [np.abs(live[s].astype(float) - live[0]).mean() for s in shown]
    assert change[0] == 0 and change[1] > 5 and change[2] > change[1]  # the view moves as the warp grows

    def corr(a, b) -> float:
        return float(np.corrcoef(a[..., 0][inside].astype(float), b[..., 0][inside].astype(float))[0, 1])

    for step in shown:
        same = corr(live[step], kept[step])
        others = [corr(live[step], kept[o]) for o in shown if o != step]
        assert same > 0.6, (step, same)
        assert same > max(others) + 0.3, (step, same, others)

    tiles = [fixed_view] + [live[s] for s in shown]
    composite = _label(tiles, ["fixed"] + [f"moving, step {s}" for s in shown])
    composite.save(tmp_path / "composite.png")
    if os.environ.get("STEPRL_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        composite.save(SCREENSHOT, optimize=True)


def _label(tiles: list[np.ndarray], captions: list[str]):
    """Tiles side by side, each with a caption strip under it (a picture for the README)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    strip = 18
    height, width = tiles[0].shape[:2]
    canvas = PILImage.new("RGB", (width * len(tiles) + 4 * (len(tiles) - 1), height + strip), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    for i, (tile, caption) in enumerate(zip(tiles, captions)):
        x = i * (width + 4)
        canvas.paste(PILImage.fromarray(tile), (x, 0))
        draw.text((x + 6, height + 3), caption, fill=(230, 230, 230))
    return canvas


def test_readme_picture_is_small_and_present():
    path = Path(SCREENSHOT)
    assert path.is_file(), f"{path} is missing: run this test file with STEPRL_UPDATE_SCREENSHOTS=1"
    assert path.stat().st_size < 200_000
    from PIL import Image as PILImage

    with PILImage.open(path) as picture:
        assert picture.width > picture.height > 100
