"""Synthetic data: reproducible, smooth, labels that follow the deformation, datasets on disk."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from steprl import spatial
from steprl.synth import toy


def _mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    labels = sorted(set(np.unique(a)) | set(np.unique(b)) - {0})
    return float(np.mean([2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k)) for k in labels]))


def _magnitude(field: np.ndarray) -> np.ndarray:
    return np.sqrt((field.astype(np.float64) ** 2).sum(axis=0))


def _min_jacobian(field: np.ndarray) -> float:
    return float(spatial.jacobian_determinant(torch.from_numpy(field)[None]).min())


def test_pair_is_reproducible_and_seed_dependent():
    a = toy.synthetic_pair((48, 40), np.random.default_rng(3))
    b = toy.synthetic_pair((48, 40), np.random.default_rng(3))
    c = toy.synthetic_pair((48, 40), np.random.default_rng(4))
    assert set(a) == {"fixed", "moving", "fixed_labels", "moving_labels"}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.allclose(a["fixed"], c["fixed"])


@pytest.mark.parametrize("shape", [(64, 56), (24, 28, 20)])
def test_pair_shapes_dtypes_and_labels(shape):
    pair = toy.synthetic_pair(shape, np.random.default_rng(0), max_displacement=3.0)
    for key in ("fixed", "moving"):
        assert pair[key].shape == shape and pair[key].dtype == np.float32
        assert 0.0 <= pair[key].min() and pair[key].max() <= 1.0
    for key in ("fixed_labels", "moving_labels"):
        assert pair[key].shape == shape and pair[key].dtype == np.int16
    fixed_set, moving_set = set(np.unique(pair["fixed_labels"])), set(np.unique(pair["moving_labels"]))
    assert fixed_set == moving_set
    assert 0 in fixed_set and 2 <= len(fixed_set) <= toy.MAX_CLASSES + 1
    dice = _mean_dice(pair["fixed_labels"], pair["moving_labels"])
    assert 0.3 < dice < 0.97  # related by a deformation of a few voxels: overlapping but not equal


def test_labels_follow_the_image_deformation():
    pair = toy.synthetic_pair((64, 64), np.random.default_rng(1), max_displacement=4.0, return_fields=True)
    for name in ("fixed", "moving"):
        field = pair[f"{name}_field"]
        assert field.shape == (2, 64, 64)
        assert _magnitude(field).max() <= 1.5 * 4.0 + 1e-3
        assert _min_jacobian(field) > 0  # no folding
        image, labels = toy.deform(pair["base"], pair["base_labels"], field)
        np.testing.assert_array_equal(labels, pair[f"{name}_labels"])
        np.testing.assert_allclose(image, pair[name], atol=1e-6)
    # the labels sit where the image has its blobs: bright inside, dark outside
    inside = pair["fixed"][pair["fixed_labels"] > 0].mean()
    outside = pair["fixed"][pair["fixed_labels"] == 0].mean()
    assert inside > outside + 0.2


@pytest.mark.parametrize("shape", [(40, 48), (16, 20, 24)])
def test_smooth_field_peak_and_smoothness(shape):
    field = toy.smooth_random_field(shape, 3.0, 10.0, np.random.default_rng(0))
    assert field.shape == (len(shape), *shape) and field.dtype == np.float32
    assert _magnitude(field).max() == pytest.approx(3.0, rel=1e-4)
    assert np.abs(np.diff(field, axis=1)).max() < 1.0  # smooth: no jumps between neighbours
    assert _min_jacobian(field) > 0


def test_affine_field_is_affine_about_the_centre():
    field = toy.random_affine_field((33, 41), np.random.default_rng(2), translation=0.0)
    # second differences of an affine field vanish
    assert np.abs(np.diff(field, n=2, axis=1)).max() < 1e-4
    assert np.abs(np.diff(field, n=2, axis=2)).max() < 1e-4
    # without translation the grid centre stays put
    assert np.abs(field[:, 16, 20]).max() < 1e-4
    assert _magnitude(field).max() > 0.5


def test_blob_image_classes():
    image, labels = toy.blob_image((48, 48), np.random.default_rng(5), n_blobs=(5, 5))
    assert image.dtype == np.float32 and labels.dtype == np.int16
    assert sorted(np.unique(labels)) == [0, 1, 2, 3, 4]


def test_noisy_ellipse_defeats_a_global_threshold():
    scores = []
    for seed in range(6):
        image, mask = toy.noisy_ellipse((64, 64), np.random.default_rng(seed))
        assert image.dtype == np.float32 and mask.dtype == np.uint8
        assert 0.02 < mask.mean() < 0.5
        best = 0.0
        for t in np.linspace(0.0, 1.0, 51):  # the best threshold, chosen knowing the answer
            pred = image > t
            best = max(best, 2 * np.sum(pred & (mask > 0)) / (pred.sum() + mask.sum()))
        scores.append(best)
    assert np.mean(scores) < 0.8


def test_registration_dataset_round_trip(tmp_path):
    folder = toy.write_registration_dataset(tmp_path / "reg", 3, (20, 24, 16), seed=0, spacing=(1.5, 1.0, 2.0))
    images = sorted((folder / "images").glob("case_*.nii.gz"))
    labels = sorted((folder / "labels").glob("case_*.nii.gz"))
    assert [p.name for p in images] == ["case_000.nii.gz", "case_001.nii.gz", "case_002.nii.gz"]
    assert [p.name for p in labels] == [p.name for p in images]
    assert not [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("case_")]
    arrays = []
    for image_path, label_path in zip(images, labels, strict=True):
        image, label = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
        for im in (image, label):
            assert im.GetSize() == (16, 24, 20)  # ITK order is the reverse of numpy's
            assert im.GetSpacing() == pytest.approx((1.5, 1.0, 2.0))
            assert im.GetOrigin() == pytest.approx((0.0, 0.0, 0.0))
        arrays.append(sitk.GetArrayFromImage(label))
    # different deformations of one shared base: same label set, overlapping, not identical
    assert set(np.unique(arrays[0])) == set(np.unique(arrays[1]))
    assert 0.3 < _mean_dice(arrays[0], arrays[1]) < 1.0


def test_segmentation_dataset_round_trip(tmp_path):
    folder = toy.write_segmentation_dataset(tmp_path / "seg", 2, (32, 32), seed=1)
    image = sitk.ReadImage(str(folder / "images" / "case_001.nii.gz"))
    mask = sitk.ReadImage(str(folder / "labels" / "case_001.nii.gz"))
    assert image.GetSize() == mask.GetSize() == (32, 32)
    assert image.GetPixelID() == sitk.sitkFloat32
    assert set(np.unique(sitk.GetArrayFromImage(mask))) == {0, 1}
