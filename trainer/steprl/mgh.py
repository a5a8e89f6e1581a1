"""FreeSurfer's MGH / MGZ volumes (``orig.mgz``, ``T1.mgz``, ``aseg.mgz``), read without FreeSurfer.

Why: the scans a white-matter model is judged on come with FreeSurfer labels, and FreeSurfer
writes everything as MGZ; SimpleITK has no reader for it, so ``steprl segment orig.mgz`` and
``steprl evaluate segmentation --labels aseg.mgz`` failed with "Unable to determine ImageIO".
Slicer reads MGZ itself; this serves the command line. No nibabel: the format is small.

The layout (FreeSurfer's MGH format; ``.mgz`` is the same gzip-compressed), big-endian:

- header, 284 bytes: version (int32, 1), width, height, depth, frames, type (int32 each), dof
  (int32), a flag saying the geometry below is valid (int16), voxel size (3 float32, mm),
  direction cosines of the x, y and z index axes in RAS (3 x 3 float32, one axis per row), the
  RAS position of the volume's centre (3 float32, mm); the rest zero-padded;
- voxels: width x height x depth x frames values of ``type`` (x fastest), then optional tags
  (scan parameters, history), ignored here.

The centre is the position of voxel index ``(width, height, depth) / 2``: ``RAS(i, j, k) = M (i, j,
k) + centre - M (dims / 2)`` with ``M`` the cosines scaled by the voxel sizes: an IJK-to-RAS matrix,
which :func:`steprl.geometry.geometry_from_ijk_to_ras` (the one place where RAS meets LPS) turns
into steprl's geometry.
"""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from steprl.errors import InputError
from steprl.geometry import geometry_from_ijk_to_ras

log = logging.getLogger(__name__)

#: File name endings read as MGH (lower case).
SUFFIXES = (".mgh", ".mgz", ".mgh.gz")
#: Bytes before the voxels.
HEADER_BYTES = 284
#: MGH type code -> big-endian numpy type (uchar, int, float, short, ushort).
TYPES = {0: ">u1", 1: ">i4", 3: ">f4", 4: ">i2", 10: ">u2"}
#: FreeSurfer's geometry when a file says its own is not valid: 1 mm, coronal slices (LIA).
DEFAULT_COSINES = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # rows: x, y, z axes in RAS
_HEAD = struct.Struct(">7ih")  # version, width, height, depth, frames, type, dof, geometry-valid flag
_GEOMETRY = struct.Struct(">15f")  # voxel size (3), cosines (9, one axis per row), centre (3)


def is_mgh(path: str | Path) -> bool:
    """Whether ``path`` names an MGH / MGZ file (by its ending)."""
    return str(path).lower().endswith(SUFFIXES)


def read_mgh(path: str | Path, name: str = "image") -> sitk.Image:
    """The volume in ``path`` as a 3D SimpleITK image of the file's own pixel type, geometry in LPS.

    Raises:
        InputError: not an MGH file (version), damaged compression, an unknown voxel type, fewer
            voxel bytes than the header announces, or more than one frame.
    """
    path = Path(path)
    raw = _raw_bytes(path, name)
    if len(raw) < HEADER_BYTES:
        raise _error(path, name, f"it has {len(raw)} bytes, less than the {HEADER_BYTES}-byte header")
    version, width, height, depth, frames, code, _dof, valid = _HEAD.unpack_from(raw, 0)
    if version != 1:
        raise _error(path, name, f"its header says version {version}, not 1 (not an MGH file, or damaged)")
    if code not in TYPES:
        raise _error(path, name, f"its voxel type code {code} is not one of {sorted(TYPES)} "
                                 "(uchar 0, int 1, float 3, short 4, ushort 10)")
    if min(width, height, depth, frames) < 1:
        raise _error(path, name, f"its header gives the size {width} x {height} x {depth} x {frames}")
    if frames > 1:
        raise InputError(f"The {name} '{path}' holds {frames} frames (4D); only one 3D volume is supported.",
                         "Extract one frame (e.g. mri_convert --frame 0 in.mgz out.mgz) and give that file.")
    dtype = np.dtype(TYPES[code])
    count = width * height * depth
    if len(raw) < HEADER_BYTES + count * dtype.itemsize:
        raise _error(path, name, f"it holds {len(raw) - HEADER_BYTES} voxel bytes where its header announces "
                                 f"{count * dtype.itemsize} (truncated)")
    array = np.frombuffer(raw, dtype, count, HEADER_BYTES).reshape(depth, height, width)
    image = sitk.GetImageFromArray(array.astype(dtype.newbyteorder("="), copy=False))
    spacing, cosines, centre = _geometry(raw, valid, path, name)
    vox2ras = np.eye(4)
    vox2ras[:3, :3] = cosines.T * spacing  # columns: the x, y, z index axes in RAS, scaled to mm
    vox2ras[:3, 3] = centre - vox2ras[:3, :3] @ (np.array([width, height, depth]) / 2.0)
    geometry_from_ijk_to_ras(vox2ras, (depth, height, width)).apply_to_sitk(image)  # RAS -> LPS there
    return image


def _raw_bytes(path: Path, name: str) -> bytes:
    """The file's bytes, decompressed when it is gzip-compressed (by its magic number, not its name)."""
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise _error(path, name, f"its compression is damaged or truncated ({exc})") from exc


def _geometry(raw: bytes, valid: int, path: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(voxel size (3,) mm, cosines (3, 3) one index axis per row in RAS, centre (3,) RAS mm)``."""
    values = np.array(_GEOMETRY.unpack_from(raw, _HEAD.size), dtype=np.float64)
    spacing, cosines, centre = values[:3], values[3:12].reshape(3, 3), values[12:]
    usable = valid and np.all(spacing > 0) and abs(abs(np.linalg.det(cosines)) - 1.0) < 1e-3
    if usable:
        return spacing, cosines, centre
    why = "its header says its geometry is not valid" if not valid else "its voxel sizes or axes are degenerate"
    log.warning("The %s '%s': %s; using FreeSurfer's default (1 mm voxels, coronal slices, centred at 0): "
                "positions in mm may be wrong.", name, path, why)
    return np.ones(3), DEFAULT_COSINES.copy(), np.zeros(3)


def _error(path: Path, name: str, reason: str) -> InputError:
    return InputError(f"Cannot read the {name} '{path}' as a FreeSurfer MGH/MGZ volume: {reason}.",
                      "Give an intact .mgz / .mgh file (FreeSurfer's mri_info shows its header), or convert it "
                      "to NIfTI with mri_convert.")
