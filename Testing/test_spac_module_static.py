"""Static checks of the SPACRegistration module's Qt side and packaging (Slicer itself is not needed).

The .ui parses; every widget the module code uses exists in it with the right class; the
parameter-node bindings name real parameters through widgets the parameterNodeWrapper can bind;
every Lib file and the .ui are packaged by CMake; the ExtensionsIndex entry is valid and named
after ``project()``; the Lib imports neither Qt nor torch; models and dependency installation
behave as the panel expects.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from test_spac_module_support import MODULE_DIR, REPO_ROOT, require_slicer_core, save_tiny_model

UI_FILE = MODULE_DIR / "Resources" / "UI" / "SPACRegistration.ui"
MODULE_FILE = MODULE_DIR / "SPACRegistration.py"
CATALOG = REPO_ROOT / "Resources" / "StepRL.json"
#: Parameters the widget code sets itself (not bound through SlicerParameterName).
CODE_MANAGED = {"model", "sequenceBrowser"}
#: Qt widgets that do not need a tooltip (text and layout only).
NO_TOOLTIP = {"QLabel", "ctkCollapsibleButton", "qMRMLWidget"}


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
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


def module_ui_widgets() -> dict[str, str]:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "UI_WIDGETS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("SPACRegistration.py has no UI_WIDGETS table")


def used_ui_names() -> set[str]:
    """Every ``self.ui.<name>`` in the module file."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


def test_ui_parses_and_declares_its_custom_widgets():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.findtext("class") == "SPACRegistration"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "SPACRegistration"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    qt_builtin = {c for c in used if c.startswith("Q")}
    assert used - qt_builtin <= declared, f"undeclared custom widgets: {sorted(used - qt_builtin - declared)}"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate object names"
    # Every MRML widget receives the scene from the panel.
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml = {w.get("name") for w in root.iter("widget") if w.get("class").startswith("qMRML") and w is not top}
    assert mrml <= receivers, f"no scene for {sorted(mrml - receivers)}"


def test_every_widget_the_code_uses_exists_with_its_class():
    table = module_ui_widgets()
    used = used_ui_names()
    assert used, "the module uses no ui widget?"
    assert used <= set(table), f"self.ui names missing from UI_WIDGETS: {sorted(used - set(table))}"
    assert set(table) <= used, f"UI_WIDGETS lists unused widgets: {sorted(set(table) - used)}"
    widgets = ui_widgets()
    for name, cls in table.items():
        assert name in widgets, f"{name} is not in the .ui"
        assert widgets[name].get("class") == cls, f"{name} is a {widgets[name].get('class')} in the .ui, not {cls}"


def test_interactive_widgets_have_tooltips_and_strings_are_translatable():
    for name, widget in ui_widgets().items():
        if widget.get("class") not in NO_TOOLTIP and name not in ("statusLabel",):
            assert (ui_property(widget, "toolTip") or "").strip(), f"{name} has no tooltip"
    text = UI_FILE.read_text(encoding="utf-8")
    assert 'notr="true"' not in text
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "from slicer.i18n import tr as _" in source
    for attribute in ("title", "helpText", "acknowledgementText"):
        assert re.search(rf"self\.parent\.{attribute} = _\(", source), attribute


def test_parameter_bindings_match_the_parameter_node():
    require_slicer_core()
    from SPACRegistrationLib.parameters import MAX_STEPS, MIN_STEPS, parameter_types

    types = parameter_types()
    bound = {ui_property(w, "SlicerParameterName"): w for w in ui_widgets().values()
             if ui_property(w, "SlicerParameterName")}
    assert set(bound) == set(types) - CODE_MANAGED
    for name, widget in bound.items():
        annotated = types[name]
        base = typing.get_origin(annotated) and typing.get_args(annotated)[0] or annotated
        metadata = getattr(annotated, "__metadata__", ())
        cls = widget.get("class")
        if isinstance(base, type) and base.__name__.startswith("vtkMRML"):
            assert cls == "qMRMLNodeComboBox", name
            assert ui_property(widget, "nodeTypes") == [base.__name__], name
        elif base is bool:
            assert cls == "QCheckBox", name
        elif base is int:
            assert cls == "QSpinBox", name
            bounds = [m for m in metadata if type(m).__name__ == "WithinRange"]
            assert bounds, f"{name}: an int bound to a spin box needs WithinRange (else the range is +-2^31)"
            assert (bounds[0].minimum, bounds[0].maximum) == (MIN_STEPS, MAX_STEPS)
            assert (ui_property(widget, "minimum"), ui_property(widget, "maximum")) == (MIN_STEPS, MAX_STEPS)
        elif base is str:
            assert cls == "QComboBox" and any(type(m).__name__ == "Choice" for m in metadata), name
        elif base is Path:
            assert cls == "ctkPathLineEdit", name
        else:
            pytest.fail(f"{name}: no binding rule for {annotated}")
    # The label selectors may be empty; the volume selectors list no label maps.
    widgets = ui_widgets()
    assert ui_property(widgets["fixedLabelsSelector"], "noneEnabled") is True
    assert ui_property(widgets["fixedVolumeSelector"], "showChildNodeTypes") is False


def test_cmake_packages_every_lib_file_and_the_ui():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(re.findall(r"(?:\$\{MODULE_NAME\}|SPACRegistration)Lib/(\w+\.py)", text))
    on_disk = {p.name for p in (MODULE_DIR / "SPACRegistrationLib").glob("*.py")}
    assert listed == on_disk
    assert "Resources/UI/${MODULE_NAME}.ui" in text
    top = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "trainer/steprl/*.py" in top and "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR" in top
    assert "steprl/models/*" in top and "steprl/data/*" in top


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


def test_lib_imports_neither_qt_nor_torch():
    """The logic must run without Qt (slicer-core) and keep torch out of Slicer's process."""
    require_slicer_core()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "import SPACRegistrationLib.logic, SPACRegistrationLib.models, SPACRegistrationLib.install, "
            "SPACRegistrationLib.parameters, SPACRegistrationLib.results; "
            "bad = [m for m in ('torch', 'qt', 'ctk', 'PythonQt') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


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
    from SPACRegistrationLib import install

    assert install.satisfied("numpy>=1.0") and not install.satisfied("numpy>=999")
    assert not install.satisfied("no-such-package-steprl")
    missing = ["torch>=2.2", "safetensors>=0.4"]
    state = {"missing": list(missing)}
    monkeypatch.setattr(install, "missing_requirements", lambda *a: list(state["missing"]))
    fake = FakeInstaller()
    asked: list[str] = []
    assert install.ensure_dependencies(lambda text: asked.append(text) or False, fake) is False
    assert fake.calls == [] and "torch>=2.2" in asked[0] and "numpy and SimpleITK are not changed" in asked[0]

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
