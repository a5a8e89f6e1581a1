"""trainer/benchmarks/segmentation_cases.py: the cases compare_segmentation.py derives from MNI152
(built on a small phantom here, so they run without nilearn)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from steprl.geometry import Geometry, Image


@pytest.fixture(scope="module")
def bench(repo_root):
    spec = importlib.util.spec_from_file_location(
        "segmentation_cases", repo_root / "trainer" / "benchmarks" / "segmentation_cases.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture()
def phantom(bench):
    """A 'template': grey sphere (60) with a white core (100) in dark air (0), 1 mm voxels, z from -20 mm."""
    shape = (40, 36, 32)
    z, y, x = np.indices(shape)
    r = np.sqrt((z - 20) ** 2 + (y - 18) ** 2 + (x - 16) ** 2)
    brain, white = r <= 14, r <= 8
    array = np.where(white, 100.0, np.where(brain, 60.0, 0.0)).astype(np.float32)
    image = Image(array, Geometry(shape, (1.0, 1.0, 1.0), (0.0, 0.0, -20.0), np.eye(3)))
    return bench.Case("mni152", "MNI152 (whole WM map)", image, white, brain, None, "phantom")


def test_the_noisy_case_adds_rician_noise_of_the_asked_level(bench, phantom):
    noisy = bench.noisy_mni_case(phantom, 0.05)
    clean, array = phantom.image.array, noisy.image.array
    assert noisy.name == "mni152-noise5-cerebrum" and "5 % Rician noise" in noisy.group
    assert array.shape == clean.shape and array.dtype == np.float32
    assert noisy.image.geometry is phantom.image.geometry
    assert noisy.reference is phantom.reference and noisy.brain is phantom.brain  # the same reference
    assert noisy.roi is not None and noisy.roi.any() and not noisy.roi.all()  # the cerebrum row: z > -10 mm
    # at high SNR the Rician magnitude is about Gaussian: sigma = 5 % of white matter's 100
    assert float(np.std(array[phantom.reference] - 100.0)) == pytest.approx(5.0, rel=0.15)
    # in the air it is Rayleigh: positive, mean sigma * sqrt(pi / 2)
    air = clean == 0
    assert array[air].min() >= 0 and float(array[air].mean()) == pytest.approx(5.0 * np.sqrt(np.pi / 2), rel=0.1)
    assert np.array_equal(bench.noisy_mni_case(phantom, 0.05).image.array, array)  # fixed seed
    assert not np.array_equal(bench.noisy_mni_case(phantom, 0.05, seed=1).image.array, array)


def test_the_biased_case_keeps_the_reference_and_changes_the_image(bench, phantom):
    biased = bench.biased_mni_case(phantom, 0.2)
    ratio = biased.image.array[phantom.brain] / phantom.image.array[phantom.brain]
    assert biased.reference is phantom.reference
    assert 0.8 - 1e-6 <= ratio.min() < 0.95 and 1.05 < ratio.max() <= 1.2 + 1e-6  # a +-20 % field


def test_synthetic_draws_add_t1_volumes_and_keep_the_first_seed(bench, monkeypatch, tmp_path):
    """--synthetic-draws N: N T1-like volumes per held-out subject; the first draw keeps the seed (and
    so the figures) of a run without the option; the random-contrast volume stays one."""
    import types

    from steprl.synth import segmentation_slices, synthseg

    seeds = []

    def fake_case(path, folder, seed, *, t1, label_values=None):
        seeds.append((path.name, seed, t1))
        array = np.full((4, 5, 6), float(seed), np.float32)
        geometry = Geometry((4, 5, 6), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), np.eye(3))
        mask = (np.arange(120).reshape(4, 5, 6) % (3 if label_values else 5) == 0).astype(np.uint8)
        return Image(array, geometry), Image(mask, geometry)

    subjects = [tmp_path / f"training_seg_{n}.nii.gz" for n in (18, 19)]
    monkeypatch.setattr(segmentation_slices, "synth_case", fake_case)
    monkeypatch.setattr(synthseg, "list_label_maps", lambda folder: subjects)
    monkeypatch.setattr(synthseg, "split_subjects", lambda maps: types.SimpleNamespace(test=list(maps)))
    one = bench.synthetic_cases(tmp_path)
    assert [c.name for c in one] == ["synth-s18-t1", "synth-s18-random", "synth-s19-t1", "synth-s19-random"]
    first_seeds = {c.name: float(c.image.array.flat[0]) for c in one}
    three = bench.synthetic_cases(tmp_path, 3)
    names = [c.name for c in three]
    assert names[:4] == ["synth-s18-t1", "synth-s18-t1-d2", "synth-s18-t1-d3", "synth-s18-random"]
    assert len(names) == 8 and len(set(names)) == 8
    for case in three:
        if case.name in first_seeds:
            assert float(case.image.array.flat[0]) == first_seeds[case.name]  # same seed, same volume
    t1_groups = {c.group for c in three if "-t1" in c.name}
    assert t1_groups == {"synthetic held-out, T1-like (6)"}
    assert len({float(c.image.array.flat[0]) for c in three}) == 8  # every volume its own seed
    assert all(c.reference.any() and c.brain.any() for c in three)


def test_a_candidate_takes_the_bundled_models_pipeline(repo_root, monkeypatch):
    """--pipeline-from: a training run's candidate is scored with another card's level matching, steps
    and border; the rest of its own card (grid, normalisation percentiles) stays."""
    monkeypatch.syspath_prepend(str(repo_root / "trainer" / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "compare_segmentation_under_test", repo_root / "trainer" / "benchmarks" / "compare_segmentation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source = {"normalisation": {"tissue_levels": {"ratio": 0.6}, "percentiles": [0.5, 99.5]},
              "inference": {"steps": 3, "border": {"fraction": 0.5, "noise_target": 0.1}, "size": [128, 128]}}
    card = {"normalisation": {"percentiles": [1, 99]}, "inference": {"size": [160, 160], "steps": 10}}
    out = module.with_pipeline(card, source)
    assert out["normalisation"] == {"percentiles": [1, 99], "tissue_levels": {"ratio": 0.6}}
    assert out["inference"] == {"size": [160, 160], "steps": 3, "border": {"fraction": 0.5, "noise_target": 0.1}}
    bare = module.with_pipeline({"normalisation": {"tissue_levels": {"ratio": 0.5}}, "inference": {"border": {}}},
                                {"inference": {}})
    assert "tissue_levels" not in bare["normalisation"] and "border" not in bare["inference"]


def test_the_subject_case_flattens_the_contrast_then_adds_bias_and_noise(bench, phantom):
    """One subject's scan: grey at 0.85 of white (the phantom's 0.6 raised), then the +-20 % field and
    3 % noise of the two other cases; the reference and the brain stay the template's."""
    grey = phantom.brain & ~phantom.reference
    case = bench.subject_mni_case(phantom, grey, 0.85)
    array = case.image.array
    assert case.name == "mni152-subject85-cerebrum" and "grey/white 0.85" in case.group
    assert case.reference is phantom.reference and case.brain is phantom.brain
    assert case.roi is not None and case.roi.any() and not case.roi.all()
    assert "raised from 0.60 to 0.85" in case.notes and "bias field" in case.notes and "Rician" in case.notes
    ratio = float(np.median(array[grey]) / np.median(array[phantom.reference]))
    assert ratio == pytest.approx(0.85, abs=0.03)
    # the field and the noise are there: the white core is no longer one value
    assert float(np.std(array[phantom.reference])) > 2.0
    assert np.array_equal(bench.subject_mni_case(phantom, grey, 0.85).image.array, array)  # fixed seeds


