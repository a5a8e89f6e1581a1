"""Image input/output with the full physical geometry, built on SimpleITK.

Why this module exists: every file a user gives (fixed/moving volumes, label maps, PNG slices,
DICOM folders) and every file steprl writes (warped images, displacement fields, label maps,
JSON reports) goes through here, so that geometry, errors and atomic writes are handled once.

Geometry: SimpleITK reports spacing/origin/direction in LPS millimetres, ITK order, exactly what
:class:`steprl.geometry.Geometry` holds, so nothing here converts to RAS (that happens only in
:mod:`steprl.geometry`). Arrays come back in numpy order ``(D, H, W)`` / ``(H, W)``; vector
images (displacement fields) as ``(*S, C)``.

Writes are atomic: data go to a temporary name in the destination folder that keeps the real
extension (SimpleITK picks its writer by extension) and are renamed into place with
:func:`os.replace`; on failure nothing half-written is left (:mod:`steprl.atomic`, the one
implementation of that for every steprl output).

Example::

    fixed = read_image("fixed.nii.gz", name="fixed image")
    labels = read_labels("fixed_seg.nrrd", fixed.geometry, name="fixed labels")
    validate_image(fixed, "fixed image", ndim=3)
    write_image(fixed, "out/fixed_copy.nrrd")
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from steprl import mgh
from steprl.atomic import atomic_detached, atomic_path, write_text
from steprl.dicom import read_series
from steprl.errors import InputError
from steprl.filecheck import check_file
from steprl.geometry import Geometry, Image
from steprl.imageformats import (
    COMPRESSED,
    DETACHED,
    PICTURE_EXTENSIONS,
    SUPPORTED_READ,
    WRITE_EXTENSIONS,
    extension,
    itk_reason,
    read_error,
    write_error,
)

log = logging.getLogger(__name__)

#: Rec. 601 luma weights, used for RGB(A) pictures.
_LUMA = np.array([0.299, 0.587, 0.114])

#: Files :func:`expand_files` picks from a folder of images.
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh", ".png", ".tif", ".tiff", ".jpg")


# ---- JSON -------------------------------------------------------------------------------
def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as strict UTF-8 JSON (indent 2, trailing newline) atomically; returns the path.

    numpy scalars/arrays and paths are converted, NaN and infinity become ``null`` (a bare
    ``NaN`` is not JSON; see :mod:`steprl.jsonvalues`); other non-JSON types raise ``TypeError``
    before anything is written.
    """
    from steprl.jsonvalues import finite_json

    path = Path(path)
    text = json.dumps(finite_json(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return write_text(path, text)


# ---- reading --------------------------------------------------------------------------
def _read_sitk(path: str | os.PathLike, name: str, series_uid: str | None = None) -> sitk.Image:
    """Read a file or DICOM folder as a 2D/3D SimpleITK image (any pixel type, maybe vector)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"The {name} '{path}' does not exist.", f"Check the path. Supported: {SUPPORTED_READ}.")
    if path.is_dir():
        image = read_series(path, name, series_uid)
    elif mgh.is_mgh(path):  # FreeSurfer's format: SimpleITK has no reader for it
        image = mgh.read_mgh(path, name)
    else:
        check_file(path, name)  # truncated NIfTI / JPEG and NaN in NIfTI, which ITK lets through
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            reason = itk_reason(exc)
            # MetaImage says "No such file or directory" about a truncated file that does exist
            reason = reason.replace("No such file or directory", "the file is truncated or damaged")
            raise read_error(path, name, reason) from exc
    ndim = image.GetDimension()
    if ndim == 4 and image.GetSize()[3] == 1:
        log.info("%s '%s' is 4D with one volume along the 4th axis: using that volume.", name, path)
        image = sitk.Extract(image, [*image.GetSize()[:3], 0], [0, 0, 0, 0])
        ndim = 3
    if ndim not in (2, 3):
        raise InputError(
            f"The {name} '{path}' has {ndim} dimensions (size {image.GetSize()}); only 2D and 3D are supported.",
            "Extract one 3D volume (e.g. one time point or one channel) and give that file.",
        )
    return image


def _is_picture(path: Path) -> bool:
    return extension(path) in PICTURE_EXTENSIONS


def _to_scalar(image: sitk.Image, path: Path, name: str) -> sitk.Image:
    """Turn an RGB(A) / grey+alpha picture into one luminance channel; refuse other vectors."""
    comps = image.GetNumberOfComponentsPerPixel()
    if comps == 1:
        return image
    colour = comps in (2, 3, 4) and (
        _is_picture(path) or image.GetPixelID() in (sitk.sitkVectorUInt8, sitk.sitkVectorUInt16)
    )
    if not colour:
        raise InputError(
            f"The {name} '{path}' has {comps} components per voxel (a vector or multi-channel image).",
            "Give a scalar (single-channel) image; for a displacement field use read_displacement_field.",
        )
    array = sitk.GetArrayViewFromImage(image)
    if comps <= 2:
        log.info("%s '%s' is grey + alpha: using the grey channel, ignoring alpha.", name, path)
        scalar = np.asarray(array[..., 0], dtype=np.float32)
    else:
        log.info("%s '%s' is RGB%s: converted to luminance (0.299 R + 0.587 G + 0.114 B)%s.",
                 name, path, "A" if comps == 4 else "", ", alpha ignored" if comps == 4 else "")
        scalar = (np.asarray(array[..., :3], dtype=np.float64) @ _LUMA).astype(np.float32)
    out = sitk.GetImageFromArray(scalar)
    out.CopyInformation(image)
    return out


def _check_pixel_type(image: sitk.Image, path: Path, name: str) -> None:
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError(f"The {name} '{path}' has complex voxels.", "Give a real-valued (magnitude) image.")


def read_image(
    path: str | os.PathLike,
    *,
    name: str = "image",
    dtype: np.dtype | type | None = np.float32,
    series_uid: str | None = None,
) -> Image:
    """Read a 2D or 3D scalar image with its geometry (LPS, ITK order).

    Args:
        path: a NIfTI / NRRD / MetaImage / FreeSurfer MGH-MGZ file, a PNG/JPEG/TIFF/BMP picture, or a FOLDER holding
            one DICOM series (read with GDCM, slices sorted by position).
        name: what the image is, for error messages ("fixed image", "moving labels"...).
        dtype: array type returned (float32 by default, for intensities); ``None`` keeps the
            file's own type (a luminance-converted picture is float32).
        series_uid: the DICOM SeriesInstanceUID to read when the folder holds several series.

    Returns:
        :class:`Image` with ``array`` ``(H, W)`` or ``(D, H, W)``. A 3D file with one voxel
        along an axis (a single slice saved as 3D) stays 3D; a 4D file with a single volume
        becomes 3D. RGB(A) pictures become luminance (logged).

    Raises:
        InputError: missing or unreadable file, DICOM folder with none or several series,
        4D data, vector / multi-component (non-colour) or complex voxels.
    """
    path = Path(path)
    image = _read_sitk(path, name, series_uid)
    _check_pixel_type(image, path, name)
    image = _to_scalar(image, path, name)
    result = Image.from_sitk(image)
    if dtype is not None:
        result.array = result.array.astype(dtype, copy=False)
    return result


def _same_grid(a: Geometry, b: Geometry, fraction: float = 0.01) -> bool:
    """True when both grids have the same shape and every grid corner lies within
    ``fraction`` of the smallest voxel size of the other's: the same physical samples."""
    if a.shape != b.shape:
        return False
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in a.size_xyz], indexing="ij")).reshape(a.ndim, -1)
    (ma, ba), (mb, bb) = a.index_to_physical(), b.index_to_physical()
    gap = np.abs((ma @ corners + ba[:, None]) - (mb @ corners + bb[:, None])).max()
    return bool(gap <= fraction * min(min(a.spacing), min(b.spacing)))


