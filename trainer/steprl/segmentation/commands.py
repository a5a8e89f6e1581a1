"""What the segmentation sub-commands of ``steprl`` do (the CLI only parses arguments).

Each function takes the parsed ``argparse.Namespace`` and returns an exit code.
"""

from __future__ import annotations

import logging

import numpy as np

from steprl.errors import InputError
from steprl.limits import check_steps
from steprl.outputfolder import check_output_folder
from steprl.segmentation.config import BATCH_SLICES

log = logging.getLogger(__name__)


def _check_steps(args) -> None:
    check_steps(getattr(args, "steps", None))
    if getattr(args, "batch_slices", 1) < 1:
        raise InputError(f"--batch-slices must be >= 1, got {args.batch_slices}.",
                         f"Use e.g. --batch-slices {BATCH_SLICES}.")
    if getattr(args, "slice_stride", None) is not None and args.slice_stride < 1:
        raise InputError(f"--slice-stride must be >= 1, got {args.slice_stride}.",
                         "Use --slice-stride 1 for every slice, or leave it out.")


def segment_command(args) -> int:
    from steprl import io
    from steprl.geometry import Image
    from steprl.segmentation.data import object_mask
    from steprl.segmentation.outputs import run_and_write

    _check_steps(args)
    check_output_folder(args.out)  # before any image is read
    image = io.read_image(args.image, name="image")
    labels = None
    if args.labels is not None:
        lab = io.read_labels(args.labels, image.geometry, name="label map")
        labels = Image(object_mask(lab.array, args.label_values).astype(np.uint8), image.geometry)
    summary = run_and_write(image, args.model, args.out, steps=args.steps, device=args.device, axis=args.axis,
                            batch_slices=args.batch_slices, labels=labels, fmt=args.format,
                            step_masks=not args.no_step_masks, bf16=args.bf16, quiet=args.quiet,
                            match_levels=args.match_levels, border=args.border, slice_stride=args.slice_stride,
                            inputs={"image": str(args.image), "labels": str(args.labels) if args.labels else None})
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    steps = summary["steps"]
    last = steps[-1]
    line = f"steps: {last['step']}  object {100 * last['object_fraction']:.2f}% of the voxels"
    if "final" in summary:
        final = summary["final"]
        first = steps[1]["dice"] if len(steps) > 1 else steps[0]["dice"]
        line += (f"  Dice step 1 {first:.3f} -> {final['dice']:.3f}  IoU {final['iou']:.3f}  "
                 f"HD95 {final['hd95']:.2f} mm")
    line += f"  time {summary['seconds_total']:.1f} s"
    print(line)
    print(f"outputs in {summary['out']}")


def train_command(args) -> int:
    from steprl.segmentation.training import train_segmentation

    if (args.synthetic or getattr(args, "synthseg", None)) and args.labels:
        raise InputError("--labels makes no sense with --synthetic or --synthseg (those slices bring their own).",
                         "Drop --labels, or train on --images.")
    check_output_folder(args.out)
    train_segmentation(args)
    return 0

