"""The Slicer-application side both StepRL module files share: panel, Slicer logic glue, self-test.

The only file of ``StepRLCommon`` that imports Qt (and Slicer's application modules): only the
module files ``SPACRegistration.py`` / ``PixelRLSegment.py`` import it, inside Slicer. The other
files stay MRML-only so that they also run headless on slicer-core (Testing/test_module_static.py
checks both rules, and that no file here imports torch).

- :class:`StepRLModule`: what the modules' descriptions share (contributors, dependencies).
- :class:`StepRLModuleLogic`: the module's ``ScriptedLoadableModuleLogic``: its parameter node and
  its :class:`~.workerlogic.WorkerLogic` on the application scene (``worker``).
- :class:`StepRLWidget`: the module panel. It binds the .ui to the parameter node, fills the model
  list (each entry with its card), labels the device choices with what the worker found, turns
  Apply into Cancel while a run goes on and polls the run on a timer, points the step slider, the
  play button and the metrics plot at the latest result, and hands "Keep this step" to the module.
- :class:`StepRLModuleTest`: the self-test base (cleared scene per test, a tiny model made by the
  worker's Python, the "no model" refusal).

What differs between the modules comes from the module's
:class:`~.description.ModuleDescription`, which its Lib's ``WorkerLogic`` subclass carries; the
module file's classes pass their collaborators as class keywords, checked when the class is
defined::

    class SPACRegistrationLogic(StepRLModuleLogic, worker_class=RegistrationLogic): ...
    class SPACRegistrationWidget(StepRLWidget, logic_class=SPACRegistrationLogic): ...
    class SPACRegistrationTest(StepRLModuleTest, logic_class=SPACRegistrationLogic, tests=("test_...",)): ...

The widget fills in the hooks ``missingInputText``, ``showInputs``, ``keepStep`` (and, if it needs
them, ``showNewResult`` and ``onParameterNodeModified``). Its .ui has the widgets of
:data:`UI_WIDGETS` under these names; its parameter node has the fields of
:data:`~.description.COMMON_PARAMETERS` (see the modules' ``...Lib/parameters.py``).
"""

import logging
import subprocess
import tempfile
import unittest

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
from steprl.errors import StepRLError

from . import install, models, stepresults
from .parameters import DEVICES, user_folder
from .protocol import device_choice_texts
from .workerlogic import RunState, WorkerLogic

#: Every ``self.ui.<name>`` this file uses, with its class; each module's .ui must have them
#: (Testing/test_module_static.py checks both ways).
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

#: How often the panel polls a running job (and the device probe), in milliseconds.
POLL_MILLISECONDS = 100


class StepRLModule(ScriptedLoadableModule):
    """A StepRL module's description, the shared part: contributors, Slicer modules it needs (Sequences and
    ``dependencies``). The module sets its title, category, help and acknowledgement."""

    def __init__(self, parent, *dependencies: str) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.dependencies = ["Sequences", *dependencies]
        self.parent.contributors = ["The StepRL developers"]


