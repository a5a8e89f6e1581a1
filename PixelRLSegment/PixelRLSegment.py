"""PixelRLSegment: step-by-step segmentation by PixelDRL-MG pixel agents, with a step slider.

The widget is thin: the panel plumbing both StepRL modules share (parameter node binding, model
list, device labels, Apply/Cancel, polling on a timer, slider and plot) is
``StepRLCommon.widgetbase.StepRLWidget``; this file adds what is segmentation's (its inputs, its
request, the label layer and the action-change overlay, keeping a step as a segmentation).
Everything else happens in ``PixelRLSegmentLib`` and the shared ``StepRLCommon`` (MRML only, no
Qt: they also run headless on slicer-core) and, for the computation, in the ``steprl`` worker
process (torch never enters Slicer's process).
``slicer`` here is the Slicer application's module: nothing outside Slicer imports this file.
"""

import logging

import slicer
from PixelRLSegmentLib.logic import RunState, SegmentationLogic, SegmentationRequest
from slicer.i18n import tr as _

from StepRLCommon import stepresults
from StepRLCommon.widgetbase import StepRLModule, StepRLModuleLogic, StepRLModuleTest, StepRLWidget


class PixelRLSegment(StepRLModule):
    """Module description shown by Slicer (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        StepRLModule.__init__(self, parent, "Segmentations")
        self.parent.title = _("PixelRL Segment")
        self.parent.categories = ["Segmentation"]
        self.parent.helpText = _(
            "Segmentation by pixel-level reinforcement-learning agents (PixelDRL-MG): every pixel of every slice "
            "decides, step by step, whether it stays object. The slider shows the mask after each step, and "
            "'Show the changes' colours what the step shown changed. The last step becomes a segmentation "
            "(and optionally a labelmap); 'Keep this step' makes one of any other step. The computation runs "
            "in a separate process (PyTorch from the PyTorch extension)."
        )
        self.parent.acknowledgementText = _(
            "Part of the StepRL extension. PixelDRL-MG: pixel-level deep reinforcement learning with a "
            "self-attention module for medical image segmentation; PixelRL: Furuta et al., 'PixelRL: Fully "
            "Convolutional Network with Reinforcement Learning for Image Processing', IEEE TMM 2020."
        )


class PixelRLSegmentLogic(StepRLModuleLogic, worker_class=SegmentationLogic):
    """Slicer-side glue around ``PixelRLSegmentLib.logic.SegmentationLogic`` (usable without the GUI)."""

    #: The name ``worker`` had before the modules shared this class (saved scripts use it).
    segmentation = StepRLModuleLogic.worker


class PixelRLSegmentWidget(StepRLWidget, logic_class=PixelRLSegmentLogic):
    """The module panel (see ``StepRLWidget``): segmentation's inputs, label layer, overlay and kept steps."""

    def missingInputText(self, p) -> str:
        return "" if p and p.inputVolume and p.model else _("Choose the input volume and a model.")

    def showInputs(self, p) -> None:
        slicer.util.setSliceViewerLayers(background=p.inputVolume, label=None, fit=True)

    def showNewResult(self, nodes) -> None:
        slicer.util.setSliceViewerLayers(label=nodes.proxy, labelOpacity=0.6)

    def onParameterNodeModified(self, p) -> None:
        """The "Show the changes" toggle switches the step labelmap's colours (when the result is this module's)."""
        if p.sequenceBrowser and stepresults.from_browser(p.sequenceBrowser, self.description.result_kind):
            self.logic.segmentation.show_changes(p.sequenceBrowser, p.showChanges)

    def keepStep(self, p):
        segmentation, _labelmap = self.logic.segmentation.keep_step(p.sequenceBrowser, labelmap=p.createLabelmap)
        return segmentation


class PixelRLSegmentTest(StepRLModuleTest, logic_class=PixelRLSegmentLogic,
                         tests=("test_bad_request_is_one_message", "test_segmentation_streams_steps")):
    """Self-test run by Slicer's ctest and by the Reload & Test button."""

    def test_bad_request_is_one_message(self):
        self.assertRefusedWithoutModel(SegmentationRequest(self._volume(), model=""))

    def test_segmentation_streams_steps(self):
        """A tiny untrained model made by the worker's Python (torch stays out of Slicer's process)."""
        model = self.tinyModel(
            "import sys, torch\n"
            "from steprl.modelfile import save_model\n"
            "from steprl.segmentation.data import SyntheticSliceSource\n"
            "from steprl.segmentation.training import build_learner\n"
            "from steprl.training.distributed import single_process\n"
            "torch.manual_seed(0)\n"
            "source = SyntheticSliceSource((24, 24), seed=0, val_count=2)\n"
            "learner, _ = build_learner('pixeldrl', source, single_process('cpu'), batch=2, iterations_per_epoch=5,\n"
            "                           widths=(4, 8, 16, 32), t_max=3)\n"
            "state, card = learner.export_model()\n"
            "save_model(sys.argv[1] + '/tiny', state, card)\n"
        )
        logic = PixelRLSegmentLogic().segmentation
        volume = self._volume()
        run = logic.wait(logic.start(SegmentationRequest(volume, model, steps=3, device="cpu")), timeout=300)
        self.assertEqual(run.state, RunState.DONE, run.error)
        self.assertEqual(run.nodes.sequence.GetNumberOfDataNodes(), 4)
        self.assertTrue(run.segmentation.IsA("vtkMRMLSegmentationNode"))
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(run.segmentation, labelmap, volume)
        self.assertEqual(slicer.util.arrayFromVolume(labelmap).shape, (12, 32, 28))
        logging.info("PixelRLSegment self-test passed")

    def _volume(self):
        import numpy as np

        z, y, x = np.mgrid[:12, :32, :28].astype(np.float32)
        return self.volume(100 * np.exp(-((x - 14) ** 2 + (y - 16) ** 2) / 40.0) + 5 * np.sin(z), (0.9, 0.9, 2.0),
                           "PixelRL test volume")
