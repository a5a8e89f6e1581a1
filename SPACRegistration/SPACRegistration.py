"""SPACRegistration: step-by-step deformable registration by a SPAC policy (Slicer module shell).

Under construction: this file holds the module description, an empty widget, a logic stub and
a self-test, so that the extension builds and loads. The registration logic (MRML in, MRML
out) goes in ``SPACRegistrationLib/``; the computation runs in the ``steprl`` package, in a
child process. ``slicer`` exists only inside 3D Slicer: nothing outside Slicer imports this file.
"""

import logging

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


class SPACRegistration(ScriptedLoadableModule):
    """Module description shown by Slicer (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SPAC Registration"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["The StepRL developers"]
        self.parent.helpText = (
            "Deformable registration of a moving volume to a fixed volume by a Stochastic "
            "Planner-Actor-Critic (SPAC) policy, applied step by step; a slider shows every "
            "intermediate warp. <b>This module is under construction.</b>"
        )
        self.parent.acknowledgementText = (
            "Part of the StepRL extension. SPAC: Luo et al., 'Stochastic Planner-Actor-Critic for "
            "Unsupervised Deformable Image Registration', AAAI 2022. The bundled sample images "
            "come from the Insight Toolkit (ITK) examples, Apache-2.0."
        )


class SPACRegistrationWidget(ScriptedLoadableModuleWidget):
    """The module panel: thin, no computation (empty while under construction)."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.layout.addStretch(1)


class SPACRegistrationLogic(ScriptedLoadableModuleLogic):
    """Computation entry point, usable without the GUI (stub while under construction)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        logging.debug("SPACRegistrationLogic created (module under construction)")


class SPACRegistrationTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer's ctest and by the Reload & Test button."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_logic_is_created()

    def test_logic_is_created(self):
        self.assertIsNotNone(SPACRegistrationLogic())
