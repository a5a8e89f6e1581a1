"""Repository layout: what Slicer's packaging, the ExtensionsIndex and CI rely on."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
MODULES = {"SPACRegistration": "Registration", "PixelRLSegment": "Segmentation"}
DATA = REPO_ROOT / "trainer" / "steprl" / "data"


def _cmake_list(text: str, variable: str) -> list[str]:
    """Entries of ``set(VARIABLE ...)`` in a CMake file (comments dropped)."""
    text = re.sub(r"#[^\n]*", "", text)
    match = re.search(rf"set\(\s*{variable}\s+([^)]*)\)", text)
    assert match, f"set({variable} ...) not found"
    return match.group(1).split()


def _readme_test_command() -> str:
    """The single command in the first code block under the README's 'Run the tests' heading."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^#+\s*Run the tests\s*$(.*?)(?=^#+\s|\Z)", readme, re.M | re.S)
    assert section, "README has no 'Run the tests' heading"
    block = re.search(r"```[a-z]*\n(.*?)```", section.group(1), re.S)
    assert block, "no code block under 'Run the tests'"
    lines = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one command, got {lines}"
    return lines[0]


def test_top_level_layout():
    for name in ("CMakeLists.txt", "README.md", "LICENSE", "ruff.toml", ".ci/run", "trainer/pyproject.toml",
                 "trainer/steprl/__init__.py", "Resources/Icons/StepRL.png", "Resources/SampleData/README.md"):
        assert (REPO_ROOT / name).is_file(), name
    for name in (*MODULES, "StepRLCommon", "Resources", "Testing", "trainer"):
        assert (REPO_ROOT / name).is_dir(), name


def test_licence_is_apache_with_copyright():
    text = (REPO_ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("Copyright 2026 The StepRL developers")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_extension_cmake():
    text = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"cmake_minimum_required\(VERSION 3\.\d+", text)
    assert re.search(r"^project\(StepRL\)", text, re.M)
    for module in ("StepRLCommon", *MODULES):  # the shared package first: the modules import it
        assert re.search(rf"^add_subdirectory\({module}\)", text, re.M), module
    assert text.index("add_subdirectory(StepRLCommon)") < min(text.index(f"add_subdirectory({m})") for m in MODULES)
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"?PyTorch"?\)', text)
    for variable in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf"set\(EXTENSION_{variable}\s+\"[^\"]+\"\)", text), variable
    assert "find_package(Slicer REQUIRED)" in text
    assert "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in text
    assert "include(${Slicer_EXTENSION_CPACK})" in text


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_cmake_lists_every_python_file(module):
    folder = REPO_ROOT / module
    text = (folder / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(rf"set\(MODULE_NAME\s+{module}\)", text)
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text

    def expand(entries: list[str]) -> set[str]:
        return {e.replace("${MODULE_NAME}", module) for e in entries}

    scripts = expand(_cmake_list(text, "MODULE_PYTHON_SCRIPTS"))
    on_disk = {p.relative_to(folder).as_posix() for p in (folder / f"{module}Lib").rglob("*.py")}
    assert f"{module}Lib/__init__.py" in on_disk
    missing = sorted(on_disk - scripts)
    assert not missing, f"{module}/CMakeLists.txt MODULE_PYTHON_SCRIPTS lacks {missing}: Slicer would not package them"
    assert f"{module}.py" in scripts
    for entry in scripts | expand(_cmake_list(text, "MODULE_PYTHON_RESOURCES")):
        assert (folder / entry).is_file(), f"{module}/CMakeLists.txt lists {entry}, which does not exist"
    assert (folder / "Testing" / "Python" / "CMakeLists.txt").is_file()


def test_common_cmake_lists_every_python_file():
    """StepRLCommon is packaged like a module's Lib: every file listed by its literal path."""
    folder = REPO_ROOT / "StepRLCommon"
    scripts = set(_cmake_list((folder / "CMakeLists.txt").read_text(encoding="utf-8"), "STEPRL_COMMON_SCRIPTS"))
    on_disk = {p.relative_to(REPO_ROOT).as_posix() for p in folder.rglob("*.py")}
    assert "StepRLCommon/__init__.py" in on_disk and scripts == on_disk


@pytest.mark.parametrize(("module", "category"), sorted(MODULES.items()))
def test_module_script_shape(module, category):
    source = (REPO_ROOT / module / f"{module}.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {module, f"{module}Widget", f"{module}Logic", f"{module}Test"} <= classes
    assert f'categories = ["{category}"]' in source
    with Image.open(REPO_ROOT / module / "Resources" / "Icons" / f"{module}.png") as icon:
        assert icon.size == (128, 128)


def test_extension_icon():
    with Image.open(REPO_ROOT / "Resources" / "Icons" / "StepRL.png") as icon:
        assert icon.size == (128, 128)


def test_ci_runs_the_readme_test_command_after_pinning_torch():
    run = REPO_ROOT / ".ci" / "run"
    assert os.access(run, os.X_OK)
    text = run.read_text(encoding="utf-8")
    assert text.startswith("#!") and "set -euo pipefail" in text
    command = _readme_test_command()
    assert command == 'python -m pip install -e "trainer[test]" && python -m pytest Testing -q'
    lines = [line.strip() for line in text.splitlines()]
    assert command in lines, ".ci/run must run the README's test command verbatim"
    pin = next((i for i, line in enumerate(lines) if re.fullmatch(r"python -m pip install torch==2\.13\.0\b.*", line)),
               None)
    assert pin is not None and pin < lines.index(command), "torch==2.13.0 must be installed before the tests"
    assert "ruff check ." in lines


def test_sample_data_is_small_attributed_and_readable():
    files = [p for p in DATA.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1_000_000
    attribution = (DATA / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for needed in ("InsightSoftwareConsortium/ITK", "Apache", "BrainProtonDensitySliceBorder20.png",
                   "BrainProtonDensitySliceBSplined10.png", "insighttoolkit5-examples"):
        assert needed in attribution, needed
    fixed = sitk.ReadImage(str(DATA / "sample_fixed.nrrd"))
    moving = sitk.ReadImage(str(DATA / "sample_moving.nrrd"))
    for image in (fixed, moving):
        assert image.GetDimension() == 2 and image.GetSize() == (221, 257)
        assert image.GetSpacing() == pytest.approx((1.0, 1.0))
    a, b = sitk.GetArrayFromImage(fixed).astype(float), sitk.GetArrayFromImage(moving).astype(float)
    assert a.std() > 10 and b.std() > 10
    assert 0.5 < np.corrcoef(a.ravel(), b.ravel())[0, 1] < 0.99  # same anatomy, not yet aligned
    readme = (REPO_ROOT / "Resources" / "SampleData" / "README.md").read_text(encoding="utf-8")
    assert "ATTRIBUTION.md" in readme


def test_gitignore_does_not_hide_the_sample_data():
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout (or git is not installed)")
    paths = [str(p.relative_to(REPO_ROOT)) for p in (DATA / "sample_fixed.nrrd", DATA / "sample_moving.nrrd",
                                                     DATA / "ATTRIBUTION.md", REPO_ROOT / ".ci" / "run")]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=REPO_ROOT, capture_output=True, text=True)
    assert ignored.returncode == 1 and not ignored.stdout.strip(), f"git ignores: {ignored.stdout.split()}"


def test_no_module_imports_slicer_outside_slicer_files():
    """The steprl package must import without Slicer (it runs in Slicer's child process and in plain Python)."""
    for path in (REPO_ROOT / "trainer" / "steprl").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "slicer" or n.startswith("slicer.") for n in names), f"{path} imports slicer"
