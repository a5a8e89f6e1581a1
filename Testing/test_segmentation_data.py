"""PixelDRL-MG data: slicing axes from the orientation, the network grid, labels in physical space, slice choice."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from steprl import io
from steprl.errors import InputError
from steprl.geometry import Geometry, Image
from steprl.segmentation.data import (
    SliceGrid,
    SliceSet,
    SyntheticSliceSource,
    constant_slices,
    in_plane_spacing,
    in_plane_transposed,
    object_mask,
    prepare_case,
    resolve_axis,
    select_training_slices,
    slice_stack,
)


def _rotation(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def test_axis_names_follow_the_direction_matrix():
    standard = Geometry((10, 12, 14), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    assert [resolve_axis(a, standard) for a in ("axial", "coronal", "sagittal")] == [0, 1, 2]
    assert resolve_axis("1", standard) == 1 and resolve_axis(2, standard) == 2
    # index axis i (ITK) points along physical z: array axis 2 holds the axial slices
    permuted = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # columns: i->z, j->y, k->x
    geometry = Geometry((10, 12, 14), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), permuted)
    assert resolve_axis("axial", geometry) == 2
    assert resolve_axis("sagittal", geometry) == 0
    # a 20 degree in-plane rotation keeps axial on array axis 0
    assert resolve_axis("axial", Geometry((4, 5, 6), (1, 1, 1), (0, 0, 0), _rotation(20))) == 0
    with pytest.raises(InputError, match="axis"):
        resolve_axis("oblique", standard)


def test_in_plane_order_follows_the_direction_matrix():
    """Axial slices of FreeSurfer's LIA storage read like LPS ones; a sagittal acquisition stored P-I-L has
    them with rows left-right, so they are transposed (spacing with them) and transposed back."""
    lia = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]])  # columns: i -> L, j -> I, k -> A
    pil = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # i -> P, j -> I, k -> L
    for direction, axial, transposed in ((np.eye(3), 0, False), (lia, 1, False), (pil, 1, True),
                                         (_rotation(30) @ pil, 1, True)):
        geometry = Geometry((12, 10, 14), (0.9, 1.2, 1.0), (0.0, 0.0, 0.0), direction)
        assert resolve_axis("axial", geometry) == axial
        assert in_plane_transposed(geometry, axial) is transposed
    geometry = Geometry((12, 10, 14), (0.9, 1.2, 1.0), (0.0, 0.0, 0.0), pil)  # numpy spacing (1.0, 1.2, 0.9)
    assert in_plane_spacing(geometry, 1, True) == (0.9, 1.0) and in_plane_spacing(geometry, 1) == (1.0, 0.9)
    image = np.random.default_rng(0).random((12, 10, 14)).astype(np.float32)
    case = prepare_case(Image(image, geometry), size=(16, 16))
    assert case.transposed and case.axis == 1 and case.grid.shape == (14, 12)
    assert np.array_equal(slice_stack(image, 1, True)[3], image[:, 3, :].T)
    assert np.array_equal(case.to_volume(slice_stack(image, 1, True), 3), image)
    assert not in_plane_transposed(Geometry((12, 14), (1.0, 1.0), (0.0, 0.0), np.eye(2)), 0)


def test_slice_grid_keeps_physical_proportions_and_round_trips():
    # 60 x 30 pixels of 0.5 x 2 mm: 29.5 mm x 58 mm; the network pixels must stay square
    grid = SliceGrid.fit((60, 30), (0.5, 2.0), (32, 32))
    sh, sw = grid.network_spacing
    assert abs(sh - sw) / sw < 0.05
    assert grid.fitted[1] == 32 and grid.fitted[0] < 32 and grid.offset[1] == 0 and grid.offset[0] > 0
    yy, xx = np.mgrid[0:60, 0:30]
    disk = ((yy - 30) * 0.5) ** 2 + ((xx - 15) * 2.0) ** 2 < 12.0**2  # a 12 mm disk
    net = grid.to_network(torch.from_numpy(disk.astype(np.float32))[None, None])
    assert net.shape == (1, 1, 32, 32)
    rows, cols = np.nonzero(net[0, 0].numpy() >= 0.5)
    assert abs(np.ptp(rows) - np.ptp(cols)) <= 2  # round on the network grid
    back = grid.mask_from_network((net >= 0.5).float())[0, 0].numpy()
    dice = 2 * (back & disk).sum() / (back.sum() + disk.sum())
    assert back.shape == disk.shape and dice > 0.9


def test_object_mask_and_constant_slices():
    labels = np.array([[0, 1, 2], [4, 0, 2]])
    assert object_mask(labels).tolist() == [[False, True, True], [True, False, True]]
    assert object_mask(labels, [2, 4]).tolist() == [[False, False, True], [True, False, True]]
    stack = np.zeros((3, 4, 4))
    stack[1, 0, 0] = 1.0
    assert constant_slices(stack).tolist() == [True, False, True]


def _volume(shape=(8, 32, 28), seed=0):
    from steprl.synth.toy import noisy_ellipse

    rng = np.random.default_rng(seed)
    pairs = [noisy_ellipse(shape[1:], rng) for _ in range(shape[0])]
    image = np.stack([p[0] for p in pairs]).astype(np.float32)
    labels = np.stack([p[1] for p in pairs]).astype(np.uint8)
    image[0] = 0.0  # a constant slice (outside the body)
    labels[0] = 0
    labels[1] = 0  # an empty but non-constant slice
    return image, labels


def test_prepare_case_and_the_choice_of_training_slices():
    image, labels = _volume()
    geometry = Geometry(image.shape, (1.0, 1.2, 3.0), (0.0, 0.0, 0.0), np.eye(3))
    case = prepare_case(Image(image, geometry), Image(labels * 2, geometry), size=(24, 24), label_values=[2])
    assert case.images.shape == (8, 1, 24, 24) and case.masks.shape == (8, 1, 24, 24)
    assert 0.0 <= float(case.images.min()) and float(case.images.max()) <= 1.0
    assert case.constant.tolist() == [True] + [False] * 7
    assert not case.has_object[0] and not case.has_object[1] and case.has_object[2:].all()
    rng = np.random.default_rng(0)
    _, _, counts = select_training_slices([case], 0.0, rng)
    assert counts == {"object_slices": 6, "empty_slices_kept": 0, "empty_slices_available": 1}
    images, masks, counts = select_training_slices([case], 1.0, rng)
    assert counts["empty_slices_kept"] == 1 and len(images) == 7  # the constant slice never
    with pytest.raises(InputError, match="shape"):
        prepare_case(Image(image, geometry), Image(labels[:, :-1], Geometry(labels[:, :-1].shape, (1, 1, 1),
                                                                                 (0, 0, 0), np.eye(3))))


def test_bad_images_are_refused_with_a_fix():
    geometry = Geometry((16, 16), (1.0, 1.0), (0.0, 0.0), np.eye(2))
    with pytest.raises(InputError, match="same value"):
        prepare_case(Image(np.zeros((16, 16), np.float32), geometry))
    with pytest.raises(InputError, match="NaN"):
        prepare_case(Image(np.full((16, 16), np.nan, np.float32), geometry))
    with pytest.raises(InputError, match="components"):
        prepare_case(Image(np.random.rand(16, 16, 3).astype(np.float32), geometry))
    with pytest.raises(InputError, match="empty axis"):
        Geometry((0, 16), (1.0, 1.0), (0.0, 0.0), np.eye(2))


def test_files_with_labels_on_another_grid(tmp_path):
    """Labels with their own header are brought onto the image grid physically; no overlap is an error."""
    image, labels = _volume((6, 32, 28), seed=1)
    geometry = Geometry(image.shape, (1.0, 1.0, 2.0), (5.0, -3.0, 0.0), np.eye(3))
    io.write_image(Image(image, geometry), tmp_path / "img.nii.gz")
    # the labels at 2x in-plane resolution, on their own (finer) grid covering the same field of view
    fine = sitk.GetImageFromArray(labels)
    geometry.apply_to_sitk(fine)
    ref = sitk.Image([56, 64, 6], sitk.sitkUInt8)
    ref.SetSpacing((0.5, 0.5, 2.0))
    ref.SetOrigin((4.75, -3.25, 0.0))
    fine = sitk.Resample(fine, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    sitk.WriteImage(fine, str(tmp_path / "lab.nii.gz"))
    source = SliceSet.from_files([tmp_path / "img.nii.gz"], [tmp_path / "lab.nii.gz"], size=(32, 32), val_count=0,
                                 empty_fraction=0.0)
    direct = prepare_case(Image(image, geometry), Image(labels, geometry), size=(32, 32))
    kept = direct.masks[direct.has_object]
    agreement = (source.train.masks == kept).float().mean().item()
    assert source.train.masks.shape == kept.shape and agreement > 0.97
    far = sitk.GetImageFromArray(labels)
    far.SetOrigin((500.0, 500.0, 500.0))
    sitk.WriteImage(far, str(tmp_path / "far.nii.gz"))
    with pytest.raises(InputError, match="overlap"):
        SliceSet.from_files([tmp_path / "img.nii.gz"], [tmp_path / "far.nii.gz"], size=(32, 32), val_count=0)
    with pytest.raises(InputError, match="label maps"):
        SliceSet.from_files([tmp_path / "img.nii.gz"], [], size=(32, 32))


def test_synthetic_source_is_endless_and_validation_fixed():
    source = SyntheticSliceSource((24, 20), seed=3, val_count=4, augment=True)
    a = source.sample(3, np.random.default_rng(0))
    b = source.sample(3, np.random.default_rng(1))
    assert a.images.shape == (3, 1, 24, 20) and not torch.equal(a.images, b.images)
    assert set(a.masks.unique().tolist()) <= {0.0, 1.0}
    again = SyntheticSliceSource((24, 20), seed=3, val_count=4)
    assert torch.equal(source.validation().images, again.validation().images)


def test_normalisation_in_float32_matches_the_float64_formula():
    """normalise_percentile computes in float32 in place; the float64 formula it replaced agrees to one
    float32 ulp, and the percentile range lands on exactly 0 and 1."""
    from steprl.preprocess import normalise_percentile

    rng = np.random.default_rng(3)
    array = (rng.gamma(2.0, 100.0, (20, 30, 40)) - 50).astype(np.float32)
    lo, hi = np.percentile(array, (0.5, 99.5))
    expected = np.clip((array.astype(np.float64) - lo) / (hi - lo), 0, 1)
    out = normalise_percentile(array)
    assert out.dtype == np.float32 and out.shape == array.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1.2e-7)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.count_nonzero(out == 0.0) >= array.size * 0.005 and np.count_nonzero(out == 1.0) >= array.size * 0.005


def test_prepare_case_takes_a_normalised_array_it_does_not_recompute():
    from steprl.preprocess import normalise_percentile

    array, _ = _volume()
    image = Image(array, Geometry(array.shape, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3)))
    normalised = normalise_percentile(image.array)
    a = prepare_case(image, size=(32, 32))
    b = prepare_case(image, size=(32, 32), normalised=normalised)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    c = prepare_case(image, size=(32, 32), normalised=normalised * 0.5)  # it is used as given
    assert c.images.max() < 0.51
    with pytest.raises(ValueError, match="shape"):
        prepare_case(image, size=(32, 32), normalised=normalised[:-1])
