"""The image file formats steprl reads and writes with SimpleITK, and ITK's errors put in words.

Shared by :mod:`steprl.io` (image files) and :mod:`steprl.dicom` (DICOM series); no SimpleITK here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from steprl.errors import InputError

#: Extensions read as medical images (geometry in the header).
MEDICAL_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh")
#: Extensions read as 2D pictures (RGB(A) is turned into luminance).
PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: Extensions :func:`write_image` accepts.
WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png")
#: Formats whose header and voxel data live in two files (written through a temporary folder).
DETACHED = (".mhd", ".nhdr")
#: Formats written with compression on.
COMPRESSED = (".nii.gz", ".nrrd", ".mha")
SUPPORTED_READ = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), FreeSurfer MGH (.mgz, .mgh), "
    "PNG/JPEG/TIFF/BMP pictures (2D), or a folder holding a DICOM series"
)


def extension(path: str | os.PathLike) -> str:
    """Lower-case extension of ``path``, with ``.nii.gz`` (and ``.xxx.gz``) kept whole."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if len(suffixes) >= 2 and suffixes[-1] == ".gz":
        return suffixes[-2] + suffixes[-1]
    return suffixes[-1] if suffixes else ""


def itk_reason(exc: Exception) -> str:
    """The useful part of a SimpleITK/ITK exception message (no C++ file and line)."""
    text = " ".join(str(exc).split())
    for marker in ("ITK ERROR:", "sitk::ERROR:"):
        if marker in text:
            text = text.split(marker, 1)[1]
    text = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):", "", text)  # "ImageFileReader(0x55..):"
    text = text.split(" Tried to create one of", 1)[0]
    return text.strip()[:300] or type(exc).__name__


def read_error(path: Path, name: str, reason: str) -> InputError:
    """The error for an image file (or DICOM folder) SimpleITK could not read."""
    return InputError(f"Cannot read the {name} '{path}': {reason}.", f"Give one of: {SUPPORTED_READ}.")


def write_error(path: Path, reason: str) -> InputError:
    """The error for a file SimpleITK could not write."""
    return InputError(f"Cannot write '{path}': {reason}.",
                      "Check that the folder is writable and has free space, and the file is not open elsewhere.")
