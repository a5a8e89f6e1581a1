"""The ``steprl`` command line: argument parsing only; the work happens in ``commands.py`` and ``*/commands.py``.

    steprl demo --out demo_out
    steprl register FIXED MOVING --model spac2d_brain --steps 20 --out result/
    steprl train registration --images data/*.nii.gz --grid 128 128 --out runs/spac2d
    steprl evaluate registration --pairs pairs.csv --model runs/spac2d/model_best.safetensors
    steprl info MODEL

User errors (:class:`steprl.errors.StepRLError`) are printed as one line saying what was wrong
and what to do, with a non-zero exit code; ``--debug`` shows the traceback instead. SIGTERM
(``timeout``, ``kill``, job schedulers) ends a run like Ctrl-C: staged outputs are removed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from steprl import __version__
from steprl.errors import StepRLError
from steprl.outputfolder import output_path

# Idle OpenMP threads sleep instead of spinning: on a busy or shared CPU, spinning threads burn
# the cores their partners need (measured: 3x less CPU per 3D SPAC step on a loaded 2-core
# machine, trainer/benchmarks/README.md). Set before torch is imported; the user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: Modules with an ``add_parsers(sub, train_sub, evaluate_sub, add_common)`` for further tasks
#: (segmentation, the Slicer worker). Each parser sets ``handler="module:function"``.
TASK_PARSERS: list[str] = ["steprl.worker_cli", "steprl.segmentation.cli_args"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def build_parser() -> argparse.ArgumentParser:
    from steprl.registration.cli_args import add_parsers as add_registration

    parser = argparse.ArgumentParser(
        prog="steprl", description="StepRL: step-by-step deep reinforcement learning for medical image registration "
                                   "(SPAC) and segmentation (PixelDRL-MG).")
    parser.add_argument("--version", action="version", version=f"steprl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="register the bundled sample pair with the bundled model (the main job)")
    demo.add_argument("--out", type=output_path, default=Path("steprl_demo"),
                      help="output folder (default steprl_demo)")
    demo.add_argument("--steps", type=int, default=None)
    demo.set_defaults(handler="steprl.commands:demo")
    _add_common(demo)
    train_sub = sub.add_parser("train", help="train a model").add_subparsers(dest="task", required=True)
    evaluate_sub = sub.add_parser("evaluate", help="evaluate a model over a set of cases and print a table"
                                  ).add_subparsers(dest="task", required=True)
    add_registration(sub, train_sub, evaluate_sub, _add_common)
    for extra in TASK_PARSERS:
        importlib.import_module(extra).add_parsers(sub, train_sub, evaluate_sub, _add_common)
    info = sub.add_parser("info", help="show a model card and its parameter count")
    info.add_argument("model", help="model file or bundled model name")
    info.add_argument("--json", action="store_true", help="print the whole card as stored (JSON)")
    info.set_defaults(handler="steprl.commands:info")
    _add_common(info)
    _hide_suppressed(sub)
    return parser


def _hide_suppressed(sub: argparse._SubParsersAction) -> None:
    """Leave commands whose help is SUPPRESS (the Slicer worker) out of ``steprl --help``
    (argparse lists them as ``worker ==SUPPRESS==``)."""
    sub._choices_actions = [a for a in sub._choices_actions if a.help != argparse.SUPPRESS]


def _configure_logging(args) -> None:
    level = logging.DEBUG if getattr(args, "debug", False) else (
        logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _handler(spec: str):
    module, function = spec.split(":")
    return getattr(importlib.import_module(module), function)


def _interrupt_on_sigterm():
    """Turn SIGTERM into KeyboardInterrupt, so a terminated run unwinds like Ctrl-C (its staged
    outputs are removed); returns the previous handler (None when none was set). Only in the
    main thread, where Python delivers signals."""
    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, handler)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    previous = _interrupt_on_sigterm()
    try:
        return int(_handler(args.handler)(args) or 0)
    except StepRLError as err:
        if getattr(args, "debug", False):
            raise
        print(f"steprl: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("steprl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `steprl info NAME | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
