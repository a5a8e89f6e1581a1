"""Copy a trained model into steprl's bundled models with a complete model card.

    python trainer/tools/bundle_model.py runs/spac2d_oasis spac2d_brain --card-extra card_extra.json
    python trainer/tools/bundle_model.py runs/wm pixeldrl_wm --card-extra extra.json --which last \
        --to trainer/snapshots --training-record pixeldrl_wm      # any method: SPAC, PixelDRL-MG, U-Net

Takes ``RUN/model_best.safetensors`` (+ its card), verifies it loads, and writes
``trainer/steprl/models/NAME.safetensors`` + ``NAME.json``. The card keeps everything training
recorded (method, config, normalisation, training command, validation metrics, sha256) and
gains the keys of ``--card-extra`` (task, modality, data licence and attribution, intended use,
limits, training time...). Weights trained on data whose licence forbids redistribution
(e.g. BraTS, CC BY-NC-SA) must never be bundled: the caller states the licence in the extra card.

``--training-record NAME`` copies the committed training record into the card, and
``--which last --to trainer/snapshots`` writes a warm-start snapshot of a run's latest weights
instead of a shipped model (trainer/snapshots/README.md). ``--half`` stores the floating-point
weights as float16 (half the file; every loader copies them into its float32 network, so they
warm-start and segment as they are): for snapshots kept to repeat a measurement, e.g. a 6.5M-
parameter baseline (13 MB instead of 26 MB). Rounding to float16 moves a weight by at most
1/2048 of itself; the card says so (``weights_stored_as``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from steprl.atomic import atomic_path
from steprl.io import write_json
from steprl.modelfile import load_model, model_paths

BUNDLED = Path(__file__).resolve().parents[1] / "steprl" / "models"


#: Keys written by training that an extra card must not replace (the weights depend on them).
PROTECTED = ("config", "method", "ndim", "sha256", "format", "format_version", "normalisation")


def merge_card(card: dict, extra: dict) -> dict:
    """``card`` with ``extra`` merged in: nested objects are merged key by key (so an extra
    ``inference`` entry adds to the trained one instead of dropping e.g. its grid size), and
    the :data:`PROTECTED` keys cannot be changed. Raises ValueError on an attempt."""
    merged = dict(card)
    for key, value in extra.items():
        if key in PROTECTED and key in card and card[key] != value:
            raise ValueError(f"--card-extra may not change '{key}' (training wrote it; the weights depend on it)")
        if isinstance(value, dict) and isinstance(card.get(key), dict):
            merged[key] = merge_card(card[key], value) if key not in PROTECTED else card[key]
        else:
            merged[key] = value
    return merged


def record_summary(name: str) -> dict:
    """The committed training record ``name`` for a card: totals, and per run its command, updates,
    CPU-hours, note (what it tried, when the record has one) and validation curve against the
    updates (registration: hard Dice at steps 0 / 1 / 10 / 20; segmentation: pooled Dice after the
    first and the last step and at the best step)."""
    from training_record import load

    record = load(name)
    if not record["runs"]:
        raise SystemExit(f"refusing: no training record named {name!r} (trainer/tools/training_record.py add)")
    keys = ("updates", "dice_identity", "dice_step1", "dice_step10", "dice_final", "dice_best_step")
    runs = [{"run": r["run"], "command": r["command"], "init_from": r.get("init_from"),
             "updates": r["updates"], "cpu_hours": r.get("cpu_hours"),
             **({"note": r["note"]} if r.get("note") else {}),
             "curve": [{k: p[k] for k in keys if k in p} for p in r["curve"]]} for r in record["runs"]]
    return {"file": f"trainer/benchmarks/results/training_record_{name}.md", "runs": runs,
            "total_updates": sum(r["updates"] for r in runs),
            "total_cpu_hours": round(sum(r["cpu_hours"] or 0 for r in runs), 2)}


def _write_half(weights: Path, card: dict, target: Path) -> None:
    """``weights`` with every floating-point tensor as float16, and ``card`` (a new sha256), at ``target``."""
    from steprl.modelfile import save_model

    state, _ = load_model(weights)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    note = ("float16 (bundle_model.py --half): loaded into float32 networks; each weight within 1/2048 of "
            "the trained float32 value")
    save_model(target, half, {**card, "weights_stored_as": note})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="training run folder (with model_best.safetensors)")
    parser.add_argument("name", help="bundled model name, e.g. spac2d_brain")
    parser.add_argument("--card-extra", type=Path, required=True, help="JSON object merged into the card")
    parser.add_argument("--which", default="best", choices=["best", "last"])
    parser.add_argument("--to", type=Path, default=BUNDLED, metavar="DIR",
                        help="where to write NAME.safetensors + NAME.json (default: the bundled models; "
                             "trainer/snapshots for a warm-start snapshot of a model still in training)")
    parser.add_argument("--half", action="store_true",
                        help="store the weights as float16: half the file, loaded into float32 networks "
                             "(for snapshots kept to repeat a measurement)")
    parser.add_argument("--training-record", default=None, metavar="NAME",
                        help="copy the committed training record NAME (training_record.py) into the card's "
                             "training.record: every run's command, updates, CPU-hours and validation curve")
    args = parser.parse_args(argv)

    weights, card_path = model_paths(args.run / f"model_{args.which}.safetensors")
    _, card = load_model(weights)  # verifies sha256 and format
    extra = json.loads(args.card_extra.read_text(encoding="utf-8"))
    if "licence" not in json.dumps(extra).lower():
        print("refusing: --card-extra must state the training data's licence", file=sys.stderr)
        return 2
    try:
        card = merge_card(card, extra)
    except ValueError as err:
        print(f"refusing: {err}", file=sys.stderr)
        return 2
    card["name"] = args.name
    if args.training_record:
        card.setdefault("training", {})["record"] = record_summary(args.training_record)
    args.to.mkdir(parents=True, exist_ok=True)
    target = args.to / f"{args.name}.safetensors"
    if args.half:
        _write_half(weights, card, target)
    else:
        with atomic_path(target) as tmp:
            shutil.copyfile(weights, tmp)
        write_json(card, args.to / f"{args.name}.json")
    load_model(target)  # the bundled copy verifies too
    print(f"bundled {target} ({card.get('parameters')} parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
