"""Each module's description (StepRLCommon.description) and the Qt-side classes built on it.

A module's Lib describes the module once (a ``ModuleDescription``, checked when it is made); the
module file's Slicer classes take it through class keywords (checked when they are defined). So
a misspelt parameter, request field, class keyword, hook or self-test name stops the import, in
Slicer as here. The module files are imported for real, on slicer-core with stand-ins for Qt
(``module_support.load_module_file``); their request mapping and panel hooks then run on a
stand-in parameter node that has exactly the parameter node's fields. Last, the code that only
runs in Slicer (widgetbase's panel, the module classes' methods) is read: every ``self.`` /
``self.logic.`` name it uses exists on the real classes, and its calls fit their signatures.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import types
import unittest
from dataclasses import dataclass
from pathlib import Path

import pytest
from module_support import load_module_file, require_slicer_core


@dataclass(frozen=True)
class Module:
    name: str
    worker: str  # its WorkerLogic subclass in <name>Lib.logic
    alias: str  # the name StepRLModuleLogic.worker had before the modules shared it


MODULES = [Module("SPACRegistration", "RegistrationLogic", "registration"),
           Module("PixelRLSegment", "SegmentationLogic", "segmentation")]
each_module = pytest.mark.parametrize("module", MODULES, ids=[m.name for m in MODULES])


@pytest.fixture(scope="module")
def qt_side():
    """``{module name: the imported module file}``."""
    require_slicer_core()
    return {m.name: load_module_file(m.name) for m in MODULES}


def _worker(module: Module):
    return getattr(importlib.import_module(f"{module.name}Lib.logic"), module.worker)


def _stand_in(parameter_node_class, **values) -> types.SimpleNamespace:
    """A parameter node with exactly the class's fields: their defaults, a distinct object per node field."""
    from StepRLCommon.description import parameter_names

    fields = {name: vars(parameter_node_class).get(name, object()) for name in parameter_names(parameter_node_class)}
    fields.update(model="tiny", userModelsFolder=Path("/models"), steps=3, device="cpu")
    return types.SimpleNamespace(**{**fields, **values})


@each_module
def test_each_lib_describes_its_module(module):
    require_slicer_core()
    from StepRLCommon.parameters import parameter_types

    lib = importlib.import_module(f"{module.name}Lib.logic")
    description = lib.DESCRIPTION
    assert _worker(module).description is description and description.name == module.name
    assert description.parameter_node_class.__name__ == f"{module.name}ParameterNode"
    volume = parameter_types(description.parameter_node_class)[description.default_volume_parameter]
    assert volume.__name__ == "vtkMRMLScalarVolumeNode"
    assert description.result_kind.module == module.name


def test_a_description_with_a_mistake_is_refused():
    require_slicer_core()
    from SPACRegistrationLib.logic import DESCRIPTION, RegistrationRun

    from StepRLCommon.workerlogic import WorkerLogic

    replace = dataclasses.replace
    fields = dict(DESCRIPTION.request_fields)
    mistakes = {
        "no parameter 'fixedVolum'": dict(request_fields={**fields, "fixed": "fixedVolum"}),
        "no field 'fixd'": dict(request_fields={**{k: v for k, v in fields.items() if k != "fixed"},
                                                "fixd": "fixedVolume"}),
        "nothing fills the request field 'fixed'": dict(request_fields={k: v for k, v in fields.items()
                                                                         if k != "fixed"}),
        "no parameter 'movingVolme'": dict(default_volume_parameter="movingVolme"),
        "'steps' is mapped by the shared logic": dict(request_fields={**fields, "steps": "steps"}),
        "result kind": dict(name="SPACRegistration2"),
    }
    for words, change in mistakes.items():
        with pytest.raises(ValueError, match=words):
            replace(DESCRIPTION, **change)
    for change in (dict(methods=["spac"]), dict(methods=()), dict(result_kind="spac"), dict(request_class=dict)):
        with pytest.raises(TypeError):
            replace(DESCRIPTION, **change)
    with pytest.raises(TypeError):
        type("NoDescription", (WorkerLogic,), {})
    with pytest.raises(TypeError, match="run_class"):
        type("BadRun", (WorkerLogic,), {}, description=replace(DESCRIPTION, run_class=dict))
    assert type("Fine", (WorkerLogic,), {}, description=replace(DESCRIPTION, run_class=RegistrationRun)).description


