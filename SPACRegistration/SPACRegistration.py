"""SPACRegistration: step-by-step deformable registration by a SPAC policy, with a step slider.

The widget is thin: the panel plumbing both StepRL modules share (parameter node binding, model
list, device labels, Apply/Cancel, polling on a timer, slider and plot) is
``StepRLCommon.widgetbase.StepRLWidget``; this file adds what is registration's (its inputs, its
request, keeping a step as a transform). Everything else happens in ``SPACRegistrationLib`` and
the shared ``StepRLCommon`` (MRML only, no Qt: they also run headless on slicer-core) and, for
the computation, in the ``steprl`` worker process (torch never enters Slicer's process).
``slicer`` here is the Slicer application's module: nothing outside Slicer imports this file.
"""

import logging

import slicer
from slicer.i18n import tr as _
from SPACRegistrationLib.logic import RegistrationLogic, RegistrationRequest, RunState

from StepRLCommon.widgetbase import StepRLModule, StepRLModuleLogic, StepRLModuleTest, StepRLWidget


class SPACRegistration(StepRLModule):
    """Module description shown by Slicer (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        StepRLModule.__init__(self, parent)
        self.parent.title = _("SPAC Registration")
        self.parent.categories = ["Registration"]
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


class SPACRegistrationLogic(StepRLModuleLogic, worker_class=RegistrationLogic):
    """Slicer-side glue around ``SPACRegistrationLib.logic.RegistrationLogic`` (usable without the GUI)."""

    #: The name ``worker`` had before the modules shared this class (saved scripts use it).
    registration = StepRLModuleLogic.worker

    @classmethod
    def request(cls, parameterNode):
        """The base request, plus the refinement steps (the spin box's -1, "model default", is None)."""
        request = super().request(parameterNode)
        request.refine = None if parameterNode.refineSteps < 0 else parameterNode.refineSteps
        return request


class SPACRegistrationWidget(StepRLWidget, logic_class=SPACRegistrationLogic):
    """The module panel (see ``StepRLWidget``): registration's inputs, views and kept steps."""

    def missingInputText(self, p) -> str:
        if p and p.fixedVolume and p.movingVolume and p.model:
            return ""
        return _("Choose the fixed and moving volumes and a model.")

    def showInputs(self, p) -> None:
        slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=p.movingVolume,
                                         foregroundOpacity=0.5, fit=True)

    def keepStep(self, p):
        transform, volume = self.logic.registration.keep_step(p.sequenceBrowser, resample=p.createWarpedVolume)
        transform.CreateDefaultDisplayNodes()
        if volume is not None:
            volume.CreateDefaultDisplayNodes()
            slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=volume, foregroundOpacity=0.5)
        return transform


class SPACRegistrationTest(StepRLModuleTest, logic_class=SPACRegistrationLogic,
                           tests=("test_bad_request_is_one_message", "test_registration_streams_steps")):
    """Self-test run by Slicer's ctest and by the Reload & Test button."""

    def test_bad_request_is_one_message(self):
        fixed, moving = self._volumes()
        self.assertRefusedWithoutModel(RegistrationRequest(fixed, moving, model=""))

    def test_registration_streams_steps(self):
        """A tiny random model made by the worker's Python (torch stays out of Slicer's process)."""
        model = self.tinyModel(
            "import sys, torch\n"
            "from steprl.modelfile import save_model\n"
            "from steprl.registration.networks import SPACConfig, SPACPolicy\n"
            "torch.manual_seed(0)\n"
            "cfg = SPACConfig(ndim=3, grid=(16, 16, 16), channels=(8, 8), plan_dim=4, critic_channels=(4, 4))\n"
            "save_model(sys.argv[1] + '/tiny', SPACPolicy(cfg).state_dict(),\n"
            "           {'method': 'spac', 'ndim': 3, 'config': cfg.to_dict(), 'inference': {'steps': 3}})\n"
        )
        logic = SPACRegistrationLogic().registration
        fixed, moving = self._volumes()
        run = logic.wait(logic.start(RegistrationRequest(fixed, moving, model, steps=3, device="cpu")), timeout=300)
        self.assertEqual(run.state, RunState.DONE, run.error)
        self.assertEqual(run.nodes.sequence.GetNumberOfDataNodes(), 4)
        self.assertEqual(moving.GetParentTransformNode().GetID(), run.nodes.proxy.GetID())
        transform, volume = logic.keep_step(run, 3, resample=True)
        self.assertEqual(slicer.util.arrayFromVolume(volume).shape, (20, 24, 22))
        logging.info("SPACRegistration self-test passed")

    def _volumes(self):
        import numpy as np

        z, y, x = np.mgrid[:20, :24, :22].astype(np.float32)
        blob = np.exp(-((x - 11) ** 2 + (y - 12) ** 2 + (z - 10) ** 2) / 30.0)
        spacing = (1.0, 1.1, 1.3)
        return self.volume(blob, spacing, "SPAC test fixed"), self.volume(np.roll(blob, 2, axis=2), spacing,
                                                                           "SPAC test moving")
