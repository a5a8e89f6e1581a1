"""A run's output folder: checked before any work, written beside it, published all at once.

Why this module exists: ``steprl register`` / ``demo`` / ``segment`` write several files into a
folder the user names. Users point ``--out`` at folders that already hold their own files, at an
unset shell variable (``--out ""``: the current folder), at a read-only place, or at a file; runs
are killed by ``timeout`` and job schedulers. The rules kept here, in one place:

- **Check first.** :func:`check_output_folder` refuses an empty, unwritable or impossible
  ``--out`` (and files that would collide with the run's) before any image is read, so a bad
  ``--out`` never costs a whole run and never ends in a traceback.
- **Never touch what steprl did not write.** A published folder holds a record,
  ``.steprl-outputs.json``, of the files its last steprl run wrote. A new run replaces those
  (and removes the ones it no longer writes, e.g. the per-step files of a longer earlier run);
  any other file is left alone, and a run that would have to overwrite one is refused.
- **All or nothing.** Files are written into a hidden staging folder beside ``out`` (same file
  system) and moved in by :func:`publish` as one transaction: the previous run's files are
  moved aside first, and put back if any move fails, so ``out`` never mixes two runs.
- **Nothing left behind.** A staging folder carries a marker with its process id; a run killed
  before it could clean up (SIGKILL, power loss) leaves one, which the next run into the same
  ``out`` removes once that process is gone. Only folders with the marker are ever removed.

Example::

    check_output_folder(out, files=("warped.nii.gz", "metrics.json"))   # before the work
    with staged_output(out) as staging:                                 # after the checks
        write_image(warped, staging / "warped.nii.gz")
    # published here; on an exception the staging folder is gone and `out` is as it was
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from steprl.atomic import write_text
from steprl.errors import InputError

log = logging.getLogger(__name__)

#: The record of the files the last steprl run wrote into an output folder.
MANIFEST = ".steprl-outputs.json"
#: The marker that makes a hidden ``.NAME.partial-*`` folder a steprl staging folder.
STAGING_MARKER = ".steprl-staging"
_PARTIAL = ".partial-"
_BACKUP = ".steprl-replaced"


# ---- checks --------------------------------------------------------------------------------
def output_path(text: str) -> Path:
    """argparse ``type=`` for output paths: refuses an empty value (an unset shell variable
    would otherwise turn into the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path (an unset shell variable?); give a folder or file name")
    return Path(text)


def _capital(text: str) -> str:
    """``text`` starting a sentence (``the job's output folder`` -> ``The job's ...``)."""
    return text[:1].upper() + text[1:]


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _existing_ancestor(path: Path) -> Path:
    """The nearest of ``path`` and its parents that exists (``path`` absolute)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor)


def _check_creatable(path: Path, shown: str, flag: str, kind: str) -> None:
    """InputError unless ``path`` (absolute, absent) can be created: its nearest existing
    ancestor is a writable folder."""
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise InputError(f"{_capital(flag)} '{shown}' lies under '{ancestor}', which is a file, not a folder.",
                         f"Give a {kind} path whose parent folders are folders.")
    if not _writable(ancestor):
        raise InputError(f"Cannot create {flag} '{shown}': the folder '{ancestor}' is not writable.",
                         f"Choose a {kind} in a folder you can write to.")


def _empty(out: str | os.PathLike, flag: str) -> None:
    if not str(out).strip():
        raise InputError(f"{_capital(flag)} is empty (an unset shell variable?).", "Give a folder or file name.")


def check_output_folder(out: str | os.PathLike, *, files: Iterable[str] = (), flag: str = "--out") -> Path:
    """Refuse an output folder a run could not publish into; returns it as an absolute path.

    Refused, each with a message saying what to do: an empty path; an existing file; a path
    under a file; a folder that cannot be created or written; and any of ``files`` (paths
    relative to ``out``) that exists in ``out`` as a folder, or as a file no earlier steprl run
    wrote there (steprl replaces only its own files). Creates nothing.
    """
    _empty(out, flag)
    real = Path(out).resolve()
    if real.exists():
        if not real.is_dir():
            raise InputError(f"{_capital(flag)} '{out}' is an existing file, not a folder.",
                             "Give a folder (new or existing) for the outputs.")
        if not _writable(real):
            raise InputError(f"Cannot write into {flag} '{out}': the folder is not writable.",
                             "Choose a folder you can write to.")
        _check_collisions(real, files, str(out))
    else:
        _check_creatable(real, str(out), flag, "folder")
    _staging_parent(real, str(out), flag)
    return real


def check_output_file(path: str | os.PathLike, *, flag: str) -> Path:
    """Refuse an output FILE path (``--json``) that cannot be written; returns it absolute.

    An existing file is replaced (the user named it); a folder, a path under a file or a
    read-only folder are refused before any work.
    """
    _empty(path, flag)
    real = Path(path).resolve()
    if real.is_dir():
        raise InputError(f"{_capital(flag)} '{path}' is a folder.",
                         f"Give a file name, e.g. {Path(path) / 'table.json'}.")
    if real.exists():
        if not _writable(real.parent):
            raise InputError(f"Cannot replace {flag} '{path}': its folder is not writable.",
                             "Choose a file in a folder you can write to.")
    else:
        _check_creatable(real, str(path), flag, "file")
    return real


def _recorded(out: Path) -> set[str]:
    """The relative paths of the files the last steprl run wrote into ``out`` (its manifest)."""
    try:
        data = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    files = data.get("files", []) if isinstance(data, dict) else []
    return {f for f in files if isinstance(f, str) and _safe_relative(f)}


def _safe_relative(rel: str) -> bool:
    """A manifest entry that stays inside its folder (no absolute path, no ``..``, no marker)."""
    path = Path(rel)
    return bool(rel) and not path.is_absolute() and ".." not in path.parts and path.name not in (MANIFEST, "")


def _check_collisions(out: Path, files: Iterable[str], shown: str) -> None:
    """InputError when a file of the run would land on a folder, under a file, or on a file
    that no earlier steprl run wrote into ``out``."""
    recorded = _recorded(out)
    blocked, foreign = [], []
    for rel in files:
        above = [out / p for p in Path(rel).parents if str(p) != "."]
        if (out / rel).is_dir() or any(p.exists() and not p.is_dir() for p in above):
            blocked.append(rel)
        elif (out / rel).exists() and rel not in recorded:
            foreign.append(rel)
    if blocked:
        raise InputError(f"The output folder '{shown}' holds a folder (or a file in the way) where this run writes "
                         f"{', '.join(blocked[:5])}.", "Rename or remove it, or choose another --out folder.")
    if foreign:
        raise InputError(f"The output folder '{shown}' already holds {', '.join(foreign[:5])}, which steprl has no "
                         f"record of writing ({MANIFEST}): it does not overwrite files it did not write.",
                         "Choose another --out folder, or move those files away first (outputs of an older steprl "
                         "carry no record: remove them yourself if that is what they are).")


# ---- staging ---------------------------------------------------------------------------------
def _same_device(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_dev == b.stat().st_dev
    except OSError:
        return False


def _staging_parent(real: Path, shown: str, flag: str) -> Path:
    """Where the staging folder goes: beside ``real`` (same file system, so moves are atomic),
    or inside it when only ``real`` itself is writable or it is a mount point."""
    parent = real.parent
    beside = _existing_ancestor(parent)
    if beside.is_dir() and _writable(beside) and (not real.exists() or _same_device(parent, real)):
        return parent
    if real.is_dir() and _writable(real):
        return real
    raise InputError(f"Cannot stage the outputs of {flag} '{shown}': neither its folder '{parent}' nor the "
                     "output folder itself is writable.", "Choose an output folder in a folder you can write to.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_staging(parent: Path, name: str) -> list[Path]:
    """Remove the staging folders of earlier runs into ``name`` that died without cleaning up.

    A folder goes only when it is named ``.{name}.partial-*``, holds the :data:`STAGING_MARKER`
    this module writes, and its process (same host) no longer runs. Returns what was removed.
    """
    removed = []
    for folder in parent.glob(f".{name}{_PARTIAL}*"):
        try:
            marker = json.loads((folder / STAGING_MARKER).read_text(encoding="utf-8"))
            pid, host = int(marker["pid"]), str(marker["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours, or not readable: never removed
        if host != socket.gethostname() or _alive(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        log.info("Removed %s, the staging folder of an earlier run (process %d) that did not finish.", folder, pid)
    return removed


def staging_folder(out: str | os.PathLike) -> Path:
    """A new hidden staging folder for ``out`` (``.NAME.partial-*``, with its marker), after removing
    stale ones of earlier runs. Creates the parent folders of ``out`` if needed."""
    real = Path(out).resolve()
    parent = _staging_parent(real, str(out), "--out")
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(parent, real.name)
    folder = Path(tempfile.mkdtemp(prefix=f".{real.name}{_PARTIAL}", dir=parent))
    marker = {"pid": os.getpid(), "host": socket.gethostname(), "out": str(real)}
    (folder / STAGING_MARKER).write_text(json.dumps(marker), encoding="utf-8")
    return folder


def _created_parents(path: Path) -> list[Path]:
    """The missing folders among ``path`` and its parents, outermost first."""
    return [p for p in reversed((path, *path.parents)) if not p.exists()]


@contextlib.contextmanager
def staged_output(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder for ``out``; publish it when the block ends normally.

    On any exception (Ctrl-C and SIGTERM included, see :mod:`steprl.cli`) the staging folder
    and the folders made for it are removed and ``out`` is left exactly as it was.
    """
    real = Path(out).resolve()
    made = _created_parents(real.parent)
    staging = staging_folder(out)
    try:
        yield staging
        publish(staging, out)
    except BaseException:
        if not _keeps_previous_files(staging):
            shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise


# ---- publishing --------------------------------------------------------------------------------
def _staged_files(staging: Path) -> list[str]:
    return sorted(str(p.relative_to(staging)) for p in staging.rglob("*")
                  if p.is_file() and p.name != STAGING_MARKER and _BACKUP not in p.relative_to(staging).parts)


def publish(staging: Path, out: str | os.PathLike) -> None:
    """Move the files of ``staging`` into ``out`` as one transaction, then remove ``staging``.

    The files of the previous steprl run in ``out`` (its manifest) are moved aside into
    ``staging`` first; if moving a new file in fails, everything is put back and an
    :class:`InputError` says why. Files steprl did not write are never replaced or removed.
    """
    real = Path(out).resolve()
    new = _staged_files(staging)
    if real.is_dir():
        _check_collisions(real, new, str(out))
    else:
        check_output_folder(out)
    old = sorted(rel for rel in (_recorded(real) if real.is_dir() else ()) if (real / rel).is_file())
    made = _created_parents(real)
    moved_aside: list[str] = []
    placed: list[str] = []
    try:
        real.mkdir(parents=True, exist_ok=True)
        for rel in old:
            backup = staging / _BACKUP / rel
            backup.parent.mkdir(parents=True, exist_ok=True)
            os.replace(real / rel, backup)
            moved_aside.append(rel)
        for rel in new:
            target = real / rel
            made += [p for p in _created_parents(target.parent) if p not in made]
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, target)
            placed.append(rel)
        _write_manifest(real, new)
    except BaseException as exc:
        _roll_back(real, staging, placed, moved_aside, made)
        if isinstance(exc, OSError):
            raise InputError(f"Cannot publish the outputs into '{out}' ({exc.strerror or exc}); it is left as it "
                             "was.", "Check free space and permissions of that folder, then run again.") from exc
        raise
    _remove_empty_folders(real, old)
    shutil.rmtree(staging, ignore_errors=True)
    log.info("Wrote %d files to %s", len(new), out)


