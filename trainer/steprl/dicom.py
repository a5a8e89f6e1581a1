"""DICOM series in and out: a folder of one series read as one image, a 3D image written as a series.

:func:`read_series` serves :func:`steprl.io.read_image` when it is given a folder;
:func:`write_dicom_series` writes a derived series (Secondary Capture) with the image's geometry.
Geometry is SimpleITK's LPS, as everywhere in steprl (:mod:`steprl.geometry`).

Example::

    write_dicom_series(image, "out/series", series_description="StepRL warped")
    image = steprl.io.read_image("out/series")
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from steprl.atomic import atomic_path
from steprl.errors import InputError
from steprl.geometry import Image
from steprl.imageformats import SUPPORTED_READ, itk_reason, read_error, write_error

log = logging.getLogger(__name__)


# ---- reading ----------------------------------------------------------------------------
def read_series(folder: Path, name: str, series_uid: str | None) -> sitk.Image:
    """Read the DICOM series in ``folder`` (one series, or the one ``series_uid`` names)."""
    reader = sitk.ImageSeriesReader()
    try:
        uids = list(reader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as exc:
        raise read_error(folder, name, itk_reason(exc)) from exc
    if not uids:
        raise InputError(
            f"The {name} '{folder}' is a folder without a DICOM series in it (subfolders are not searched).",
            f"Give the folder that holds the DICOM files of one series, or an image file: {SUPPORTED_READ}.",
        )
    if series_uid is None and len(uids) > 1:
        lines = []
        for uid in uids:
            files = reader.GetGDCMSeriesFileNames(str(folder), uid)
            lines.append(f"  {uid}  ({len(files)} files{_series_description(files[0])})")
        raise InputError(
            f"The {name} folder '{folder}' holds {len(uids)} DICOM series:\n" + "\n".join(lines) + "\n",
            "Choose one with series_uid='<one of the UIDs above>' (CLI: --series-uid), "
            "or put each series in its own folder.",
        )
    if series_uid is not None and series_uid not in uids:
        raise InputError(
            f"The {name} folder '{folder}' has no DICOM series {series_uid!r}; it has: {', '.join(uids)}.",
            "Give one of the series UIDs listed.",
        )
    uid = series_uid or uids[0]
    files = reader.GetGDCMSeriesFileNames(str(folder), uid)
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise read_error(folder, name, itk_reason(exc)) from exc
    log.info("Read DICOM series %s (%d files) from %s", uid, len(files), folder)
    return image


def _series_description(file: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
        if reader.HasMetaDataKey("0008|103e"):
            return f", '{reader.GetMetaData('0008|103e').strip()}'"
    except RuntimeError:
        pass
    return ""


# ---- writing ----------------------------------------------------------------------------
def _new_uid() -> str:
    """A DICOM UID from a random UUID (the '2.25.' root of DICOM PS3.5 B.2)."""
    return f"2.25.{uuid.uuid4().int}"


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) for ``value``."""
    for digits in range(12, 3, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.3e}"


def _int16_mapping(array: np.ndarray) -> tuple[float, float]:
    """``(slope, intercept)`` such that ``array ~ slope * q + intercept`` with q in int16.

    Whole numbers spanning at most 65534 are kept exactly (slope 1); other data are quantised
    to 65001 levels, an error of at most half a slope.
    """
    lo, hi = float(array.min()), float(array.max())
    if np.array_equal(array, np.round(array)) and hi - lo <= 65534:
        intercept = 0.0 if lo >= -32767 and hi <= 32767 else float(np.floor((lo + hi) / 2))
        return 1.0, intercept
    slope = float(_ds((hi - lo) / 65000.0)) if hi > lo else 1.0
    return slope, float(_ds((hi + lo) / 2.0))


