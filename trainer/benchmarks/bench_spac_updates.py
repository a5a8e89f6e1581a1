"""Updates per second of the 3D SPAC recipe (training through the rollout), per grid and precision.

Issue 11 asks whether bfloat16 autocast and ``channels_last_3d`` make an update cheaper on this
CPU (it has AMX-BF16), and whether the loss curve then still matches float32. For each grid,
every configuration trains from the SAME initial weights on the SAME pre-synthesised batches
(synthesis excluded from the timing), interleaved round by round so a busy machine slows all of
them alike; the report gives updates per second and the ratio to float32 in the same process,
and the soft Dice after each update of the bf16 run next to the float32 one. The loss is stage 1's
(blurred soft Dice over the 32 labels); the later stages' distance loss warps as many channels.

    OMP_NUM_THREADS=2 python trainer/benchmarks/bench_spac_updates.py --grids 32 64 --updates 6

Writes ``results/bench_spac_updates_<device>.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import _common
import numpy as np
import torch
from steprl.atomic import write_text

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {"fp32": (False, False), "bf16": (True, False), "fp32 channels_last_3d": (False, True),
           "bf16 channels_last_3d": (True, True)}


class FixedBatches:
    """A pair source that cycles through batches made once (so every configuration sees the same data)."""

    labels_are_real = True

    def __init__(self, source, batches) -> None:
        self.num_labels, self._batches, self._k = source.num_labels, batches, 0

    def sample(self, n, rng):
        batch = self._batches[self._k % len(self._batches)]
        self._k += 1
        return batch

    def validation(self):
        return self._batches[0]


def _learner(grid: int, batches, source, bf16: bool, channels_last: bool, seed: int):
    from steprl.registration.learner import SPACLearner, SPACTrainConfig
    from steprl.registration.networks import SPACConfig
    from steprl.training.distributed import single_process

    net = SPACConfig(ndim=3, grid=(grid,) * 3, channels=(16, 32, 32, 32), plan_dim=64, norm="instance", stem=8,
                     features="diff", step_bound=1.0)
    cfg = SPACTrainConfig(batch_pairs=4, episode_steps=5, unroll=5, lr=1e-4, ncc_weight=0.0, dice_weight=1.0,
                          label_sigma=0.7, smooth_weight=0.5, train_max_step=1.0, test_max_step=1.0,
                          sac_start=10**9, bf16=bf16, seed=seed)
    learner = SPACLearner(net, cfg, FixedBatches(source, batches), single_process("cpu"))
    if channels_last:
        learner.policy.to(memory_format=torch.channels_last_3d)
    return learner


def measure(grid: int, updates: int, synthseg: Path, seed: int) -> list[dict]:
    from steprl.synth import synthseg as ss
    from steprl.synth.registration_pairs import SynthSegPairSource

    split = ss.split_subjects(ss.list_label_maps(synthseg), 2, 3)
    source = SynthSegPairSource(split.train[:4], split.validation, (grid,) * 3, spacing=211.0 / grid,
                                supersample=2, t1_probability=1.0, val_pairs=2)
    rng = np.random.default_rng(seed)
    batches = [source.sample(4, rng) for _ in range(updates + 1)]
    learners = {name: _learner(grid, batches, source, *flags, seed) for name, flags in CONFIGS.items()}
    first = next(iter(learners.values())).policy.state_dict()
    for learner in learners.values():  # the same initial weights everywhere
        learner.policy.load_state_dict(copy.deepcopy(first))
    for learner in learners.values():  # warm-up (oneDNN kernels are chosen on first use), not timed
        learner.train_iteration(0)
    times = {name: [] for name in learners}
    dice = {name: [] for name in learners}
    for k in range(updates):
        for name, learner in learners.items():
            start = time.perf_counter()
            logs = learner.train_iteration(k + 1)
            times[name].append(time.perf_counter() - start)
            dice[name].append(logs["soft_dice"])
    base = float(np.median(times["fp32"]))
    return [{"grid": grid, "config": name, "seconds": float(np.median(t)), "updates_per_s": 1 / float(np.median(t)),
             "speedup": base / float(np.median(t)), "soft_dice": dice[name],
             "max_dice_diff": float(np.max(np.abs(np.subtract(dice[name], dice["fp32"]))))}
            for name, t in times.items()]


def report(rows: list[dict], args, threads: int) -> str:

    lines = ["# SPAC 3D recipe: updates per second by grid and precision", "",
             f"`python trainer/benchmarks/bench_spac_updates.py --grids {' '.join(map(str, args.grids))} "
             f"--updates {args.updates}`; {_common.cpu_model()}, torch {torch.__version__}, "
             f"{threads} threads. One update = one optimiser step through a window of 5 composed policy steps, "
             "batch 4, 32 SynthSeg structures, stage 1's blurred soft-Dice loss "
             "(synthesis not timed). Medians over the timed updates; ratios "
             "against float32 in the same process, on the same batches and initial weights.", "",
             "| grid | configuration | s / update | updates / s | speed vs fp32 | max |soft Dice - fp32's| |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['grid']}^3 | {r['config']} | {r['seconds']:.2f} | {r['updates_per_s']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['max_dice_diff']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grids", nargs="+", type=int, default=[32, 64])
    p.add_argument("--updates", type=int, default=6, help="timed updates per configuration")
    p.add_argument("--synthseg", type=Path, default=Path(__file__).resolve().parents[3] / "shared/data/synthseg")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "bench_spac_updates_cpu.md")
    args = p.parse_args(argv)
    rows = [row for grid in args.grids for row in measure(grid, args.updates, args.synthseg, args.seed)]
    text = report(rows, args, torch.get_num_threads())
    write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
