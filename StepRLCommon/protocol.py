"""The worker's JSON-lines events as typed values (the Slicer side of ``steprl/worker.py``).

Shared by the StepRL modules: a registration step names its ``field`` file, a segmentation
step its ``mask`` and ``changed`` files; :class:`StepEvent` keeps every such path in ``files``.

Every line the worker prints on stdout is one JSON object with an ``event`` key; anything else
(a stray library print) is not an event and :func:`parse_line` returns None for it. The
worker's module docstring documents the fields; here each event becomes a small frozen
dataclass, so the logic matches on types instead of dictionary keys.

Example::

    event = parse_line('{"event": "step", "step": 2, "total": 5, "field": "/tmp/f.mha", "metrics": {"ncc": 0.3}}')
    # StepEvent(step=2, total=5, files={'field': '/tmp/f.mha'}, metrics={'ncc': 0.3}, eta_seconds=None, time=None)
    event.field  # '/tmp/f.mha'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: Exit codes of ``steprl worker`` (see steprl.errors): what a non-zero code means, in words.
EXIT_CODES = {
    0: "finished",
    1: "an unexpected error in the worker",
    2: "an input problem",
    3: "a model file problem",
    130: "interrupted",
}


@dataclass(frozen=True)
class StartedEvent:
    """The model is loaded and the policy is about to run."""

    device: str = ""
    model: str = ""
    steps: int = 0
    grid: tuple[int, ...] = ()
    pid: int | None = None


@dataclass(frozen=True)
class ProgressEvent:
    """A stage of the work (reading, loading the model, pre-alignment, slices segmented).

    ``done`` of ``total`` units and ``eta_seconds`` come with stages that count (the slices of a
    segmentation), None otherwise.
    """

    stage: str = ""
    message: str = ""
    done: int | None = None
    total: int | None = None
    eta_seconds: float | None = None


#: The keys of a step event that name a file the worker wrote (registration: ``field``;
#: segmentation: ``mask`` and ``changed``).
FILE_KEYS = ("field", "mask", "changed")


@dataclass(frozen=True)
class StepEvent:
    """Step ``step`` of ``total`` is finished; the files it names are complete and readable.

    ``files`` maps each file key of the event (:data:`FILE_KEYS`) to its absolute path.
    """

    step: int
    total: int
    files: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    eta_seconds: float | None = None
    time: float | None = None

    @property
    def field(self) -> str:
        """The displacement field file of a registration step ("" for another task)."""
        return self.files.get("field", "")

    @property
    def mask(self) -> str:
        """The mask file of a segmentation step ("" for another task)."""
        return self.files.get("mask", "")

    @property
    def changed(self) -> str:
        """The file of the voxels a segmentation step flipped ("" for another task)."""
        return self.files.get("changed", "")


@dataclass(frozen=True)
class DevicesEvent:
    """What torch can use in the worker's environment: ``[(value, label), ...]``."""

    devices: tuple[tuple[str, str], ...] = ()
    default: str = "cpu"


@dataclass(frozen=True)
class DoneEvent:
    """The job finished; ``steps`` is the last step number."""

    steps: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ErrorEvent:
    """The job failed: ``message`` says what was wrong, ``fix`` what to do."""

    message: str
    fix: str = ""
    kind: str = ""
    exit_code: int | None = None

    @property
    def text(self) -> str:
        """One message for the user: the problem and, when known, what to do."""
        return f"{self.message} {self.fix}".strip()


Event = StartedEvent | ProgressEvent | StepEvent | DevicesEvent | DoneEvent | ErrorEvent


def parse_event(data: dict[str, Any]) -> Event | None:
    """The typed event of a decoded JSON object, or None when it is not a known event."""
    kind = data.get("event")
    try:
        if kind == "step":
            files = {key: str(data[key]) for key in FILE_KEYS if data.get(key)}
            if not files:  # a step without a file cannot be shown
                return None
            return StepEvent(int(data["step"]), int(data.get("total", 0)), files, dict(data.get("metrics") or {}),
                             data.get("eta_seconds"), data.get("time"))
        if kind == "started":
            return StartedEvent(str(data.get("device", "")), str(data.get("model", "")), int(data.get("steps", 0)),
                                tuple(int(v) for v in data.get("grid", ())), data.get("pid"))
        if kind == "progress":
            done, total = data.get("done"), data.get("total")
            return ProgressEvent(str(data.get("stage", "")), str(data.get("message", "")),
                                 None if done is None else int(done), None if total is None else int(total),
                                 data.get("eta_seconds"))
        if kind == "devices":
            devices = tuple((str(d["value"]), str(d.get("label", d["value"]))) for d in data.get("devices", ()))
            return DevicesEvent(devices, str(data.get("default", "cpu")))
        if kind == "done":
            return DoneEvent(int(data.get("steps", 0)), float(data.get("seconds") or 0.0))
        if kind == "error":
            return ErrorEvent(str(data.get("message", "")), str(data.get("fix", "")), str(data.get("kind", "")),
                              data.get("exit_code"))
    except (KeyError, TypeError, ValueError):
        return None
    return None


def parse_line(line: str) -> Event | None:
    """The event on one stdout line, or None for a line that is not an event."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None
    return parse_event(data) if isinstance(data, dict) else None


def describe_exit(returncode: int | None) -> str:
    """A non-zero exit status in words ("killed by signal 9", "exit code 1: an unexpected error ...")."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        return f"killed by signal {-returncode}"
    meaning = EXIT_CODES.get(returncode)
    return f"exit code {returncode}" + (f" ({meaning})" if meaning else "")


def device_choice_texts(answer: DevicesEvent | ErrorEvent, tr=str) -> dict[str, str]:
    """What the device selector shows for "auto", "cpu" and "cuda", from a device probe's answer.

    ``tr`` translates the fixed words (Slicer's ``tr`` in the panel). With an ErrorEvent (torch
    missing or broken) the choices stay, and "auto" says why the devices are unknown.
    """
    labels = dict(getattr(answer, "devices", ()))
    gpu = next((label for value, label in labels.items() if value.startswith("cuda")), None)
    texts = {"auto": tr("auto ({0})").format(gpu or tr("CPU: no GPU detected")),
             "cpu": labels.get("cpu", tr("CPU")),
             "cuda": gpu or tr("GPU (not available)")}
    if not labels:
        texts["auto"] = tr("auto (devices unknown: {0})").format(getattr(answer, "message", ""))
    return texts
