"""Command-line arguments of ``steprl worker``: the child process the Slicer modules launch.

Not meant to be typed by users (its help is suppressed); the protocol is in :mod:`steprl.worker`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parsers(sub, train_sub, evaluate_sub, add_common) -> None:  # noqa: ARG001 - the TASK_PARSERS hook signature
    """Register ``steprl worker JOB.json`` (and ``steprl worker --devices``) on the top-level sub-parsers."""
    p = sub.add_parser("worker", help=argparse.SUPPRESS,
                       description="Run one job written by a StepRL Slicer module and stream JSON-line events "
                                   "on stdout (see steprl/worker.py).")
    p.add_argument("job", nargs="?", type=Path, help="job file (JSON) written by the Slicer module")
    p.add_argument("--devices", action="store_true", help="report the devices torch can use, then exit")
    p.add_argument("--quiet", action="store_true", help="warnings only in the log (stderr)")
    p.add_argument("--debug", action="store_true", help="debug logs (stderr)")
    p.set_defaults(handler="steprl.worker:main")
