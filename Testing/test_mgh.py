"""FreeSurfer MGH / MGZ volumes (steprl.mgh) read through steprl.io like any image file."""

from __future__ import annotations

import gzip
import logging
import struct

import numpy as np
import pytest
from steprl import io
from steprl.errors import InputError
from steprl.mgh import HEADER_BYTES

#: rows: the x, y, z index axes in RAS (a tilted LIA-like frame), voxel sizes (mm), centre (RAS mm)
COSINES = np.array([[-1.0, 0.0, 0.0], [0.0, 0.28, -0.96], [0.0, 0.96, 0.28]])
SPACING = np.array([1.0, 1.2, 1.5])
CENTRE = np.array([10.0, -20.0, 30.0])


def mgh_bytes(volume: np.ndarray, code: int = 0, dtype: str = ">u1", *, valid: int = 1, frames: int = 1,
              version: int = 1, cosines=COSINES, spacing=SPACING, centre=CENTRE, tail: bytes = b"") -> bytes:
    """An MGH file's bytes for ``volume`` indexed ``[i, j, k]`` (x, y, z), as FreeSurfer writes it."""
    width, height, depth = volume.shape
    head = struct.pack(">7ih", version, width, height, depth, frames, code, 0, valid)
    head += struct.pack(">15f", *spacing, *np.asarray(cosines).ravel(), *centre)
    head += b"\0" * (HEADER_BYTES - len(head))
    voxels = np.repeat(volume[..., None], frames, axis=3).astype(dtype).ravel(order="F").tobytes()
    return head + voxels + tail


def ras_of(index_xyz) -> np.ndarray:
    """FreeSurfer's vox2ras, written out: RAS = M index + centre - M dims / 2."""
    m = COSINES.T * SPACING
    return m @ np.asarray(index_xyz, float) + CENTRE - m @ (np.array([5, 6, 7]) / 2.0)


@pytest.fixture()
def volume() -> np.ndarray:
    return (np.arange(5 * 6 * 7) % 251).reshape(5, 6, 7).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".mgz", ".mgh"])
def test_voxels_and_geometry_come_back_in_lps(tmp_path, volume, suffix):
    raw = mgh_bytes(volume, tail=b"\0\0\0\x03some tags")
    path = tmp_path / f"orig{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix == ".mgz" else raw)
    image = io.read_image(path, dtype=None)
    assert image.array.dtype == np.uint8 and image.array.shape == (7, 6, 5)  # (z, y, x)
    assert np.array_equal(image.array, volume.transpose(2, 1, 0))
    a, b = image.geometry.index_to_physical()
    for index in [(0, 0, 0), (4, 5, 6), (2, 1, 3)]:
        ras = ras_of(index)
        assert np.allclose(a @ np.array(index) + b, [-ras[0], -ras[1], ras[2]], atol=1e-4)
    assert np.allclose(image.geometry.spacing, SPACING)


@pytest.mark.parametrize(("code", "dtype", "native"), [(1, ">i4", np.int32), (3, ">f4", np.float32),
                                                       (4, ">i2", np.int16), (10, ">u2", np.uint16)])
def test_every_voxel_type_keeps_its_values(tmp_path, volume, code, dtype, native):
    values = volume.astype(np.float64) * (7 if native != np.float32 else 0.37) - (3 if native != np.uint16 else 0)
    path = tmp_path / "scan.mgz"
    path.write_bytes(gzip.compress(mgh_bytes(values, code, dtype)))
    image = io.read_image(path, dtype=None)
    assert image.array.dtype == native
    assert np.allclose(image.array, values.astype(native).transpose(2, 1, 0))


def test_aseg_labels_are_read_as_labels(tmp_path, volume):
    labels = np.where(volume > 128, 41, np.where(volume > 60, 2, 0)).astype(np.int32)
    path = tmp_path / "aseg.mgz"
    path.write_bytes(gzip.compress(mgh_bytes(labels, 1, ">i4")))
    read = io.read_image(path, dtype=None).array
    assert set(np.unique(read)) == {0, 2, 41} and np.array_equal(read, labels.transpose(2, 1, 0))