@each_module
def test_the_module_file_wires_its_classes(module, qt_side):
    loaded = qt_side[module.name]
    logic, widget, test = (getattr(loaded, module.name + suffix) for suffix in ("Logic", "Widget", "Test"))
    worker = _worker(module)
    assert logic.workerClass is worker and logic.description is worker.description
    assert widget.logicClass is logic and widget.description is worker.description
    assert test.logicClass is logic and issubclass(test, unittest.TestCase)
    assert test.tests and all(callable(getattr(test, name)) for name in test.tests)
    assert getattr(logic, module.alias) is loaded.StepRLModuleLogic.worker  # the old name still works
    assert issubclass(getattr(loaded, module.name), loaded.StepRLModule)


def test_a_module_class_without_its_keywords_is_refused_when_defined(qt_side):
    loaded = qt_side["SPACRegistration"]
    logic = loaded.SPACRegistrationLogic
    hooks = {name: lambda self, p: None for name in loaded.StepRLWidget.HOOKS}
    with pytest.raises(TypeError):
        type("NoWorker", (loaded.StepRLModuleLogic,), {})
    with pytest.raises(TypeError, match="worker_class"):
        type("NotAWorker", (loaded.StepRLModuleLogic,), {}, worker_class=logic)
    with pytest.raises(TypeError):
        type("Misspelt", (loaded.StepRLWidget,), hooks, logic_clas=logic)
    with pytest.raises(TypeError, match="keepStep"):
        type("HalfDone", (loaded.StepRLWidget,), {k: v for k, v in hooks.items() if k != "keepStep"}, logic_class=logic)
    with pytest.raises(TypeError, match="test_nothing"):
        type("NoSuchTest", (loaded.StepRLModuleTest,), {}, logic_class=logic, tests=("test_nothing",))
    assert type("Panel", (loaded.StepRLWidget,), hooks, logic_class=logic).description is logic.description


@each_module
def test_the_panel_builds_the_request_from_the_parameter_node(module, qt_side):
    logic = getattr(qt_side[module.name], f"{module.name}Logic")
    description = logic.description
    p = _stand_in(description.parameter_node_class)
    request = logic.request(p)
    assert isinstance(request, description.request_class)
    common = (request.model, request.steps, request.device, request.keep_job_folder)
    assert common == ("tiny", 3, "cpu", p.keepJobFolder)
    assert Path(request.user_models_folder) == Path("/models")
    for field, name in description.request_fields.items():
        assert getattr(request, field) is getattr(p, name), field
    if module.name == "SPACRegistration":  # the refinement spin box's -1 is "the model's default"
        assert logic.request(p).refine is None
        assert logic.request(_stand_in(description.parameter_node_class, refineSteps=7)).refine == 7


class _Node:
    def __init__(self, name: str) -> None:
        self.name = name

    def GetName(self) -> str:
        return self.name

    def CreateDefaultDisplayNodes(self) -> None:
        pass


class _Worker:
    """Stands in for the module's worker logic: checks that a call fits the real method, records it."""

    def __init__(self, worker_class, scene) -> None:
        self.worker_class, self.scene, self.calls = worker_class, scene, []

    def __getattr__(self, name):
        real = getattr(self.worker_class, name)

        def call(*args, **kwargs):
            inspect.signature(real).bind(self, *args, **kwargs)
            self.calls.append((name, args, kwargs))
            return _Node("first"), _Node("second")
        return call


@each_module
def test_the_panel_hooks_use_the_parameter_node_fields(module, qt_side, monkeypatch):
    import slicer
    import slicer.util

    loaded = qt_side[module.name]
    logic_class, widget_class = (getattr(loaded, module.name + suffix) for suffix in ("Logic", "Widget"))
    description = logic_class.description
    layers = []
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kwargs: layers.append(kwargs))
    scene = object()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    panel = object.__new__(widget_class)  # no __init__: that builds Qt widgets
    panel.logic = logic_class()
    panel.logic._worker = worker = _Worker(logic_class.workerClass, scene)
    p = _stand_in(description.parameter_node_class)
    assert panel.missingInputText(p) == ""
    for name in (description.default_volume_parameter, "model"):
        assert panel.missingInputText(_stand_in(description.parameter_node_class, **{name: None}))
    panel.showInputs(p)
    assert layers and layers[-1].get("background") is getattr(p, description.default_volume_parameter)
    assert panel.keepStep(p).GetName() == "first"
    assert worker.calls[-1][0] == "keep_step" and worker.calls[-1][1] == (p.sequenceBrowser,)
    panel.onParameterNodeModified(_stand_in(description.parameter_node_class, sequenceBrowser=None))
    panel.showNewResult(types.SimpleNamespace(proxy=_Node("proxy")))


# ---- what only runs in Slicer, read -------------------------------------------------------------------
#: What Slicer's ScriptedLoadableModuleWidget / VTKObservationMixin / ScriptedLoadableModuleLogic give.
SLICER_WIDGET = {"parent", "layout", "moduleName", "developerMode", "resourcePath", "addObserver", "removeObserver",
                 "removeObservers", "hasObserver"}