def test_a_case_stored_as_a_sagittal_acquisition_keeps_every_voxel_in_place(bench, phantom):
    """Same physical scan, other storage: each voxel's value, reference and position are unchanged, and the
    axial slices come out stored with left-right rows (what the models must transpose back)."""
    from steprl.segmentation.data import in_plane_transposed, resolve_axis

    ras = np.diag([-1.0, -1.0, 1.0])
    image = Image(phantom.image.array * np.linspace(0.5, 1.5, 32, dtype=np.float32),  # no symmetry to hide a flip
                  Geometry(phantom.image.array.shape, (1.0, 1.2, 1.5), (5.0, -3.0, -20.0), ras))
    case = bench.Case("c", "g", image, phantom.reference, phantom.brain, phantom.reference.copy(), "n")
    moved = bench.stored_as(case, *bench.SAGITTAL_STORAGE, "c-sagittal", "g, sagittal")
    assert moved.image.array.shape == (32, 40, 36) and moved.name == "c-sagittal"
    old_a, old_b = image.geometry.tensor_index_to_physical()
    new_a, new_b = moved.image.geometry.tensor_index_to_physical()
    rng = np.random.default_rng(0)
    for index in rng.integers(0, [40, 36, 32], size=(20, 3)):
        where = old_a @ index + old_b
        back = np.rint(np.linalg.solve(new_a, where - new_b)).astype(int)
        assert moved.image.array[tuple(back)] == image.array[tuple(index)]
        assert moved.reference[tuple(back)] == case.reference[tuple(index)]
        assert moved.roi[tuple(back)] == case.roi[tuple(index)] and moved.brain[tuple(back)] == case.brain[tuple(index)]
    geometry = moved.image.geometry
    assert geometry.spacing == (1.2, 1.5, 1.0)  # ITK order of the new axes: y (front-back), z, x
    assert resolve_axis("axial", geometry) == 1 and in_plane_transposed(geometry, 1)
