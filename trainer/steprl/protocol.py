"""The worker's job file as typed values: one schema for the Slicer modules that write jobs and
the ``steprl worker`` that reads them. No torch here (the modules import it inside Slicer).

Why: the worker used to check a job piece by piece while it ran, so ``"version": "1"`` or
``"fixed": 5`` surfaced as an unexpected error ("please report a bug") after work had begun.
Now :func:`job_from_dict` checks the whole job once, up front, and names the field that is
wrong; the Slicer side builds the same dataclasses and writes them with :meth:`to_dict`, so
the two sides cannot drift apart.

Job files (JSON; relative paths are relative to the job file's folder)::

    {"version": 1, "task": "register", "fixed": "fixed.nrrd", "moving": "moving.nrrd",
     "fixed_labels": null, "moving_labels": null, "model": "spac3d_brain", "steps": 20,
     "device": "auto", "prealign": false, "output": "steps"}
    {"version": 1, "task": "segment", "image": "image.nrrd", "labels": null, "model": "pixeldrl_wm",
     "steps": 10, "axis": "axial", "device": "auto", "batch_slices": 8, "output": "steps"}
    {"version": 1, "task": "devices"}

Example::

    job = RegisterJob(fixed="fixed.nrrd", moving="moving.nrrd", model="spac3d_brain", output="steps")
    path.write_text(json.dumps(job.to_dict()))            # the Slicer module
    job = read_job(path)                                   # the worker: a RegisterJob, paths absolute
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from steprl.errors import InputError
from steprl.limits import check_steps
from steprl.segmentation.config import BATCH_SLICES

log = logging.getLogger(__name__)

JOB_VERSION = 1
#: Slice axes a segmentation job accepts: patient planes, or a numpy array axis.
AXES = ("axial", "coronal", "sagittal", "0", "1", "2")
_FIX = "Start the worker from the Slicer module (a job written by hand or by another StepRL version may not fit)."


@dataclass(frozen=True)
class RegisterJob:
    """Register ``moving`` onto ``fixed`` (label maps optional, both or neither)."""

    task: ClassVar[str] = "register"
    paths: ClassVar[tuple[str, ...]] = ("fixed", "moving", "fixed_labels", "moving_labels", "output")

    fixed: str
    moving: str
    model: str
    output: str
    fixed_labels: str | None = None
    moving_labels: str | None = None
    steps: int | None = None
    device: str = "auto"
    prealign: bool = False
    refine: int | None = None  # refinement steps after the policy's (None: the model card's default)

    def to_dict(self) -> dict[str, Any]:
        return {"version": JOB_VERSION, "task": self.task, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class SegmentJob:
    """Segment ``image`` slice by slice along ``axis`` (``labels``: optional reference)."""

    task: ClassVar[str] = "segment"
    paths: ClassVar[tuple[str, ...]] = ("image", "labels", "output")

    image: str
    model: str
    output: str
    labels: str | None = None
    steps: int | None = None
    axis: str = "axial"
    device: str = "auto"
    batch_slices: int = BATCH_SLICES

    def to_dict(self) -> dict[str, Any]:
        return {"version": JOB_VERSION, "task": self.task, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class DevicesJob:
    """Report the devices torch can use."""

    task: ClassVar[str] = "devices"
    paths: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"version": JOB_VERSION, "task": self.task}


Job = RegisterJob | SegmentJob | DevicesJob
JOB_TYPES: dict[str, type] = {cls.task: cls for cls in (RegisterJob, SegmentJob, DevicesJob)}


def _field_error(source: str, key: str, wanted: str, value: Any) -> InputError:
    return InputError(f"{source}: '{key}' must be {wanted}, got {json.dumps(value)}.", _FIX)


def _check_value(source: str, key: str, value: Any, field: dataclasses.Field) -> None:
    """The type (and range) check of one field, from its annotation."""
    optional = "None" in str(field.type)
    if value is None:
        if not optional:
            raise InputError(f"{source} lacks '{key}'.", _FIX)
        return
    if key in ("steps", "refine"):
        check_steps(value, f"{source}: '{key}'")
    elif key == "batch_slices":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _field_error(source, key, "a whole number >= 1", value)
    elif key == "prealign":
        if not isinstance(value, bool):
            raise _field_error(source, key, "true or false", value)
    elif not isinstance(value, str) or not value.strip():
        raise _field_error(source, key, "a non-empty text (a file path or a name)", value)
    elif key == "axis" and value.strip().lower() not in AXES:
        raise _field_error(source, key, f"one of {', '.join(AXES)}", value)


def job_from_dict(data: Any, base: str | os.PathLike | None = None, *, source: str = "The job") -> Job:
    """Check a decoded job completely and build its dataclass; InputError naming the bad field.

    ``base``: the folder relative paths are resolved against (the job file's); the model is
    resolved only when such a file exists there (otherwise it is a bundled model's name).
    Unknown keys are logged and ignored.
    """
    if not isinstance(data, dict):
        raise InputError(f"{source} is not a JSON object.", _FIX)
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _field_error(source, "version", f"a whole number (this steprl reads version {JOB_VERSION})", version)
    if version > JOB_VERSION:
        raise InputError(f"{source} has version {version}; this steprl reads up to {JOB_VERSION}.",
                         "Update the StepRL extension so the module and steprl match.")
    cls = JOB_TYPES.get(data.get("task"))
    if cls is None:
        raise InputError(f"{source} names no known task ({json.dumps(data.get('task'))}; expected one of "
                         f"{', '.join(JOB_TYPES)}).", _FIX)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields) - {"version", "task"})
    if unknown:
        log.warning("%s: ignoring the unknown key(s) %s.", source, ", ".join(unknown))
    values = {}
    for key, field in fields.items():
        default = None if field.default is dataclasses.MISSING else field.default
        value = data.get(key)
        value = default if value is None else value  # null or absent: the default, when there is one
        _check_value(source, key, value, field)
        values[key] = value
    job = cls(**values)
    return _resolved(job, Path(base)) if base is not None else job


def _resolved(job: Job, base: Path) -> Job:
    """``job`` with its paths made absolute against ``base`` (and the model, when it is a file there)."""
    changes = {key: str((base / getattr(job, key)).resolve()) for key in job.paths if getattr(job, key)}
    model = getattr(job, "model", None)
    if model and not Path(model).is_absolute() and (base / model).exists():
        changes["model"] = str((base / model).resolve())
    return dataclasses.replace(job, **changes)


def read_job(path: str | os.PathLike) -> Job:
    """Read and check a job file (see :func:`job_from_dict`); relative paths become absolute."""
    path = Path(path)
    source = f"Job file {path}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"{source} does not exist.", "Start the worker from the Slicer module.") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{source} cannot be read as JSON ({exc}).",
                         "Start the worker from the Slicer module.") from exc
    return job_from_dict(data, path.parent, source=source)


def write_job(job: Job, folder: str | os.PathLike) -> Path:
    """``folder/job.json`` holding ``job`` (its paths as given: relative ones are relative to ``folder``)."""
    path = Path(folder) / "job.json"
    path.write_text(json.dumps(job.to_dict(), indent=2), encoding="utf-8")
    return path
