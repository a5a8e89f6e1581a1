"""trainer/benchmarks/compare_registration_brats.py: its case builder and its behaviour without the data.

The real BraTS volumes live in ../shared only; these tests build a small fake patient with the same
file names, so they run everywhere.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from steprl import io
from steprl.geometry import Geometry, Image


@pytest.fixture()
def bench(repo_root):
    spec = importlib.util.spec_from_file_location(
        "compare_registration_brats", repo_root / "trainer" / "benchmarks" / "compare_registration_brats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_patient(folder, shape=(40, 40, 40)):
    """A spherical 'brain': WM core (bright), GM shell, a tumour blob and a few very bright 'vessels'."""
    folder.mkdir(parents=True)
    z, y, x = np.indices(shape)
    r = np.sqrt((z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2)
    brain = r < 16
    t1c = np.where(r < 9, 1.5, np.where(brain, 1.0, -1.0)).astype(np.float32)
    tumour = np.sqrt((z - 20) ** 2 + (y - 20) ** 2 + (x - 30) ** 2) < 3
    vessels = (r > 12) & (r < 15) & (z < 8)  # enhancing vessels, ~1.5 % of the brain: must not become the WM class
    t1c[vessels] = 9.0
    t1c += np.random.default_rng(0).normal(0, 0.1, shape).astype(np.float32)
    g = Geometry(shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    io.write_image(Image(t1c, g), folder / "T1c_subtrMeanDivStd.nii.gz")
    io.write_image(Image(brain.astype(np.uint8), g), folder / "brainmask.nii.gz")
    io.write_image(Image(tumour.astype(np.uint8), g), folder / "OTMultiClass.nii.gz")
    return r, tumour


def test_patient_cube_labels_tissue_outside_the_tumour_and_ignores_bright_vessels(bench, tmp_path):
    r, _ = _fake_patient(tmp_path / "p")
    image, labels = bench.patient_cube(tmp_path / "p", spacing=1.0, size=40)
    lab = labels.array
    assert image.array.shape == lab.shape == (40, 40, 40)
    assert image.array.min() >= 0  # background at 0, as the network's normalisation expects
    # WM is the bright core (~3,000 voxels), not the vessels (~250): the vessels alone would mean they won the class
    assert (lab == 2).sum() > 1000
    assert (lab == 1).sum() > 1000
    # the tumour blob (x near 30) is left out of both tissue classes, healthy tissue beside it is not
    assert lab[20, 20, 30] == 0 and lab[20, 20, 34] == 1 and lab[20, 20, 20] == 2


def test_without_the_data_it_says_so_and_exits_zero(bench, tmp_path, capsys):
    assert bench.main(["--data", str(tmp_path / "absent")]) == 0
    assert "no BraTS data" in capsys.readouterr().out
