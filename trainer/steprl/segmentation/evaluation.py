"""``steprl evaluate segmentation``: segment every case of a dataset and tabulate the six metrics.

One row per case (Dice, PPV, sensitivity, IoU, boundary IoU, HD95 in mm, computed on the
image's own grid in 3D for a volume), plus the Dice after the first step for PixelDRL-MG and
the seconds; a final ``mean`` row (NaN-aware: HD95 is NaN when only one mask is empty).

With ``--baselines otsu kmeans atropos`` (:mod:`steprl.segmentation.baselines`) each case also
gets one row per baseline, run inside the case's brain mask and scored by the same metric code
on the same reference, and the table has one mean row per method. The brain mask
(:func:`brain_mask`) is a given mask file, the label map's labelled voxels
(``--brain-from-labels``, for whole-brain label maps such as FreeSurfer's aseg), or by default
the image's nonzero voxels (right for skull-stripped images only; a warning says when an image
does not look skull-stripped). Each baseline row records which one it used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from steprl.errors import InputError
from steprl.segmentation.config import BATCH_SLICES

METRICS = ("dice", "ppv", "sen", "iou", "biou", "hd95")


def _stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_names(paths: Sequence[str | Path]) -> list[str]:
    """File names without their image suffix; ``folder/stem`` when stems repeat (one folder per case)."""
    stems = [_stem(p) for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{Path(p).parent.name}/{s}" for p, s in zip(paths, stems)]


def evaluate_case(image, labels, model, *, steps=None, device="auto", axis="axial", batch_slices=BATCH_SLICES,
                  bf16=None, match_levels=True, border=True) -> dict:
    """Segment one image (``labels`` already on its grid, > 0 = object); the row of the table."""
    from steprl import metrics
    from steprl.segmentation.inference import segment

    history = list(segment(image, model, steps, device, axis, batch_slices, labels=labels, bf16=bf16,
                           match_levels=match_levels, border=border))
    last = history[-1]
    policy = [h for h in history if h.metrics["stage"] == "policy"]
    reference = np.asarray(labels.array) > 0
    row = {"steps": policy[-1].step if policy else 0, "border": last.metrics["stage"] == "border",
           **metrics.segmentation_metrics(last.mask.array, reference, image.geometry.spacing)}
    if len(policy) > 1:
        row["dice_step1"] = policy[0].metrics["dice"]
    if row["border"]:
        row["dice_policy"] = policy[-1].metrics["dice"]  # the last policy step, before the border
    row["seconds"] = last.metrics["seconds"]
    return row


def baseline_row(method: str, image, brain: np.ndarray, reference: np.ndarray) -> dict:
    """Run one white-matter baseline inside ``brain`` (bool, the image's shape) and score it against
    ``reference`` (> 0 = object) with the model's metric code; ``seconds`` is the baseline's own time."""
    import time

    from steprl import metrics
    from steprl.segmentation.baselines import white_matter

    start = time.perf_counter()
    pred = white_matter(method, image.array, brain, image.geometry.spacing)
    seconds = time.perf_counter() - start
    row = {"method": method, **metrics.segmentation_metrics(pred, np.asarray(reference) > 0, image.geometry.spacing)}
    row["seconds"] = seconds
    return row


def brain_mask(image, labels: np.ndarray, mask_path: Path | None = None,
               from_labels: bool = False) -> tuple[np.ndarray, str]:
    """The brain mask the baselines run in (bool, the image's shape) and where it came from.

    ``mask_path``: a mask file (any grid, resampled onto the image; > 0 = brain); ``from_labels``:
    every labelled voxel of ``labels`` (the whole label map on the image grid); otherwise the
    image's nonzero voxels (:func:`steprl.segmentation.baselines.nonzero_brain_mask`).
    """
    from steprl import io
    from steprl.segmentation.baselines import nonzero_brain_mask

    if mask_path is not None:
        mask = io.read_labels(mask_path, image.geometry, name=f"brain mask {Path(mask_path).name}")
        return np.asarray(mask.array) > 0, f"file {Path(mask_path).name}"
    if from_labels:
        return np.asarray(labels) > 0, "label map > 0"
    return nonzero_brain_mask(image.array), "nonzero voxels"


def evaluate_dataset(images: Sequence[Path], labels: Sequence[Path], model, *, steps=None, device="auto",
                     axis="axial", batch_slices=BATCH_SLICES, label_values=None, bf16=None, quiet=False,
                     baselines: Sequence[str] = (), match_levels=True, border=True,
                     brain_masks: Sequence[Path] | None = None, brain_from_labels: bool = False) -> list[dict]:
    """Rows of :func:`evaluate_case` for image / label-map files matched by order.

    With ``baselines`` every row also names its ``method``, and each case gets one more row per
    baseline (:func:`baseline_row`) in its :func:`brain_mask` (``brain_masks`` in image order).
    """
    from tqdm import tqdm

    from steprl import io
    from steprl.device import resolve_device
    from steprl.geometry import Image
    from steprl.segmentation.data import object_mask
    from steprl.segmentation.model import load_segmenter

    if len(images) != len(labels):
        raise InputError(f"{len(images)} images but {len(labels)} label maps.", "Give one label map per image.")
    if brain_masks is not None and len(brain_masks) != len(images):
        raise InputError(f"{len(images)} images but {len(brain_masks)} brain masks.",
                         "Give one brain mask per image, in image order.")
    dev = resolve_device(device)
    loaded = load_segmenter(model)
    rows = []
    names = case_names(images)
    for k, (image_path, label_path) in enumerate(tqdm(list(zip(images, labels)), desc="cases", disable=quiet)):
        image = io.read_image(image_path, name=f"image {Path(image_path).name}")
        lab = io.read_labels(label_path, image.geometry, name=f"label map {Path(label_path).name}")
        mask = Image(object_mask(lab.array, label_values).astype(np.uint8), image.geometry)
        row = {"case": names[k], **({"method": loaded.method} if baselines else {})}
        row.update(evaluate_case(image, mask, loaded, steps=steps, device=dev, axis=axis,
                                 batch_slices=batch_slices, bf16=bf16, match_levels=match_levels,
                                 border=border))
        rows.append(row)
        if baselines:
            brain, source = brain_mask(image, lab.array, brain_masks[k] if brain_masks else None, brain_from_labels)
            rows += [{"case": names[k], **baseline_row(m, image, brain, mask.array), "brain_mask": source}
                     for m in baselines]
    return rows


COLUMNS = [("case", "case", "{}"), ("dice", "Dice", "{:.3f}"), ("ppv", "PPV", "{:.3f}"), ("sen", "SEN", "{:.3f}"),
           ("iou", "IoU", "{:.3f}"), ("biou", "BIoU", "{:.3f}"), ("hd95", "HD95 mm", "{:.2f}"),
           ("dice_step1", "Dice step 1", "{:.3f}"), ("dice_policy", "Dice before border", "{:.3f}"),
           ("seconds", "s", "{:.1f}")]


def mean_row(rows: list[dict]) -> dict:
    """Means of every numeric column over the finite values (NaN/inf left out)."""
    from steprl.reporting import mean_row as means

    return means(rows, COLUMNS)


#: With baselines: the method after the case.
METHOD_COLUMNS = [COLUMNS[0], ("method", "method", "{}"), *COLUMNS[1:]]


def method_means(rows: list[dict]) -> list[dict]:
    """One mean row per method (rows from ``evaluate_dataset(..., baselines=...)``)."""
    from steprl.reporting import method_means as means

    return means(rows, METHOD_COLUMNS)


def format_table(rows: list[dict]) -> str:
    """A plain-text table with a final 'mean' row; with baselines (rows that name their ``method``)
    one line per case and method and one mean row per method."""
    from steprl.reporting import format_method_table
    from steprl.reporting import format_table as table

    if any("method" in r for r in rows):
        return format_method_table(rows, METHOD_COLUMNS)
    return table(rows, COLUMNS)


def evaluate_command(args) -> int:
    """``steprl evaluate segmentation``: the model's table, or with ``--baselines`` every method's.

    Everything that can be refused (steps, the --json path, missing optional packages, file
    lists, brain-mask count) is checked before the first case is segmented.
    """
    from steprl.io import expand_files
    from steprl.outputfolder import check_output_file
    from steprl.segmentation.baselines import require
    from steprl.segmentation.commands import _check_steps

    _check_steps(args)
    baselines = tuple(dict.fromkeys(args.baselines or ()))
    for method in baselines:
        require(method)
    if args.json:
        check_output_file(args.json, flag="--json")  # before the whole evaluation, not after it
    images = expand_files(args.images, "images")
    labels = expand_files(args.labels, "label maps")
    masks = expand_files(args.brain_masks, "brain masks") if args.brain_masks else None
    if (masks or args.brain_from_labels) and not baselines:
        raise InputError("--brain-masks and --brain-from-labels are for the baselines.",
                         "Add --baselines otsu kmeans atropos, or drop them.")
    rows = evaluate_dataset(images, labels, args.model, steps=args.steps, device=args.device, axis=args.axis,
                            batch_slices=args.batch_slices, label_values=args.label_values, bf16=args.bf16,
                            quiet=args.quiet, baselines=baselines, brain_masks=masks, match_levels=args.match_levels,
                            border=args.border, brain_from_labels=args.brain_from_labels)
    print(format_table(rows))
    if args.json:
        from steprl.io import write_json

        means = {"means": method_means(rows)} if baselines else {"mean": mean_row(rows)}
        write_json({"cases": rows, **means, "model": str(args.model)}, Path(args.json))
    return 0