SLICER_LOGIC = {"moduleName", "getParameterNode", "isSingletonParameterNode", "createParameterNode"}
PARAMETER_NODE_METHODS = {"connectGui", "disconnectGui"}


def _namespaces(loaded) -> dict[str, dict]:
    """``{module name: its globals}`` of a loaded module file and of the widgetbase it imported."""
    shared = loaded.StepRLWidget.__init__.__globals__
    return {loaded.__name__: vars(loaded), shared["__name__"]: shared}


def _tree(cls, namespaces: dict[str, dict]) -> ast.ClassDef:
    """The class statement of ``cls``, read from its file."""
    path = Path(namespaces[cls.__module__]["__file__"])
    return next(n for n in ast.parse(path.read_text(encoding="utf-8")).body
                if isinstance(n, ast.ClassDef) and n.name == cls.__name__)


def _chains(tree: ast.AST, *prefix: str) -> set[str]:
    """Every ``name`` of ``<prefix...>.name`` in ``tree``, e.g. prefix ("self", "logic")."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and (value.id, *chain) == prefix:
                found.add(node.attr)
    return found


def _assigned(tree: ast.AST) -> set[str]:
    """The ``self.x`` a class assigns in its methods."""
    return {t.attr for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}


@each_module
def test_the_code_only_slicer_runs_uses_names_that_exist(module, qt_side):
    """widgetbase's panel, logic glue and self-test base and the module's classes: every ``self.`` name,
    ``self.logic.`` name, worker method, parameter-node field and call into StepRLCommon they use exists
    and fits (the hooks run above; the rest needs the Slicer application)."""
    from StepRLCommon.description import parameter_names

    loaded = qt_side[module.name]
    namespaces = _namespaces(loaded)
    logic_class = getattr(loaded, f"{module.name}Logic")
    worker_class = logic_class.workerClass
    parameters = parameter_names(logic_class.description.parameter_node_class) | PARAMETER_NODE_METHODS
    given = {"Widget": SLICER_WIDGET, "Logic": SLICER_LOGIC, "Test": set(dir(unittest.TestCase)) | {"delayDisplay"}}
    described = {f.name for f in dataclasses.fields(logic_class.description)}
    logic_names = set(dir(logic_class)) | _assigned(_tree(loaded.StepRLModuleLogic, namespaces)) | SLICER_LOGIC
    for suffix, slicer_given in given.items():
        cls = getattr(loaded, module.name + suffix)
        trees = [_tree(c, namespaces) for c in cls.__mro__ if c.__module__ in namespaces]
        defined = set(dir(cls)) | slicer_given | {name for tree in trees for name in _assigned(tree)}
        for tree in trees:
            assert _chains(tree, "self") <= defined, f"{tree.name}: self.{sorted(_chains(tree, 'self') - defined)}"
            assert _chains(tree, "self", "logic") <= logic_names, tree.name
            assert _chains(tree, "self", "description") <= described, tree.name
            for alias in ("worker", module.alias):
                assert all(hasattr(worker_class, n) for n in _chains(tree, "self", "logic", alias)), tree.name
            fields = _chains(tree, "self", "_parameterNode") | _chains(tree, "p") | _chains(tree, "parameterNode")
            assert fields <= parameters, f"{tree.name}: not parameters: {sorted(fields - parameters)}"
        for c, tree in zip([c for c in cls.__mro__ if c.__module__ in namespaces], trees):
            _check_calls(tree, namespaces[c.__module__], worker_class, module.alias)


def _check_calls(tree: ast.AST, namespace: dict, worker_class: type, alias: str) -> None:
    """Calls of imported StepRLCommon functions (``install.x(...)``, ``user_folder(...)``) and of worker
    methods (``self.logic.worker.poll(run)``) fit their signatures (counted arguments, named keywords)."""
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        func, target, bound = call.func, None, False
        if isinstance(func, ast.Name) and inspect.isfunction(namespace.get(func.id)):
            target = namespace[func.id]
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            owner = namespace.get(func.value.id)
            if inspect.ismodule(owner) and owner.__name__.startswith("StepRLCommon"):
                target = getattr(owner, func.attr)
        elif (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Attribute)
              and func.value.attr in ("worker", alias) and ast.unparse(func.value.value) == "self.logic"):
            target = getattr(worker_class, func.attr)
            bound = not isinstance(inspect.getattr_static(worker_class, func.attr), staticmethod)
        if target is None or isinstance(target, type):
            continue
        assert not any(isinstance(a, ast.Starred) for a in call.args), ast.unparse(call)
        args = [None] * (len(call.args) + bound)
        inspect.signature(target).bind(*args, **{k.arg: None for k in call.keywords if k.arg})
