"""PixelRLSegment: step-by-step segmentation by PixelDRL-MG (Slicer module shell).

Under construction: this file holds the module description, an empty widget, a logic stub and
a self-test, so that the extension builds and loads. The segmentation logic (MRML in, MRML
out) goes in ``PixelRLSegmentLib/``; the computation runs in the ``steprl`` package, in a
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


class PixelRLSegment(ScriptedLoadableModule):
    """Module description shown by Slicer (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "PixelRL Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["The StepRL developers"]
        self.parent.helpText = (
            "Segmentation by pixel-level reinforcement-learning agents (PixelDRL-MG), refined "
            "step by step; a slider shows every intermediate mask. "
            "<b>This module is under construction.</b>"
        )
        self.parent.acknowledgementText = (
            "Part of the StepRL extension. PixelDRL-MG: pixel-level deep reinforcement learning "
            "with a self-attention module for medical image segmentation; PixelRL: Furuta et al., "
            "'PixelRL: Fully Convolutional Network with Reinforcement Learning for Image "
            "Processing', IEEE TMM 2020."
        )


class PixelRLSegmentWidget(ScriptedLoadableModuleWidget):
    """The module panel: thin, no computation (empty while under construction)."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.layout.addStretch(1)


class PixelRLSegmentLogic(ScriptedLoadableModuleLogic):
    """Computation entry point, usable without the GUI (stub while under construction)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        logging.debug("PixelRLSegmentLogic created (module under construction)")


class PixelRLSegmentTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer's ctest and by the Reload & Test button."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_logic_is_created()

    def test_logic_is_created(self):
        self.assertIsNotNone(PixelRLSegmentLogic())
