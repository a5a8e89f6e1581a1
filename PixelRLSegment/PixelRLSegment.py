"""PixelRLSegment: step-by-step segmentation by PixelDRL-MG pixel agents, with a step slider.

The widget is thin: it binds the .ui to the parameter node, turns Apply into Cancel while a run
goes on, and polls the logic on a timer. Everything else happens in ``PixelRLSegmentLib`` and
the shared ``StepRLCommon`` (MRML only, no Qt: they also run headless on slicer-core) and, for
the computation, in the ``steprl`` worker process (torch never enters Slicer's process).
``slicer`` here is the Slicer application's module: nothing outside Slicer imports this file.
"""

import logging

import qt
import slicer
import vtk
from PixelRLSegmentLib.logic import METHODS, RunState, SegmentationLogic, SegmentationRequest
from PixelRLSegmentLib.parameters import DEVICES, PixelRLSegmentParameterNode, user_folder
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from steprl.errors import StepRLError

from StepRLCommon import install, models, stepresults
from StepRLCommon.protocol import device_choice_texts

#: Every ``self.ui.<name>`` this file uses, with its class in Resources/UI/PixelRLSegment.ui
#: (Testing/test_module_static.py checks both ways). The other inputs are bound to the
#: parameter node through their ``SlicerParameterName`` property.
UI_WIDGETS = {
    "modelComboBox": "QComboBox",
    "modelsFolderPathLineEdit": "ctkPathLineEdit",
    "modelCardLabel": "QLabel",
    "deviceComboBox": "QComboBox",
    "applyButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "sequenceSeekWidget": "qMRMLSequenceBrowserSeekWidget",
    "sequencePlayWidget": "qMRMLSequenceBrowserPlayWidget",
    "metricsPlotWidget": "qMRMLPlotWidget",
    "keepStepButton": "QPushButton",
}

POLL_MILLISECONDS = 100


