"""Render check: real Slicer slice views (trame-slicer, offscreen) show the segmentation of each step.

A segmentation result is browsed at steps 1, middle and last. For each, "Keep this step" makes the
segmentation node, which Slicer's segmentations displayable manager draws over the input in an axial
slice view (rendered offscreen, saved as PNG); the step labelmap with the action-change colours
(the proxy in the label layer) is rendered too. The test asserts that the overlay is drawn where
the step's mask is (and nowhere else), that it differs between steps as the masks do, and that the
change overlay shows the step's flips.
"""

from __future__ import annotations

import numpy as np
import pytest
from module_support import grab, require_slicer_core
from test_pixelrl_worker import save_tiny_segmenter
from test_spac_module_render import offscreen_env  # noqa: F401 - the shared offscreen-OpenGL fixture

slicer = require_slicer_core()
pytest.importorskip("trame_slicer", reason="trame-slicer is not installed (pip install -e 'trainer[test]')")

STEPS = 4
SIZE = 160
SHAPE = (9, 40, 36)  # (D, H, W): axial slices along D (identity direction)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_slice_view_shows_the_segmentation_of_each_step(offscreen_env, tmp_path, monkeypatch):  # noqa: F811
    for key, value in offscreen_env.items():
        monkeypatch.setenv(key, value)
    from PIL import Image as PILImage
    from PixelRLSegmentLib import steps as steps_module
    from PixelRLSegmentLib.logic import SegmentationLogic, SegmentationRequest
    from steprl.geometry import Geometry, Image
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
    from trame_slicer.views.render_scheduler import NoScheduleRendering

    from StepRLCommon.mrmlio import volume_from_image, voxel_array
    from StepRLCommon.workerlogic import RunState

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    view = app.view_manager.create_view(ViewLayoutDefinition.axial_view())
    view.set_scheduled_render(NoScheduleRendering())
    view.render_window().SetSize(SIZE, SIZE)

    def shot() -> np.ndarray:
        return grab(view).astype(np.int16)

    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    array = (np.exp(-(x**2 + y**2) * 2.5) * 100 + np.random.default_rng(2).normal(0, 4, SHAPE)).astype(np.float32)
    volume = volume_from_image(app.scene, Image(array, Geometry(SHAPE, (1.1, 0.9, 2.0), (0.0, 0.0, 0.0), np.eye(3))),
                               "input")
    volume.CreateDefaultDisplayNodes()
    model = save_tiny_segmenter(tmp_path)
    logic = SegmentationLogic(app.scene, temp_root=tmp_path / "temp")
    run = logic.wait(logic.start(SegmentationRequest(volume, str(model), steps=STEPS, device="cpu")), timeout=300)
    assert run.state is RunState.DONE, run.error

    composite = view._logic.GetSliceCompositeNode()
    view.set_background_volume_id(volume.GetID())
    view.fit_view_to_content()
    run.segmentation.GetDisplayNode().SetVisibility(False)  # the finished run's output: shown by default
    plain = shot()
    PILImage.fromarray(plain.astype(np.uint8)).save(tmp_path / "input.png")
    assert (np.abs(plain - plain.mean(axis=-1, keepdims=True)).max(axis=-1) <= 1).all()  # grey: no overlay yet
    # The axial slice shown (identity direction, origin 0: RAS z = k * spacing).
    k = int(round(view.get_slice_value() / 2.0))
    assert 0 <= k < SHAPE[0]

    shown = (1, STEPS // 2, STEPS)
    overlay, masks = {}, {}
    for step in shown:
        segmentation, _ = logic.keep_step(run, step)
        picture = shot()
        PILImage.fromarray(picture.astype(np.uint8)).save(tmp_path / f"segmentation_step_{step}.png")
        segmentation.GetDisplayNode().SetVisibility(False)
        # The segment's colour (default: amber) over the grey input: where the picture changed.
        overlay[step] = np.abs(picture - plain).max(axis=-1) > 20
        item = run.nodes.sequence.GetNthDataNode(run.nodes.item_of(step))
        masks[step] = steps_module.decode(voxel_array(item))[k]
    assert all((tmp_path / f"segmentation_step_{s}.png").is_file() for s in shown)
    for step in shown:
        assert masks[step].any() == overlay[step].any(), step  # the overlay is present where the mask is
        if masks[step].any():  # and covers about as much of the picture as the mask of the slice
            assert overlay[step].sum() / masks[step].sum() == pytest.approx(
                overlay[shown[-1]].sum() / max(masks[shown[-1]].sum(), 1), rel=0.35)
    assert any(overlay[s].any() for s in shown), "the untrained model segmented nothing on the slice shown"
    for a, b in ((shown[0], shown[1]), (shown[1], shown[2])):
        if not np.array_equal(masks[a], masks[b]):
            assert not np.array_equal(overlay[a], overlay[b]), (a, b)  # the picture follows the steps

    # The step labelmap in the label layer with the action-change colours: red where a step turned
    # voxels background, green where it turned them object.
    composite.SetLabelVolumeID(run.nodes.proxy.GetID())
    composite.SetLabelOpacity(1.0)
    logic.show_changes(run, True)
    changes = {}
    for step in shown:
        logic.select_step(run, step)
        picture = shot()
        PILImage.fromarray(picture.astype(np.uint8)).save(tmp_path / f"changes_step_{step}.png")
        changes[step] = picture
    for step in shown:
        values = voxel_array(run.nodes.sequence.GetNthDataNode(run.nodes.item_of(step)))[k]
        red = (changes[step][..., 0] > 180) & (changes[step][..., 1] < 100) & (changes[step][..., 2] < 100)
        assert red.any() == bool((values == steps_module.TURNED_OFF).any()), step
    assert not np.array_equal(changes[shown[0]], plain)  # the label layer is drawn