def _checked_array(image: Image, folder: Path) -> np.ndarray:
    """The image's voxels as float64, after refusing what DICOM cannot store or where it cannot go."""
    if image.ndim != 3 or image.is_vector:
        raise InputError(f"A DICOM series needs a 3D scalar volume, got a {image.ndim}D "
                         f"{'vector ' if image.is_vector else ''}image.", "Write .nii.gz or .nrrd instead.")
    direction = image.geometry.direction
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputError("The image direction is not orthonormal (sheared): DICOM cannot store it.",
                         "Resample the image onto an orthogonal grid, or write .nii.gz / .nrrd.")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"Cannot write a DICOM series into '{folder}': it exists and is not an empty folder.",
                         "Give a new folder name (series are never mixed with other files).")
    array = np.asarray(image.array, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise InputError("The image has NaN or infinite voxels; DICOM cannot store them.",
                         "Replace them with the background value first.")
    return array


def _series_tags(image: Image, series_description: str, slope: float, intercept: float) -> dict[str, str]:
    """The tags every slice of a new series carries (new Study/Series/FrameOfReference UIDs)."""
    now = time.localtime()
    date, clock = time.strftime("%Y%m%d", now), time.strftime("%H%M%S", now)
    d = image.geometry.direction
    return {
        "0008|0008": "DERIVED\\SECONDARY",
        "0008|0060": "OT",
        "0008|0020": date, "0008|0030": clock, "0008|0021": date, "0008|0031": clock,
        "0008|0023": date, "0008|0033": clock,
        "0008|103e": series_description[:64],
        "0010|0010": "Anonymous", "0010|0020": "StepRL",
        "0020|000d": _new_uid(), "0020|000e": _new_uid(), "0020|0052": _new_uid(),
        "0020|0010": "1", "0020|0011": "1",
        "0020|0037": "\\".join(_ds(v) for v in (*d[:, 0], *d[:, 1])),
        "0018|0050": _ds(image.geometry.spacing[2]),
        "0018|0088": _ds(image.geometry.spacing[2]),
        "0028|1052": _ds(intercept), "0028|1053": _ds(slope), "0028|1054": "US",
        "0028|0100": "16", "0028|0101": "16", "0028|0102": "15", "0028|0103": "1",
    }


def write_dicom_series(
    image: Image,
    folder: str | os.PathLike,
    *,
    series_description: str = "StepRL",
    tags: dict[str, str] | None = None,
) -> Path:
    """Write a 3D scalar image as a DICOM series, one file per slice, geometry kept.

    Voxels are stored as int16 with Rescale Slope/Intercept (exact for whole numbers spanning
    at most 65534, else quantised to 65001 levels). Every slice carries ImagePositionPatient,
    ImageOrientationPatient (from the direction's first two columns), PixelSpacing and
    SliceThickness; new Study/Series/FrameOfReference/SOP instance UIDs are made. The series
    is Secondary Capture ("OT", DERIVED). ``tags`` (``{"0010|0010": "Doe^Jane"}``) adds or
    overrides tags. The files are written to a temporary folder beside ``folder`` and renamed
    into place; ``folder`` must not exist yet or be empty.

    A left-handed grid (third direction column opposite to row x column) is written as it
    is; readers sort slices by position along row x column, so they may return the slices in
    the other order with the direction flipped to match: the same physical image.
    """
    folder = Path(folder)
    array = _checked_array(image, folder)
    slope, intercept = _int16_mapping(array)
    quantised = np.clip(np.round((array - intercept) / slope), -32767, 32767) * slope + intercept
    volume = sitk.GetImageFromArray(quantised)
    image.geometry.apply_to_sitk(volume)
    common = _series_tags(image, series_description, slope, intercept)
    common.update(tags or {})
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep the UIDs set here instead of GDCM's own
    try:
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            for k in range(volume.GetDepth()):
                slice_ = volume[:, :, k]
                for key, value in common.items():
                    slice_.SetMetaData(key, value)
                position = volume.TransformIndexToPhysicalPoint((0, 0, k))
                slice_.SetMetaData("0020|0032", "\\".join(_ds(v) for v in position))
                slice_.SetMetaData("0020|0013", str(k + 1))
                slice_.SetMetaData("0008|0018", _new_uid())
                writer.SetFileName(str(tmp / f"IM{k + 1:05d}.dcm"))
                writer.Execute(slice_)
    except RuntimeError as exc:
        raise write_error(folder, itk_reason(exc)) from exc
    except OSError as exc:
        raise write_error(folder, str(exc)) from exc
    log.info("Wrote DICOM series (%d slices, slope %s, intercept %s) to %s",
             volume.GetDepth(), _ds(slope), _ds(intercept), folder)
    return folder
