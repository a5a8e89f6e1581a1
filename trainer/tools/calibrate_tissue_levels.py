"""Choose the grey / white-matter ratio a segmentation model works best at, and put it in its card.

    python trainer/tools/calibrate_tissue_levels.py trainer/steprl/models/pixeldrl_wm.safetensors \\
        --synthseg ../shared/data/synthseg --write

Why: :mod:`steprl.segmentation.tissue_levels`. Each T1-like synthetic volume of the model's
VALIDATION subjects (never the held-out test subjects that the comparisons score; ``--seeds``
volumes each) is remapped to every candidate ratio with the SAME estimator that inference
applies to a user's scan (:func:`steprl.segmentation.inference.first_pass_levels`) and
segmented; the ratio with the best mean Dice wins.
Synthetic T1 ratios spread widely (0.38-0.75 on the training subjects), so the ratio the model
works best at is measured, not assumed. ``--write`` stores ``normalisation.tissue_levels``
(the ratio, the table, this command) in the card next to the weights, atomically, weights
untouched: from then on ``steprl segment`` matches every scan's levels to it unless
``--no-match-levels`` is given. About 10 s per volume and ratio on one core.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np


def validation_table(model, folder: Path, seeds: int, ratios: list[float]) -> list[dict]:
    """Per validation volume: its own ratio, Dice as it is, and Dice after remapping to each ratio."""
    from steprl.geometry import Image
    from steprl.metrics import dice
    from steprl.preprocess import normalise_percentile
    from steprl.segmentation.inference import first_pass_levels, segment
    from steprl.segmentation.tissue_levels import match_levels
    from steprl.synth import synthseg
    from steprl.synth.segmentation_slices import synth_case

    def final(image: Image):
        return list(segment(image, model, None, match_levels=False))[-1].mask.array != 0

    rows = []
    for k, path in enumerate(synthseg.split_subjects(synthseg.list_label_maps(folder)).validation):
        for s in range(seeds):
            image, mask = synth_case(path, folder, seed=7000 + 10 * k + s, t1=True)
            normalised, truth = normalise_percentile(image.array), mask.array != 0
            levels = first_pass_levels(image, model)
            if levels is None:
                print(f"{path.name} seed {s}: no first-pass mask, left out", flush=True)
                continue
            row = {"volume": f"{path.name} seed {s}", "own_ratio": round(levels[0] / levels[1], 4),
                   "as_is": round(dice(final(image), truth), 4),
                   "dice": {f"{r:g}": round(dice(final(Image(match_levels(normalised, *levels, r), image.geometry)),
                                                 truth), 4) for r in ratios}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a segmentation model file (NAME.safetensors with NAME.json)")
    p.add_argument("--synthseg", type=Path, required=True, help="the SynthSeg label maps the model trained on")
    p.add_argument("--seeds", type=int, default=2, help="volumes per validation subject (default 2)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8],
                   help="candidate grey / white ratios")
    p.add_argument("--write", action="store_true", help="store the result in the model's card")
    args = p.parse_args(argv)

    from steprl.atomic import write_text
    from steprl.modelfile import model_paths
    from steprl.segmentation.model import load_segmenter

    model = load_segmenter(args.model)
    rows = validation_table(model, args.synthseg, args.seeds, args.ratios)
    if not rows:
        raise SystemExit("no validation volume gave levels: nothing to calibrate on")
    means = {r: float(np.mean([row["dice"][r] for row in rows])) for r in rows[0]["dice"]}
    best = max(means, key=means.get)
    entry = {"grey_to_white": float(best), "validation_dice": round(means[best], 4),
             "validation_dice_as_is": round(float(np.mean([row["as_is"] for row in rows])), 4),
             "mean_dice_by_ratio": {r: round(d, 4) for r, d in means.items()}, "volumes": len(rows),
             "estimator": "steprl.segmentation.inference.first_pass_levels (one-step first pass of this model on "
                          "<= 16 slices: median grey in a 2-voxel in-slice ring around its mask / median white "
                          "inside it, on the 0.5-99.5 percentile-normalised image)",
             "data": "T1-like synthetic volumes of the validation subjects "
                     "(steprl.synth.segmentation_slices.synth_case)",
             "command": shlex.join(["python", "trainer/tools/calibrate_tissue_levels.py", *(argv or sys.argv[1:])])}
    print(json.dumps(entry, indent=2))
    if args.write:
        _, card_path = model_paths(args.model)
        card = json.loads(card_path.read_text())
        card.setdefault("normalisation", {})["tissue_levels"] = entry
        write_text(card_path, json.dumps(card, indent=2) + "\n")  # the card's own key order: a small diff
        print(f"written to {card_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