class StepRLModuleLogic(ScriptedLoadableModuleLogic):
    """Slicer-side glue around a module's ``WorkerLogic`` (usable without the GUI).

    A module passes its ``WorkerLogic`` subclass: ``class SPACRegistrationLogic(StepRLModuleLogic,
    worker_class=RegistrationLogic)``; the parameter node, the request and which parameter fills
    which request field come from that class's ``description``.
    """

    def __init_subclass__(cls, *, worker_class: type, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not (isinstance(worker_class, type) and issubclass(worker_class, WorkerLogic)):
            raise TypeError(f"{cls.__name__}: worker_class must be a WorkerLogic subclass, got {worker_class!r}")
        cls.workerClass = worker_class
        cls.description = worker_class.description

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._worker = None

    def getParameterNode(self):
        return self.description.parameter_node_class(super().getParameterNode())

    @property
    def worker(self):
        """The module's MRML logic (a ``WorkerLogic``) on the application scene, created on first use."""
        if self._worker is None or self._worker.scene is not slicer.mrmlScene:
            self._worker = self.workerClass(slicer.mrmlScene, sequences_logic=slicer.modules.sequences.logic())
        return self._worker

    @classmethod
    def request(cls, parameterNode):
        """The request (the description's ``request_class``) the parameter node describes."""
        p, description = parameterNode, cls.description
        own = {field: getattr(p, name) for field, name in description.request_fields.items()}
        return description.request_class(model=p.model, steps=p.steps, device=p.device,
                                         user_models_folder=user_folder(p.userModelsFolder),
                                         keep_job_folder=p.keepJobFolder, **own)

    def start(self, parameterNode):
        """Start a job from the parameter node; returns the run (poll it with ``worker.poll``)."""
        return self.worker.start(self.request(parameterNode))


class StepRLWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: binds widgets to the parameter node and polls the logic; no computation.

    A module passes its :class:`StepRLModuleLogic` subclass (``class SPACRegistrationWidget(
    StepRLWidget, logic_class=SPACRegistrationLogic)``) and fills in the hooks below that raise
    NotImplementedError (a subclass without them is refused when it is defined).
    """

    #: The hooks a module must fill in.
    HOOKS = ("missingInputText", "showInputs", "keepStep")

    def __init_subclass__(cls, *, logic_class: type, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not (isinstance(logic_class, type) and issubclass(logic_class, StepRLModuleLogic)):
            raise TypeError(f"{cls.__name__}: logic_class must be a StepRLModuleLogic subclass, got {logic_class!r}")
        missing = [name for name in cls.HOOKS if getattr(cls, name) is getattr(StepRLWidget, name)]
        if missing:
            raise TypeError(f"{cls.__name__} must fill in {', '.join(missing)}")
        cls.logicClass = logic_class
        cls.description = logic_class.description

    def __init__(self, parent=None) -> None:
        # Set before ScriptedLoadableModuleWidget.__init__: without a parent it calls setup() at once.
        self.logic = None
        self.run = None
        self.timer = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._deviceProbe = None
        self._deviceTexts = {}
        self._plotViewNode = None
        VTKObservationMixin.__init__(self)
        ScriptedLoadableModuleWidget.__init__(self, parent)

    # ---- hooks -------------------------------------------------------------------------------
    def missingInputText(self, parameterNode) -> str:
        """What to choose before Apply can run; "" when the inputs are complete."""
        raise NotImplementedError

    def showInputs(self, parameterNode) -> None:
        """Show the inputs in the slice views when a run starts."""
        raise NotImplementedError

    def keepStep(self, parameterNode):
        """Make the output of the step shown ("Keep this step"); return its main node."""
        raise NotImplementedError

    def taskTitle(self) -> str:
        """The module's title, e.g. "SPAC Registration" (window titles, the install question)."""
        return slicer.util.getModule(self.moduleName).title

    def showNewResult(self, nodes) -> None:
        """A run's first step arrived: ``nodes`` (a ``StepNodes``) is its new result. Default: nothing."""

    def onParameterNodeModified(self, parameterNode) -> None:
        """The parameter node changed (after the buttons were updated). Default: nothing."""

    # ---- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = self.logicClass()

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
        self._deviceProbe = self.logic.worker.start_device_probe()
        self.timer.start()

    def cleanup(self) -> None:
        if self.timer is not None:
            self.timer.stop()
        self._cancelRun()
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
        self._cancelRun()
        self.run = None
        self._plotViewNode = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def _cancelRun(self) -> None:
        """Stop the running job, if any (its steps stay in the scene)."""
        if self.run is not None and not self.run.finished:
            self.logic.worker.cancel(self.run)

    # ---- parameter node ----------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        name = self.description.default_volume_parameter
        if not getattr(self._parameterNode, name):
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                setattr(self._parameterNode, name, first)

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
        """Apply is Cancel while a run goes on, and says what is missing otherwise."""
        running = self.run is not None and not self.run.finished
        p = self._parameterNode
        missing = self.missingInputText(p)
        noun = self.description.task_noun
        self.ui.applyButton.enabled = running or not missing
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = _("Stop the {0}; the steps done so far are kept.").format(noun) if running else (
            missing or _("Run the {0}.").format(noun))
        self.ui.keepStepButton.enabled = bool(p and p.sequenceBrowser)
        if p:
            self.onParameterNodeModified(p)

    # ---- models and devices --------------------------------------------------------------
    def refreshModels(self, folder=None) -> None:
        """Fill the model selector: bundled models, then the user's folder (each with its card).

        ``folder`` is the path just typed (this slot may run before the parameter node has it).
        """
        if folder is None and self._parameterNode:
            folder = self._parameterNode.userModelsFolder
        entries = models.list_models(user_folder(folder), method=self.description.methods)
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
            self.ui.modelCardLabel.text = _("No {0} found: choose a folder with your models.").format(
                self.description.model_kind)
            return
        path = self.ui.modelComboBox.itemData(index)
        self.ui.modelCardLabel.text = self.ui.modelComboBox.itemData(index, qt.Qt.ToolTipRole)
        if self._parameterNode and self._parameterNode.model != path:
            self._parameterNode.model = path

    def _updateDevices(self) -> None:
        answer = self.logic.worker.read_device_probe(self._deviceProbe)
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
            self._cancelRun()
            self._updateProgress()
            return
        try:
            p = self._parameterNode
            method = self.logic.worker.find_entry(p.model, user_folder(p.userModelsFolder)).card.get("method")
            if not install.ensure_dependencies(confirm=slicer.util.confirmOkCancelDisplay, purpose=self.taskTitle(),
                                               requirements=install.requirements_for(method)):
                return
            self.run = self.logic.start(self._parameterNode)
        except (StepRLError, RuntimeError) as err:  # one message: what is wrong and what to do
            slicer.util.errorDisplay(str(err), windowTitle=self.taskTitle())
            return
        self.showInputs(self._parameterNode)
        self._updateProgress()

    def onTimer(self) -> None:
        if self._deviceProbe is not None:
            self._updateDevices()
        if self.run is None or self.run.finished:
            if self._deviceProbe is None:
                self.timer.stop()
            return
        added = self.logic.worker.poll(self.run)
        if added and self.run.nodes is not None and self._parameterNode.sequenceBrowser != self.run.nodes.browser:
            self._parameterNode.sequenceBrowser = self.run.nodes.browser
            self._showResult(self.run.nodes.browser)
            self.showNewResult(self.run.nodes)
        self._updateProgress()
        if self.run.finished and self.run.state is RunState.FAILED:
            slicer.util.errorDisplay(self.run.error, windowTitle=self.taskTitle())

    def _updateProgress(self) -> None:
        run = self.run
        if run is not None and not run.finished and not self.timer.isActive():
            self.timer.start()
        self.ui.progressBar.maximum = 100
        self.ui.progressBar.value = int(100 * run.fraction) if run else 0  # steps, or slices while they count
        self.ui.statusLabel.text = run.progress_text if run else ""
        self._onParameterChanged()

    def _showResult(self, browser) -> None:
        """Point the slider, the play button and the plot at a result's browser."""
        self.ui.sequenceSeekWidget.setMRMLSequenceBrowserNode(browser)
        self.ui.sequencePlayWidget.setMRMLSequenceBrowserNode(browser)
        nodes = stepresults.from_browser(browser, self.description.result_kind)
        if nodes is None or nodes.chart is None:
            return
        if self._plotViewNode is None:
            self._plotViewNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode")
            self._plotViewNode.SetSingletonTag(f"{self.moduleName}Plot")
            self.ui.metricsPlotWidget.setMRMLPlotViewNode(self._plotViewNode)
        self._plotViewNode.SetPlotChartNodeID(nodes.chart.GetID())

    def onKeepStep(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The step could not be kept."), waitCursor=True):
            kept = self.keepStep(self._parameterNode)
            self.ui.statusLabel.text = _("Kept: {0}").format(kept.GetName())


class StepRLModuleTest(ScriptedLoadableModuleTest):
    """Self-test base, run by Slicer's ctest and by the Reload & Test button.

    A module passes its :class:`StepRLModuleLogic` subclass and its test method names, run in
    order, each on a cleared scene (``class SPACRegistrationTest(StepRLModuleTest,
    logic_class=SPACRegistrationLogic, tests=("test_...",))``); ``test_logic_is_created`` is
    here, and helpers for the rest.
    """

    def __init_subclass__(cls, *, logic_class: type, tests: tuple[str, ...], **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not (isinstance(logic_class, type) and issubclass(logic_class, StepRLModuleLogic)):
            raise TypeError(f"{cls.__name__}: logic_class must be a StepRLModuleLogic subclass, got {logic_class!r}")
        missing = [name for name in tests if not callable(getattr(cls, name, None))]
        if not tests or missing:
            raise TypeError(f"{cls.__name__}: tests must name its test methods (not found: {', '.join(missing)})")
        cls.logicClass, cls.tests = logic_class, tuple(tests)

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        for name in ("test_logic_is_created", *self.tests):
            self.setUp()
            try:
                getattr(self, name)()
            except unittest.SkipTest as skipped:  # runTest is called directly: report, do not fail
                logging.warning("%s.%s skipped: %s", type(self).__name__, name, skipped)

    def test_logic_is_created(self):
        self.assertIsNotNone(self.logicClass().worker)

    @staticmethod
    def volume(array, spacing, name: str):
        """A scalar volume of ``array`` ``(D, H, W)`` with ``spacing`` (x, y, z mm), origin 0, axis-aligned."""
        import numpy as np
        from steprl.geometry import Geometry, Image

        from .mrmlio import volume_from_image

        return volume_from_image(slicer.mrmlScene, Image(array, Geometry(array.shape, spacing, (0.0, 0.0, 0.0),
                                                                         np.eye(3))), name)

    def assertRefusedWithoutModel(self, request):
        """``request`` (with no model) is refused with one message, and nothing is created."""
        with self.assertRaises(StepRLError) as context:
            self.logicClass().worker.start(request)
        self.assertIn("No model is chosen", str(context.exception))
        self.assertIsNone(slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSequenceNode"))

    def tinyModel(self, script: str) -> str:
        """Run ``script`` (it saves ``sys.argv[1] + '/tiny'``) with the worker's Python; the model's path.

        Torch stays out of Slicer's process. Skips when the worker's dependencies are not installed.
        """
        if install.missing_requirements():
            self.skipTest("PyTorch or safetensors is not installed (install the PyTorch extension)")
        worker = self.logicClass().worker
        folder = tempfile.mkdtemp(prefix=f"{type(self).__name__}-")
        subprocess.run([*worker.python, "-c", script, folder], env=worker.env, check=True, timeout=300)
        return folder + "/tiny.safetensors"
