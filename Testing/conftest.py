"""Shared pytest fixtures of the headless test suite.

The ``steprl`` package is pip-installed (``python -m pip install -e "trainer[test]"``). The Slicer
modules' Python is imported from the source tree, as Slicer does: the repository root (for the
shared ``StepRLCommon`` package) and each module's folder (for its ``...Lib`` package) go on
``sys.path``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# As the steprl CLI does: idle OpenMP threads sleep instead of spinning, which matters on the
# small shared machines CI runs on (set before any test module imports torch).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: The repository root (the parent of ``Testing/``).
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Where Slicer finds the modules' Python: the folder of StepRLCommon, then each module's folder.
SLICER_PYTHON_PATHS = [REPO_ROOT, REPO_ROOT / "SPACRegistration", REPO_ROOT / "PixelRLSegment"]
for _path in reversed(SLICER_PYTHON_PATHS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root folder."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data``: real development data, present on developer and CI machines only.

    Skips the test, with the reason, when the folder is absent (as on a user's machine).
    """
    path = (REPO_ROOT.parent / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip(f"development data not found at {path} (it lives beside the repository as ../shared/data)")
    return path


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch CPU thread: for small tensors it is faster, and far faster on a
    shared, loaded machine. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
