"""User-facing errors: each says what was wrong and what to do about it.

The CLI prints ``str(error)`` without a traceback and exits with ``error.exit_code``; the
Slicer worker sends it as one ``error`` event. Anything else that escapes is a bug.
"""

from __future__ import annotations


class StepRLError(Exception):
    """Base class of the errors a user can fix. ``fix`` tells them how."""

    exit_code = 2

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} {fix}".strip())


class InputError(StepRLError):
    """An input image, label map or argument is unusable (wrong dimension, empty, NaN...)."""


class ModelFileError(StepRLError):
    """A model file is missing, corrupt, or made for another method / dimension / version."""

    exit_code = 3


class CheckpointError(StepRLError):
    """A training checkpoint cannot be resumed (corrupt, or from another configuration)."""

    exit_code = 4
