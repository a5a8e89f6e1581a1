"""The MRML nodes of one registration result, on the shared ``StepRLCommon.stepresults``.

- a sequence of ``vtkMRMLGridTransformNode`` items, index = step (item 0 is the input: identity,
  or the affine pre-alignment alone), browsed by a sequence browser whose proxy transform is the
  transform the moving volume sits under, so Slicer reslices on the fly;
- a metrics table (local NCC, folding, Dice with label maps, seconds) with a chart of NCC and Dice.

The browser refers to the fixed and moving volumes (``SPACRegistration.fixed`` / ``.moving``),
so that "Keep this step" (:func:`keep`) works from a saved and reloaded scene as well.
"""

from __future__ import annotations

import logging

from StepRLCommon import stepresults
from StepRLCommon.stepresults import StepNodes, add_step, append_metrics, select

from .transforms import copy_grid_transform, resample_volume

__all__ = ["COLUMNS", "KIND", "ResultNodes", "add_step", "append_metrics", "create", "from_browser", "keep",
           "select"]

log = logging.getLogger(__name__)

#: Table columns: (metrics key, column name); Dice only when label maps were given.
COLUMNS = (("ncc", "local NCC"), ("folding_percent", "folding %"), ("dice", "Dice"), ("seconds", "seconds"))
KIND = stepresults.ResultKind("SPACRegistration", COLUMNS, plotted=("ncc", "dice"), proxy_suffix="transform")
FIXED_REFERENCE = KIND.reference("fixed")
MOVING_REFERENCE = KIND.reference("moving")

#: The handles on one result's nodes (the shared class; the old name stays for scripts).
ResultNodes = StepNodes


def create(scene, first_step: int, first_node, metrics: dict, fixed, moving, sequences_logic,
           base_name: str) -> StepNodes:
    """Create a registration result's nodes around its first step."""
    return stepresults.create(scene, KIND, first_step, first_node, metrics, {"fixed": fixed, "moving": moving},
                              sequences_logic, base_name)


def from_browser(browser) -> StepNodes | None:
    """The result nodes of a browser this module created (None for another browser)."""
    return stepresults.from_browser(browser, KIND)


def keep(nodes: StepNodes, step: int, scene, *, resample: bool = False, name: str | None = None):
    """A standalone copy of step ``step``'s transform, and (if asked) the moving volume resampled by it.

    Returns ``(transform_node, volume_node_or_None)``; both are new nodes in ``scene``, owned by
    the user (deleting the result does not touch them).
    """
    item = nodes.item_of(step)
    if item < 0:
        raise KeyError(f"step {step} is not in {nodes.sequence.GetName()}")
    fixed = nodes.reference("fixed")
    moving = nodes.reference("moving")
    base = name or f"{moving.GetName() if moving else 'moving'} SPAC step {step}"
    transform = copy_grid_transform(nodes.sequence.GetNthDataNode(item), scene.GenerateUniqueName(base), scene)
    volume = None
    if resample:
        if fixed is None or moving is None:
            raise KeyError("the fixed or moving volume of this result is no longer in the scene")
        volume = resample_volume(moving, fixed, transform, scene, scene.GenerateUniqueName(f"{base} warped"))
    return transform, volume
