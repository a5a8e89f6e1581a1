"""Tests of steprl.io: format round trips with full geometry, LPS, DICOM, label resampling in
physical space, input checks, atomic writes and displacement fields read back by ITK."""

from __future__ import annotations

import gzip
import json
import shutil
import struct

import numpy as np
import pytest
import SimpleITK as sitk
from steprl import dicom, io
from steprl.errors import InputError
from steprl.geometry import Geometry, Image, lps_to_ras


def rotation(axis, angle: float) -> np.ndarray:
    """Rodrigues rotation matrix about ``axis`` by ``angle`` radians (an oblique direction)."""
    a = np.asarray(axis, dtype=float)
    a /= np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


OBLIQUE_3D = Geometry((4, 5, 6), (0.7, 1.3, 2.9), (-12.5, 30.25, 7.0), rotation((1, 2, 3), 0.4))
OBLIQUE_2D = Geometry((5, 7), (0.6, 1.7), (-3.5, 11.0), rotation((0, 0, 1), 0.3)[:2, :2])


def random_image(geometry: Geometry, seed: int = 0) -> Image:
    rng = np.random.default_rng(seed)
    return Image((rng.random(geometry.shape) * 1000 - 200).astype(np.float32), geometry)


def assert_geometry(a: Geometry, b: Geometry, atol: float) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, atol=atol)


def only_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- round trips ----------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"])
@pytest.mark.parametrize("geometry", [OBLIQUE_3D, OBLIQUE_2D], ids=["3d", "2d"])
def test_round_trip_keeps_geometry_and_values(tmp_path, ext, geometry):
    image = random_image(geometry)
    out = io.write_image(image, tmp_path / "sub" / f"img{ext}")
    assert out.exists()
    back = io.read_image(out, dtype=None)
    # NIfTI stores its affine in float32: geometry to float32 precision; the others exactly.
    atol = 1e-4 if ext.startswith(".nii") else 1e-9
    assert_geometry(back.geometry, geometry, atol)
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, image.array)
    # Only the real file(s) are left: no temporary names.
    expected = {".nhdr": ["img.nhdr", "img.raw"], ".mhd": ["img.mhd", "img.raw"]}.get(ext, [f"img{ext}"])
    assert only_files(tmp_path / "sub") == expected


def test_nifti_direction_is_what_simpleitk_reads(tmp_path):
    path = io.write_image(random_image(OBLIQUE_3D), tmp_path / "oblique.nii.gz")
    back = io.read_image(path)
    reference = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(back.geometry.direction.ravel(), reference.GetDirection())
    np.testing.assert_array_equal(back.geometry.origin, reference.GetOrigin())
    np.testing.assert_allclose(back.geometry.direction, OBLIQUE_3D.direction, atol=1e-5)


def test_read_image_default_dtype_is_float32_and_none_keeps_type(tmp_path):
    image = Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), OBLIQUE_3D.resized((2, 3, 4)))
    path = io.write_image(image, tmp_path / "int.nrrd")
    assert io.read_image(path).array.dtype == np.float32
    assert io.read_image(path, dtype=None).array.dtype == np.int16


def test_vector_image_is_written_as_vector(tmp_path):
    rng = np.random.default_rng(1)
    field = Image(rng.normal(size=(*OBLIQUE_3D.shape, 3)), OBLIQUE_3D)
    path = io.write_image(field, tmp_path / "vec.nrrd")
    raw = sitk.ReadImage(str(path))
    assert raw.GetNumberOfComponentsPerPixel() == 3 and raw.GetDimension() == 3
    with pytest.raises(InputError, match="components"):
        io.read_image(path)  # a vector image is not an intensity image