def _write_manifest(real: Path, files: list[str]) -> None:
    """The manifest, atomically (a failed write leaves no temporary file: :func:`steprl.atomic.atomic_path`)."""
    write_text(real / MANIFEST, json.dumps({"written_by": "steprl", "files": files}, indent=1) + "\n")


def _roll_back(real: Path, staging: Path, placed: list[str], moved_aside: list[str], made: list[Path]) -> None:
    """Undo a failed :func:`publish`: new files back to staging, the previous run's back in place.

    A previous file that cannot be put back stays in the staging folder, which is then kept
    (see :func:`_keeps_previous_files`) and named in the log: nothing is lost.
    """
    for rel in reversed(placed):
        with contextlib.suppress(OSError):
            os.replace(real / rel, staging / rel)
    for rel in reversed(moved_aside):
        try:
            os.replace(staging / _BACKUP / rel, real / rel)
        except OSError:
            log.error("Could not put %s back into %s: it is kept in %s.", rel, real, staging / _BACKUP)
    for folder in reversed(made):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _keeps_previous_files(staging: Path) -> bool:
    """True when a failed publish could not put every previous file back (they are in ``staging``)."""
    backup = staging / _BACKUP
    return backup.is_dir() and any(p.is_file() for p in backup.rglob("*"))


def _remove_empty_folders(real: Path, removed: list[str]) -> None:
    """Remove the sub-folders that only held files of the previous run (e.g. ``steps/``) once empty."""
    for folder in sorted({(real / rel).parent for rel in removed}, key=lambda p: len(p.parts), reverse=True):
        if folder != real and not any(folder.iterdir()):
            with contextlib.suppress(OSError):
                folder.rmdir()
