"""What the registration sub-commands of ``steprl`` do (the CLI only parses arguments).

Each function takes the parsed ``argparse.Namespace`` and returns an exit code.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from steprl.errors import InputError
from steprl.outputfolder import check_output_file, check_output_folder

log = logging.getLogger(__name__)


# ---- register ----------------------------------------------------------------------
def register_command(args) -> int:
    from steprl import io
    from steprl.modelfile import default_model
    from steprl.registration.outputs import print_summary, run_and_write

    check_output_folder(args.out)  # before any image is read
    fixed = io.read_image(args.fixed, name="fixed image")
    moving = io.read_image(args.moving, name="moving image")
    if (args.fixed_labels is None) != (args.moving_labels is None):
        raise InputError("Only one of --fixed-labels / --moving-labels was given.", "Give both, or neither.")
    fixed_labels = moving_labels = None
    if args.fixed_labels is not None:
        fixed_labels = io.read_labels(args.fixed_labels, fixed.geometry, name="fixed labels")
        moving_labels = io.read_labels(args.moving_labels, moving.geometry, name="moving labels")
    summary = run_and_write(
        fixed, moving, args.model or default_model(fixed.ndim), args.out, steps=args.steps, device=args.device,
        fixed_labels=fixed_labels, moving_labels=moving_labels, prealign=args.prealign, max_step=args.max_step,
        early_stop=args.early_stop, step_fields=not args.no_step_fields, quiet=args.quiet,
        inputs={"fixed": str(args.fixed), "moving": str(args.moving)}, refine=args.refine, bf16=args.bf16,
    )
    print_summary(summary)
    return 0


# ---- train ----------------------------------------------------------------------------------
def train_command(args) -> int:
    from steprl.registration.training import train_registration

    check_output_folder(args.out)
    train_registration(args)
    return 0


# ---- evaluate -------------------------------------------------------------------------------
def _read_pairs_csv(path: Path) -> list[dict[str, Path | None]]:
    if not path.is_file():
        raise InputError(f"Pairs file {path} not found.",
                         "Give a CSV with columns fixed,moving[,fixed_labels,moving_labels].")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"fixed", "moving"} <= set(rows[0]):
        raise InputError(f"{path} has no 'fixed' and 'moving' columns.",
                         "Write a header line: fixed,moving[,fixed_labels,moving_labels].")
    base = path.parent
    def resolve(v):
        return None if not v else (Path(v) if Path(v).is_absolute() else base / v)
    return [{k: resolve(row.get(k)) for k in ("fixed", "moving", "fixed_labels", "moving_labels")} for row in rows]


def evaluate_command(args) -> int:
    from steprl.io import expand_files
    from steprl.registration.evaluation import evaluate_pairs, format_table

    if args.json:
        check_output_file(args.json, flag="--json")  # before the whole evaluation, not after it
    if args.pairs is not None:
        pairs = _read_pairs_csv(args.pairs)
    else:
        images = expand_files(args.images, "images")
        labels = expand_files(args.labels, "label maps") if args.labels else None
        if len(images) < 2:
            raise InputError("Evaluation needs at least 2 images.", "Give more --images.")
        if labels is not None and len(labels) != len(images):
            raise InputError(f"{len(images)} images but {len(labels)} label maps.", "Give one label map per image.")
        n = len(images)
        pairs = [{"fixed": images[i], "moving": images[(i + 1) % n],
                  "fixed_labels": labels[i] if labels else None,
                  "moving_labels": labels[(i + 1) % n] if labels else None} for i in range(n if n > 2 else 1)]
    compare = bool(args.baselines) or args.report_steps is not None
    rows = evaluate_pairs(pairs, args.model, steps=args.steps, device=args.device, prealign=args.prealign,
                          quiet=args.quiet, baselines=tuple(args.baselines), report_steps=args.report_steps,
                          threads=args.threads, refine=args.refine)
    if compare:
        from steprl.registration.evaluation import format_method_table, method_means

        print(format_method_table(rows))
        report = {"rows": rows, "means": method_means(rows), "threads": args.threads}
    else:
        print(format_table(rows))
        report = {"pairs": rows}
    if args.json:
        from steprl.io import write_json

        write_json(report, args.json)
    return 0
