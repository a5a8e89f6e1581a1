"""SPACRegistration module benchmark: scrub latency, streaming latency, scene memory (headless).

Why a script and not a test: the machines are shared and noisy; figures are printed against the
issue's targets, never asserted. Everything runs on slicer-core (Slicer's MRML without Qt) and
trame-slicer (real slice views, offscreen), through the module's own Lib code.

What it measures:

- **streaming latency**: a worker process emits ``--steps`` step events in the worker's format
  (each field an uncompressed float32 ITK displacement field on a ``--grid``^3 network grid,
  written atomically before its event, stamped with ``time.time()`` when emitted); the module's
  logic polls (every ``--poll-ms``, as the GUI timer does) and reads each field into the step
  sequence. Latency = step in the scene minus emission time. The emitter is this script run as a
  child (``--emit``), injected through the logic's ProcessRunner Protocol: inference time is the
  model's business (bench_spac.py), not the module's.
- **scene memory**: RSS growth of this process over the streamed steps (the sequence's float32
  grids, the proxy's copy, tables), plus the bytes of the grids themselves.
- **scrub latency**: a ``--volume``-sized moving volume (default 256x256x160, int16) under the
  proxy transform of that sequence, shown in an axial slice view of ``--view`` pixels; each
  sample selects another step (the proxy takes that step's grid, Slicer's slice logic reslices
  the volume through it) and renders the view once (``WaitForCompletion``). Median and p90,
  wall and process CPU time (on a shared machine the CPU time is the steadier figure).

Targets (issue 4): scrub median <= 50 ms, streaming <= 0.3 s, scene memory for 20 steps on a
128^3 grid <= 1 GiB.

Usage::

    python trainer/benchmarks/bench_slicer_module.py                       # 20 steps, 128^3, 256x256x160
    python trainer/benchmarks/bench_slicer_module.py --steps 20 --grid 128 --poll-ms 100 --view 512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
# As Slicer does: the folder of the shared StepRLCommon package, and the module's folder (its Lib).
sys.path[:0] = [str(REPO), str(REPO / "SPACRegistration")]

TARGETS = {"scrub_ms": 50.0, "stream_s": 0.3, "memory_gib": 1.0}


def rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the emitting child ------------------------------------------------------------------------
def emit(folder: Path, steps: int, grid: int, interval: float) -> None:
    """Act as the worker: write each step's field atomically, then print its event (worker format)."""
    import SimpleITK as sitk
    from steprl.atomic import atomic_path
    from steprl.geometry import Geometry, Image
    from steprl.worker import field_path, line_emitter

    out = line_emitter(sys.stdout)
    geometry = Geometry((grid,) * 3, (1.4, 1.2, 1.1), (-90.0, -100.0, -80.0), np.eye(3))
    zz, yy, xx = np.meshgrid(*[np.linspace(0, np.pi, grid, dtype=np.float32)] * 3, indexing="ij")
    base = np.stack([np.sin(xx) * np.sin(yy), np.sin(yy) * np.sin(zz), np.sin(zz) * np.sin(xx)], axis=-1)
    out({"event": "started", "task": "register", "pid": os.getpid(), "device": "cpu", "model": "bench",
         "steps": steps, "grid": [grid] * 3})
    for step in range(steps + 1):
        path = field_path(folder, step)
        image = Image((base * (0.4 * step)).astype(np.float32), geometry).to_sitk()
        with atomic_path(path) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=False)
        out({"event": "step", "step": step, "total": steps, "field": str(path), "metrics": {"ncc": 0.1 * step},
             "eta_seconds": None, "time": time.time()})
        time.sleep(interval)
    out({"event": "done", "steps": steps, "seconds": 0.0})