def test_png_round_trip_and_rgb_luminance(tmp_path, caplog):
    geometry = Geometry((4, 6), (0.5, 0.25), (0.0, 0.0), np.eye(2))
    image = Image(np.arange(24, dtype=np.uint16).reshape(4, 6) * 1000, geometry)
    back = io.read_image(io.write_image(image, tmp_path / "slice.png"), dtype=None)
    np.testing.assert_array_equal(back.array, image.array)
    np.testing.assert_allclose(back.geometry.spacing, geometry.spacing, atol=1e-3)

    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.png"))
    with caplog.at_level("INFO", logger="steprl.io"):
        grey = io.read_image(tmp_path / "rgb.png")
    assert grey.ndim == 2 and grey.array.shape == (4, 6)
    np.testing.assert_allclose(grey.array, 0.299 * 200 + 0.587 * 100 + 0.114 * 50, atol=1e-3)
    assert "luminance" in caplog.text

    with pytest.raises(InputError, match="uint8"):
        io.write_image(Image(np.ones((4, 6), np.float32), geometry), tmp_path / "float.png")
    assert not (tmp_path / "float.png").exists()


def test_single_slice_volume_stays_3d_and_4d_is_refused(tmp_path):
    single = sitk.GetImageFromArray(np.random.default_rng(2).random((1, 5, 6)).astype(np.float32))
    sitk.WriteImage(single, str(tmp_path / "single.nii.gz"))
    back = io.read_image(tmp_path / "single.nii.gz")
    assert back.ndim == 3 and back.array.shape == (1, 5, 6)

    volume = sitk.GetImageFromArray(np.random.default_rng(3).random((3, 4, 5)).astype(np.float32))
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(tmp_path / "four.nrrd"))
    with pytest.raises(InputError, match="4 dimensions"):
        io.read_image(tmp_path / "four.nrrd", name="moving image")
    sitk.WriteImage(sitk.JoinSeries([volume]), str(tmp_path / "four1.nrrd"))
    assert io.read_image(tmp_path / "four1.nrrd").array.shape == (3, 4, 5)


# ---- LPS -------------------------------------------------------------------------------
def test_nifti_origin_is_lps_as_itk_reports(tmp_path):
    written = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32) + np.arange(5, dtype=np.float32))
    written.SetOrigin((10.0, 20.0, 30.0))
    written.SetSpacing((1.0, 2.0, 3.0))
    path = tmp_path / "lps.nii.gz"
    sitk.WriteImage(written, str(path))
    back = io.read_image(path)
    np.testing.assert_allclose(back.geometry.origin, (10.0, 20.0, 30.0), atol=1e-5)
    np.testing.assert_allclose(lps_to_ras(np.array(back.geometry.origin)), (-10.0, -20.0, 30.0), atol=1e-5)
    # On disk NIfTI is RAS: ITK negated x and y, so io must not convert again.
    header = gzip.open(path).read(348)
    qoffset = struct.unpack("<3f", header[268:280])
    np.testing.assert_allclose(qoffset, (-10.0, -20.0, 30.0), atol=1e-5)


# ---- DICOM -----------------------------------------------------------------------------
DICOM_GEOMETRY = Geometry((4, 5, 6), (0.7, 0.8, 2.5), (10.0, -20.0, 30.0), rotation((1, -1, 2), 0.35))


def test_dicom_series_round_trip_float(tmp_path):
    image = random_image(DICOM_GEOMETRY, seed=4)
    folder = dicom.write_dicom_series(image, tmp_path / "series", series_description="test")
    assert len(list(folder.glob("*.dcm"))) == 4
    assert only_files(tmp_path) == ["series"]  # no temporary folder left
    back = io.read_image(folder)
    assert_geometry(back.geometry, DICOM_GEOMETRY, atol=1e-3)
    slope = (image.array.max() - image.array.min()) / 65000.0
    assert np.abs(back.array - image.array).max() <= slope * 0.51 + 1e-4


