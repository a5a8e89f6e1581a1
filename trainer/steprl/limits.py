"""Sane bounds on what a user may ask for, checked before any work (no torch here).

Why: ``segment --steps 100000`` once ran the whole network and then asked for 59 GB; a run
of many steps also writes one full-resolution file per step. The policies are trained for 10
(PixelDRL-MG) or 20 (SPAC) steps and unrolled policies drift past their trained depth, so
:data:`MAX_STEPS` is far above any useful value yet keeps memory and disk bounded, and
:func:`warn_step_outputs` says so when the per-step files will be large.
"""

from __future__ import annotations

import logging

from steprl.errors import InputError

log = logging.getLogger(__name__)

#: The most policy steps one run may take (50x the bundled models' defaults).
MAX_STEPS = 1000
#: Per-step outputs above this many bytes in all are announced with a warning.
LARGE_OUTPUT_BYTES = 2 * 1024**3


def check_steps(steps: object, flag: str = "--steps") -> None:
    """InputError unless ``steps`` is None (the model's default) or a whole number in 0..MAX_STEPS."""
    if steps is None:
        return
    if not isinstance(steps, int) or isinstance(steps, bool):
        raise InputError(f"{flag} must be a whole number, got {steps!r}.", "Ask for e.g. 20 steps.")
    if steps < 0:
        raise InputError(f"{flag} must be >= 0, got {steps}.", "Ask for e.g. 20 steps.")
    if steps > MAX_STEPS:
        raise InputError(f"{flag} {steps} is more than the {MAX_STEPS} steps a run may take (the models are trained "
                         "for 10 to 20 steps, and memory and disk grow with every step).",
                         f"Ask for at most {MAX_STEPS} steps; the model's default is usually best.")


def warn_step_outputs(steps: int, bytes_per_step: int, what: str, skip_flag: str) -> None:
    """Warn, before the run, when ``steps`` per-step files of ``bytes_per_step`` add up to a lot."""
    total = steps * bytes_per_step
    if total > LARGE_OUTPUT_BYTES:
        log.warning("This run writes %d per-step %s of up to %.0f MB each, up to %.1f GB in all; %s skips them.",
                    steps, what, bytes_per_step / 1e6, total / 1e9, skip_flag)
