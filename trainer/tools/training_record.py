"""The committed training record of a model trained over many runs (and machines).

A run folder (``steprl train ... --out RUN``) lives on the machine that trained it; the next
run may be on another machine. This tool copies what matters of a run (its command, settings,
episodes, optimiser updates, CPU-hours and validation curve) into a JSON record that is
committed with the code, then renders the record as markdown with a plot of validation Dice
against the total number of updates across all runs:

    python trainer/tools/training_record.py add runs/spac3d --name spac3d_brain
    python trainer/tools/training_record.py show --name spac3d_brain
    python trainer/tools/training_record.py add runs/wm --name pixeldrl_wm     # segmentation runs alike

Files: ``trainer/benchmarks/results/training_record_<name>.{json,md,png}``. ``add`` replaces
the entry of the same run folder (a resumed run grows in place) and keeps run order. A record
holds the runs of one model, so of one method: registration (SPAC) records show the validation
Dice at steps 0 / 1 / 10 / 20 and folding, segmentation records (PixelDRL-MG, U-Net) the pooled
Dice after the first and the last step and at the best step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from steprl.atomic import write_text

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

#: What a record's text says, and its validation columns (heading, validation key), by kind of model.
INTRO = {
    "spac": "Updates are optimiser updates of the registration loss; validation Dice is the mean over the labels "
            "of the run's validation pairs (--synthseg: the 32 SynthSeg structures of held-out subjects; image "
            "folders: their label maps, or 3-class K-means pseudo-labels without them), on the run's own network "
            "grid (hard Dice: nearest-neighbour labels), after 1, 10 and 20 steps (identity: no step); folding and "
            "std log det J are the final field's (runs before std log det J was validated show '-'). Runs on "
            "different grids have different identity values: compare each run with its own identity column.",
    "segmentation": "Updates are optimiser updates (PixelDRL-MG: one per episode of t_max steps; U-Net: one per "
                    "batch); validation Dice is the pooled Dice over the run's validation slices (held-out subjects), "
                    "on the run's own network grid, after the first and the last step and at the best step.",
}
CURVE_COLUMNS = {
    "spac": (("identity", "dice_identity"), ("step 1", "dice_step1"), ("step 10", "dice_step10"),
             ("step 20", "dice_final"), ("folding %", "folding_percent"), ("std log det J", "std_log_jacobian")),
    "segmentation": (("step 1", "dice_step1"), ("last step", "dice_final"), ("best step", "dice_best_step")),
}


def record_kind(record: dict) -> str:
    """``spac`` or ``segmentation``: the method of the record's runs (entries written before it was kept: spac)."""
    method = next((r["method"] for r in record["runs"] if r.get("method")), "spac")
    return "spac" if method == "spac" else "segmentation"


def updates_per_episode(training: dict) -> int:
    """Optimiser updates per training episode (iteration): for registration, those of the registration
    loss (one per step, or per ``unroll`` window); segmentation settings have no ``episode_steps``: 1."""
    steps, unroll = int(training.get("episode_steps", 1)), int(training.get("unroll", 0))
    return math.ceil(steps / unroll) if unroll > 0 else steps


def read_run(run: Path, label: str | None = None) -> dict:
    """One run folder as a record entry (``config.json`` + ``history.jsonl`` + ``model_last.json``)."""
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    cfg = config.get("config", config)
    training = cfg.get("training", {})
    per_episode = updates_per_episode(training)
    curve, seconds = [], 0.0
    for line in (run / "history.jsonl").read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        seconds += float(entry.get("seconds", 0.0))
        val = entry.get("validation", {})
        curve.append({"episodes": entry["global_step"], "updates": entry["global_step"] * per_episode,
                      **{k: round(float(v), 4) for k, v in val.items() if isinstance(v, (int, float))}})
    card_path = run / "model_last.json"
    card = json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else {}
    card_training = card.get("training", {})
    grid = cfg.get("network", {}).get("grid") or cfg.get("data", {}).get("size") or []
    return {"run": label or run.name, "method": cfg.get("method", "spac"), "command": card_training.get("command", ""),
            "init_from": cfg.get("data", {}).get("init_from"), "network": cfg.get("network", {}), "grid": grid,
            "training": training, "updates_per_episode": per_episode,
            "episodes": curve[-1]["episodes"] if curve else 0, "updates": curve[-1]["updates"] if curve else 0,
            "cpu_hours": card_training.get("cpu_hours"), "device": card_training.get("device"),
            "wall_seconds": round(seconds, 1), "curve": curve}


def load(name: str) -> dict:
    path = RESULTS / f"training_record_{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"model": name, "runs": []}


