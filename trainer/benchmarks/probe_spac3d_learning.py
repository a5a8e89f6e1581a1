"""How fast does a 3D SPAC policy learn on SynthSeg pairs? A probe before a long training run.

Issue 6 needs a 3D starter model; four full CPU runs of ``steprl train registration --synthseg``
stayed at the identity's validation Dice. This probe measures the learning signal directly, in
minutes, so a run on a GPU (or a new idea on a CPU) can be judged before it spends hours:

- ``field``: on 8 held-out KNOWN pairs (one subject, two views, exact field between them,
  :func:`steprl.synth.from_labels.known_pair`), the mean squared error (voxels^2) of the policy's
  first step to the true field, as a ratio to predicting zero. Below 1 = the policy predicts
  some of the deformation; this is the densest signal training has.
- ``dice``: the validation Dice of inter-subject pairs from held-out subjects (32 structures)
  before any step, after step 1 and after 10 steps (test clamp), as in training's validation.

Training is the learner's registration loss only (SAC never starts: it does not change the
policy's first step, and it triples the cost of an episode in 3D), with the pairs chosen by
``--pairs``: ``known`` (all pairs known, the default field ranges), ``mixed`` (half known, half
two subjects) or ``shift`` (known pairs related by a global shift of up to 20 mm only: the
easiest possible target, a check that anything is learned at all) or ``large`` (known pairs with
about twice the default field ranges: does a bigger, clearer deformation learn faster?).

    OMP_NUM_THREADS=2 python trainer/benchmarks/probe_spac3d_learning.py --grid 32 --iterations 300
    python trainer/benchmarks/probe_spac3d_learning.py --device cuda --grid 64 --iterations 3000

Writes ``results/probe_spac3d_learning_<pairs>_<device>.md`` (``--out`` to change) and prints each row.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path

import _common
import numpy as np
import torch
from steprl.atomic import write_text

RESULTS = Path(__file__).resolve().parent / "results"
HEAD_MM = 211.0  # the field of view of the synthesised pairs: 64 voxels of 3.3 mm


def build(args):
    """The pair source, learner and held-out known pairs for ``args``."""
    from steprl.registration.learner import SPACLearner, SPACTrainConfig
    from steprl.registration.networks import SPACConfig
    from steprl.synth import synthseg
    from steprl.synth.from_labels import SpatialAugment
    from steprl.synth.registration_pairs import PAIR_AUGMENT, SynthSegPairSource
    from steprl.training.distributed import single_process

    pair_augment = PAIR_AUGMENT
    if args.pairs == "shift":
        pair_augment = SpatialAugment(rotation_deg=0.0, scaling=0.0, shear=0.0, shift_mm=20.0, elastic_mm=0.0)
    elif args.pairs == "large":
        pair_augment = SpatialAugment(rotation_deg=10.0, scaling=0.12, shear=0.06, shift_mm=12.0, elastic_mm=8.0,
                                      elastic_control_mm=24.0)
    split = synthseg.split_subjects(synthseg.list_label_maps(args.synthseg), 2, 3)
    grid = (args.grid,) * 3
    source = SynthSegPairSource(split.train, split.validation, grid, spacing=HEAD_MM / args.grid, seed=args.seed,
                                known_fraction=1.0, pair_augment=pair_augment, supersample=args.supersample)
    held_out = source.sample(8, np.random.default_rng(args.seed + 777))  # new random views, never trained on
    source.known_fraction = 0.5 if args.pairs == "mixed" else 1.0
    net = SPACConfig(ndim=3, grid=grid, plan_dim=64, field_level=args.field_level)
    cfg = SPACTrainConfig(batch_pairs=args.batch, episode_steps=args.episode_steps, lr=args.lr, ncc_weight=0.0,
                          dice_weight=args.dice_weight, field_weight=1.0, grad_clip=args.grad_clip,
                          sac_start=args.iterations + 1, seed=args.seed)
    learner = SPACLearner(net, cfg, source, single_process(args.device))
    return learner, held_out.to(learner.device)


def field_ratio(learner, held_out) -> float:
    """MSE of the deterministic first step to the true field, over MSE of a zero step."""
    with torch.no_grad():
        state = torch.cat([held_out.fixed, held_out.moving], dim=1)
        _, step = learner.policy.act(state, deterministic=True)
        truth = held_out.true_field
        return ((step - truth).pow(2).sum(1).mean() / truth.pow(2).sum(1).mean()).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthseg", type=Path, default=Path(__file__).resolve().parents[3] / "shared/data/synthseg")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--grid", type=int, default=32, help="network grid per axis (32 or 64)")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--every", type=int, default=50, help="measure every N iterations")
    parser.add_argument("--pairs", choices=("known", "mixed", "shift", "large"), default="known")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--episode-steps", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--dice-weight", type=float, default=0.0)
    parser.add_argument("--grad-clip", type=float, default=10.0)
    parser.add_argument("--field-level", type=int, default=1)
    parser.add_argument("--supersample", type=int, default=1,
                        help="paint images on a grid this many times finer, then average (partial volume)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.synthseg.is_dir():
        parser.error(f"SynthSeg label maps not found at {args.synthseg}; give --synthseg DIR")

    learner, held_out = build(args)
    rows, start = [], time.perf_counter()

    def measure(iteration: int) -> None:
        val = learner.validate()
        row = {"iteration": iteration, "seconds": time.perf_counter() - start, "field": field_ratio(learner, held_out),
               "dice0": val["dice_identity"], "dice1": val["dice_step1"], "dice10": val["dice_final"]}
        rows.append(row)
        print(f"it {iteration:5d}  {row['seconds']:7.0f} s  field MSE / zero {row['field']:.3f}  "
              f"Dice {row['dice0']:.3f} -> step 1 {row['dice1']:.3f} -> step 10 {row['dice10']:.3f}", flush=True)

    measure(0)
    for it in range(1, args.iterations + 1):
        learner.train_iteration(it)
        if it % args.every == 0 or it == args.iterations:
            measure(it)
    write_report(args, learner.device, rows)
    return 0


def write_report(args, device: torch.device, rows: list[dict]) -> None:
    detail = f"_x{args.supersample}" if args.supersample > 1 else ""
    out = args.out or RESULTS / f"probe_spac3d_learning_{args.pairs}{detail}_{device.type}.md"
    command = "python trainer/benchmarks/probe_spac3d_learning.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("synthseg", "out"))
    lines = ["# 3D SPAC learning probe (SynthSeg pairs)", "",
             f"Generated by `trainer/benchmarks/probe_spac3d_learning.py` on {datetime.now(UTC):%Y-%m-%d}, "
             f"{_common.cpu_model()}, torch {torch.__version__}, device {device}, "
             f"{torch.get_num_threads()} threads.", "", "```", command, "```", "",
             "`field`: held-out known pairs, MSE of step 1 to the true field / MSE of no step (below 1 = learning). "
             "`Dice`: held-out inter-subject validation pairs, before / after step 1 / after 10 steps.", "",
             "| iteration | seconds | field MSE / zero | Dice 0 | Dice step 1 | Dice step 10 |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['iteration']} | {r['seconds']:.0f} | {r['field']:.3f} | {r['dice0']:.3f} | {r['dice1']:.3f} | "
              f"{r['dice10']:.3f} |" for r in rows]
    write_text(out, "\n".join(lines) + "\n")
    print(f"report: {out}")


if __name__ == "__main__":
    raise SystemExit(main())