def test_dicom_series_round_trip_integers_exact(tmp_path):
    values = np.random.default_rng(5).integers(0, 60000, DICOM_GEOMETRY.shape).astype(np.float32)
    folder = dicom.write_dicom_series(Image(values, DICOM_GEOMETRY), tmp_path / "ints")
    np.testing.assert_array_equal(io.read_image(folder).array, values)


def test_dicom_series_left_handed_grid_keeps_physical_image(tmp_path):
    geometry = Geometry((4, 5, 6), (0.7, 0.8, 2.5), (10.0, -20.0, 30.0), np.diag([1.0, 1.0, -1.0]))
    values = np.random.default_rng(10).integers(0, 100, geometry.shape).astype(np.float32)
    back = io.read_image(dicom.write_dicom_series(Image(values, geometry), tmp_path / "lh"))
    # Whatever slice order the reader picks, each physical point keeps its value.
    resampled = sitk.Resample(Image(back.array, back.geometry).to_sitk(), geometry.to_sitk_reference(),
                              sitk.Transform(3, sitk.sitkIdentity), sitk.sitkNearestNeighbor, -1.0, sitk.sitkFloat32)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(resampled), values)


def test_dicom_folder_with_several_series(tmp_path):
    small = Geometry((2, 3, 4), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    dicom.write_dicom_series(random_image(small, 6), tmp_path / "a", series_description="first")
    dicom.write_dicom_series(random_image(small, 7), tmp_path / "b", series_description="second")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for sub in ("a", "b"):
        for f in (tmp_path / sub).iterdir():
            shutil.copy(f, mixed / f"{sub}_{f.name}")
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(mixed))
    assert len(uids) == 2
    with pytest.raises(InputError) as info:
        io.read_image(mixed, name="fixed image")
    message = str(info.value)
    assert all(uid in message for uid in uids) and "series_uid=" in message
    chosen = io.read_image(mixed, series_uid=uids[1])
    assert chosen.array.shape == (2, 3, 4)
    with pytest.raises(InputError, match="not an empty folder"):
        dicom.write_dicom_series(random_image(small), mixed)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="without a DICOM series"):
        io.read_image(tmp_path)


