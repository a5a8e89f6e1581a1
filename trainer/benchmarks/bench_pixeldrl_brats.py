"""PixelDRL-MG against the U-Net baseline on BraTS 2013 FLAIR slices (the paper's comparison, small budget).

Data (``../shared/data/brats2013``, beside the repository; the script says so and exits 0 when
it is absent): FLAIR (``Flair_subtrMeanDivStd.nii.gz``), whole tumour = ``OTMultiClass > 0``.
Training cases pat0005 and pat0006, validation cases pat0003 and pat0004, axial slices
resampled onto the network grid (``--size``), all tumour slices plus 0.2 empty brain slices
per tumour slice (constant slices outside the brain never).

Both methods are trained by :func:`steprl.segmentation.training.train` (the code behind
``steprl train segmentation``) with the SAME slices, batch size, number of updates
(``--epochs`` x ``--iterations``), learning-rate schedule and seed; the model kept is the
epoch with the best validation Dice (validation slices of pat0003/pat0004, as the command
does). Then each is evaluated on the two validation volumes with
:func:`steprl.segmentation.evaluation.evaluate_case`: the six metrics on the 3D volume at
the image's own resolution (Dice, PPV, SEN, IoU, boundary IoU, HD95 in mm), and the same six
averaged over the axial 2D slices that contain tumour (the paper reports slice metrics), as
``steprl evaluate segmentation`` computes them (:func:`steprl.segmentation.inference.segment`
then :func:`steprl.metrics.segmentation_metrics`).

Licence: BraTS 2013 is CC BY-NC-SA 3.0. Weights trained here are written to a temporary
folder that is deleted at the end; nothing is written into the repository. Never commit
weights trained on these data.

Usage (the default budget fits about 15 minutes of the 2-core CPU)::

    python trainer/benchmarks/bench_pixeldrl_brats.py
    python trainer/benchmarks/bench_pixeldrl_brats.py --size 96 96 --epochs 10 --iterations 30 --json out.json
    python trainer/benchmarks/bench_pixeldrl_brats.py --methods pixeldrl --fusion input   # the paper's reading
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "brats2013"
TRAIN = ("brats_2013_pat0005_1", "brats_2013_pat0006_1")
VALIDATION = ("brats_2013_pat0003_1", "brats_2013_pat0004_1")
IMAGE, LABELS = "Flair_subtrMeanDivStd.nii.gz", "OTMultiClass.nii.gz"
METRICS = ("dice", "ppv", "sen", "iou", "biou", "hd95")


def slice_metrics(pred: np.ndarray, ref: np.ndarray, spacing_xyz, axis: int = 0) -> dict[str, float]:
    """The six metrics per axial slice that holds tumour, averaged (HD95 over finite values)."""
    from steprl.metrics import segmentation_metrics

    rows = []
    in_plane = tuple(s for k, s in enumerate(spacing_xyz) if k != 2 - axis)
    for k in range(ref.shape[axis]):
        r = np.take(ref, k, axis=axis)
        if r.any():
            rows.append(segmentation_metrics(np.take(pred, k, axis=axis), r, in_plane))
    out = {}
    for key in METRICS:
        values = [row[key] for row in rows if math.isfinite(row[key])]
        out[key] = float(np.mean(values)) if values else float("nan")
    out["slices"] = len(rows)
    return out


def run_method(method: str, args, workdir: Path) -> dict:
    """Train one method in ``workdir`` and evaluate it on the validation volumes."""
    import torch
    from steprl import io
    from steprl.geometry import Image
    from steprl.metrics import segmentation_metrics
    from steprl.segmentation.data import SliceSet
    from steprl.segmentation.inference import segment
    from steprl.segmentation.model import load_segmenter
    from steprl.segmentation.training import build_learner, train
    from steprl.training.distributed import single_process

    cases = [*TRAIN, *VALIDATION]
    source = SliceSet.from_files([DATA / c / IMAGE for c in cases], [DATA / c / LABELS for c in cases],
                                 size=tuple(args.size), axis="axial", val_count=len(VALIDATION),
                                 empty_fraction=args.empty_fraction, val_slices=args.val_slices, seed=args.seed)
    torch.manual_seed(args.seed)
    learner, config = build_learner(method, source, single_process(args.device), batch=args.batch,
                                    iterations_per_epoch=args.iterations, seed=args.seed, fusion=args.fusion,
                                    unet_channels=args.unet_channels, allow_revival=not args.no_revival)
    learner.data_description["licence"] = "BraTS 2013, CC BY-NC-SA 3.0: benchmark only, weights not kept"
    parameters = sum(p.numel() for p in learner.net.parameters())
    out = workdir / method
    start = time.perf_counter()
    result = train(learner, config, out, epochs=args.epochs, resume=False, tensorboard=False, progress=False)
    train_seconds = time.perf_counter() - start
    loaded = load_segmenter(out / "model_best.safetensors")
    per_case = []
    for case in VALIDATION:
        image = io.read_image(DATA / case / IMAGE, name=f"{case} FLAIR")
        labels = io.read_labels(DATA / case / LABELS, image.geometry, name=f"{case} labels")
        mask = Image((labels.array > 0).astype(np.uint8), image.geometry)
        history = list(segment(image, loaded, None, args.device, labels=mask))
        final = history[-1].mask.array
        row = {"case": case, **segmentation_metrics(final, mask.array > 0, image.geometry.spacing),
               "dice_per_step": [round(h.metrics["dice"], 4) for h in history],
               "seconds": history[-1].metrics["seconds"],
               "slices": slice_metrics(final, mask.array > 0, image.geometry.spacing)}
        if args.compare_fp32:  # the accuracy cost of the default precision (bf16 where native)
            fp32 = list(segment(image, loaded, None, args.device, labels=mask, bf16=False))[-1]
            row.update(dice_fp32=fp32.metrics["dice"], seconds_fp32=fp32.metrics["seconds"],
                       voxels_differing_fp32=int((fp32.mask.array != final).sum()))
        per_case.append(row)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return {"method": loaded.method, "parameters": parameters, "train_seconds": train_seconds,
            "best_epoch": result.best_epoch, "best_val_dice": result.best_score,
            "val_curve": [round(h["validation"]["score"], 4) for h in history],
            "train_slices": source.description["train_slices"], "cases": per_case,
            "mean_3d": {k: float(np.nanmean([c[k] for c in per_case])) for k in METRICS},
            "mean_slices": {k: float(np.nanmean([c["slices"][k] for c in per_case])) for k in METRICS},
            "inference_seconds": float(np.mean([c["seconds"] for c in per_case])),
            "config": {k: v for k, v in config.items() if k != "data"}}


def format_report(results: list[dict], args) -> str:
    lines = [f"BraTS 2013 FLAIR, whole tumour; train {', '.join(TRAIN)}; validate {', '.join(VALIDATION)}",
             f"budget: {args.epochs} epochs x {args.iterations} updates x batch {args.batch}, grid "
             f"{args.size[0]}x{args.size[1]}, seed {args.seed}", ""]
    header = f"{'method':<12} {'level':<7} " + " ".join(f"{m.upper():>6}" for m in METRICS[:-1]) + "  HD95 mm"
    header += "   params  train s  infer s/vol  best epoch"
    lines += [header, "-" * len(header)]
    for r in results:
        for level, key in (("3D", "mean_3d"), ("slices", "mean_slices")):
            values = r[key]
            line = f"{r['method']:<12} {level:<7} " + " ".join(f"{values[m]:6.3f}" for m in METRICS[:-1])
            line += f"  {values['hd95']:7.2f}"
            if level == "3D":
                line += (f"  {r['parameters'] / 1e6:6.2f}M  {r['train_seconds']:7.0f}  {r['inference_seconds']:11.1f}"
                         f"  {r['best_epoch']:>10}")
            lines.append(line)
    lines.append("")
    for r in results:
        lines.append(f"{r['method']}: validation Dice per epoch {r['val_curve']}")
        for c in r["cases"]:
            lines.append(f"  {c['case']}: 3D " + " ".join(f"{m} {c[m]:.3f}" for m in METRICS)
                         + f" | {c['slices']['slices']} tumour slices: Dice {c['slices']['dice']:.3f}"
                         + f" | Dice per step {c['dice_per_step']}")
            if "dice_fp32" in c:
                lines.append(f"    default precision vs fp32: Dice {c['dice']:.4f} vs {c['dice_fp32']:.4f}, "
                             f"{c['voxels_differing_fp32']} voxels differ, {c['seconds']:.1f} s vs "
                             f"{c['seconds_fp32']:.1f} s")
    if len(results) == 2:
        a, b = results
        wins = [m for m in METRICS if (a["mean_3d"][m] < b["mean_3d"][m] if m == "hd95" else
                                        a["mean_3d"][m] > b["mean_3d"][m])]
        lines.append(f"{a['method']} better than {b['method']} (3D means) on: {', '.join(wins) or 'none'}; "
                     f"parameter ratio {a['parameters'] / b['parameters']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["pixeldrl", "unet"], choices=("pixeldrl", "unet"))
    parser.add_argument("--size", nargs=2, type=int, default=[64, 64])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--empty-fraction", type=float, default=0.2)
    parser.add_argument("--val-slices", type=int, default=48)
    parser.add_argument("--fusion", choices=("late", "input"), default="late")
    parser.add_argument("--no-revival", action="store_true")
    parser.add_argument("--unet-channels", nargs="+", type=int, default=None, help="default 64 128 256 512 1024")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-compare-fp32", dest="compare_fp32", action="store_false",
                        help="skip the second evaluation in fp32 (accuracy cost of bf16 inference)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON (outside the repository!)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    missing = [c for c in (*TRAIN, *VALIDATION) if not (DATA / c / IMAGE).is_file()]
    if missing:
        print(f"SKIPPED: BraTS 2013 data not found ({DATA}: missing {', '.join(missing)}). It lives beside the "
              "repository as ../shared/data/brats2013 on development machines only.")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="steprl_brats_") as tmp:  # weights never leave this folder
        for method in args.methods:
            print(f"training {method} ...", flush=True)
            results.append(run_method(method, args, Path(tmp)))
            print(f"  {method}: best validation Dice {results[-1]['best_val_dice']:.3f}, "
                  f"{results[-1]['train_seconds']:.0f} s", flush=True)
    report = format_report(results, args)
    print(report)
    if args.json:
        from steprl.io import write_json

        write_json({"results": results, "report": report, "arguments": vars(args)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
