"""``steprl evaluate segmentation``: segment every case of a dataset and tabulate the six metrics.

One row per case (Dice, PPV, sensitivity, IoU, boundary IoU, HD95 in mm, computed on the
image's own grid in 3D for a volume), plus the Dice after the first step for PixelDRL-MG and
the seconds; a final ``mean`` row (NaN-aware: HD95 is NaN when only one mask is empty).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

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


def evaluate_case(image, labels, model, *, steps=None, device="auto", axis="axial", batch_slices=16,
                  bf16=None) -> dict:
    """Segment one image (``labels`` already on its grid, > 0 = object); the row of the table."""
    from steprl import metrics
    from steprl.segmentation.inference import segment

    history = list(segment(image, model, steps, device, axis, batch_slices, labels=labels, bf16=bf16))
    last = history[-1]
    reference = np.asarray(labels.array) > 0
    row = {"steps": last.step, **metrics.segmentation_metrics(last.mask.array, reference, image.geometry.spacing)}
    if len(history) > 2:
        row["dice_step1"] = history[1].metrics["dice"]
    row["seconds"] = last.metrics["seconds"]
    return row


def evaluate_dataset(images: Sequence[Path], labels: Sequence[Path], model, *, steps=None, device="auto",
                     axis="axial", batch_slices=16, label_values=None, bf16=None, quiet=False) -> list[dict]:
    """Rows of :func:`evaluate_case` for image / label-map files matched by order."""
    from tqdm import tqdm

    from steprl import io
    from steprl.device import resolve_device
    from steprl.errors import InputError
    from steprl.geometry import Image
    from steprl.segmentation.data import object_mask
    from steprl.segmentation.model import load_segmenter

    if len(images) != len(labels):
        raise InputError(f"{len(images)} images but {len(labels)} label maps.", "Give one label map per image.")
    dev = resolve_device(device)
    loaded = load_segmenter(model)
    rows = []
    names = case_names(images)
    for k, (image_path, label_path) in enumerate(tqdm(list(zip(images, labels)), desc="cases", disable=quiet)):
        image = io.read_image(image_path, name=f"image {Path(image_path).name}")
        lab = io.read_labels(label_path, image.geometry, name=f"label map {Path(label_path).name}")
        mask = Image(object_mask(lab.array, label_values).astype(np.uint8), image.geometry)
        row = {"case": names[k]}
        row.update(evaluate_case(image, mask, loaded, steps=steps, device=dev, axis=axis,
                                 batch_slices=batch_slices, bf16=bf16))
        rows.append(row)
    return rows


COLUMNS = [("case", "case", "{}"), ("dice", "Dice", "{:.3f}"), ("ppv", "PPV", "{:.3f}"), ("sen", "SEN", "{:.3f}"),
           ("iou", "IoU", "{:.3f}"), ("biou", "BIoU", "{:.3f}"), ("hd95", "HD95 mm", "{:.2f}"),
           ("dice_step1", "Dice step 1", "{:.3f}"), ("seconds", "s", "{:.1f}")]


def mean_row(rows: list[dict]) -> dict:
    """Means of every numeric column over the finite values (NaN/inf left out)."""
    from steprl.reporting import mean_row as means

    return means(rows, COLUMNS)


def format_table(rows: list[dict]) -> str:
    """A plain-text table with a final 'mean' row."""
    from steprl.reporting import format_table as table

    return table(rows, COLUMNS)
