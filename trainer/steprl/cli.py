"""The ``steprl`` command line: argument parsing only; the work happens in ``*/commands.py``.

    steprl demo --out demo_out
    steprl register FIXED MOVING --model spac2d_brain --steps 20 --out result/
    steprl train registration --images data/*.nii.gz --grid 128 128 --out runs/spac2d
    steprl evaluate registration --pairs pairs.csv --model runs/spac2d/model_best.safetensors
    steprl info MODEL

User errors (:class:`steprl.errors.StepRLError`) are printed as one line saying what was wrong
and what to do, with a non-zero exit code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from steprl import __version__
from steprl.errors import StepRLError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def _add_register(sub) -> None:
    p = sub.add_parser("register", help="register MOVING onto FIXED with a SPAC model, step by step",
                       description="Writes warped image, displacement fields, metrics.json and steps.png to --out.")
    p.add_argument("fixed", type=Path, help="fixed image (NIfTI, NRRD, MHA, PNG, or a DICOM folder)")
    p.add_argument("moving", type=Path, help="moving image (any grid, orientation and intensity range)")
    p.add_argument("--model", default=None, help="model file (.safetensors) or bundled model name "
                                                 "(default: the bundled model for the images' dimension)")
    p.add_argument("--steps", type=int, default=None, help="policy steps (default: the model's, usually 20)")
    p.add_argument("--out", type=Path, required=True, help="output folder (created; files are replaced)")
    p.add_argument("--fixed-labels", type=Path, help="label map of the fixed image (for Dice per step)")
    p.add_argument("--moving-labels", type=Path, help="label map of the moving image (for Dice per step)")
    p.add_argument("--prealign", action="store_true", help="affine pre-alignment (SimpleITK) before SPAC")
    p.add_argument("--max-step", type=float, default=None, help="per-step clamp in voxels (default: model's)")
    p.add_argument("--early-stop", type=int, default=None, metavar="K",
                   help="stop after K steps without NCC improvement")
    p.add_argument("--no-step-fields", action="store_true", help="do not write the per-step displacement fields")
    _add_common(p)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model")
    tsub = p.add_subparsers(dest="task", required=True)
    r = tsub.add_parser("registration", help="train a SPAC registration model",
                        description="Pairs are drawn at random among the images. Runs unchanged under torchrun.")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", type=Path, help="image files, or one folder of images")
    src.add_argument("--synthetic", nargs="+", type=int, metavar="N",
                     help="train on endless synthetic blob pairs of this grid (e.g. 64 64): a quick self-check")
    r.add_argument("--labels", nargs="+", type=Path, help="label maps (files in image order, or one folder); "
                                                         "default: 3-class K-means pseudo-labels")
    r.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, models, logs); resumed if present")
    r.add_argument("--grid", nargs="+", type=int, help="network grid, array order (default 128 128 / 128 128 128)")
    r.add_argument("--epochs", type=int, default=20)
    r.add_argument("--iterations", type=int, default=50, help="episodes per epoch")
    r.add_argument("--batch", type=int, default=4, help="pairs per episode")
    r.add_argument("--episode-steps", type=int, default=5, help="steps per training episode")
    r.add_argument("--val-count", type=int, default=2, help="images kept for validation")
    r.add_argument("--channels", nargs="+", type=int, default=None, help="encoder widths (default 16 32 32 32)")
    r.add_argument("--plan-dim", type=int, default=None, help="plan size (default 32 in 2D, 64 in 3D)")
    r.add_argument("--lr", type=float, default=1e-3, help="learning rate of the registration loss (planner + actor)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-resume", action="store_true",
                   help="start afresh even if --out holds an interrupted run (its files are overwritten)")
    r.add_argument("--no-tensorboard", action="store_true")
    _add_common(r)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a model over a set of cases and print a table")
    esub = p.add_subparsers(dest="task", required=True)
    r = esub.add_parser("registration", help="evaluate SPAC over pairs")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", type=Path, help="CSV with columns fixed,moving[,fixed_labels,moving_labels]")
    src.add_argument("--images", nargs="+", type=Path, help="images; each is registered to the next (cyclic)")
    r.add_argument("--labels", nargs="+", type=Path, help="label maps for --images, same order")
    r.add_argument("--model", default=None)
    r.add_argument("--steps", type=int, default=None)
    r.add_argument("--prealign", action="store_true")
    r.add_argument("--json", type=Path, help="also write the table as JSON")
    _add_common(r)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steprl", description="StepRL: step-by-step deep reinforcement learning for medical image registration "
                                   "(SPAC) and segmentation (PixelDRL-MG).")
    parser.add_argument("--version", action="version", version=f"steprl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="register the bundled sample pair with the bundled model (the main job)")
    demo.add_argument("--out", type=Path, default=Path("steprl_demo"), help="output folder (default steprl_demo)")
    demo.add_argument("--steps", type=int, default=None)
    _add_common(demo)
    _add_register(sub)
    _add_train(sub)
    _add_evaluate(sub)
    info = sub.add_parser("info", help="show a model card and its parameter count")
    info.add_argument("model", help="model file or bundled model name")
    _add_common(info)
    return parser


def _configure_logging(args) -> None:
    level = logging.DEBUG if getattr(args, "debug", False) else (
        logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    try:
        from steprl.registration import commands

        handler = {
            "demo": commands.demo, "register": commands.register_command, "info": commands.info,
            ("train", "registration"): commands.train_command, ("evaluate", "registration"): commands.evaluate_command,
        }[(args.command, args.task) if hasattr(args, "task") else args.command]
        return int(handler(args) or 0)
    except StepRLError as err:
        if getattr(args, "debug", False):
            raise
        print(f"steprl: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("steprl: interrupted", file=sys.stderr)
        return 130
