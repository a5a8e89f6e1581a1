"""What one training update of PixelDRL-MG (and of its U-Net baseline) costs at larger network grids.

Issue 12: the bundled ``pixeldrl_wm`` was trained on a 96 x 96 grid (2.2-2.7 mm pixels over a
head), which loses thin white-matter strands; "measure what 128 or 160 costs" before training
at them. This script measures, it does not train: a handful of updates per configuration, no
model is kept.

One configuration = method x grid x data source, each a real learner of
:func:`steprl.segmentation.training.build_learner` with the bundled model's settings (PixelDRL-MG
widths 16/32/64/128, late fusion of width 16, t_max 10, class balance faded over 200 updates to
0.3; U-Net 32-64-128-256-512, as in ``compare_segmentation_cpu.md``), batch 8, fp32 as trained:

- source ``ellipses``: :class:`~steprl.segmentation.data.SyntheticSliceSource` slices made on the
  grid (cheap): the cost of the update itself (episode of 10 steps, returns, backward, Adam);
- source ``synthseg`` (when ``--synthseg`` holds the label maps): the training source the bundled
  model used (two brains synthesised per batch and sliced onto the grid), i.e. the whole update
  as ``steprl train segmentation --synthseg`` runs it.

Each configuration runs one untimed warm-up update; then ``--rounds`` rounds time one update of
every configuration in turn (interleaved, so a change of load on the shared machine hits all
grids alike). The table gives the median seconds per update, the process CPU seconds of the same
span, and the ratio to the 96 x 96 grid of the same method and source, measured in this process.
Pixel size = the bundled model's field of view (256 mm along the longer side) / grid.

    OMP_NUM_THREADS=1 python trainer/benchmarks/bench_pixeldrl_grid.py                 # 96 128 160, 1 thread
    python trainer/benchmarks/bench_pixeldrl_grid.py --grids 96 128 --methods pixeldrl --rounds 5
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SYNTHSEG = REPO.parent / "shared" / "data" / "synthseg"
FOV_MM = 256.0
#: The bundled models' training settings (see the module docstring).
SETTINGS = {
    "pixeldrl": {"widths": (16, 32, 64, 128), "fusion_width": 16, "class_balance_anneal": 200,
                 "class_balance_floor": 0.3, "t_max": 10},
    "unet": {"unet_channels": (32, 64, 128, 256, 512)},
}


def make_source(kind: str, grid: int, synthseg: Path):
    """The slice source of one configuration (validation slices kept to a minimum: not timed)."""
    if kind == "ellipses":
        from steprl.segmentation.data import SyntheticSliceSource

        return SyntheticSliceSource((grid, grid), seed=0, val_count=2)
    from steprl.synth.segmentation_slices import SynthSegSliceSource

    return SynthSegSliceSource(synthseg, (grid, grid), seed=0, val_slices=2)


def make_learner(method: str, source, batch: int):
    from steprl.segmentation.training import build_learner
    from steprl.training.distributed import single_process

    learner, _ = build_learner(method, source, single_process("cpu"), batch=batch, iterations_per_epoch=20,
                               seed=0, **SETTINGS[method])
    return learner


def timed_update(learner, iteration: int) -> tuple[float, float]:
    """(wall s, process CPU s) of one ``train_iteration``."""
    wall, cpu = time.perf_counter(), time.process_time()
    learner.train_iteration(iteration)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", nargs="+", type=int, default=[96, 128, 160], help="network grids (first = baseline)")
    parser.add_argument("--methods", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--sources", nargs="+", choices=("ellipses", "synthseg"), default=None,
                        help="default: ellipses, plus synthseg when --synthseg exists")
    parser.add_argument("--synthseg", type=Path, default=DEFAULT_SYNTHSEG)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed updates per configuration")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import torch

    torch.set_num_threads(args.threads)
    sources = args.sources or (["ellipses", "synthseg"] if args.synthseg.is_dir() else ["ellipses"])
    configs = {}
    for kind in sources:
        for grid in args.grids:
            source = make_source(kind, grid, args.synthseg)
            for method in args.methods:
                learner = make_learner(method, source, args.batch)
                timed_update(learner, 0)  # warm-up: first-call costs, allocator
                configs[(method, kind, grid)] = (learner, [])
    for r in range(args.rounds):
        for learner, times in configs.values():
            times.append(timed_update(learner, 1 + r))
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, {args.rounds} timed updates "
          f"per row after 1 warm-up, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    header = f"| method | source | grid | pixel mm | s / update | CPU s / update | x {args.grids[0]} |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    order = sorted(configs, key=lambda c: (args.methods.index(c[0]), sources.index(c[1]), args.grids.index(c[2])))
    for method, kind, grid in order:
        times = configs[(method, kind, grid)][1]
        wall = statistics.median(t[0] for t in times)
        cpu = statistics.median(t[1] for t in times)
        base = statistics.median(t[0] for t in configs[(method, kind, args.grids[0])][1])
        print(f"| {method} | {kind} | {grid} x {grid} | {FOV_MM / grid:.2f} | {wall:.2f} | {cpu:.2f} | "
              f"{wall / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