def _integer_labels(image: sitk.Image, path: Path, name: str) -> sitk.Image:
    """Check that the voxels are whole numbers; return an integer-typed image."""
    comps = image.GetNumberOfComponentsPerPixel()
    if comps > 1:
        array = sitk.GetArrayViewFromImage(image)
        grey = comps == 2 or (comps in (3, 4) and np.array_equal(array[..., 0], array[..., 1])
                              and np.array_equal(array[..., 0], array[..., 2]))
        if _is_picture(path) and grey:
            log.info("%s '%s' is a grey picture stored with colour/alpha channels: using its first channel.",
                     name, path)
            return sitk.VectorIndexSelectionCast(image, 0)
        raise InputError(
            f"The {name} '{path}' has {image.GetNumberOfComponentsPerPixel()} components per voxel.",
            "Give a label map: one integer label per voxel (0 = background).",
        )
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        array = sitk.GetArrayViewFromImage(image)
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(
                f"The {name} '{path}' has non-integer values (range {float(np.nanmin(array)):g} to "
                f"{float(np.nanmax(array)):g}): it looks like an intensity image or a probability map.",
                "Give a label map with one whole-number label per voxel (threshold a probability map first).",
            )
        if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
            raise InputError(f"The {name} '{path}' has labels outside the 32-bit integer range.",
                             "Renumber the labels.")
        return sitk.Cast(image, sitk.sitkInt32)
    return image


