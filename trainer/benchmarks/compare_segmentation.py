"""PixelDRL-MG against the U-Net baseline for cerebral white matter, on real and held-out synthetic brains.

Issue 6's segmentation comparison. Both models are trained by ``steprl train segmentation
--synthseg`` on the same synthetic slices with the same budget (see the report for the exact
commands); this script evaluates them on the same cases in one run:

- **MNI152** (real, labelled): nilearn's ICBM152 2009a symmetric T1 template (1 mm,
  skull-stripped) with its white-matter probability map > 0.5 as the reference. The map also
  holds cerebellar white matter and the brain stem, which the models (trained on FreeSurfer
  labels 2 and 41, cerebral white matter only) are not meant to segment, so two rows:
  ``mni152`` (the whole map) and ``mni152-cerebrum`` (prediction and reference both restricted
  to z > -10 mm in MNI space, above the cerebellum and the pons; this also drops the lowest
  temporal white matter).
- **Held-out synthetic subjects**: the 3 SynthSeg subjects :func:`steprl.synthseg.split_subjects`
  keeps for testing (never seen in training or validation), each synthesised twice (a
  T1-like and a random contrast, fixed seeds) on a 1.5 mm grid with exact labels.

Per method and case: DICE, PPV, SEN, IoU, boundary IoU, HD95 (mm) on the volume's own grid,
the Dice after every step (PixelDRL-MG: steps 0..10; U-Net: one step), inference seconds;
per method: trainable parameters and training seconds (from the run's ``history.jsonl``).

    python trainer/benchmarks/compare_segmentation.py --pixeldrl /work/runs/pixeldrl_wm \\
        --unet /work/runs/unet_wm --json out.json --plot steps.png

``--pixeldrl`` / ``--unet`` take a run folder (its ``model_best``) or a model file / bundled name.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SYNTHSEG = REPO.parent / "shared" / "data" / "synthseg"
CEREBRUM_Z_MM = -10.0
METRICS = ("dice", "ppv", "sen", "iou", "biou", "hd95")


def nilearn_file(kind: str) -> Path:
    """``mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz`` from nilearn's package data."""
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data" / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"


def mni_cases():
    """``[(name, image, reference mask, roi or None)]`` for the MNI152 template."""
    from steprl import io
    from steprl.geometry import Image

    image = io.read_image(nilearn_file("t1"), name="MNI152 T1")
    wm = io.read_image(nilearn_file("wm"), name="MNI152 white matter")
    probability = wm.array.astype(np.float32) / float(wm.array.max())  # stored 0..255
    reference = Image((probability > 0.5).astype(np.uint8), image.geometry)
    matrix, offset = image.geometry.tensor_index_to_physical()
    grids = np.ogrid[tuple(slice(0, n) for n in image.array.shape)]
    z = offset[2] + sum(matrix[2, k] * grids[k] for k in range(3))  # LPS z = RAS z (superior)
    roi = np.broadcast_to(z > CEREBRUM_Z_MM, image.array.shape)
    return [("mni152", image, reference, None), ("mni152-cerebrum", image, reference, roi)]


def synthetic_cases(folder: Path):
    """Held-out synthetic subjects: one T1-like and one random-contrast volume each."""
    from steprl.segmentation.synth_source import synth_case
    from steprl.synthseg import list_label_maps, split_subjects

    split = split_subjects(list_label_maps(folder))
    cases = []
    for k, path in enumerate(split.test):
        for t1 in (True, False):
            image, mask = synth_case(path, folder, seed=1000 + 10 * k + int(t1), t1=t1)
            name = f"synth-{path.name.split('.')[0].replace('training_seg_', 's')}-{'t1' if t1 else 'random'}"
            cases.append((name, image, mask, None))
    return cases


def resolve_model(arg: str) -> tuple[str, Path | None]:
    """A model file (or bundled name) and the run folder it came from (None for a bare model)."""
    path = Path(arg)
    if path.is_dir():
        return str(path / "model_best.safetensors"), path
    return arg, None


