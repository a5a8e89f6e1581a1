"""The MRML nodes of one registration result: step sequence, browser, metrics table and plot.

Created all at once when the first step arrives (so a run that fails before it leaves nothing
behind), then grown one step at a time:

- a ``vtkMRMLSequenceNode`` of ``vtkMRMLGridTransformNode`` items, index = step (item 0 is the
  input: identity, or the affine pre-alignment alone);
- a ``vtkMRMLSequenceBrowserNode`` whose selected item is the step slider; its proxy transform
  is the transform the moving volume sits under, so Slicer reslices on the fly;
- a ``vtkMRMLTableNode`` of per-step metrics, with a plot chart of local NCC (and Dice).

The browser keeps references to the fixed and moving volumes, so that "Keep this step" works
from a saved and reloaded scene as well.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from slicer import (
    vtkMRMLPlotChartNode,
    vtkMRMLPlotSeriesNode,
    vtkMRMLSequenceBrowserNode,
    vtkMRMLSequenceNode,
    vtkMRMLTableNode,
)
from vtkmodules.vtkCommonCore import vtkDoubleArray

from .mrmlio import ROLE_ATTRIBUTE, copy_grid_transform, resample_volume

log = logging.getLogger(__name__)

FIXED_REFERENCE = "SPACRegistration.fixed"
MOVING_REFERENCE = "SPACRegistration.moving"
TABLE_REFERENCE = "SPACRegistration.metrics"
CHART_REFERENCE = "SPACRegistration.chart"

#: Table columns: (metrics key, column name); Dice only when label maps were given.
COLUMNS = (("ncc", "local NCC"), ("folding_percent", "folding %"), ("dice", "Dice"), ("seconds", "seconds"))


@dataclass
class ResultNodes:
    """Handles on one result's nodes (all in the scene)."""

    sequence: vtkMRMLSequenceNode
    browser: vtkMRMLSequenceBrowserNode
    table: vtkMRMLTableNode
    chart: vtkMRMLPlotChartNode

    @property
    def proxy(self):
        """The transform node showing the selected step."""
        return self.browser.GetProxyNode(self.sequence)

    @property
    def count(self) -> int:
        return self.sequence.GetNumberOfDataNodes()

    def step_at(self, item: int) -> int:
        """Step number of sequence item ``item``."""
        return int(float(self.sequence.GetNthIndexValue(item)))

    def item_of(self, step: int) -> int:
        """Sequence item of step ``step`` (-1 when absent)."""
        return self.sequence.GetItemNumberFromIndexValue(str(step))

    def remove(self, scene) -> None:
        """Take every node of this result out of the scene."""
        nodes = [self.chart.GetNthPlotSeriesNode(i) for i in range(self.chart.GetNumberOfPlotSeriesNodes())]
        nodes += [self.chart, self.table, self.proxy, self.browser, self.sequence]
        for node in nodes:
            if node is not None and node.GetScene() is scene:
                scene.RemoveNode(node)


def _add_column(table: vtkMRMLTableNode, name: str) -> None:
    array = vtkDoubleArray()
    array.SetName(name)
    table.GetTable().AddColumn(array)


