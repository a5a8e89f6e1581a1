"""The MRML nodes of one step-by-step result: step sequence, browser, metrics table and plot.

Shared by the StepRL modules; what differs between them is described by a :class:`ResultKind`
(which module, which metric columns, which are plotted, what the proxy node shows). The nodes
are created all at once when the first step arrives (so a run that fails before it leaves
nothing behind), then grown one step at a time:

- a ``vtkMRMLSequenceNode`` of one node per step, index = step (item 0 is the input state:
  identity transform, or the all-object start mask);
- a ``vtkMRMLSequenceBrowserNode`` whose selected item is the step slider; its proxy node shows
  the selected step (a transform the moving volume sits under, a labelmap over the input);
- a ``vtkMRMLTableNode`` of per-step metrics, with a plot chart of the plotted ones.

The browser keeps node references to the inputs, the table and the chart (names
``<module>.<role>``), so that a saved and reloaded scene still knows them.

Example::

    kind = ResultKind("PixelRLSegment", columns=(("dice", "Dice"),), plotted=("dice",), proxy_suffix="mask")
    nodes = create(scene, kind, 0, first_labelmap, {"dice": 0.4}, {"input": volume}, sequences_logic, "CT PixelRL")
    add_step(nodes, 1, labelmap, {"dice": 0.6}, sequences_logic)
    nodes.proxy          # the labelmap shown; select(nodes, item, sequences_logic) moves the slider
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

from .mrmlio import role_attribute

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResultKind:
    """What one module's results look like.

    module: the module name; it names the role attribute and the browser's node references.
    columns: table columns as (metrics key, column name), in order; a column is created only
        when the first step's metrics have its key.
    plotted: the metrics keys drawn in the chart (when present).
    proxy_suffix: the proxy node's name is ``<base name> <proxy_suffix>``.
    """

    module: str
    columns: tuple[tuple[str, str], ...]
    plotted: tuple[str, ...]
    proxy_suffix: str

    @property
    def role_attribute(self) -> str:
        return role_attribute(self.module)

    def reference(self, role: str) -> str:
        """The browser's node-reference name for ``role`` (e.g. ``SPACRegistration.fixed``)."""
        return f"{self.module}.{role}"


@dataclass
class StepNodes:
    """Handles on one result's nodes (all in the scene)."""

    kind: ResultKind
    sequence: vtkMRMLSequenceNode
    browser: vtkMRMLSequenceBrowserNode
    table: vtkMRMLTableNode
    chart: vtkMRMLPlotChartNode

    @property
    def proxy(self):
        """The node showing the selected step."""
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

    @property
    def selected_step(self) -> int:
        """The step the slider shows."""
        return self.step_at(self.browser.GetSelectedItemNumber())

    def reference(self, role: str):
        """The node the browser refers to as ``role`` (an input, the table, ...), or None."""
        return self.browser.GetNodeReference(self.kind.reference(role))

    def nodes(self) -> list:
        """Every node of this result: series, chart, table, proxy, browser, sequence."""
        nodes = [self.chart.GetNthPlotSeriesNode(i) for i in range(self.chart.GetNumberOfPlotSeriesNodes())]
        return [n for n in [*nodes, self.chart, self.table, self.proxy, self.browser, self.sequence] if n is not None]

    def remove(self, scene) -> None:
        """Take every node of this result out of the scene."""
        for node in self.nodes():
            if node.GetScene() is scene:
                scene.RemoveNode(node)


def _add_column(table: vtkMRMLTableNode, name: str) -> None:
    array = vtkDoubleArray()
    array.SetName(name)
    table.GetTable().AddColumn(array)


def _new(scene, node, name: str, kind: ResultKind, role: str):
    node.SetName(scene.GenerateUniqueName(name))
    node.SetAttribute(kind.role_attribute, role)
    scene.AddNode(node)
    return node


