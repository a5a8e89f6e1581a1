"""Moved to ``StepRLCommon.install`` (shared by the StepRL modules); re-exported here for one release."""

from StepRLCommon.install import (
    NEVER_REPLACE,
    PIP_REQUIREMENTS,
    TORCH_REQUIREMENT,
    Installer,
    SlicerInstaller,
    ensure_dependencies,
    missing_requirements,
    satisfied,
)

__all__ = ["NEVER_REPLACE", "PIP_REQUIREMENTS", "TORCH_REQUIREMENT", "Installer", "SlicerInstaller",
           "ensure_dependencies", "missing_requirements", "satisfied"]
