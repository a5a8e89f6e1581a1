"""Moved to ``StepRLCommon.process`` (shared by the StepRL modules); re-exported here for one release."""

from StepRLCommon.process import ProcessHandle, ProcessRunner, SubprocessHandle, SubprocessRunner

__all__ = ["ProcessHandle", "ProcessRunner", "SubprocessHandle", "SubprocessRunner"]
