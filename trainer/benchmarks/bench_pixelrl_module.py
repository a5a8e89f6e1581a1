"""PixelRLSegment module benchmark: a 240x240x155 volume end to end through the module logic vs ``steprl segment``.

Why a script and not a test: the machines are shared and noisy; figures are printed against the
issue's target (module overhead <= 10% over plain ``steprl segment`` on the same volume), never
asserted. Everything runs headless on slicer-core, through the module's own Lib code.

What it measures, alternating the two, ``--repeats`` times each, in this one process run:

- **module**: ``SegmentationLogic.start`` on a scene volume (Slicer's NRRD writer), the real worker
  process (``python -m steprl worker``: interpreter start, torch import, model load, ``segment()``,
  the step masks written as NRRD), the logic polling every ``--poll-ms`` (the GUI timer's
  interval), each step's mask + changed files read into the labelmap sequence, and on finish the
  ``vtkMRMLSegmentationNode`` of the last step. Wall time from ``start`` to the run's end; its
  parts: export + launch, worker run to the last step event, reading the steps into the scene,
  the segmentation node.
- **cli**: ``python -m steprl segment IMAGE --model M --out OUT --steps N --device cpu --format nrrd``
  as a child process on the NRRD file the module writes (same interpreter start, torch import and
  model load; it writes the labelmap, every step's mask, metrics.json and steps.png).

overhead = median(module) / median(cli) - 1. The model is a randomly initialised PixelDRL-MG of
the paper's widths on a 128 x 128 grid (the cost does not depend on the weights), saved in a
temporary folder. Children run with the inherited environment (``OMP_WAIT_POLICY=PASSIVE`` as the
CLI sets it).

Usage::

    python trainer/benchmarks/bench_pixelrl_module.py                       # 2 repeats, 10 steps
    python trainer/benchmarks/bench_pixelrl_module.py --repeats 3 \
        --markdown trainer/benchmarks/results/bench_pixelrl_module_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import numpy as np

REPO = Path(__file__).resolve().parents[2]
for _path in (REPO, REPO / "PixelRLSegment"):
    sys.path.insert(0, str(_path))

TARGET = 0.10
SHAPE = (155, 240, 240)  # (D, H, W)


def make_model(folder: Path, size: int) -> Path:
    import torch
    from steprl.modelfile import save_model
    from steprl.segmentation.data import SyntheticSliceSource
    from steprl.segmentation.training import build_learner
    from steprl.training.distributed import single_process

    torch.manual_seed(0)
    source = SyntheticSliceSource((size, size), seed=0, val_count=2)
    learner, _ = build_learner("pixeldrl", source, single_process("cpu"), batch=2, iterations_per_epoch=1)
    state, card = learner.export_model()
    return save_model(folder / "bench_pixeldrl", state, card)


def make_volume(scene):
    """A 240x240x155 (1 mm) volume with a soft object in every slice (no constant slice: nothing skipped)."""
    from steprl.geometry import Geometry, Image

    from StepRLCommon.mrmlio import volume_from_image

    d, h, w = SHAPE
    z, y, x = np.ogrid[:d, :h, :w]
    rng = np.random.default_rng(0)
    blob = np.exp(-(((x - w / 2) / 50.0) ** 2 + ((y - h / 2) / 60.0) ** 2 + ((z - d / 2) / 70.0) ** 2))
    array = (300 * blob + rng.normal(100, 15, SHAPE)).astype(np.float32)
    return volume_from_image(scene, Image(array, Geometry(SHAPE, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))),
                             "bench volume")


def run_module(scene, volume, model: Path, args, workdir: Path) -> dict:
    from PixelRLSegmentLib.logic import SegmentationLogic, SegmentationRequest

    from StepRLCommon.workerlogic import RunState

    logic = SegmentationLogic(scene, temp_root=workdir / "temp")
    reads: list[float] = []
    original_add, original_done = logic.add_step, logic.on_done
    marks: dict[str, float] = {}

    def timed_add(run, event):
        start = time.perf_counter()
        original_add(run, event)
        reads.append(time.perf_counter() - start)
        marks["last_step"] = time.perf_counter()

    def timed_done(run):
        start = time.perf_counter()
        original_done(run)
        marks["segmentation"] = time.perf_counter() - start

    logic.add_step, logic.on_done = timed_add, timed_done
    start = time.perf_counter()
    run = logic.start(SegmentationRequest(volume, str(model), steps=args.steps, device="cpu"))
    launched = time.perf_counter()
    while not run.finished:
        logic.poll(run)
        time.sleep(args.poll_ms / 1000)
    total = time.perf_counter() - start
    if run.state is not RunState.DONE:
        raise RuntimeError(f"module run failed: {run.error}")
    result = {"total": total, "launch": launched - start, "reads": sum(reads), "read_each": statistics.median(reads),
              "segmentation": marks.get("segmentation", 0.0), "steps": len(run.steps)}
    run.nodes.remove(scene)
    scene.RemoveNode(run.segmentation)
    return result


def run_cli(image: Path, model: Path, args, workdir: Path) -> float:
    out = workdir / "cli_out"
    command = [sys.executable, "-m", "steprl", "segment", str(image), "--model", str(model), "--out", str(out),
               "--steps", str(args.steps), "--device", "cpu", "--format", "nrrd", "--quiet"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"steprl segment failed: {proc.stderr[-2000:]}")
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=128, help="network grid (pixels per side)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--poll-ms", type=float, default=100.0, help="logic poll interval (the GUI timer's)")
    parser.add_argument("--markdown", type=Path, help="also write the figures as a markdown table")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()

    import slicer

    from StepRLCommon.mrmlio import export_volume

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = (f"date {when}  load {tuple(round(v, 1) for v in os.getloadavg())}  cpus {os.cpu_count()}  "
              f"python {sys.version.split()[0]}  {_common.cpu_model()}")
    print(header)
    with tempfile.TemporaryDirectory(prefix="bench_pixelrl_module_") as tmp:
        workdir = Path(tmp)
        model = make_model(workdir, args.size)
        scene = slicer.vtkMRMLScene()
        volume = make_volume(scene)
        image = workdir / "image.nrrd"
        export_volume(volume, image)  # the same bytes the module's worker reads
        print(f"volume {SHAPE[::-1]} (W, H, D) float32, 1 mm; {args.steps} steps; network {args.size}^2; "
              f"poll every {args.poll_ms:.0f} ms; {args.repeats} repeats each, alternating")
        module_runs, cli_runs = [], []
        for repeat in range(args.repeats):
            cli_runs.append(run_cli(image, model, args, workdir))
            module_runs.append(run_module(scene, volume, model, args, workdir))
            print(f"  repeat {repeat + 1}: steprl segment {cli_runs[-1]:.2f} s, "
                  f"module {module_runs[-1]['total']:.2f} s")
    module = statistics.median(r["total"] for r in module_runs)
    cli = statistics.median(cli_runs)
    overhead = module / cli - 1.0
    parts = {key: statistics.median(r[key] for r in module_runs) for key in ("launch", "reads", "read_each",
                                                                              "segmentation")}
    verdict = "ok" if overhead <= TARGET else "OVER"
    print(f"steprl segment  median {cli:.2f} s")
    print(f"module          median {module:.2f} s: export + launch {parts['launch']:.2f} s, steps read into the "
          f"scene {parts['reads']:.2f} s ({parts['read_each'] * 1000:.0f} ms each), segmentation node "
          f"{parts['segmentation']:.2f} s")
    print(f"overhead        {100 * overhead:+.1f}% ({verdict} <= {100 * TARGET:.0f}%)")
    figures = {"date": when, "cli_s": cli_runs, "module": module_runs, "overhead": overhead, "steps": args.steps}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(
            "# PixelRLSegment module benchmark\n\n"
            f"`python trainer/benchmarks/bench_pixelrl_module.py --repeats {args.repeats}` on {when}, "
            f"{os.cpu_count()}-core CPU, load average {os.getloadavg()[0]:.1f} (shared machine), slicer-core, "
            f"torch CPU. Volume 240x240x155 float32 (1 mm), {args.steps} steps, an untrained PixelDRL-MG of the "
            f"paper's widths on a {args.size}x{args.size} grid (timing does not depend on the weights); GUI poll "
            f"every {args.poll_ms:.0f} ms; medians of {args.repeats} alternating runs.\n\n"
            "| measure | result | target |\n|---|---|---|\n"
            f"| `steprl segment` (child process: start, torch import, model load, segment, write NRRD outputs) "
            f"| {cli:.2f} s | |\n"
            f"| module end to end (export, worker, steps into the sequence, segmentation node) | {module:.2f} s | |\n"
            f"| of which export + launch | {parts['launch']:.2f} s | |\n"
            f"| of which step files read into the scene | {parts['reads']:.2f} s "
            f"({parts['read_each'] * 1000:.0f} ms per step) | |\n"
            f"| of which the segmentation node (import + optional outputs) | {parts['segmentation']:.2f} s | |\n"
            f"| overhead of the module over `steprl segment` | {100 * overhead:+.1f}% | <= 10%: "
            f"{'pass' if overhead <= TARGET else 'fail'} |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