def create(scene, kind: ResultKind, first_step: int, first_node, metrics: dict, references: dict,
           sequences_logic, base_name: str) -> StepNodes:
    """Create a result's nodes around its first step (see the module docstring).

    ``references``: role -> input node, kept as the browser's node references.
    """
    sequence = _new(scene, vtkMRMLSequenceNode(), f"{base_name} steps", kind, "steps")
    sequence.SetIndexName("step")
    sequence.SetIndexUnit("")
    sequence.SetIndexType(vtkMRMLSequenceNode.NumericIndex)
    sequence.SetDataNodeAtValue(first_node, str(first_step))

    table = _new(scene, vtkMRMLTableNode(), f"{base_name} metrics", kind, "metrics")
    _add_column(table, "step")
    for key, column in kind.columns:
        if key in metrics:
            _add_column(table, column)

    chart = _new(scene, vtkMRMLPlotChartNode(), f"{base_name} chart", kind, "chart")
    chart.SetTitle("Per-step metrics")
    chart.SetXAxisTitle("step")
    names = dict(kind.columns)
    for key in kind.plotted:
        if key not in metrics:
            continue
        series = _new(scene, vtkMRMLPlotSeriesNode(), f"{base_name} {names[key]}", kind, "series")
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("step")
        series.SetYColumnName(names[key])
        series.SetPlotType(vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())

    browser = _new(scene, vtkMRMLSequenceBrowserNode(), f"{base_name} browser", kind, "browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.SetPlaybackRateFps(4.0)
    browser.SetPlaybackLooped(False)
    for role, node in references.items():
        if node is not None:
            browser.SetNodeReferenceID(kind.reference(role), node.GetID())
    browser.SetNodeReferenceID(kind.reference("metrics"), table.GetID())
    browser.SetNodeReferenceID(kind.reference("chart"), chart.GetID())
    sequences_logic.UpdateProxyNodesFromSequences(browser)
    proxy = browser.GetProxyNode(sequence)
    proxy.SetName(scene.GenerateUniqueName(f"{base_name} {kind.proxy_suffix}"))
    proxy.SetAttribute(kind.role_attribute, "proxy")
    browser.SetSaveChanges(sequence, False)  # editing the proxy must not rewrite a step
    nodes = StepNodes(kind, sequence, browser, table, chart)
    append_metrics(nodes, first_step, metrics)
    return nodes


def from_browser(browser, kind: ResultKind) -> StepNodes | None:
    """The result nodes a browser created by :func:`create` for ``kind`` refers to (None for another browser)."""
    if browser is None or browser.GetAttribute(kind.role_attribute) != "browser":
        return None
    return StepNodes(kind, browser.GetMasterSequenceNode(), browser,
                     browser.GetNodeReference(kind.reference("metrics")),
                     browser.GetNodeReference(kind.reference("chart")))


def append_metrics(nodes: StepNodes, step: int, metrics: dict) -> None:
    """One table row for ``step`` (NaN where a metric is missing)."""
    table = nodes.table.GetTable()
    keys = {column: key for key, column in nodes.kind.columns}
    for index in range(table.GetNumberOfColumns()):
        array = table.GetColumn(index)
        name = array.GetName()
        value = step if name == "step" else metrics.get(keys.get(name, ""))
        array.InsertNextValue(float("nan") if value is None else float(value))
    table.Modified()
    nodes.table.Modified()


def add_step(nodes: StepNodes, step: int, node, metrics: dict, sequences_logic) -> None:
    """Append one step; the selection follows the newest step unless the user moved the slider away."""
    following = nodes.browser.GetSelectedItemNumber() == nodes.count - 1
    nodes.sequence.SetDataNodeAtValue(node, str(step))
    append_metrics(nodes, step, metrics)
    if following:
        select(nodes, nodes.count - 1, sequences_logic)


def select(nodes: StepNodes, item: int, sequences_logic) -> None:
    """Show sequence item ``item`` (the proxy node takes that step's content)."""
    nodes.browser.SetSelectedItemNumber(item)
    sequences_logic.UpdateProxyNodesFromSequences(nodes.browser)