class EmitterRunner:
    """A ProcessRunner that starts this script's emitter instead of the steprl worker."""

    def __init__(self, steps: int, grid: int, interval: float) -> None:
        self.args = [str(steps), str(grid), str(interval)]

    def start(self, command, env=None, cwd=None):
        from StepRLCommon.process import SubprocessRunner

        folder = Path(cwd) / "steps"
        folder.mkdir(parents=True, exist_ok=True)
        return SubprocessRunner().start([sys.executable, __file__, "--emit", str(folder), *self.args], env=env, cwd=cwd)


# ---- the scene -----------------------------------------------------------------------------------
def make_volumes(scene, shape: tuple[int, int, int]):
    from steprl.geometry import Geometry, Image

    from StepRLCommon.mrmlio import volume_from_image

    d, h, w = shape
    geometry = Geometry(shape, (0.9, 0.9, 1.2), (-115.0, -115.0, -95.0), np.eye(3))
    z, y, x = np.ogrid[:d, :h, :w]
    pattern = (1000 * (np.sin(x / 6.0) * np.sin(y / 6.0) * np.cos(z / 9.0) + 1)).astype(np.int16)
    fixed = volume_from_image(scene, Image(pattern, geometry), "fixed")
    moving = volume_from_image(scene, Image(np.roll(pattern, 3, axis=2), geometry), "moving")
    for volume in (fixed, moving):
        volume.CreateDefaultDisplayNodes()
    return fixed, moving


def streaming(args, scene, fixed, moving, model: Path):
    from SPACRegistrationLib.logic import RegistrationLogic, RegistrationRequest

    logic = RegistrationLogic(scene, runner=EmitterRunner(args.steps, args.grid, args.emit_interval),
                              temp_root=args.workdir)
    before = rss_mib()
    run = logic.start(RegistrationRequest(fixed, moving, str(model), steps=args.steps))
    latencies, reads = [], []
    arrival: dict[int, float] = {}
    pending: dict[int, float] = {}
    original = logic.add_step  # the WorkerLogic hook that reads one step into the scene

    def timed_add(run_, event):
        start = time.perf_counter()
        original(run_, event)
        reads.append(time.perf_counter() - start)
        arrival[event.step] = time.time()
        pending[event.step] = event.time

    logic.add_step = timed_add
    while not run.finished:
        logic.poll(run)
        time.sleep(args.poll_ms / 1000)
    latencies = [arrival[k] - pending[k] for k in sorted(arrival)]
    after = rss_mib()
    grids = sum(run.nodes.sequence.GetNthDataNode(i).GetTransformFromParent().GetDisplacementGrid()
                .GetActualMemorySize() for i in range(run.nodes.count)) / 1024
    return logic, run, {"latencies": latencies, "reads": reads, "rss_growth_mib": after - before,
                        "grid_mib": grids, "state": run.state.value, "error": run.error}


