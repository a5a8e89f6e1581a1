"""Checks of image files that ITK's readers skip: truncated data and non-finite voxels.

Why: ITK 5.4 reads a truncated ``.nii`` / ``.nii.gz`` without complaint (the missing part
becomes zeros, and the run exits 0 on half an image), replaces NaN and infinite voxels of a
NIfTI file by 0 (so no later check can see them), and decodes a truncated JPEG with a grey
bottom. NRRD, MetaImage and PNG readers do refuse truncated files. So, before ITK reads a file:

- NIfTI-1 / NIfTI-2 (``.nii``, ``.nii.gz``): the header says how many bytes of voxels follow;
  the file (decompressed, streamed in chunks, never held whole) must hold them all, and a
  float32 / float64 image must hold no NaN or infinity.
- JPEG: the file must end with the end-of-image marker.

Anything this module cannot parse (not NIfTI after all, an unknown data type) is left to ITK,
whose own error message then applies.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from steprl.errors import InputError

#: NIfTI data types that can hold NaN / infinity: code -> numpy type (float16 has no code).
_FLOAT_TYPES = {16: np.float32, 64: np.float64}
_CHUNK = 8 * 1024 * 1024


class _NotChecked(Exception):
    """The file is not one this module can check (ITK decides)."""


def _header(raw: bytes) -> tuple[str, int, int, int]:
    """``(byte order, data bytes, datatype code, voxel offset)`` of a NIfTI-1/2 header."""
    for order in "<>":
        if len(raw) >= 4 and struct.unpack(f"{order}i", raw[:4])[0] == 348 and len(raw) >= 348:
            dims = struct.unpack(f"{order}8h", raw[40:56])
            datatype, bitpix = struct.unpack(f"{order}2h", raw[70:74])
            offset = int(struct.unpack(f"{order}f", raw[108:112])[0])
            return order, _data_bytes(dims, bitpix), datatype, max(offset, 348)
        if len(raw) >= 4 and struct.unpack(f"{order}i", raw[:4])[0] == 540 and len(raw) >= 540:
            datatype, bitpix = struct.unpack(f"{order}2h", raw[12:16])
            dims = struct.unpack(f"{order}8q", raw[16:80])
            offset = struct.unpack(f"{order}q", raw[168:176])[0]
            return order, _data_bytes(dims, bitpix), datatype, max(offset, 540)
    raise _NotChecked


def _data_bytes(dims: tuple[int, ...], bitpix: int) -> int:
    n = dims[0]
    if not 1 <= n <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1:n + 1]):
        raise _NotChecked
    return int(np.prod([int(d) for d in dims[1:n + 1]], dtype=object)) * bitpix // 8


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _count_nonfinite(chunk: bytes, dtype: np.dtype) -> tuple[int, int]:
    values = np.frombuffer(chunk, dtype=dtype)
    finite = np.isfinite(values)
    if finite.all():
        return 0, 0
    nan = int(np.isnan(values).sum())
    return nan, int(values.size - finite.sum()) - nan


def check_nifti(path: str | os.PathLike, name: str) -> None:
    """InputError when a NIfTI file is truncated, its compressed stream is damaged, or its float
    voxels hold NaN / infinity. Returns silently for files it cannot parse (ITK reports those)."""
    path = Path(path)
    expected = None
    try:
        with _open(path) as handle:
            order, expected, datatype, offset = _header(handle.read(540))
            dtype = np.dtype(_FLOAT_TYPES[datatype]).newbyteorder(order) if datatype in _FLOAT_TYPES else None
            handle.seek(offset)
            got, nan, inf, rest = 0, 0, 0, b""
            while got < expected and (chunk := handle.read(min(_CHUNK, expected - got))):
                got += len(chunk)
                if dtype is not None:
                    data = rest + chunk
                    usable = len(data) - len(data) % dtype.itemsize
                    n, i = _count_nonfinite(data[:usable], dtype)
                    nan, inf, rest = nan + n, inf + i, data[usable:]
    except _NotChecked:
        return
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        if expected is None:
            return  # not even a header: not a NIfTI file ITK could read either; it says why
        raise InputError(f"The {name} '{path}' is truncated or damaged ({exc}).",
                         "Copy or download the file again; compare its size with the original.") from exc
    except OSError:
        return  # unreadable: ITK's reader says why
    if got < expected:
        raise InputError(f"The {name} '{path}' is truncated: its header announces {expected:,} bytes of voxel data, "
                         f"the file holds {got:,}.", "Copy or download the file again; compare its size with the "
                                                     "original.")
    if nan or inf:
        raise InputError(
            f"The {name} '{path}' has {nan} NaN and {inf} infinite voxel values.",
            "Replace them (e.g. with the background value) before using it; they often come from a division by zero "
            "in preprocessing.")


def check_jpeg(path: str | os.PathLike, name: str) -> None:
    """InputError when a JPEG file has no end-of-image marker near its end (a truncated file;
    the marker cannot occur inside the compressed data, and some writers pad after it)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            start = handle.read(2)
            handle.seek(max(path.stat().st_size - 4096, 0))
            tail = handle.read()
    except OSError:
        return
    if start == b"\xff\xd8" and b"\xff\xd9" not in tail:
        raise InputError(f"The {name} '{path}' is a truncated JPEG (no end-of-image marker).",
                         "Copy or export the picture again.")


def check_file(path: str | os.PathLike, name: str) -> None:
    """The checks above that apply to ``path``'s format (by extension); nothing for others."""
    lower = str(path).lower()
    if lower.endswith((".nii", ".nii.gz")):
        check_nifti(path, name)
    elif lower.endswith((".jpg", ".jpeg")):
        check_jpeg(path, name)
