"""Static checks of both modules' Qt side and packaging, and of the shared StepRLCommon package
(Slicer itself is not needed).

For each module: the .ui parses; every widget the module code and the shared panel
(``StepRLCommon/widgetbase.py``) use exists in it with the right class; the parameter-node
bindings name real parameters through widgets the parameterNodeWrapper can bind; every Lib file
and the .ui are packaged by CMake; the Lib and StepRLCommon import neither Qt nor torch, except
``widgetbase`` (the one Qt-side file of StepRLCommon), which imports no torch and no module's Lib.
(The Qt-side classes themselves are imported and checked in test_module_description.py.) Also:
the ExtensionsIndex entry is valid and named after ``project()``; models and dependency
installation behave as the panels expect.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
import typing
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
from module_support import REPO_ROOT, require_slicer_core, save_tiny_model

CATALOG = REPO_ROOT / "Resources" / "StepRL.json"
COMMON_DIR = REPO_ROOT / "StepRLCommon"
#: The one StepRLCommon file on the Qt side (imported only by the module files, inside Slicer).
WIDGET_BASE = COMMON_DIR / "widgetbase.py"
#: Modules only the Slicer application has (Qt and Slicer's Qt-side Python).
QT_MODULES = ("qt", "ctk", "PythonQt", "slicer.ScriptedLoadableModule", "slicer.util", "slicer.i18n")
#: Qt widgets that do not need a tooltip (text and layout only).
NO_TOOLTIP = {"QLabel", "ctkCollapsibleButton", "qMRMLWidget"}


@dataclass(frozen=True)
class Module:
    """What differs between the modules for these checks."""

    name: str
    parameter_class: str
    volume_selector: str  # a volume selector: it must not list label maps
    optional_selector: str  # an optional input: None must be selectable

    @property
    def folder(self) -> Path:
        return REPO_ROOT / self.name

    @property
    def ui_file(self) -> Path:
        return self.folder / "Resources" / "UI" / f"{self.name}.ui"

    @property
    def module_file(self) -> Path:
        return self.folder / f"{self.name}.py"


#: Parameters the widget code sets itself (not bound through SlicerParameterName).
CODE_MANAGED = {"model", "sequenceBrowser"}
MODULES = [
    Module("SPACRegistration", "SPACRegistrationParameterNode", "fixedVolumeSelector", "fixedLabelsSelector"),
    Module("PixelRLSegment", "PixelRLSegmentParameterNode", "inputVolumeSelector", "referenceSelector"),
]
each_module = pytest.mark.parametrize("module", MODULES, ids=[m.name for m in MODULES])


def ui_widgets(module: Module) -> dict[str, ET.Element]:
    root = ET.parse(module.ui_file).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def ui_property(widget: ET.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            value = prop[0]
            if value.tag == "stringlist":
                return [s.text for s in value]
            if value.tag == "number":
                return int(value.text)
            if value.tag == "bool":
                return value.text == "true"
            return value.text
    return None


def ui_table(path: Path) -> dict[str, str]:
    """The ``UI_WIDGETS`` table of a file ({} when it has none: the module uses only the shared panel's)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "UI_WIDGETS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def used_ui_names(path: Path) -> set[str]:
    """Every ``self.ui.<name>`` in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


@each_module
def test_ui_parses_and_declares_its_custom_widgets(module):
    root = ET.parse(module.ui_file).getroot()
    assert root.tag == "ui" and root.findtext("class") == module.name
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == module.name
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    qt_builtin = {c for c in used if c.startswith("Q")}
    assert used - qt_builtin <= declared, f"undeclared custom widgets: {sorted(used - qt_builtin - declared)}"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate object names"
    # Every MRML widget receives the scene from the panel.
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("sender") == module.name
                 and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml = {w.get("name") for w in root.iter("widget") if w.get("class").startswith("qMRML") and w is not top}
    assert mrml <= receivers, f"no scene for {sorted(mrml - receivers)}"


@each_module
def test_every_widget_the_code_uses_exists_with_its_class(module):
    """The shared panel's table lists exactly what it uses; a module's own table (if any) only what it uses."""
    base_table, own_table = ui_table(WIDGET_BASE), ui_table(module.module_file)
    base_used, own_used = used_ui_names(WIDGET_BASE), used_ui_names(module.module_file)
    assert base_used and set(base_table) == base_used, f"widgetbase UI_WIDGETS vs use: {set(base_table) ^ base_used}"
    assert set(own_table) <= own_used, f"{module.name}.py UI_WIDGETS lists unused widgets"
    table = base_table | own_table
    assert own_used <= set(table), f"self.ui names missing from UI_WIDGETS: {sorted(own_used - set(table))}"
    assert all(own_table[n] == base_table[n] for n in set(own_table) & set(base_table))
    widgets = ui_widgets(module)
    for name, cls in table.items():
        assert name in widgets, f"{name} is not in the .ui"
        assert widgets[name].get("class") == cls, f"{name} is a {widgets[name].get('class')} in the .ui, not {cls}"


@each_module
def test_interactive_widgets_have_tooltips_and_strings_are_translatable(module):
    for name, widget in ui_widgets(module).items():
        if widget.get("class") not in NO_TOOLTIP and name not in ("statusLabel",):
            assert (ui_property(widget, "toolTip") or "").strip(), f"{name} has no tooltip"
    text = module.ui_file.read_text(encoding="utf-8")
    assert 'notr="true"' not in text
    source = module.module_file.read_text(encoding="utf-8")
    assert "from slicer.i18n import tr as _" in source
    for attribute in ("title", "helpText", "acknowledgementText"):
        assert re.search(rf"self\.parent\.{attribute} = _\(", source), attribute


def _node_classes(annotated) -> list[str] | None:
    """The MRML node class names a field holds (one, or a Union's), None for a non-node field."""
    args = typing.get_args(annotated) if typing.get_origin(annotated) is typing.Union else (annotated,)
    names = [a.__name__ for a in args if isinstance(a, type) and a.__name__.startswith("vtkMRML")]
    return names or None


@each_module
def test_parameter_bindings_match_the_parameter_node(module):
    require_slicer_core()
    from StepRLCommon.parameters import parameter_types

    parameters = importlib.import_module(f"{module.name}Lib.parameters")
    types = parameter_types(getattr(parameters, module.parameter_class))
    bound = {ui_property(w, "SlicerParameterName"): w for w in ui_widgets(module).values()
             if ui_property(w, "SlicerParameterName")}
    assert set(bound) == set(types) - CODE_MANAGED
    for name, widget in bound.items():
        annotated = types[name]
        base = typing.get_origin(annotated) is typing.Annotated and typing.get_args(annotated)[0] or annotated
        metadata = getattr(annotated, "__metadata__", ())
        cls = widget.get("class")
        if _node_classes(annotated):
            assert cls == "qMRMLNodeComboBox", name
            assert ui_property(widget, "nodeTypes") == _node_classes(annotated), name
        elif base is bool:
            assert cls == "QCheckBox", name
        elif base is int:
            assert cls == "QSpinBox", name
            bounds = [m for m in metadata if type(m).__name__ == "WithinRange"]
            assert bounds, f"{name}: an int bound to a spin box needs WithinRange (else the range is +-2^31)"
            assert (ui_property(widget, "minimum"), ui_property(widget, "maximum")) == (
                bounds[0].minimum, bounds[0].maximum), name  # the spin box offers exactly the allowed range
            if name == "steps":
                assert (bounds[0].minimum, bounds[0].maximum) == (parameters.MIN_STEPS, parameters.MAX_STEPS)
            assert ui_property(widget, "value") == getattr(parameters, module.parameter_class).__dict__[name]
        elif base is str:
            assert cls == "QComboBox" and any(type(m).__name__ == "Choice" for m in metadata), name
        elif base is Path:
            assert cls == "ctkPathLineEdit", name
        else:
            pytest.fail(f"{name}: no binding rule for {annotated}")
    widgets = ui_widgets(module)
    assert ui_property(widgets[module.optional_selector], "noneEnabled") is True
    assert ui_property(widgets[module.volume_selector], "showChildNodeTypes") is False


@each_module
def test_cmake_packages_every_lib_file_and_the_ui(module):
    text = (module.folder / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(re.findall(rf"(?:\$\{{MODULE_NAME\}}|{module.name})Lib/(\w+\.py)", text))
    on_disk = {p.name for p in (module.folder / f"{module.name}Lib").glob("*.py")}
    assert listed == on_disk
    assert "Resources/UI/${MODULE_NAME}.ui" in text
    top = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "trainer/steprl/*.py" in top and "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR" in top
    assert "steprl/models/*" in top and "steprl/data/*" in top


def test_cmake_packages_every_common_file_before_the_modules():
    text = (COMMON_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\s*StepRLCommon/(\w+\.py)\s*$", text, re.M))
    assert listed == {p.name for p in COMMON_DIR.glob("*.py")}
    assert "ctkMacroCompilePythonScript(" in text and "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR" in text
    top = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    order = [m.start() for m in re.finditer(r"^add_subdirectory\((StepRLCommon|SPACRegistration|PixelRLSegment)\)",
                                            top, re.M)]
    assert len(order) == 3 and order == sorted(order) and top.index("add_subdirectory(StepRLCommon)") == order[0]


def test_catalog_entry_is_valid_and_named_after_the_project():
    entry = json.loads(CATALOG.read_text(encoding="utf-8"))
    cmake = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    project = re.search(r"^project\((\w+)\)", cmake, re.M).group(1)
    assert CATALOG.stem == project  # the ExtensionsIndex names an extension by its file name
    assert re.fullmatch(r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
                        r"slicer-extension-catalog-entry-schema-v1\.0\.\d+\.json#", entry["$schema"])
    for key in ("$schema", "category", "scm_url"):  # required by the schema
        assert isinstance(entry.get(key), str) and entry[key]
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier", "dicom_support_rule"}
    assert set(entry) <= allowed, f"not in the schema: {set(entry) - allowed}"
    assert entry["category"] == re.search(r'set\(EXTENSION_CATEGORY\s+"([^"]+)"\)', cmake).group(1)
    depends = re.search(r'set\(EXTENSION_DEPENDS\s+"?([^")]+)"?\)', cmake).group(1).split()
    assert entry["build_dependencies"] == depends == ["PyTorch"]
    assert entry["scm_url"].startswith("https://") and entry.get("scm_type", "git") == "git"
    assert isinstance(entry.get("tier", 1), int) and 1 <= entry.get("tier", 1) <= 5


@each_module
def test_lib_imports_neither_qt_nor_torch(module):
    """The logic must run without Qt (slicer-core) and keep torch out of Slicer's process."""
    require_slicer_core()
    names = [f"{module.name}Lib.{p.stem}" for p in (module.folder / f"{module.name}Lib").glob("*.py")]
    names += [f"StepRLCommon.{p.stem}" for p in COMMON_DIR.glob("*.py") if p != WIDGET_BASE]
    code = ("import importlib, sys; sys.path[:0] = sys.argv[1:3]; "
            f"[importlib.import_module(m) for m in {sorted(names)!r}]; "
            "bad = [m for m in ('torch', 'qt', 'ctk', 'PythonQt') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT), str(module.folder)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---- the Qt side, read (it runs only in Slicer) ------------------------------------------------------
def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (``from . import x`` as ``StepRLCommon.x``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ("StepRLCommon." if node.level else "") + (node.module or "")
            names.add(base.rstrip("."))
            names |= {f"{base.rstrip('.')}.{a.name}" for a in node.names}
    return names


def _is(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_only_widgetbase_of_the_common_package_imports_qt_and_none_imports_torch():
    for path in sorted(COMMON_DIR.glob("*.py")):
        names = imported_modules(path)
        assert not [n for n in names if _is(n, ("torch",))], f"{path.name} imports torch"
        qt = [n for n in names if _is(n, QT_MODULES)]
        if path == WIDGET_BASE:
            assert {"qt", "slicer.ScriptedLoadableModule"} <= set(qt)
            assert not [n for n in names if _is(n, [f"{m.name}Lib" for m in MODULES])], "widgetbase imports a Lib"
        else:
            assert not qt, f"{path.name} imports {qt}: only widgetbase.py may (the rest runs on slicer-core)"
    for module in MODULES:  # the module files run in Slicer's process: no torch there either
        assert not [n for n in imported_modules(module.module_file) if _is(n, ("torch",))]


def test_models_lists_bundled_then_user_spac_models(tmp_path):
    from SPACRegistrationLib import models

    bundled, user = tmp_path / "bundled", tmp_path / "user"
    save_tiny_model(bundled, name="b3d")
    save_tiny_model(user, name="u3d")
    save_tiny_model(user, name="b3d")  # same name as a bundled one: listed too, as the user's
    (user / "broken.safetensors").write_bytes(b"x")  # no card: skipped with a warning
    card = json.loads((user / "u3d.json").read_text())
    card["method"] = "pixeldrl-mg"
    (user / "seg.json").write_text(json.dumps(card))
    (user / "seg.safetensors").write_bytes((user / "u3d.safetensors").read_bytes())
    entries = models.list_models(user, bundled_folder=bundled)
    assert [(e.name, e.source) for e in entries] == [("b3d", "bundled"), ("b3d", "user"), ("u3d", "user")]
    assert entries[0].label == "b3d (3D, bundled)"
    assert models.find_model("b3d", user, bundled_folder=bundled).source == "user"
    assert models.find_model(str(user / "u3d.safetensors")).name == "u3d"
    assert models.find_model("nothing", user, bundled_folder=bundled) is None
    text = models.describe_card(entries[0].card)
    assert "SPAC model, 3D" in text and "16 x 16 x 16" in text and "default steps: 3" in text


class FakeInstaller:
    def __init__(self) -> None:
        self.calls: list = []

    def install_torch(self, requirement: str) -> bool:
        self.calls.append(("torch", requirement))
        return True

    def pip_ensure(self, requirements, never_replace) -> None:
        self.calls.append(("pip", list(requirements), list(never_replace)))


def test_dependencies_are_installed_only_with_consent(monkeypatch):
    from StepRLCommon import install

    assert install.satisfied("numpy>=1.0") and not install.satisfied("numpy>=999")
    assert not install.satisfied("no-such-package-steprl")
    missing = ["torch>=2.2", "safetensors>=0.4"]
    state = {"missing": list(missing)}
    monkeypatch.setattr(install, "missing_requirements", lambda *a: list(state["missing"]))
    fake = FakeInstaller()
    asked: list[str] = []
    assert install.ensure_dependencies(lambda text: asked.append(text) or False, fake, purpose="PixelRL") is False
    assert fake.calls == [] and "torch>=2.2" in asked[0] and "numpy and SimpleITK are not changed" in asked[0]
    assert asked[0].startswith("PixelRL needs these Python packages")

    def install_all(requirement):
        state["missing"] = []
        return True

    fake.install_torch = install_all
    assert install.ensure_dependencies(lambda text: True, fake) is True
    assert fake.calls == [("pip", ["safetensors>=0.4"], ["numpy", "SimpleITK", "torch"])]
    state["missing"] = ["safetensors>=0.4"]
    fake.pip_ensure = lambda requirements, never_replace: None  # pip "succeeds" but nothing changes
    with pytest.raises(RuntimeError, match="Could not install safetensors"):
        install.ensure_dependencies(lambda text: True, fake)


def test_protocol_reads_every_file_of_a_step_and_counted_progress():
    from StepRLCommon.protocol import ProgressEvent, StepEvent, device_choice_texts, parse_line

    step = parse_line('{"event": "step", "step": 2, "total": 3, "mask": "/m.nrrd", "changed": "/c.nrrd",'
                      ' "metrics": {"dice": 0.5}}')
    assert isinstance(step, StepEvent) and step.files == {"mask": "/m.nrrd", "changed": "/c.nrrd"}
    assert (step.mask, step.changed, step.field, step.metrics) == ("/m.nrrd", "/c.nrrd", "", {"dice": 0.5})
    assert parse_line('{"event": "step", "step": 1, "field": "/f.mha"}').field == "/f.mha"
    assert parse_line('{"event": "step", "step": 1, "total": 3}') is None  # a step without a file
    progress = parse_line('{"event": "progress", "stage": "segmenting", "message": "Slices 3 of 9", "done": 3,'
                          ' "total": 9, "eta_seconds": 1.5}')
    assert progress == ProgressEvent("segmenting", "Slices 3 of 9", 3, 9, 1.5)
    assert parse_line('{"event": "progress", "stage": "reading", "message": "x"}').done is None
    texts = device_choice_texts(parse_line('{"event": "devices", "devices": [{"value": "cpu", "label": "CPU (2)"},'
                                           ' {"value": "cuda:0", "label": "GPU: H100"}]}'))
    assert texts == {"auto": "auto (GPU: H100)", "cpu": "CPU (2)", "cuda": "GPU: H100"}
    broken = device_choice_texts(parse_line('{"event": "error", "message": "no torch", "exit_code": 1}'))
    assert broken["auto"] == "auto (devices unknown: no torch)" and broken["cuda"] == "GPU (not available)"
