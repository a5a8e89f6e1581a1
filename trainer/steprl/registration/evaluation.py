"""``steprl evaluate registration``: run a SPAC model over pairs and tabulate the metrics.

One row per pair: Dice (with labels) and local NCC before registration, after the first step
(what a one-shot network of the same size would give) and after the last step; the final
field's folding (% det J <= 0) and std of log det J; HD95 (mm, with labels); seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _stem(path: Path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def evaluate_pairs(pairs: list[dict], model, *, steps=None, device="auto", prealign=False, quiet=False) -> list[dict]:
    """Register every pair (dicts with fixed, moving[, fixed_labels, moving_labels] paths)."""
    from tqdm import tqdm

    from steprl import io, metrics, spatial
    from steprl.device import resolve_device
    from steprl.registration.commands import default_model
    from steprl.registration.inference import register
    from steprl.registration.model import load_spac

    dev = resolve_device(device)
    rows, spac = [], None
    for pair in tqdm(pairs, desc="pairs", disable=quiet):
        fixed = io.read_image(pair["fixed"], name="fixed image")
        moving = io.read_image(pair["moving"], name="moving image")
        if spac is None:
            spac = load_spac(model or default_model(fixed.ndim), dev)
        labels = {}
        if pair.get("fixed_labels") and pair.get("moving_labels"):
            labels = {"fixed_labels": io.read_labels(pair["fixed_labels"], fixed.geometry, name="fixed labels"),
                      "moving_labels": io.read_labels(pair["moving_labels"], moving.geometry, name="moving labels")}
        history = list(register(fixed, moving, spac, steps, dev, prealign=prealign, **labels))
        first, one, last = history[0], history[min(1, len(history) - 1)], history[-1]
        jac = spatial.jacobian_determinant(last.voxel_field)[0].cpu().numpy()
        row = {"pair": f"{_stem(pair['moving'])} -> {_stem(pair['fixed'])}", "steps": last.step,
               "ncc_identity": first.metrics["ncc"], "ncc_step1": one.metrics["ncc"], "ncc_final": last.metrics["ncc"],
               **metrics.jacobian_stats(jac), "seconds": last.metrics["seconds"]}
        if labels:
            row.update(dice_identity=first.metrics["dice"], dice_step1=one.metrics["dice"],
                       dice_final=last.metrics["dice"])
            per = metrics.hd95_per_label(last.warped_labels, last.fixed_labels_array,
                                         labels["fixed_labels"].geometry.spacing)
            finite = [v for v in per.values() if math.isfinite(v)]
            row["hd95"] = float(np.mean(finite)) if finite else float("nan")
        rows.append(row)
    return rows


COLUMNS = [("pair", "pair", "{}"), ("dice_identity", "Dice id", "{:.3f}"), ("dice_step1", "Dice 1", "{:.3f}"),
           ("dice_final", "Dice N", "{:.3f}"), ("ncc_identity", "NCC id", "{:.3f}"), ("ncc_final", "NCC N", "{:.3f}"),
           ("hd95", "HD95 mm", "{:.2f}"), ("folding_percent", "% detJ<=0", "{:.3f}"),
           ("std_log_jacobian", "std logJ", "{:.3f}"), ("seconds", "s", "{:.2f}")]


def format_table(rows: list[dict]) -> str:
    """A plain-text table with a final 'mean' row (NaN-aware)."""
    from steprl.reporting import format_table as table

    return table(rows, COLUMNS)