def read_labels(
    path: str | os.PathLike,
    reference: Geometry | None = None,
    *,
    name: str = "labels",
    series_uid: str | None = None,
) -> Image:
    """Read an integer label map; optionally bring it onto ``reference``'s grid.

    When ``reference`` is given and the label map's own header describes another grid (other
    size, spacing, origin or direction, as in some public datasets), the labels are resampled
    onto ``reference`` in PHYSICAL space with nearest neighbour (voxels outside the label map
    become 0), never copied voxel for voxel. Grids whose corners agree within 1% of a voxel
    count as the same grid and are copied, with ``reference``'s geometry.

    Returns:
        :class:`Image` whose array has the file's integer type (a float file holding whole
        numbers becomes int32), on ``reference``'s grid when given.

    Raises:
        InputError: unreadable file, non-integer values, multi-component voxels, a dimension
        different from ``reference``'s, or a label map that does not overlap ``reference``.
    """
    path = Path(path)
    image = _read_sitk(path, name, series_uid)
    _check_pixel_type(image, path, name)
    image = _integer_labels(image, path, name)
    own = Geometry.from_sitk(image)
    if reference is None:
        return _warn_if_empty(Image(sitk.GetArrayFromImage(image), own), path, name)
    if own.ndim != reference.ndim:
        raise InputError(
            f"The {name} '{path}' is {own.ndim}D but its image is {reference.ndim}D.",
            "Give the label map that belongs to this image (same dimension).",
        )
    if _same_grid(own, reference):
        return _warn_if_empty(Image(sitk.GetArrayFromImage(image), reference), path, name)
    ref = reference.to_sitk_reference()
    identity = sitk.Transform(reference.ndim, sitk.sitkIdentity)
    coverage = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    coverage.CopyInformation(image)
    covered = sitk.Resample(coverage, ref, identity, sitk.sitkNearestNeighbor, 0)
    fraction = float(sitk.GetArrayFromImage(covered).mean())  # a copy: a view would outlive `covered`
    if fraction == 0.0:
        raise InputError(
            f"The {name} '{path}' does not overlap its image at all in physical space "
            f"(label origin {np.round(own.origin, 2).tolist()} mm, image origin "
            f"{np.round(reference.origin, 2).tolist()} mm, LPS).",
            "Check that this label map belongs to this image and that both headers (origin, "
            "direction, spacing) are right.",
        )
    log.log(logging.INFO if fraction >= 0.5 else logging.WARNING,
            "%s '%s' has another grid than its image: resampled onto it in physical space (nearest neighbour), "
            "%.0f%% of the image covered.", name, path, 100 * fraction)
    resampled = sitk.Resample(image, ref, identity, sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    return _warn_if_empty(Image(sitk.GetArrayFromImage(resampled), reference), path, name)


def _warn_if_empty(labels: Image, path: Path, name: str) -> Image:
    """``labels``, after a warning when no voxel is labelled: Dice and HD95 are undefined then."""
    if not np.any(labels.array):
        log.warning("The %s '%s' has no label at all (every voxel of it on the image grid is 0): Dice and HD95 "
                    "against it mean nothing (undefined values are written as null).", name, path)
    return labels



def expand_files(paths: list[Path], what: str) -> list[Path]:
    """Files as given, or the image files inside a single folder (sorted)."""
    if len(paths) == 1 and paths[0].is_dir():
        files = sorted(p for p in paths[0].iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise InputError(f"No image files in folder {paths[0]} ({what}).",
                             f"Put {', '.join(IMAGE_SUFFIXES)} files there, or list the files.")
        return files
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise InputError(f"{what.capitalize()} not found: {', '.join(missing[:3])}.", "Check the paths.")
    return list(paths)

# ---- checks ---------------------------------------------------------------------------
def validate_image(image: Image, name: str, *, ndim: int | None = None, reference_name: str | None = None) -> None:
    """Raise :class:`InputError` (with a fix) when ``image`` cannot be registered or segmented.

    Checks: empty array, NaN/Inf voxels, a constant image (no contrast), and when ``ndim`` is
    given a different dimension. ``reference_name`` names where ``ndim`` came from, for the
    message "fixed image is 2D but moving image is 3D"
    (``validate_image(moving, "moving image", ndim=fixed.ndim, reference_name="fixed image")``).
    """
    if ndim is not None and image.ndim != ndim:
        if reference_name:
            problem = f"The {reference_name} is {ndim}D but the {name} is {image.ndim}D."
        else:
            problem = f"The {name} is {image.ndim}D but a {ndim}D image is needed."
        raise InputError(problem, "Give images of the same dimension: two 2D images or two 3D volumes "
                         "(a single slice saved as a 3D file counts as 3D).")
    array = np.asarray(image.array)
    if array.size == 0:
        raise InputError(f"The {name} is empty (array shape {array.shape}).", "Give an image with voxels in it.")
    if np.issubdtype(array.dtype, np.inexact):
        finite = np.isfinite(array)
        if not finite.all():
            n_nan = int(np.isnan(array).sum())
            n_inf = int(array.size - finite.sum() - n_nan)
            raise InputError(
                f"The {name} has {n_nan} NaN and {n_inf} infinite voxel values.",
                "Replace them (e.g. with the background value) before using it; they often come from "
                "a division by zero in preprocessing.",
            )
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise InputError(
            f"The {name} has the same value ({float(lo):g}) in every voxel: there is no contrast to work with.",
            "Check that the right file was given (not an empty mask or a blank export).",
        )


# ---- writing --------------------------------------------------------------------------
def _to_sitk(image: Image) -> sitk.Image:
    array = np.asarray(image.array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    out = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=image.is_vector)
    image.geometry.apply_to_sitk(out)
    return out


def write_image(image: Image, path: str | os.PathLike) -> Path:
    """Write ``image`` (scalar or vector) with its geometry; the format follows the extension.

    ``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd`` take any pixel type and
    vector images (written as vector images); ``.png`` takes 2D scalar uint8/uint16 only.
    Compression is on for ``.nii.gz``/``.nrrd``/``.mha``. The write is atomic (see
    :func:`atomic_path`); ``.mhd``/``.nhdr`` (header + ``.raw`` data file) are written in a
    temporary folder and moved in, data first, header last (their data file is ``<stem>.raw``
    for both, so ``x.mhd`` and ``x.nhdr`` in one folder overwrite each other's data). Parent
    folders are created.

    Returns the written path. Raises :class:`InputError` for an unsupported extension or
    pixel type, or when the write fails (no partial or temporary file is left).
    """
    path = Path(path)
    ext = extension(path)
    if ext not in WRITE_EXTENSIONS:
        raise InputError(f"Cannot write '{path}': unsupported extension '{ext or path.name}'.",
                         f"Use one of {', '.join(WRITE_EXTENSIONS)}.")
    if ext == ".png" and (image.ndim != 2 or image.is_vector or image.array.dtype not in (np.uint8, np.uint16)):
        raise InputError(
            f"Cannot write '{path}': PNG holds 2D single-channel uint8/uint16 images, this one is "
            f"{image.ndim}D{' vector' if image.is_vector else ''} {image.array.dtype}.",
            "Rescale and cast it to uint8 or uint16 first, or write .nii.gz / .nrrd to keep the values.",
        )
    sitk_image = _to_sitk(image)
    writer = atomic_detached if ext in DETACHED else atomic_path
    try:
        with writer(path) as tmp:
            sitk.WriteImage(sitk_image, str(tmp), useCompression=ext in COMPRESSED)
    except RuntimeError as exc:
        raise write_error(path, itk_reason(exc)) from exc
    except OSError as exc:
        raise write_error(path, str(exc)) from exc
    log.debug("Wrote %s", path)
    return path


# ---- displacement fields --------------------------------------------------------------
def write_displacement_field(field: Image, path: str | os.PathLike, dtype=np.float64) -> Path:
    """Write a physical displacement field as a float64 vector image ITK and Slicer read as a transform.

    ``dtype=np.float32`` halves the bytes to compress and write (the per-step fields: one per step,
    the writing cost most of a refinement step); readers cast on reading, as below.

    ``field.array`` is ``(*S, ndim)``: displacement in mm, LPS, components in ITK ``(x, y[, z])``
    order, pull-back convention (the fixed point ``x`` maps to the moving point ``x + u(x)``).
    That is ITK's displacement-field convention, so
    ``sitk.DisplacementFieldTransform(sitk.ReadImage(path, sitk.sitkVectorFloat64))`` is the
    resampling transform, and 3D Slicer loads the file (as "Transform") as a grid transform.
    The vectors are stored in LPS as ITK does: NIfTI files get ITK's vector intent
    (``intent_code`` 1007, the ANTs/ITK convention); NRRD files ``kinds: vector domain...``.
    Formats: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``.
    """
    path = Path(path)
    if extension(path) not in tuple(e for e in WRITE_EXTENSIONS if e != ".png"):
        raise InputError(f"Cannot write the displacement field '{path}': unsupported extension.",
                         "Use .nii.gz, .nrrd or .mha (3D Slicer loads them as grid transforms).")
    ndim = field.ndim
    if not field.is_vector or field.array.shape[-1] != ndim:
        raise InputError(f"A {ndim}D displacement field needs an array (*S, {ndim}), got {field.array.shape}.",
                         "Give one displacement component per spatial axis, last.")
    if not np.all(np.isfinite(field.array)):
        raise InputError("The displacement field has NaN or infinite values.",
                         "Check the model output; this is usually a diverged network.")
    return write_image(Image(np.asarray(field.array, dtype=dtype), field.geometry), path)


def read_displacement_field(path: str | os.PathLike, *, name: str = "displacement field") -> Image:
    """Read a displacement field written by :func:`write_displacement_field` (or ITK/ANTs/Slicer).

    Returns an :class:`Image` with a float64 array ``(*S, ndim)`` (mm, LPS, ITK component order).
    Raises :class:`InputError` when the file is not a vector image with one component per axis.
    """
    path = Path(path)
    image = _read_sitk(path, name)
    comps = image.GetNumberOfComponentsPerPixel()
    if comps != image.GetDimension():
        raise InputError(
            f"The {name} '{path}' has {comps} component(s) per voxel; a {image.GetDimension()}D "
            f"displacement field has {image.GetDimension()}.",
            "Give a displacement-field (vector) image, e.g. one written by steprl or ITK/ANTs.",
        )
    return Image.from_sitk(sitk.Cast(image, sitk.sitkVectorFloat64))
