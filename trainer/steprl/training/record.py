"""The training record a model card carries from run to run (``--init-from``), for every method.

A model trained over many runs (and machines) keeps, in its card's ``training``, this run's
command, updates (``global_step``), CPU-hours (:func:`counting_seconds`, :func:`cpu_hours`) and
device, and under ``earlier_runs`` one summary per run before it: a warm start copies the earlier
model's ``earlier_runs`` and appends that model's own run (:func:`carried_runs`).
``trainer/tools/training_record.py`` keeps the longer, committed record (the validation curves).

A warm start only makes sense from a network of the same layout: :func:`check_same_layout`
refuses another one with the fields that differ. No torch at import.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from steprl.errors import ModelFileError

#: What one earlier run keeps in a card (the keys a card's ``training`` has; absent ones are left
#: out): the command, the epoch and updates reached, CPU-hours, device, the last validation, and
#: the registration rollout settings that turn episodes into updates.
SUMMARY_KEYS = ("command", "epoch", "global_step", "cpu_hours", "device", "validation", "unroll", "episode_steps")


def run_summary(training: dict) -> dict:
    """One earlier run of a model's training record: command, updates, CPU-hours, final validation."""
    return {k: training[k] for k in SUMMARY_KEYS if k in training}


def carried_runs(card: dict) -> list[dict]:
    """The ``earlier_runs`` of a run started from the model of ``card``: its own earlier runs, then its run."""
    training = card.get("training", {})
    return [*training.get("earlier_runs", []), run_summary(training)]


@contextmanager
def counting_seconds(learner) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``learner.seconds`` (training and validation time,
    kept in the learner's checkpointed state over resumes; :func:`cpu_hours` turns it into the card's)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        learner.seconds += time.perf_counter() - start


def cpu_hours(seconds: float) -> float:
    """CPU-hours of ``seconds`` of training wall time on torch's threads (3 decimals)."""
    import torch

    return round(seconds * torch.get_num_threads() / 3600, 3)


def check_same_layout(path: Path, theirs: dict, ours: dict, fix: str) -> None:
    """Refuse a warm start from a network of another layout.

    Args:
        path: the model file (named in the message).
        theirs, ours: the layout fields of the model's network and of this run's (JSON values).
        fix: what to do instead (e.g. which options to give).

    Raises:
        ModelFileError: naming each differing field with both values.
    """
    if theirs != ours:
        diff = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here"
                         for k in {**ours, **theirs} if theirs.get(k) != ours.get(k))
        raise ModelFileError(f"--init-from {path.name} has another network layout ({diff}).", fix)