def training_seconds(run: Path | None, card: dict) -> float | None:
    """Sum of the epochs' seconds up to the best epoch's run end (all epochs of the run)."""
    if run is not None and (run / "history.jsonl").is_file():
        lines = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines() if x.strip()]
        return float(sum(x.get("seconds", 0.0) for x in lines))
    value = card.get("training_seconds")
    return float(value) if value is not None else None


def evaluate(model_arg: str, cases, steps: int | None) -> dict:
    """Segment every case with one model; per-case metrics and Dice per step."""
    from steprl.metrics import segmentation_metrics
    from steprl.segmentation.inference import _dice, segment
    from steprl.segmentation.model import load_segmenter
    from steprl.segmentation.networks import count_parameters

    model_path, run = resolve_model(model_arg)
    model = load_segmenter(model_path)
    out = {"method": model.method, "model": model_path, "parameters": count_parameters(model.net, False),
           "training_seconds": training_seconds(run, model.card), "grid": list(model.size),
           "best_epoch": model.card.get("training", {}).get("epoch"), "cases": {}}
    last_image = None
    for name, image, reference, roi in cases:
        if image is not last_image:  # the cerebrum row reuses the whole-brain segmentation
            start = time.perf_counter()
            history = list(segment(image, model, steps, "cpu", labels=reference))
            seconds = time.perf_counter() - start
            last_image = image
        pred = history[-1].mask.array != 0
        ref = reference.array != 0
        curve = [h.metrics["dice"] for h in history]
        if roi is not None:
            pred, ref = pred & roi, ref & roi
            curve = [_dice((h.mask.array != 0) & roi, ref) for h in history]
        if name == "mni152":
            MASKS[out["method"]] = (image.array, reference.array, pred)
        row = segmentation_metrics(pred, ref, image.geometry.spacing)
        row.update(dice_per_step=[round(c, 4) for c in curve], seconds=seconds)
        out["cases"][name] = row
        logging.info("%s %s: Dice %.3f", out["method"], name, row["dice"])
    return out


MASKS: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
"""method -> (MNI152 image, reference, final mask), for :func:`plot_mni`."""


