"""SPACRegistration: step-by-step deformable registration by a SPAC policy, with a step slider.

The widget is thin: it binds the .ui to the parameter node, turns Apply into Cancel while a run
goes on, and polls the logic on a timer. Everything else happens in ``SPACRegistrationLib`` and
the shared ``StepRLCommon`` (MRML only, no Qt: they also run headless on slicer-core) and, for
the computation, in the ``steprl`` worker process (torch never enters Slicer's process).
``slicer`` here is the Slicer application's module: nothing outside Slicer imports this file.
"""

import logging

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from SPACRegistrationLib import models, results
from SPACRegistrationLib.logic import RegistrationLogic, RegistrationRequest, RunState
from SPACRegistrationLib.parameters import DEVICES, SPACRegistrationParameterNode, user_folder
from steprl.errors import StepRLError

from StepRLCommon import install
from StepRLCommon.protocol import device_choice_texts

#: Every ``self.ui.<name>`` this file uses, with its class in Resources/UI/SPACRegistration.ui
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


class SPACRegistration(ScriptedLoadableModule):
    """Module description shown by Slicer (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SPAC Registration")
        self.parent.categories = ["Registration"]
        self.parent.dependencies = ["Sequences"]
        self.parent.contributors = ["The StepRL developers"]
        self.parent.helpText = _(
            "Deformable registration of a moving volume to a fixed volume by a Stochastic Planner-Actor-Critic "
            "(SPAC) policy, applied step by step. Steps appear on the slider as soon as they are computed; "
            "'Keep this step' creates the transform (and optionally the warped volume) of the step shown. "
            "The computation runs in a separate process (PyTorch from the PyTorch extension)."
        )
        self.parent.acknowledgementText = _(
            "Part of the StepRL extension. SPAC: Luo et al., 'Stochastic Planner-Actor-Critic for "
            "Unsupervised Deformable Image Registration', AAAI 2022. The bundled sample images "
            "come from the Insight Toolkit (ITK) examples, Apache-2.0."
        )


class SPACRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
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
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SPACRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SPACRegistrationLogic()

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
        self._deviceProbe = self.logic.registration.start_device_probe()
        self.timer.start()

    def cleanup(self) -> None:
        self.timer.stop()
        if self.run is not None and not self.run.finished:
            self.logic.registration.cancel(self.run)
        if self._deviceProbe is not None:
            self._deviceProbe.kill()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        if self.run is not None and not self.run.finished:
            self.logic.registration.cancel(self.run)
        self.run = None
        self._plotViewNode = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.fixedVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._labelDevices()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._showResult(self._parameterNode.sequenceBrowser)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        running = self.run is not None and not self.run.finished
        p = self._parameterNode
        ready = bool(p and p.fixedVolume and p.movingVolume and p.model)
        self.ui.applyButton.enabled = running or ready
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = _("Stop the registration; the steps done so far are kept.") if running else (
            _("Run the registration.") if ready else _("Choose the fixed and moving volumes and a model."))
        self.ui.keepStepButton.enabled = bool(p and p.sequenceBrowser)

    # ---- models and devices --------------------------------------------------------------
    def refreshModels(self, folder=None) -> None:
        """Fill the model selector: bundled models, then the user's folder (each with its card).

        ``folder`` is the path just typed (this slot may run before the parameter node has it).
        """
        if folder is None and self._parameterNode:
            folder = self._parameterNode.userModelsFolder
        folder = user_folder(folder)
        entries = models.list_models(folder)
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
            self.ui.modelCardLabel.text = _("No SPAC model found: choose a folder with your models.")
            return
        path = self.ui.modelComboBox.itemData(index)
        self.ui.modelCardLabel.text = self.ui.modelComboBox.itemData(index, qt.Qt.ToolTipRole)
        if self._parameterNode and self._parameterNode.model != path:
            self._parameterNode.model = path

    def _updateDevices(self) -> None:
        answer = self.logic.registration.read_device_probe(self._deviceProbe)
        if answer is None:
            return
        self._deviceProbe = None
        self._deviceTexts = device_choice_texts(answer, _)  # torch missing or broken: "auto" says so
        self._labelDevices()

    def _labelDevices(self) -> None:
        """Show what was detected next to each device choice (the binding keeps the values)."""
        for i, value in enumerate(DEVICES):
            if value in self._deviceTexts and i < self.ui.deviceComboBox.count:
                self.ui.deviceComboBox.setItemText(i, self._deviceTexts[value])

    # ---- run ------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self.run is not None and not self.run.finished:
            self.logic.registration.cancel(self.run)
            self._updateProgress()
            return
        try:
            if not install.ensure_dependencies(confirm=slicer.util.confirmOkCancelDisplay,
                                               purpose=_("SPAC registration")):
                return
            self.run = self.logic.start(self._parameterNode)
        except (StepRLError, RuntimeError) as err:  # one message: what is wrong and what to do
            slicer.util.errorDisplay(str(err), windowTitle=_("SPAC registration"))
            return
        p = self._parameterNode
        slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=p.movingVolume,
                                         foregroundOpacity=0.5, fit=True)
        self._updateProgress()

    def onTimer(self) -> None:
        if self._deviceProbe is not None:
            self._updateDevices()
        if self.run is None or self.run.finished:
            if self._deviceProbe is None:
                self.timer.stop()
            return
        added = self.logic.registration.poll(self.run)
        if added and self.run.nodes is not None and self._parameterNode.sequenceBrowser != self.run.nodes.browser:
            self._parameterNode.sequenceBrowser = self.run.nodes.browser
            self._showResult(self.run.nodes.browser)
        self._updateProgress()
        if self.run.finished and self.run.state is RunState.FAILED:
            slicer.util.errorDisplay(self.run.error, windowTitle=_("SPAC registration"))

    def _updateProgress(self) -> None:
        run = self.run
        if run is not None and not run.finished and not self.timer.isActive():
            self.timer.start()
        total = (run.total_steps or 0) if run else 0
        self.ui.progressBar.maximum = max(total, 1)
        self.ui.progressBar.value = (run.last_step or 0) if run else 0
        self.ui.statusLabel.text = run.progress_text if run else ""
        self._checkCanApply()

    def _showResult(self, browser) -> None:
        """Point the slider, the play button and the plot at a result's browser."""
        self.ui.sequenceSeekWidget.setMRMLSequenceBrowserNode(browser)
        self.ui.sequencePlayWidget.setMRMLSequenceBrowserNode(browser)
        nodes = results.from_browser(browser)
        if nodes is None or nodes.chart is None:
            return
        if self._plotViewNode is None:
            self._plotViewNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode")
            self._plotViewNode.SetSingletonTag("SPACRegistrationPlot")
            self.ui.metricsPlotWidget.setMRMLPlotViewNode(self._plotViewNode)
        self._plotViewNode.SetPlotChartNodeID(nodes.chart.GetID())

    def onKeepStep(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The step could not be kept."), waitCursor=True):
            p = self._parameterNode
            transform, volume = self.logic.registration.keep_step(p.sequenceBrowser, resample=p.createWarpedVolume)
            transform.CreateDefaultDisplayNodes()
            if volume is not None:
                volume.CreateDefaultDisplayNodes()
                slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=volume, foregroundOpacity=0.5)
            self.ui.statusLabel.text = _("Kept: {0}").format(transform.GetName())