def render(record: dict) -> str:
    """Markdown: one row per run, then the validation curve over the cumulative updates."""
    kind = record_kind(record)
    columns = CURVE_COLUMNS[kind]
    lines = [f"# Training record: {record['model']}", "",
             f"Written by `trainer/tools/training_record.py` from each run's `history.jsonl`. {INTRO[kind]}",
             "Updates/s: the run's updates over its wall time (data synthesis and validation included; "
             "2 threads on this project's 2-core CPU unless the command says otherwise).",
             "", "| # | run | grid | init from | episodes | updates | updates/s | CPU-hours | device | command |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k, run in enumerate(record["runs"], 1):
        grid = "x".join(str(n) for n in run.get("grid") or run.get("network", {}).get("grid", [])) or "-"
        rate = f"{run['updates'] / run['wall_seconds']:.3f}" if run.get("wall_seconds") else "-"
        lines.append(f"| {k} | {run['run']} | {grid} | {run.get('init_from') or '-'} | {run['episodes']} | "
                     f"{run['updates']} | {rate} | {run.get('cpu_hours') or '-'} | {run.get('device') or '-'} | "
                     f"`{run['command']}` |")
    notes = [f"- {run['run']}: {run['note']}" for run in record["runs"] if run.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    total_updates = sum(r["updates"] for r in record["runs"])
    total_hours = sum(r.get("cpu_hours") or 0 for r in record["runs"])
    lines += ["", f"Total: {total_updates} updates, {total_hours:.2f} CPU-hours.", "",
              "| run | updates (cumulative) | " + " | ".join(heading for heading, _ in columns) + " |",
              "|---|---|" + "---|" * len(columns)]
    offset = 0
    for run in record["runs"]:
        for point in run["curve"]:
            values = " | ".join(str(point.get(key, "-")) for _, key in columns)
            lines.append(f"| {run['run']} | {offset + point['updates']} | {values} |")
        offset += run["updates"]
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    """The validation curves of every run end to end: one colour per run, solid = Dice after the last
    step, dotted = after step 1, dashed black = the identity (registration). The run legend sits
    beside the axes in as many columns as it needs, so the curves stay visible with 20+ runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs = record["runs"]
    columns = max(1, math.ceil(len(runs) / 18))
    fig, ax = plt.subplots(figsize=(7 + 2.6 * columns, 4))
    colours = [*plt.get_cmap("tab20").colors, *plt.get_cmap("tab20b").colors]  # 40 before one repeats
    offset, handles = 0, []
    for k, run in enumerate(runs):
        x = [offset + p["updates"] for p in run["curve"]]
        colour = colours[k % len(colours)]
        for key, style in (("dice_final", "-"), ("dice_step1", ":")):
            ax.plot(x, [p.get(key, math.nan) for p in run["curve"]], style, color=colour, lw=1)
        ax.plot(x, [p.get("dice_identity", math.nan) for p in run["curve"]], "k--", lw=0.8)
        handles.append(Line2D([], [], color=colour, lw=2, label=run["run"]))
        offset += run["updates"]
    styles = [Line2D([], [], color="grey", ls="-", label="after the last step"),
              Line2D([], [], color="grey", ls=":", label="after step 1")]
    if any("dice_identity" in point for run in runs for point in run["curve"]):
        styles.append(Line2D([], [], color="k", ls="--", lw=0.8, label="identity (no warp)"))
    ax.add_artist(ax.legend(handles=styles, fontsize=7, loc="lower right"))
    ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=columns,
              frameon=False)
    ax.set_xlabel("optimiser updates (cumulative over runs)")
    ax.set_ylabel("validation Dice (held-out subjects)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="add (or update) a run folder's entry, then render")
    add.add_argument("run", type=Path)
    add.add_argument("--label", default=None, help="the run's name in the record (default: the folder name)")
    add.add_argument("--note", default=None,
                     help="what this run tried or changed, and what its curve means (kept when the run is re-added "
                          "without a note)")
    for q in (add, sub.add_parser("show", help="render the record again")):
        q.add_argument("--name", required=True, help="the model's name, e.g. spac3d_brain")
    args = p.parse_args(argv)
    record = load(args.name)
    if args.cmd == "add":
        if not (args.run / "history.jsonl").is_file():
            print(f"error: {args.run} holds no history.jsonl: not a finished epoch of a training run", file=sys.stderr)
            return 2
        entry = read_run(args.run, args.label)
        earlier = next((r for r in record["runs"] if r["run"] == entry["run"]), {})
        note = args.note if args.note is not None else earlier.get("note")
        if note:
            entry["note"] = note
        runs = [r for r in record["runs"] if r["run"] != entry["run"]]
        index = next((i for i, r in enumerate(record["runs"]) if r["run"] == entry["run"]), len(runs))
        runs.insert(index, entry)
        record["runs"] = runs
        write_text(RESULTS / f"training_record_{args.name}.json", json.dumps(record, indent=1) + "\n")
    write_text(RESULTS / f"training_record_{args.name}.md", render(record))
    plot(record, RESULTS / f"training_record_{args.name}.png")
    print(f"wrote {RESULTS / f'training_record_{args.name}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