def plot_mni(path: Path) -> None:
    """Three axial MNI152 slices: reference (green) and each method's final mask (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(MASKS)
    image, reference, _ = MASKS[methods[0]]
    per_slice = (reference != 0).sum(axis=(1, 2))
    top = int(np.argmax(per_slice))
    levels = [max(0, top - 25), top, min(len(per_slice) - 1, top + 20)]
    fig, axes = plt.subplots(len(methods), len(levels), figsize=(3.2 * len(levels), 3.4 * len(methods)), squeeze=False)
    for row, method in enumerate(methods):
        for col, z in enumerate(levels):
            ax = axes[row, col]
            ax.imshow(image[z], cmap="gray", origin="lower")
            ax.contour(reference[z] != 0, [0.5], colors="lime", linewidths=0.6)
            ax.contour(MASKS[method][2][z], [0.5], colors="red", linewidths=0.6)
            ax.set_title(f"{method}, axial slice {z}", fontsize=8)
            ax.axis("off")
    fig.suptitle("MNI152 T1: white matter > 0.5 (green) and final masks (red)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def mean_over(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if np.isfinite(r[key])]
    return float(np.mean(values)) if values else float("nan")


GROUPS = {
    "MNI152 (whole WM map)": lambda n: n == "mni152",
    "MNI152 cerebrum (z > -10 mm)": lambda n: n == "mni152-cerebrum",
    "synthetic held-out, T1-like (3)": lambda n: n.startswith("synth") and n.endswith("t1"),
    "synthetic held-out, random contrast (3)": lambda n: n.startswith("synth") and n.endswith("random"),
}


def format_report(results: list[dict]) -> str:
    lines = []
    header = (f"{'method':<12} {'cases':<40} {'DICE':>6} {'PPV':>6} {'SEN':>6} {'IoU':>6} {'BIoU':>6} "
              f"{'HD95mm':>7} {'params':>8} {'train s':>8} {'infer s':>8}")
    lines += [header, "-" * len(header)]
    for res in results:
        for group, match in GROUPS.items():
            rows = [r for n, r in res["cases"].items() if match(n)]
            if not rows:
                continue
            train = res["training_seconds"]
            lines.append(f"{res['method']:<12} {group:<40} " + " ".join(
                f"{mean_over(rows, m):>6.3f}" if m != "hd95" else f"{mean_over(rows, m):>7.2f}" for m in METRICS)
                + f" {res['parameters'] / 1e6:>7.2f}M {train if train is None else round(train):>8}"
                + f" {mean_over(rows, 'seconds'):>8.1f}")
    lines.append("")
    lines.append("Dice per step (step 0 = the all-object start; mean over the group's cases):")
    for res in results:
        for group, match in GROUPS.items():
            rows = [r for n, r in res["cases"].items() if match(n)]
            if rows:
                curve = np.mean([r["dice_per_step"] for r in rows], axis=0)
                lines.append(f"  {res['method']:<12} {group:<40} " + " ".join(f"{c:.3f}" for c in curve))
    lines.append("")
    lines.append("Per case (Dice):")
    for res in results:
        lines.append(f"  {res['method']}: " + ", ".join(f"{n} {r['dice']:.3f}" for n, r in res["cases"].items()))
    return "\n".join(lines)


def plot_steps(results: list[dict], path: Path) -> None:
    """Dice against step per method and case group (the paper's Fig. 5 analogue)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, groups in zip(axes, (list(GROUPS)[:2], list(GROUPS)[2:])):
        for res in results:
            for group in groups:
                rows = [r for n, r in res["cases"].items() if GROUPS[group](n)]
                if not rows:
                    continue
                curve = np.mean([r["dice_per_step"] for r in rows], axis=0)
                style = "-o" if res["method"] == "pixeldrl-mg" else "--s"
                ax.plot(range(len(curve)), curve, style, ms=3, label=f"{res['method']}: {group}")
        ax.set_xlabel("step")
        ax.set_ylabel("Dice")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Cerebral white matter: Dice per step")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pixeldrl", required=True, help="PixelDRL-MG run folder or model")
    parser.add_argument("--unet", help="U-Net run folder or model")
    parser.add_argument("--synthseg", type=Path, default=DEFAULT_SYNTHSEG, help="SynthSeg folder (held-out cases)")
    parser.add_argument("--steps", type=int, default=None, help="PixelDRL-MG steps (default: the model's)")
    parser.add_argument("--no-synthetic", action="store_true", help="only the MNI152 cases")
    parser.add_argument("--json", type=Path, help="write all figures as JSON")
    parser.add_argument("--plot", type=Path, help="write the Dice-per-step plot (PNG)")
    parser.add_argument("--figure", type=Path, help="write MNI152 slices with the masks (PNG)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    torch.manual_seed(0)
    cases = mni_cases()
    if not args.no_synthetic:
        if args.synthseg.is_dir():
            cases += synthetic_cases(args.synthseg)
        else:
            logging.warning("no SynthSeg folder at %s: MNI152 only", args.synthseg)
    results = [evaluate(args.pixeldrl, cases, args.steps)]
    if args.unet:
        results.append(evaluate(args.unet, cases, None))
    print(f"threads {torch.get_num_threads()}, cases: " + ", ".join(c[0] for c in cases))
    print(format_report(results))
    if args.json:
        from steprl.io import write_json

        write_json({"results": results, "command": " ".join(sys.argv)}, args.json)
    if args.plot:
        plot_steps(results, args.plot)
    if args.figure and MASKS:
        plot_mni(args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