# ---- labels ----------------------------------------------------------------------------
def test_read_labels_shifted_origin_is_resampled_not_copied(tmp_path):
    reference = Geometry((3, 4, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    labels = np.zeros(reference.shape, np.uint8)
    labels[:, :, 1] = 1
    labels[:, :, 5] = 2
    # Same size, but the label map starts 2 mm further along x (public-dataset style header).
    shifted = Geometry(reference.shape, reference.spacing, (2.0, 0.0, 0.0), np.eye(3))
    path = io.write_image(Image(labels, shifted), tmp_path / "labels.nii.gz")
    result = io.read_labels(path, reference, name="fixed labels")
    expected = np.zeros_like(labels)
    expected[:, :, 3] = 1  # label voxel x=1 sits at 3 mm = reference voxel 3
    expected[:, :, 7] = 2
    np.testing.assert_array_equal(result.array, expected)
    assert not np.array_equal(result.array, labels)  # a voxel-for-voxel copy would be wrong
    assert result.geometry is reference


def test_read_labels_other_spacing_matches_physical_lookup(tmp_path):
    reference = Geometry((5, 6, 7), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    label_geometry = Geometry((3, 4, 4), (2.0, 2.0, 2.0), (0.6, -1.4, 2.6), np.eye(3))
    labels = (np.arange(np.prod(label_geometry.shape)) + 1).reshape(label_geometry.shape).astype(np.int16)
    path = io.write_image(Image(labels, label_geometry), tmp_path / "labels.nrrd")
    result = io.read_labels(path, reference)
    # Independent lookup: physical point of each reference voxel -> nearest label voxel.
    d, h, w = np.meshgrid(*[np.arange(n) for n in reference.shape], indexing="ij")
    physical_xyz = np.stack([w, h, d], axis=-1).astype(float)  # spacing 1, origin 0, identity
    index_xyz = np.rint((physical_xyz - np.array(label_geometry.origin)) / 2.0).astype(int)
    size_xyz = np.array(label_geometry.size_xyz)
    inside = np.all((index_xyz >= 0) & (index_xyz < size_xyz), axis=-1)
    expected = np.zeros(reference.shape, np.int16)
    ix = np.clip(index_xyz, 0, size_xyz - 1)
    expected[inside] = labels[ix[..., 2], ix[..., 1], ix[..., 0]][inside]
    np.testing.assert_array_equal(result.array, expected)
    assert result.array.dtype == np.int16 and 0 < inside.mean() < 1


def test_read_labels_same_grid_copies_and_checks(tmp_path):
    labels = np.zeros(OBLIQUE_3D.shape, np.float32)
    labels[1:3, 2:4, 1:5] = 3
    path = io.write_image(Image(labels, OBLIQUE_3D), tmp_path / "float_labels.nii.gz")
    result = io.read_labels(path, OBLIQUE_3D)
    np.testing.assert_array_equal(result.array, labels.astype(np.int32))
    assert result.array.dtype == np.int32

    far = Geometry(OBLIQUE_3D.shape, OBLIQUE_3D.spacing, (500.0, 500.0, 500.0), OBLIQUE_3D.direction)
    with pytest.raises(InputError, match="does not overlap"):
        io.read_labels(path, far)

    soft = io.write_image(Image(labels * 0.3, OBLIQUE_3D), tmp_path / "soft.nii.gz")
    with pytest.raises(InputError, match="non-integer"):
        io.read_labels(soft)


# ---- validation and unreadable files ----------------------------------------------------
@pytest.mark.parametrize("bad, match", [(np.nan, "NaN"), (np.inf, "infinite")])
def test_validate_image_non_finite(bad, match):
    image = random_image(OBLIQUE_3D)
    image.array[1, 2, 3] = bad
    with pytest.raises(InputError, match=match):
        io.validate_image(image, "fixed image")


def test_validate_image_constant_and_dimension():
    io.validate_image(random_image(OBLIQUE_3D), "fixed image", ndim=3)  # a good image passes
    constant = Image(np.full(OBLIQUE_3D.shape, 7.0, np.float32), OBLIQUE_3D)
    with pytest.raises(InputError, match="same value"):
        io.validate_image(constant, "moving image")
    with pytest.raises(InputError) as info:
        io.validate_image(random_image(OBLIQUE_3D), "moving image", ndim=2, reference_name="fixed image")
    assert "fixed image is 2D but the moving image is 3D" in str(info.value)


def test_unreadable_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"\x00\x01not an image" * 20)
    with pytest.raises(InputError) as info:
        io.read_image(garbage, name="fixed image")
    assert str(garbage) in str(info.value) and ".nrrd" in str(info.value) and "fixed image" in str(info.value)
    with pytest.raises(InputError, match="does not exist"):
        io.read_image(tmp_path / "missing.mha")


# ---- atomic writes ---------------------------------------------------------------------
def test_write_image_unsupported_extension_leaves_nothing(tmp_path):
    with pytest.raises(InputError, match="unsupported extension"):
        io.write_image(random_image(OBLIQUE_3D), tmp_path / "image.xyz")
    assert only_files(tmp_path) == []


@pytest.mark.parametrize("ext", [".nii.gz", ".mhd"])
def test_write_image_failure_leaves_no_partial_file(tmp_path, monkeypatch, ext):
    target = tmp_path / f"out{ext}"
    io.write_image(random_image(OBLIQUE_3D, 1), target)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_write(image, filename, useCompression=False, *args, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise RuntimeError("ITK ERROR: ImageIO(0x1): disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    with pytest.raises(InputError, match="disk full"):
        io.write_image(random_image(OBLIQUE_3D, 2), target)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # old output intact, no temporary file
    with pytest.raises(InputError):
        io.write_image(random_image(OBLIQUE_3D, 2), tmp_path / "new" / f"fresh{ext}")
    assert only_files(tmp_path / "new") == []


def test_atomic_path_and_write_json(tmp_path):
    with pytest.raises(ValueError), io.atomic_path(tmp_path / "a.safetensors") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith("a.safetensors")
        tmp.write_bytes(b"partial")
        raise ValueError("boom")
    assert only_files(tmp_path) == []
    path = io.write_json({"dice": np.float32(0.5), "shape": np.array([1, 2]), "name": "Zürich"}, tmp_path / "m.json")
    assert json.loads(path.read_text(encoding="utf-8")) == {"dice": 0.5, "shape": [1, 2], "name": "Zürich"}
    assert path.read_text(encoding="utf-8").startswith("{\n  ")
    assert only_files(tmp_path) == ["m.json"]



def test_nested_atomic_paths_are_placed_innermost_first_and_text_replaces(tmp_path, monkeypatch):
    import os

    from steprl import atomic

    order = []
    real_replace = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: (order.append(os.path.basename(dst)),
                                                                real_replace(src, dst)))
    with atomic.atomic_path(tmp_path / "card.json") as card, atomic.atomic_path(tmp_path / "w.bin") as weights:
        weights.write_bytes(b"w")
        card.write_text("{}")
    monkeypatch.undo()
    assert order == ["w.bin", "card.json"]  # the card that names the weights comes last
    atomic.write_text(tmp_path / "card.json", "new")
    assert (tmp_path / "card.json").read_text() == "new"
    assert only_files(tmp_path) == ["card.json", "w.bin"]

# ---- displacement fields ---------------------------------------------------------------
@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_displacement_field_is_itk_resampling_transform(tmp_path, ext):
    rng = np.random.default_rng(8)
    u = rng.normal(scale=2.0, size=(*OBLIQUE_3D.shape, 3))
    path = io.write_displacement_field(Image(u, OBLIQUE_3D), tmp_path / f"field{ext}")
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkVectorFloat64  # what the transform needs
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
    a, b = OBLIQUE_3D.index_to_physical()
    for index_xyz in [(2, 3, 1), (0, 0, 0), (5, 4, 3)]:
        x = a @ np.array(index_xyz, float) + b
        expected = x + u[index_xyz[2], index_xyz[1], index_xyz[0]]
        np.testing.assert_allclose(transform.TransformPoint(tuple(x)), expected, atol=1e-3)
    back = io.read_displacement_field(path)
    assert back.array.dtype == np.float64 and back.array.shape == u.shape
    np.testing.assert_allclose(back.array, u, atol=1e-12)
    assert_geometry(back.geometry, OBLIQUE_3D, atol=1e-4 if ext == ".nii.gz" else 1e-9)
    if ext == ".nii.gz":
        assert sitk.ReadImage(str(path)).GetMetaData("intent_code") == "1007"  # ITK vector intent


def test_displacement_field_2d_and_bad_shapes(tmp_path):
    u = np.random.default_rng(9).normal(size=(*OBLIQUE_2D.shape, 2))
    path = io.write_displacement_field(Image(u, OBLIQUE_2D), tmp_path / "field2d.nrrd")
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
    a, b = OBLIQUE_2D.index_to_physical()
    x = a @ np.array([3.0, 2.0]) + b
    np.testing.assert_allclose(transform.TransformPoint(tuple(x)), x + u[2, 3], atol=1e-6)
    with pytest.raises(InputError, match=r"\(\*S, 3\)"):
        io.write_displacement_field(Image(np.zeros((*OBLIQUE_3D.shape, 2)), OBLIQUE_3D), tmp_path / "bad.nrrd")
    scalar = io.write_image(random_image(OBLIQUE_3D), tmp_path / "scalar.nrrd")
    with pytest.raises(InputError, match="component"):
        io.read_displacement_field(scalar)