def create(scene, first_step: int, first_node, metrics: dict, fixed, moving, sequences_logic,
           base_name: str) -> ResultNodes:
    """Create a result's nodes around its first step (see the module docstring)."""
    sequence = vtkMRMLSequenceNode()
    sequence.SetName(scene.GenerateUniqueName(f"{base_name} steps"))
    sequence.SetIndexName("step")
    sequence.SetIndexUnit("")
    sequence.SetIndexType(vtkMRMLSequenceNode.NumericIndex)
    sequence.SetAttribute(ROLE_ATTRIBUTE, "steps")
    scene.AddNode(sequence)
    sequence.SetDataNodeAtValue(first_node, str(first_step))

    table = vtkMRMLTableNode()
    table.SetName(scene.GenerateUniqueName(f"{base_name} metrics"))
    table.SetAttribute(ROLE_ATTRIBUTE, "metrics")
    scene.AddNode(table)
    _add_column(table, "step")
    for key, column in COLUMNS:
        if key in metrics:
            _add_column(table, column)

    chart = vtkMRMLPlotChartNode()
    chart.SetName(scene.GenerateUniqueName(f"{base_name} chart"))
    chart.SetTitle("Per-step metrics")
    chart.SetXAxisTitle("step")
    chart.SetAttribute(ROLE_ATTRIBUTE, "chart")
    scene.AddNode(chart)
    for key, column in COLUMNS[:3:2]:  # NCC, and Dice when present
        if key not in metrics:
            continue
        series = vtkMRMLPlotSeriesNode()
        series.SetName(scene.GenerateUniqueName(f"{base_name} {column}"))
        series.SetAttribute(ROLE_ATTRIBUTE, "series")
        scene.AddNode(series)
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("step")
        series.SetYColumnName(column)
        series.SetPlotType(vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())

    browser = vtkMRMLSequenceBrowserNode()
    browser.SetName(scene.GenerateUniqueName(f"{base_name} browser"))
    browser.SetAttribute(ROLE_ATTRIBUTE, "browser")
    scene.AddNode(browser)
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.SetPlaybackRateFps(4.0)
    browser.SetPlaybackLooped(False)
    browser.SetNodeReferenceID(FIXED_REFERENCE, fixed.GetID())
    browser.SetNodeReferenceID(MOVING_REFERENCE, moving.GetID())
    browser.SetNodeReferenceID(TABLE_REFERENCE, table.GetID())
    browser.SetNodeReferenceID(CHART_REFERENCE, chart.GetID())
    sequences_logic.UpdateProxyNodesFromSequences(browser)
    proxy = browser.GetProxyNode(sequence)
    proxy.SetName(scene.GenerateUniqueName(f"{base_name} transform"))
    proxy.SetAttribute(ROLE_ATTRIBUTE, "proxy")
    browser.SetSaveChanges(sequence, False)  # editing the proxy must not rewrite a step
    nodes = ResultNodes(sequence, browser, table, chart)
    append_metrics(nodes, first_step, metrics)
    return nodes


def from_browser(browser) -> ResultNodes | None:
    """The result nodes a browser created by :func:`create` refers to (None for another browser)."""
    if browser is None or browser.GetAttribute(ROLE_ATTRIBUTE) != "browser":
        return None
    return ResultNodes(browser.GetMasterSequenceNode(), browser, browser.GetNodeReference(TABLE_REFERENCE),
                       browser.GetNodeReference(CHART_REFERENCE))


def append_metrics(nodes: ResultNodes, step: int, metrics: dict) -> None:
    """One table row for ``step`` (NaN where a metric is missing)."""
    table = nodes.table.GetTable()
    names = {column: key for key, column in COLUMNS}
    for index in range(table.GetNumberOfColumns()):
        array = table.GetColumn(index)
        name = array.GetName()
        value = step if name == "step" else metrics.get(names.get(name, ""))
        array.InsertNextValue(float("nan") if value is None else float(value))
    table.Modified()
    nodes.table.Modified()


def add_step(nodes: ResultNodes, step: int, node, metrics: dict, sequences_logic) -> None:
    """Append one step; the selection follows the newest step unless the user moved the slider away."""
    following = nodes.browser.GetSelectedItemNumber() == nodes.count - 1
    nodes.sequence.SetDataNodeAtValue(node, str(step))
    append_metrics(nodes, step, metrics)
    if following:
        select(nodes, nodes.count - 1, sequences_logic)


def select(nodes: ResultNodes, item: int, sequences_logic) -> None:
    """Show sequence item ``item`` (the proxy transform takes that step's field)."""
    nodes.browser.SetSelectedItemNumber(item)
    sequences_logic.UpdateProxyNodesFromSequences(nodes.browser)


def keep(nodes: ResultNodes, step: int, scene, *, resample: bool = False, name: str | None = None):
    """A standalone copy of step ``step``'s transform, and (if asked) the moving volume resampled by it.

    Returns ``(transform_node, volume_node_or_None)``; both are new nodes in ``scene``, owned by
    the user (deleting the result does not touch them).
    """
    item = nodes.item_of(step)
    if item < 0:
        raise KeyError(f"step {step} is not in {nodes.sequence.GetName()}")
    fixed = nodes.browser.GetNodeReference(FIXED_REFERENCE)
    moving = nodes.browser.GetNodeReference(MOVING_REFERENCE)
    base = name or f"{moving.GetName() if moving else 'moving'} SPAC step {step}"
    transform = copy_grid_transform(nodes.sequence.GetNthDataNode(item), scene.GenerateUniqueName(base), scene)
    volume = None
    if resample:
        if fixed is None or moving is None:
            raise KeyError("the fixed or moving volume of this result is no longer in the scene")
        volume = resample_volume(moving, fixed, transform, scene, scene.GenerateUniqueName(f"{base} warped"))
    return transform, volume