class PixelRLSegment(ScriptedLoadableModule):
    """Module description shown by Slicer (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("PixelRL Segment")
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Sequences", "Segmentations"]
        self.parent.contributors = ["The StepRL developers"]
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


class PixelRLSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: binds widgets to the parameter node and polls the logic; no computation."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.run = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._deviceProbe = None
        self._deviceTexts = {}
        self._plotViewNode = None

    # ---- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PixelRLSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = PixelRLSegmentLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.keepStepButton.connect("clicked(bool)", self.onKeepStep)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.modelsFolderPathLineEdit.connect("currentPathChanged(QString)", self.refreshModels)
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MILLISECONDS)
        self.timer.connect("timeout()", self.onTimer)

        self.initializeParameterNode()
        self.refreshModels()
        self._deviceProbe = self.logic.segmentation.start_device_probe()
        self.timer.start()

    def cleanup(self) -> None:
        self.timer.stop()
        if self.run is not None and not self.run.finished:
            self.logic.segmentation.cancel(self.run)
        if self._deviceProbe is not None:
            self._deviceProbe.kill()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterChanged)

    def onSceneStartClose(self, caller, event) -> None:
        if self.run is not None and not self.run.finished:
            self.logic.segmentation.cancel(self.run)
        self.run = None
        self._plotViewNode = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterChanged)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._labelDevices()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterChanged)
            self._showResult(self._parameterNode.sequenceBrowser)
            self._onParameterChanged()

    def _onParameterChanged(self, caller=None, event=None) -> None:
        running = self.run is not None and not self.run.finished
        p = self._parameterNode
        ready = bool(p and p.inputVolume and p.model)
        self.ui.applyButton.enabled = running or ready
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = _("Stop the segmentation; the steps done so far are kept.") if running else (
            _("Run the segmentation.") if ready else _("Choose the input volume and a model."))
        self.ui.keepStepButton.enabled = bool(p and p.sequenceBrowser)
        if p and p.sequenceBrowser and stepresults.from_browser(p.sequenceBrowser, self.logic.segmentation.result_kind):
            self.logic.segmentation.show_changes(p.sequenceBrowser, p.showChanges)

    # ---- models and devices --------------------------------------------------------------
    def refreshModels(self, folder=None) -> None:
        """Fill the model selector: bundled models, then the user's folder (each with its card).

        ``folder`` is the path just typed (this slot may run before the parameter node has it).
        """
        if folder is None and self._parameterNode:
            folder = self._parameterNode.userModelsFolder
        entries = models.list_models(user_folder(folder), method=METHODS)
        wanted = self._parameterNode.model if self._parameterNode else ""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for entry in entries:
            combo.addItem(entry.label, str(entry.path))
            combo.setItemData(combo.count - 1, models.describe_card(entry.card), qt.Qt.ToolTipRole)
        combo.blockSignals(wasBlocked)
        combo.setCurrentIndex(models.index_of(entries, wanted))
        self.onModelSelected(combo.currentIndex)

    def onModelSelected(self, index: int) -> None:
        if index < 0:
            self.ui.modelCardLabel.text = _("No segmentation model found: choose a folder with your models.")
            return
        path = self.ui.modelComboBox.itemData(index)
        self.ui.modelCardLabel.text = self.ui.modelComboBox.itemData(index, qt.Qt.ToolTipRole)
        if self._parameterNode and self._parameterNode.model != path:
            self._parameterNode.model = path

    def _updateDevices(self) -> None:
        answer = self.logic.segmentation.read_device_probe(self._deviceProbe)
        if answer is None:
            return
        self._deviceProbe = None
        self._deviceTexts = device_choice_texts(answer, _)
        self._labelDevices()

    def _labelDevices(self) -> None:
        """Show what was detected next to each device choice (the binding keeps the values)."""
        for i, value in enumerate(DEVICES):
            if value in self._deviceTexts and i < self.ui.deviceComboBox.count:
                self.ui.deviceComboBox.setItemText(i, self._deviceTexts[value])

    # ---- run ------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self.run is not None and not self.run.finished:
            self.logic.segmentation.cancel(self.run)
            self._updateProgress()
            return
        try:
            if not install.ensure_dependencies(confirm=slicer.util.confirmOkCancelDisplay,
                                               purpose=_("PixelRL segmentation")):
                return
            self.run = self.logic.start(self._parameterNode)
        except (StepRLError, RuntimeError) as err:  # one message: what is wrong and what to do
            slicer.util.errorDisplay(str(err), windowTitle=_("PixelRL segmentation"))
            return
        slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume, label=None, fit=True)
        self._updateProgress()

    def onTimer(self) -> None:
        if self._deviceProbe is not None:
            self._updateDevices()
        if self.run is None or self.run.finished:
            if self._deviceProbe is None:
                self.timer.stop()
            return
        added = self.logic.segmentation.poll(self.run)
        if added and self.run.nodes is not None and self._parameterNode.sequenceBrowser != self.run.nodes.browser:
            self._parameterNode.sequenceBrowser = self.run.nodes.browser
            self._showResult(self.run.nodes.browser)
            slicer.util.setSliceViewerLayers(label=self.run.nodes.proxy, labelOpacity=0.6)
        self._updateProgress()
        if self.run.finished and self.run.state is RunState.FAILED:
            slicer.util.errorDisplay(self.run.error, windowTitle=_("PixelRL segmentation"))

    def _updateProgress(self) -> None:
        run = self.run
        if run is not None and not run.finished and not self.timer.isActive():
            self.timer.start()
        self.ui.progressBar.maximum = 100
        self.ui.progressBar.value = int(100 * run.fraction) if run else 0
        self.ui.statusLabel.text = run.progress_text if run else ""
        self._onParameterChanged()

    def _showResult(self, browser) -> None:
        """Point the slider, the play button and the plot at a result's browser."""
        self.ui.sequenceSeekWidget.setMRMLSequenceBrowserNode(browser)
        self.ui.sequencePlayWidget.setMRMLSequenceBrowserNode(browser)
        nodes = stepresults.from_browser(browser, self.logic.segmentation.result_kind)
        if nodes is None or nodes.chart is None:
            return
        if self._plotViewNode is None:
            self._plotViewNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode")
            self._plotViewNode.SetSingletonTag("PixelRLSegmentPlot")
            self.ui.metricsPlotWidget.setMRMLPlotViewNode(self._plotViewNode)
        self._plotViewNode.SetPlotChartNodeID(nodes.chart.GetID())

    def onKeepStep(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The step could not be kept."), waitCursor=True):
            p = self._parameterNode
            segmentation, labelmap = self.logic.segmentation.keep_step(p.sequenceBrowser, labelmap=p.createLabelmap)
            self.ui.statusLabel.text = _("Kept: {0}").format(segmentation.GetName())


class PixelRLSegmentLogic(ScriptedLoadableModuleLogic):
    """Slicer-side glue around ``PixelRLSegmentLib.logic.SegmentationLogic`` (usable without the GUI)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._segmentation = None

    def getParameterNode(self):
        return PixelRLSegmentParameterNode(super().getParameterNode())

    @property
    def segmentation(self) -> SegmentationLogic:
        """The MRML logic on the application scene (created on first use)."""
        if self._segmentation is None or self._segmentation.scene is not slicer.mrmlScene:
            self._segmentation = SegmentationLogic(slicer.mrmlScene, sequences_logic=slicer.modules.sequences.logic())
        return self._segmentation

    @staticmethod
    def request(parameterNode) -> SegmentationRequest:
        """The segmentation request the parameter node describes."""
        p = parameterNode
        return SegmentationRequest(
            volume=p.inputVolume, model=p.model, steps=p.steps, axis=p.axis, device=p.device,
            reference=p.referenceSegmentation, create_labelmap=p.createLabelmap,
            user_models_folder=user_folder(p.userModelsFolder))

    def start(self, parameterNode):
        """Start a segmentation from the parameter node; returns the run (poll it with ``segmentation.poll``)."""
        return self.segmentation.start(self.request(parameterNode))


class PixelRLSegmentTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer's ctest and by the Reload & Test button."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_logic_is_created()
        self.setUp()
        self.test_bad_request_is_one_message()
        self.setUp()
        self.test_segmentation_streams_steps()

    def _volume(self):
        import numpy as np
        from steprl.geometry import Geometry, Image

        from StepRLCommon.mrmlio import volume_from_image

        z, y, x = np.mgrid[:12, :32, :28].astype(np.float32)
        blob = 100 * np.exp(-((x - 14) ** 2 + (y - 16) ** 2) / 40.0) + 5 * np.sin(z)
        return volume_from_image(slicer.mrmlScene, Image(blob, Geometry((12, 32, 28), (0.9, 0.9, 2.0),
                                                                        (0.0, 0.0, 0.0), np.eye(3))),
                                 "PixelRL test volume")

    def test_logic_is_created(self):
        self.assertIsNotNone(PixelRLSegmentLogic())

    def test_bad_request_is_one_message(self):
        volume = self._volume()
        logic = PixelRLSegmentLogic().segmentation
        with self.assertRaises(StepRLError) as context:
            logic.start(SegmentationRequest(volume, model=""))
        self.assertIn("No model is chosen", str(context.exception))
        self.assertIsNone(slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSequenceNode"))

    def test_segmentation_streams_steps(self):
        """A tiny untrained model made by the worker's Python (torch stays out of Slicer's process)."""
        import subprocess
        import tempfile

        if install.missing_requirements():
            self.skipTest("PyTorch or safetensors is not installed (install the PyTorch extension)")
        logic = PixelRLSegmentLogic().segmentation
        folder = tempfile.mkdtemp(prefix="PixelRLSegmentTest-")
        script = (
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
        subprocess.run([*logic.python, "-c", script, folder], env=logic.env, check=True, timeout=300)
        volume = self._volume()
        run = logic.wait(logic.start(SegmentationRequest(volume, folder + "/tiny.safetensors", steps=3,
                                                         device="cpu")), timeout=300)
        self.assertEqual(run.state, RunState.DONE, run.error)
        self.assertEqual(run.nodes.sequence.GetNumberOfDataNodes(), 4)
        self.assertTrue(run.segmentation.IsA("vtkMRMLSegmentationNode"))
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(run.segmentation, labelmap, volume)
        self.assertEqual(slicer.util.arrayFromVolume(labelmap).shape, (12, 32, 28))
        logging.info("PixelRLSegment self-test passed")
