"""Moved to ``StepRLCommon.protocol`` (shared by the StepRL modules); re-exported here for one release."""

from StepRLCommon.protocol import (
    EXIT_CODES,
    DevicesEvent,
    DoneEvent,
    ErrorEvent,
    Event,
    ProgressEvent,
    StartedEvent,
    StepEvent,
    describe_exit,
    parse_event,
    parse_line,
)

__all__ = ["EXIT_CODES", "DevicesEvent", "DoneEvent", "ErrorEvent", "Event", "ProgressEvent", "StartedEvent",
           "StepEvent", "describe_exit", "parse_event", "parse_line"]
