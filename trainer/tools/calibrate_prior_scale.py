"""Calibrate a 3D SPAC model's prior step (scale, and optionally smoothing) on its VALIDATION subjects, and save it.

    python trainer/tools/calibrate_prior_scale.py trainer/snapshots/spac3d_warmstart.safetensors \\
        --out runs/spac3d_calibrated --scales 2 2.5 3 3.5 4 --sigmas 2 3

Why and how: :mod:`steprl.registration.calibration`. The pairs are T1-like synthetic heads of the
model's validation subjects (the card's ``training.data.validation_subjects``; never the held-out
test subjects that ``compare_registration.py`` scores), every ordered pair, both as whole heads and
brain-extracted (users register both kinds), by default with one contrast draw for all subjects
(``--contrast same``: two scans of one sequence, as real pairs are; see ``synthetic_heads``).
Writes ``OUT/model_best.safetensors`` + card, whose ``calibration`` entry holds this command and
every setting's figures; bundle it with ``bundle_model.py OUT NAME``. Takes about 25 s per pair
and setting on one thread.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the benchmark's case builder

from compare_registration import DEFAULT_DATA, synthetic_heads  # noqa: E402


def validation_pairs(model, folder: Path, spacing: float, size: int, seed: int, same_contrast: bool = False) -> list:
    """Whole-head and brain-extracted ordered pairs of the model's validation subjects."""
    from steprl.registration.calibration import LabelledPair
    from steprl.synth import synthseg

    names = model.card.get("training", {}).get("data", {}).get("validation_subjects")
    split = synthseg.split_subjects(synthseg.list_label_maps(folder))
    subjects = [folder / n for n in names] if names else split.validation
    if leaked := sorted(p.name for p in subjects if p in split.test):
        raise SystemExit(f"refusing: {leaked} are held-out test subjects; calibrate on validation subjects only")
    pairs = []
    for strip in (False, True):
        heads = synthetic_heads(folder, subjects, spacing, size, seed, strip=strip, same_contrast=same_contrast)
        tag = "brain-extracted" if strip else "whole head"
        pairs += [LabelledPair(f"{heads[m][0]} -> {heads[f][0]} ({tag})", heads[f][1], heads[m][1], heads[f][2],
                               heads[m][2]) for f, m in itertools.permutations(range(len(heads)), 2)]
    return pairs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model file or bundled name (an 'ncc-gradient' SPAC model with a prior step)")
    p.add_argument("--out", type=Path, required=True, help="folder for model_best.safetensors + card")
    p.add_argument("--scales", type=float, nargs="+", default=[2.0, 2.5, 3.0, 3.5, 4.0])
    p.add_argument("--sigmas", type=float, nargs="+", default=None, metavar="VOXELS",
                   help="prior smoothings to scan with every scale (default: only the model's own)")
    p.add_argument("--contrast", choices=("same", "independent"), default="same",
                   help="one T1-like contrast draw for all validation subjects (default, as scans of one sequence), "
                        "or one per subject")
    p.add_argument("--synthseg", type=Path, default=DEFAULT_DATA / "synthseg")
    p.add_argument("--spacing", type=float, default=2.0, help="pair grid spacing in mm (as compare_registration)")
    p.add_argument("--size", type=int, default=106, help="pair grid size in voxels (as compare_registration)")
    p.add_argument("--seed", type=int, default=1, help="synthesis seed (compare_registration's test pairs use 0)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import logging

    import torch
    from steprl.modelfile import model_paths, save_model
    from steprl.registration.calibration import calibrate_prior_scale
    from steprl.registration.model import load_spac

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = load_spac(args.model, "cpu")
    pairs = validation_pairs(model, args.synthseg, args.spacing, args.size, args.seed, args.contrast == "same")
    sigmas = args.sigmas or "the model's own"
    print(f"{len(pairs)} validation pairs ({args.contrast} contrast), scales {args.scales}, sigmas {sigmas}",
          flush=True)
    try:
        result = calibrate_prior_scale(model, pairs, args.scales, args.sigmas, threads=args.threads)
    except ValueError as err:
        print(f"refusing: {err}", file=sys.stderr)
        return 2
    print(f"chosen scale {result['chosen']:g} sigma {result['chosen_sigma']:g} (was {result['previous']:g}, "
          f"{result['previous_sigma']:g})")
    card = dict(model.card)
    for key in ("sha256", "name"):
        card.pop(key, None)
    result["command"] = "python trainer/tools/calibrate_prior_scale.py " + shlex.join(sys.argv[1:] if argv is None
                                                                                      else argv)
    result["pairs"] = [pair.name for pair in pairs]
    result["contrast"] = args.contrast
    card["calibration"] = result
    weights, _ = model_paths(args.out / "model_best.safetensors")
    args.out.mkdir(parents=True, exist_ok=True)
    save_model(weights, model.policy.state_dict(), card)
    print(f"wrote {weights}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