def scrub(args, scene, logic, run, moving):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    from trame_slicer.core import SlicerApp  # noqa: F401 - import check before building the views
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
    from trame_slicer.views.render_scheduler import NoScheduleRendering

    factory = DirectViewFactory(do_render_offscreen=True)
    view = factory.create_view(ViewLayoutDefinition.axial_view(), scene, scrub.app_logic)
    # One render per scrub, as Slicer's views do (they coalesce update requests until the event
    # loop runs); trame's DirectRendering would render on every MRML event instead.
    view.set_scheduled_render(NoScheduleRendering())
    view.render_window().SetSize(args.view, args.view)
    view.set_background_volume_id(moving.GetID())
    view.fit_view_to_content()
    view.render()
    rng = np.random.default_rng(0)
    samples = []
    current = run.nodes.browser.GetSelectedItemNumber()
    for _ in range(args.scrub_samples):
        item = int(rng.integers(0, run.nodes.count))
        if item == current:
            item = (item + 1) % run.nodes.count
        start, cpu = time.perf_counter(), time.process_time()
        logic.select_step(run, run.nodes.step_at(item))
        view.render()
        view.render_window().WaitForCompletion()
        samples.append((time.perf_counter() - start, time.process_time() - cpu))
        current = item
    return samples, view.render_window().GetClassName()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--grid", type=int, default=128, help="network grid edge (fields are GRID^3)")
    parser.add_argument("--volume", type=int, nargs=3, default=(160, 256, 256), metavar=("D", "H", "W"))
    parser.add_argument("--view", type=int, default=512, help="slice view size in pixels")
    parser.add_argument("--poll-ms", type=float, default=100.0, help="logic poll interval (the GUI timer's)")
    parser.add_argument("--emit-interval", type=float, default=0.5, help="seconds between emitted steps")
    parser.add_argument("--scrub-samples", type=int, default=40)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument("--emit", nargs=4, metavar=("FOLDER", "STEPS", "GRID", "INTERVAL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.emit:
        emit(Path(args.emit[0]), int(args.emit[1]), int(args.emit[2]), float(args.emit[3]))
        return 0

    import slicer
    from trame_slicer.core import SlicerApp

    sys.path.insert(0, str(REPO / "Testing"))
    from module_support import save_tiny_model

    print(f"date {time.strftime('%Y-%m-%d %H:%M')}  load {os.getloadavg()}  cpus {os.cpu_count()}  "
          f"python {sys.version.split()[0]}")
    app = SlicerApp()
    scene = app.scene
    scrub.app_logic = app.app_logic
    workdir = tempfile.TemporaryDirectory(prefix="bench_slicer_")
    args.workdir = Path(workdir.name)
    model = save_tiny_model(args.workdir / "model", steps=args.steps)
    fixed, moving = make_volumes(scene, tuple(args.volume))
    print(f"volumes {tuple(args.volume)} int16; fields {args.grid}^3 float32; {args.steps} steps; "
          f"poll every {args.poll_ms:.0f} ms")
    logic, run, stream = streaming(args, scene, fixed, moving, model)
    if stream["state"] != "done":
        print("streaming run failed:", stream["error"])
        return 1
    lat = stream["latencies"]
    figures = {
        "stream_median_s": statistics.median(lat), "stream_max_s": max(lat),
        "read_median_s": statistics.median(stream["reads"]),
        "memory_gib": stream["rss_growth_mib"] / 1024, "grid_gib": stream["grid_mib"] / 1024,
    }
    try:
        samples, window = scrub(args, scene, logic, run, moving)
        wall, cpu = [s[0] for s in samples], [s[1] for s in samples]
        figures.update(scrub_median_ms=1000 * statistics.median(wall),
                       scrub_p90_ms=1000 * float(np.percentile(wall, 90)),
                       scrub_cpu_median_ms=1000 * statistics.median(cpu), render_window=window)
    except Exception as err:  # no offscreen OpenGL here: report, do not hide the other figures
        figures.update(scrub_median_ms=None, scrub_error=f"{type(err).__name__}: {err}")

    def verdict(value, target, fmt):
        return "n/a" if value is None else f"{fmt.format(value)} ({'ok' if value <= target else 'OVER'} <= {target})"

    print(f"streaming latency  median {verdict(figures['stream_median_s'], TARGETS['stream_s'], '{:.3f} s')}, "
          f"max {figures['stream_max_s']:.3f} s (poll interval included; field read + sequence add "
          f"median {figures['read_median_s'] * 1000:.0f} ms)")
    print(f"scene memory       {verdict(figures['memory_gib'], TARGETS['memory_gib'], '{:.2f} GiB')} RSS growth for "
          f"{args.steps + 1} items; float32 grids {figures['grid_gib']:.2f} GiB")
    if figures.get("scrub_median_ms") is not None:
        print(f"scrub latency      median {verdict(figures['scrub_median_ms'], TARGETS['scrub_ms'], '{:.1f} ms')}, "
              f"p90 {figures['scrub_p90_ms']:.1f} ms, CPU median {figures['scrub_cpu_median_ms']:.1f} ms "
              f"({args.view}x{args.view} view, {figures['render_window']})")
    else:
        print(f"scrub latency      not measured: {figures['scrub_error']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    del slicer
    workdir.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