class SPACRegistrationLogic(ScriptedLoadableModuleLogic):
    """Slicer-side glue around ``SPACRegistrationLib.logic.RegistrationLogic`` (usable without the GUI)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._registration = None

    def getParameterNode(self):
        return SPACRegistrationParameterNode(super().getParameterNode())

    @property
    def registration(self) -> RegistrationLogic:
        """The MRML logic on the application scene (created on first use)."""
        if self._registration is None or self._registration.scene is not slicer.mrmlScene:
            self._registration = RegistrationLogic(slicer.mrmlScene, sequences_logic=slicer.modules.sequences.logic())
        return self._registration

    @staticmethod
    def request(parameterNode) -> RegistrationRequest:
        """The registration request the parameter node describes."""
        p = parameterNode
        return RegistrationRequest(
            fixed=p.fixedVolume, moving=p.movingVolume, model=p.model, steps=p.steps, device=p.device,
            fixed_labels=p.fixedLabels, moving_labels=p.movingLabels, prealign=p.prealign,
            user_models_folder=user_folder(p.userModelsFolder))

    def start(self, parameterNode):
        """Start a registration from the parameter node; returns the run (poll it with ``registration.poll``)."""
        return self.registration.start(self.request(parameterNode))


class SPACRegistrationTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer's ctest and by the Reload & Test button."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_logic_is_created()
        self.setUp()
        self.test_bad_request_is_one_message()
        self.setUp()
        self.test_registration_streams_steps()

    def _volumes(self):
        import numpy as np
        from steprl.geometry import Geometry, Image

        from StepRLCommon.mrmlio import volume_from_image

        z, y, x = np.mgrid[:20, :24, :22].astype(np.float32)
        blob = np.exp(-((x - 11) ** 2 + (y - 12) ** 2 + (z - 10) ** 2) / 30.0)
        fixed = Image(blob, Geometry((20, 24, 22), (1.0, 1.1, 1.3), (0.0, 0.0, 0.0), np.eye(3)))
        moving = Image(np.roll(blob, 2, axis=2), Geometry((20, 24, 22), (1.0, 1.1, 1.3), (0.0, 0.0, 0.0), np.eye(3)))
        return (volume_from_image(slicer.mrmlScene, fixed, "SPAC test fixed"),
                volume_from_image(slicer.mrmlScene, moving, "SPAC test moving"))

    def test_logic_is_created(self):
        self.assertIsNotNone(SPACRegistrationLogic())

    def test_bad_request_is_one_message(self):
        from steprl.errors import StepRLError

        fixed, moving = self._volumes()
        logic = SPACRegistrationLogic().registration
        with self.assertRaises(StepRLError) as context:
            logic.start(RegistrationRequest(fixed, moving, model=""))
        self.assertIn("No model is chosen", str(context.exception))
        self.assertIsNone(slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSequenceNode"))

    def test_registration_streams_steps(self):
        """A tiny random model made by the worker's Python (torch stays out of Slicer's process)."""
        import subprocess
        import tempfile

        if install.missing_requirements():
            self.skipTest("PyTorch or safetensors is not installed (install the PyTorch extension)")
        logic = SPACRegistrationLogic().registration
        folder = tempfile.mkdtemp(prefix="SPACRegistrationTest-")
        script = (
            "import sys, torch\n"
            "from steprl.modelfile import save_model\n"
            "from steprl.registration.networks import SPACConfig, SPACPolicy\n"
            "torch.manual_seed(0)\n"
            "cfg = SPACConfig(ndim=3, grid=(16, 16, 16), channels=(8, 8), plan_dim=4, critic_channels=(4, 4))\n"
            "save_model(sys.argv[1] + '/tiny', SPACPolicy(cfg).state_dict(),\n"
            "           {'method': 'spac', 'ndim': 3, 'config': cfg.to_dict(), 'inference': {'steps': 3}})\n"
        )
        subprocess.run([*logic.python, "-c", script, folder], env=logic.env, check=True, timeout=300)
        fixed, moving = self._volumes()
        run = logic.wait(logic.start(RegistrationRequest(fixed, moving, folder + "/tiny.safetensors", steps=3,
                                                         device="cpu")), timeout=300)
        self.assertEqual(run.state, RunState.DONE, run.error)
        self.assertEqual(run.nodes.sequence.GetNumberOfDataNodes(), 4)
        self.assertEqual(moving.GetParentTransformNode().GetID(), run.nodes.proxy.GetID())
        transform, volume = logic.keep_step(run, 3, resample=True)
        self.assertEqual(slicer.util.arrayFromVolume(volume).shape, (20, 24, 22))
        logging.info("SPACRegistration self-test passed")