def test_a_folder_of_mgz_files_is_listed(tmp_path, volume):
    for n in ("b.mgz", "a.mgz", "notes.txt"):
        (tmp_path / n).write_bytes(gzip.compress(mgh_bytes(volume)) if n.endswith(".mgz") else b"x")
    assert [p.name for p in io.expand_files([tmp_path], "images")] == ["a.mgz", "b.mgz"]


def test_invalid_geometry_falls_back_to_freesurfer_default_with_a_warning(tmp_path, volume, caplog):
    path = tmp_path / "old.mgh"
    path.write_bytes(mgh_bytes(volume, valid=0))
    with caplog.at_level(logging.WARNING):
        image = io.read_image(path)
    assert "geometry is not valid" in caplog.text
    assert np.allclose(image.geometry.spacing, 1.0)
    lps_axes = image.geometry.direction  # LIA in RAS: x -> left, y -> inferior, z -> anterior
    assert np.allclose(lps_axes[:, 0], [1, 0, 0]) and np.allclose(lps_axes[:, 1], [0, 0, -1])
    assert np.allclose(lps_axes[:, 2], [0, -1, 0])


def test_degenerate_axes_fall_back_to_freesurfer_default_with_a_warning(tmp_path, volume, caplog):
    flat = tmp_path / "flat.mgh"  # the valid flag on, but every axis the same direction
    flat.write_bytes(mgh_bytes(volume, cosines=np.ones((3, 3)) / np.sqrt(3)))
    with caplog.at_level(logging.WARNING):
        assert np.allclose(io.read_image(flat).geometry.spacing, 1.0)
    assert "degenerate" in caplog.text


@pytest.mark.parametrize(("change", "words"), [
    (dict(version=2), ["version 2", "not an MGH file"]),
    (dict(code=7), ["voxel type code 7"]),
    (dict(frames=3), ["3 frames", "mri_convert --frame 0"]),
])
def test_bad_headers_are_refused_with_the_fix(tmp_path, volume, change, words):
    path = tmp_path / "bad.mgz"
    path.write_bytes(gzip.compress(mgh_bytes(volume, **change)))
    with pytest.raises(InputError) as refused:
        io.read_image(path)
    for word in words:
        assert word in str(refused.value)


def test_truncated_files_are_refused(tmp_path, volume):
    raw = mgh_bytes(volume)
    cut = tmp_path / "cut.mgh"
    cut.write_bytes(raw[:-10])
    with pytest.raises(InputError, match="truncated"):
        io.read_image(cut)
    broken = tmp_path / "broken.mgz"
    broken.write_bytes(gzip.compress(raw)[:-30])
    with pytest.raises(InputError, match="compression is damaged"):
        io.read_image(broken)
    tiny = tmp_path / "tiny.mgh"
    tiny.write_bytes(raw[:100])
    with pytest.raises(InputError, match="header"):
        io.read_image(tiny)


def test_nibabel_reads_the_same_volume_and_geometry(tmp_path):
    """Cross-check against nibabel's MGH writer (an independent reading of the format)."""
    nib = pytest.importorskip("nibabel", reason="nibabel is not installed")
    rng = np.random.default_rng(0)
    data = rng.integers(0, 200, size=(6, 5, 4)).astype(np.float32)
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = rotation * [0.9, 1.1, 1.3]
    affine[:3, 3] = [12.0, -7.0, 3.5]
    path = tmp_path / "nib.mgz"
    nib.MGHImage(data, affine).to_filename(str(path))
    image = io.read_image(path)
    assert np.allclose(image.array, data.transpose(2, 1, 0))
    a, b = image.geometry.index_to_physical()
    for index in [(0, 0, 0), (5, 4, 3), (1, 3, 2)]:
        ras = affine @ [*index, 1.0]
        assert np.allclose(a @ np.array(index) + b, [-ras[0], -ras[1], ras[2]], atol=1e-3)
