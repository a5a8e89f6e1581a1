"""Atomic writes: the one way steprl puts a file in place (no numpy, SimpleITK or torch here).

Why: an interrupted run (Ctrl-C, SIGTERM, a full disk, a crash) must never leave a half-written
image, model, checkpoint or report where a reader would take it for a whole one. Every writer
writes to a temporary name in the destination folder and renames it into place with
:func:`os.replace`, which is atomic on one file system.

Temporary names start with :data:`TEMP_PREFIX` and end with the real file name, so writers that
choose the format by extension (SimpleITK, matplotlib) see the real suffixes. The file is not
created here (unlike ``mkstemp``, whose 0600 mode would survive the rename and hide a shared
model from other users): it gets the usual ``0666 & ~umask`` mode.

Example::

    with atomic_path("out/model.safetensors") as tmp:
        safetensors.torch.save_file(tensors, tmp)
    write_text("out/report.md", text)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

#: How every temporary file or folder steprl writes beside an output begins.
TEMP_PREFIX = ".steprl-tmp-"


def temporary_sibling(path: Path) -> Path:
    """A fresh name in ``path``'s folder that ENDS with ``path.name`` (so every suffix is kept)."""
    return path.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex[:10]}-{path.name}"


def remove(path: Path) -> None:
    """Remove a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fsync(path: Path) -> None:
    """Flush a written file to disk, so that the rename never exposes an empty file after a crash."""
    if path.is_file():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Write ``path`` atomically: yield a temporary path to write to, rename it into place after.

    The temporary path lies in the same folder (so the rename is atomic on one file system) and
    ends with the real file name, so every suffix (``.nii.gz``, ``.json``, ``.safetensors``)
    is kept for writers that choose the format by extension. Parent folders are created.

    - On success the temporary file is flushed to disk and ``os.replace``-d onto ``path``
      (replacing an existing file). The body must have created it.
    - On any exception the temporary file (or folder) is removed and the exception re-raised;
      an existing ``path`` is left untouched.

    The body may also create a FOLDER at the yielded path (e.g. a DICOM series); it then
    replaces ``path`` if that is missing or an empty folder. Nested blocks are renamed into
    place innermost first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file {tmp} for {path}")
        fsync(tmp)
        if tmp.is_dir() and path.is_dir() and not any(path.iterdir()):
            path.rmdir()  # os.replace onto an empty folder is not portable
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


@contextlib.contextmanager
def atomic_detached(path: Path) -> Iterator[Path]:
    """Like :func:`atomic_path` for two-file formats (``.mhd`` + ``.raw``, ``.nhdr`` + ``.raw``).

    The header names its data file, so the files cannot be written under temporary names.
    They are written with their REAL names into a temporary folder beside ``path``, then moved
    next to it: data files first, the header last, so a reader never finds a header whose
    data is missing. On failure the temporary folder is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = temporary_sibling(path.with_name(path.name + ".d"))
    tmp_dir.mkdir()
    try:
        yield tmp_dir / path.name
        header = tmp_dir / path.name
        if not header.exists():
            raise FileNotFoundError(f"nothing was written for {path}")
        others = [p for p in tmp_dir.iterdir() if p != header]
        for item in [*others, header]:
            fsync(item)
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
