"""SPAC inference speed and memory benchmark: ``steprl.registration.inference.register()`` end to end.

Why a script and not a test: these machines are shared and noisy, so speed and memory are
measured here and reported as ratios against a baseline timed in the SAME process (the bare
policy network forward on the same grid), never asserted in the test suite.

What one row measures (a fresh subprocess per configuration x device x precision, so the
peak RSS belongs to that row alone):

- a randomly initialised SPAC policy of the default 2D/3D sizes, saved as a model file in a
  temporary folder and loaded once (loading is not timed);
- a synthetic pair (``steprl.synth.toy.synthetic_pair``) on exactly the network grid, prepared
  by the parent and read from ``.npy`` files so its generation does not count in the peak RSS;
- one short warm-up run of ``register()``, then one timed run of ``--steps`` steps: per-step
  time (median over steps 2..N: step 1 still pays first-call costs), the total from calling
  ``register()`` to the last yielded step (setup, normalisation, resampling, step 0 metrics
  included), and separately the one access of the final ``result.warped`` (a full-resolution
  warp onto the fixed grid, computed lazily);
- the baseline: the same policy's single forward pass ``policy.act(state)`` on the same grid and
  precision (no warping, no metrics); ``overhead = step time / forward time`` says what the
  environment plumbing (composition, warping, local NCC, Jacobian) costs on top of the network;
- for a bf16 row, after its peaks are recorded, an fp32 run of the same ``register()`` in the
  same process, giving the bf16 speed-up against fp32 measured side by side;
- peak RSS (``getrusage``), and on CUDA ``torch.cuda.max_memory_allocated``;
- next to every wall time, the process CPU time (all threads) of the same span, and the minor
  page faults per step: on a shared machine wall time mostly measures the neighbours.

Usage::

    python trainer/benchmarks/bench_spac.py                      # every config, cpu (+ cuda), fp32 + bf16
    python trainer/benchmarks/bench_spac.py --configs 3d128 --devices cpu --precisions fp32 --breakdown
    python trainer/benchmarks/bench_spac.py --markdown results.md
    python trainer/benchmarks/bench_spac.py --one 3d64 cpu bf16 --json   # one row (what the parent runs)
    python trainer/benchmarks/bench_spac.py --configs 3d128 --child-env OMP_WAIT_POLICY=PASSIVE

torch's default thread count is left alone (printed in the header).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import _common
import numpy as np

#: name -> network grid (array order). The 2D policy uses plan_dim 32, the 3D one 64.
CONFIGS: dict[str, tuple[int, ...]] = {"2d128": (128, 128), "3d64": (64, 64, 64), "3d128": (128, 128, 128)}
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
#: (config, device) -> (max seconds for the timed register() run, max peak RSS GiB or None).
TARGETS: dict[tuple[str, str], tuple[float, float | None]] = {
    ("3d128", "cpu"): (15.0, 3.0),
    ("3d128", "cuda"): (0.25, None),
}
JSON_PREFIX = "BENCH_JSON "
GIB = 2.0**30


# ------------------------------------------------------------------------------ preparation
def spac_config(name: str):
    """The default SPAC network config for a benchmark configuration name."""
    from steprl.registration.networks import SPACConfig

    grid = CONFIGS[name]
    nd = len(grid)
    return SPACConfig(ndim=nd, grid=grid, plan_dim=32 if nd == 2 else 64)


def prepare(name: str, folder: Path, seed: int = 0) -> None:
    """Write the model file ``spac_NAME`` and the pair ``NAME_fixed.npy`` / ``NAME_moving.npy`` into ``folder``."""
    import torch
    from steprl.modelfile import save_model
    from steprl.registration.networks import SPACPolicy
    from steprl.synth.toy import synthetic_pair

    cfg = spac_config(name)
    torch.manual_seed(seed)
    card = {"method": "spac", "ndim": cfg.ndim, "config": cfg.to_dict(), "inference": {"max_step": 3.0, "steps": 20}}
    save_model(folder / f"spac_{name}", SPACPolicy(cfg).state_dict(), card)
    pair = synthetic_pair(cfg.grid, np.random.default_rng(seed))
    for key in ("fixed", "moving"):
        np.save(folder / f"{name}_{key}.npy", pair[key].astype(np.float32))


def _prepared(name: str, folder: Path) -> bool:
    return all((folder / f).is_file() for f in (f"spac_{name}.safetensors", f"spac_{name}.json",
                                                 f"{name}_fixed.npy", f"{name}_moving.npy"))


# ---------------------------------------------------------------------------- measurement
def _rss_now_gib() -> float:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB
    except (OSError, ValueError, IndexError):
        return 0.0


def _median_time(fn: Callable[[], object], dev, reps: int, warmup: bool = True) -> tuple[float, float]:
    """Median ``(wall, cpu)`` seconds of ``fn`` over ``reps`` calls (after one warm-up call).

    ``cpu`` is the process CPU time (all threads): on a shared machine it inflates much less
    than wall time, so ratios of CPU times are the steadier ones there.
    """
    if warmup:
        fn()
        _common.sync(dev)
    walls, cpus = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        _common.sync(dev)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def _timed_register(spac, fixed, moving, dev, bf16: bool, steps: int) -> dict:
    """One run of ``register()``: per-step wall and CPU times, total, and the final warp's cost."""
    from steprl.registration.inference import register

    walls, cpus = [], []
    _common.sync(dev)
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    c0, t0 = time.process_time(), time.perf_counter()
    result = None
    for res in register(fixed, moving, spac, steps=steps, device=dev, bf16=bf16):
        _common.sync(dev)  # the metrics already call float() (a sync); this makes CUDA stamps exact
        walls.append(time.perf_counter())
        cpus.append(time.process_time())
        result = res  # only the latest is kept (each holds its own full field), as a viewer would
    # per-step deltas; index 0 is step 1, which still pays first-call costs: medians use steps 2..N
    step_wall = [b - a for a, b in zip(walls[:-1], walls[1:])]
    step_cpu = [b - a for a, b in zip(cpus[:-1], cpus[1:])]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    t1 = time.perf_counter()
    _ = result.warped
    _common.sync(dev)
    warp_s = time.perf_counter() - t1
    return {
        "total_s": walls[-1] - t0,
        "cpu_s": cpus[-1] - c0,
        "setup_s": walls[0] - t0,  # normalisation, resampling onto the network grid, step 0 metrics
        "step_s": statistics.median(step_wall[1:] or step_wall),
        "step_cpu_s": statistics.median(step_cpu[1:] or step_cpu),
        "step1_s": step_wall[0],
        "warped_s": warp_s,
        "final_ncc": float(result.metrics["ncc"]),
        # minor page faults per step: memory freshly mapped from the kernel (large temporaries the
        # allocator returned and asks for again); a high count is CPU time spent zeroing pages
        "faults_per_step": faults / max(1, len(walls)),
    }


def _act(spac, state, dev, bf16: bool):
    import torch

    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        return spac.policy.act(state, deterministic=True)


def breakdown(spac, fixed_arr: np.ndarray, moving_arr: np.ndarray, dev, bf16: bool,
              reps: int) -> dict[str, tuple[float, float]]:
    """Median ``(wall, cpu)`` seconds of each part of ``register()``, run the way it runs them.

    Setup parts (once per registration): ``normalise`` (percentile normalisation of both
    images), ``resample`` (both onto the network grid). Step parts: ``act`` (planner + actor),
    ``compose`` (clamp + composition: one field warp), ``warp`` (the moving image by the
    accumulated field), ``local_ncc`` (window 9), ``jacobian`` (determinant + folding
    percentage). For reference, ``act_channels_last``: the same forward with
    ``channels_last(_3d)`` inputs and weights, a layout the networks do not use today.
    """
    import torch
    from steprl import spatial
    from steprl.geometry import Geometry
    from steprl.metrics import local_ncc
    from steprl.preprocess import normalise_percentile

    nd = fixed_arr.ndim
    geometry = Geometry(fixed_arr.shape, (1.0,) * nd, (0.0,) * nd, np.eye(nd))
    net = geometry.resized(spac.grid)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None].to(dev)

    state_f, state_m = tensor(normalise_percentile(fixed_arr)), tensor(normalise_percentile(moving_arr))
    state = torch.cat([state_f, state_m], dim=1)
    _, step = _act(spac, state, dev, bf16)
    gen = torch.Generator(device="cpu").manual_seed(0)
    u = (torch.rand(step.shape, generator=gen) - 0.5).to(dev)  # a non-trivial accumulated field
    max_step = spac.max_step
    out: dict[str, tuple[float, float]] = {}
    with torch.no_grad():
        out["normalise"] = _median_time(lambda: (normalise_percentile(fixed_arr), normalise_percentile(moving_arr)),
                                        dev, reps)
        out["resample"] = _median_time(lambda: (spatial.resample(state_f, geometry, net),
                                                spatial.resample(state_m, geometry, net)), dev, reps)
        out["act"] = _median_time(lambda: _act(spac, state, dev, bf16), dev, reps)
        out["compose"] = _median_time(lambda: spatial.compose(u, step.float().clamp(-max_step, max_step)), dev, reps)
        out["warp"] = _median_time(lambda: spatial.warp(state_m, u), dev, reps)
        out["local_ncc"] = _median_time(lambda: float(local_ncc(state_f, state_m, 9)), dev, reps)
        out["jacobian"] = _median_time(
            lambda: float((spatial.jacobian_determinant(u) <= 0).float().mean() * 100), dev, reps)
        fmt = torch.channels_last if nd == 2 else torch.channels_last_3d
        try:
            spac.policy.to(memory_format=fmt)
            state_cl = state.contiguous(memory_format=fmt)
            out["act_channels_last"] = _median_time(lambda: _act(spac, state_cl, dev, bf16), dev, reps)
        finally:
            spac.policy.to(memory_format=torch.contiguous_format)
    return out


def run_one(name: str, device: str, precision: str, steps: int, warmup_steps: int, workdir: Path | None,
            with_breakdown: bool, reps: int) -> dict:
    """Measure one row in this process; returns a JSON-able dict (see the module docstring)."""
    import torch
    from steprl.device import resolve_device
    from steprl.geometry import Geometry, Image
    from steprl.registration.model import load_spac
    from steprl.registration.networks import Critic

    dev = resolve_device(device)
    bf16 = precision == "bf16"
    row: dict = {"config": name, "device": device, "precision": precision, "steps": steps,
                 "threads": torch.get_num_threads()}
    with contextlib.ExitStack() as stack:
        if workdir is None or not _prepared(name, workdir):
            # Standalone --one run: prepare here (its generation then counts in the peak RSS).
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_spac_")))
            prepare(name, workdir)
            row["prepared_in_process"] = True
        fixed_arr = np.load(workdir / f"{name}_fixed.npy")
        moving_arr = np.load(workdir / f"{name}_moving.npy")
        spac = load_spac(workdir / f"spac_{name}.safetensors", dev)  # model load: not timed
    cfg = spac.config
    nd = cfg.ndim
    geometry = Geometry(cfg.grid, (1.0,) * nd, (0.0,) * nd, np.eye(nd))  # exactly the network grid
    fixed, moving = Image(fixed_arr, geometry), Image(moving_arr, geometry)
    # All tensors (load_spac freezes the policy, so a requires_grad count would say 0).
    row["params_policy"] = sum(p.numel() for p in spac.policy.parameters())
    row["params_critic"] = sum(p.numel() for p in Critic(cfg).parameters())
    if dev.type == "cuda":
        row["gpu"] = torch.cuda.get_device_name(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    row["rss_start_gib"] = _rss_now_gib()
    state = torch.from_numpy(np.stack([fixed_arr, moving_arr]))[None].to(dev)  # (1, 2, *S)

    # Baseline forward timed on both sides of the timed run, so slow drifts of a shared
    # machine's load hit both numbers of the ratio alike.
    _timed_register(spac, fixed, moving, dev, bf16, warmup_steps)  # warm-up run
    before = [_median_time(lambda: _act(spac, state, dev, bf16), dev, 1, warmup=False) for _ in range(reps)]
    row.update(_timed_register(spac, fixed, moving, dev, bf16, steps))
    after = [_median_time(lambda: _act(spac, state, dev, bf16), dev, 1, warmup=False) for _ in range(reps)]
    row["forward_s"] = statistics.median(w for w, _ in before + after)
    row["forward_cpu_s"] = statistics.median(c for _, c in before + after)
    row["overhead"] = row["step_s"] / row["forward_s"]
    row["overhead_cpu"] = row["step_cpu_s"] / row["forward_cpu_s"]
    row["peak_rss_gib"] = _common.peak_rss_gib()
    if dev.type == "cuda":
        row["peak_cuda_gib"] = torch.cuda.max_memory_allocated(dev) / GIB

    if bf16:  # fp32 reference in this same process, after the peaks above were recorded
        _timed_register(spac, fixed, moving, dev, False, warmup_steps)
        ref = _timed_register(spac, fixed, moving, dev, False, steps)
        row["fp32_same_process"] = ref
        row["speedup_vs_fp32"] = ref["step_s"] / row["step_s"]
        row["speedup_vs_fp32_cpu"] = ref["step_cpu_s"] / row["step_cpu_s"]
        row["speedup_vs_fp32_total"] = ref["total_s"] / row["total_s"]
    if with_breakdown:
        row["breakdown"] = breakdown(spac, fixed_arr, moving_arr, dev, bf16, reps)
    return row


# ------------------------------------------------------------------------------- reporting
def header() -> list[str]:
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    lines = [
        f"date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}",
        f"CPU: {_common.cpu_summary()}",
        f"load average at start (1/5/15 min): {load}",
    ]
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)}")
    else:
        lines.append("GPU: none (CUDA not available: cuda rows skipped)")
    return lines


def _target(row: dict) -> tuple[str, str]:
    """(target text, PASS/FAIL/'') of a row."""
    target = TARGETS.get((row["config"], row["device"]))
    if target is None or "error" in row:
        return "", ""
    seconds, rss = target
    text = f"<= {seconds:g} s" + (f", <= {rss:g} GiB RSS" if rss is not None else "")
    if row["steps"] != 20:
        return text, "n/a (targets are for 20 steps)"
    ok = row["total_s"] <= seconds and (rss is None or row["peak_rss_gib"] <= rss)
    return text, "PASS" if ok else "FAIL"


COLUMNS = [
    "config", "device", "threads", "prec", "params policy", "params critic", "ms/step", "CPU ms/step",
    "s/{steps} steps", "CPU s", "setup s", "warped s", "fwd ms", "overhead", "CPU overhead", "bf16 speed-up (CPU)",
    "faults/step", "peak RSS GiB", "start RSS GiB", "peak CUDA GiB", "target", "result",
]


def table(rows: list[dict], steps: int) -> list[list[str]]:
    """Table cells, one list per row (header first)."""
    out = [[c.replace("{steps}", str(steps)) for c in COLUMNS]]
    for r in rows:
        if "error" in r:
            out.append([r["config"], r["device"], "", r["precision"], *[""] * (len(COLUMNS) - 5),
                        f"ERROR: {r['error']}"])
            continue
        target, result = _target(r)
        speed = f"{r['speedup_vs_fp32']:.2f}x ({r['speedup_vs_fp32_cpu']:.2f}x)" if "speedup_vs_fp32" in r else ""
        cuda = f"{r['peak_cuda_gib']:.2f}" if "peak_cuda_gib" in r else ""
        out.append([
            r["config"], r["device"], str(r["threads"]), r["precision"],
            f"{r['params_policy']:,}", f"{r['params_critic']:,}",
            f"{r['step_s'] * 1e3:.1f}", f"{r['step_cpu_s'] * 1e3:.1f}",
            f"{r['total_s']:.2f}", f"{r['cpu_s']:.2f}", f"{r['setup_s']:.2f}", f"{r['warped_s']:.2f}",
            f"{r['forward_s'] * 1e3:.1f}", f"{r['overhead']:.2f}", f"{r['overhead_cpu']:.2f}", speed,
            f"{r['faults_per_step']:.0f}", f"{r['peak_rss_gib']:.2f}", f"{r['rss_start_gib']:.2f}", cuda,
            target, result,
        ])
    return out


def format_text(cells: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in cells[0]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    return "\n".join(lines)


SETUP_PARTS = ("normalise", "resample")
STEP_PARTS = ("act", "compose", "warp", "local_ncc", "jacobian")


def format_breakdowns(rows: list[dict]) -> list[str]:
    """The ``--breakdown`` timings, one block per row (wall and CPU medians, share of the step's CPU)."""
    lines = []
    for r in rows:
        b = r.get("breakdown")
        if not b:
            continue
        wall = sum(b[p][0] for p in STEP_PARTS)
        cpu = sum(b[p][1] for p in STEP_PARTS)
        lines.append(f"breakdown {r['config']} {r['device']} {r['precision']} (median wall / CPU s per call; "
                     f"step parts sum {wall:.3f} / {cpu:.3f} s, measured step {r['step_s']:.3f} / "
                     f"{r['step_cpu_s']:.3f} s)")
        for p in SETUP_PARTS:
            lines.append(f"  setup {p:11s} {b[p][0]:8.4f} / {b[p][1]:8.4f} s")
        for p in STEP_PARTS:
            lines.append(f"  step  {p:11s} {b[p][0]:8.4f} / {b[p][1]:8.4f} s  {100 * b[p][1] / cpu:5.1f} % of step CPU")
        if "act_channels_last" in b:
            cl = b["act_channels_last"]
            lines.append(f"  (act with channels_last: {cl[0]:.4f} / {cl[1]:.4f} s, "
                         f"{b['act'][1] / cl[1]:.2f}x CPU vs contiguous)")
    return lines


NOTES = [
    "ms/step: median over steps 2..N of one register() run (after a warm-up run of --warmup-steps); "
    "s/N steps: from the register() call to the last yielded step (setup and step 0 metrics included, model "
    "load excluded); setup s: the part before step 0 is yielded; warped s: the one access of the final "
    "result.warped (a lazy full-resolution warp, not in s/N steps).",
    "CPU columns: process CPU time (all threads) of the same spans. On an idle machine CPU ~ threads x wall for "
    "well-parallelised work; on a loaded one wall time inflates much more than CPU time, so CPU ratios are the "
    "steadier ones there.",
    "fwd ms: baseline, the same policy's bare forward (policy.act) on the same grid and precision, timed in the "
    "same process before and after the timed run; overhead = ms/step / fwd ms (what composition, warping, local "
    "NCC and the Jacobian add on top of the network).",
    "bf16 speed-up: fp32 ms/step / bf16 ms/step (CPU-time ratio in brackets), the fp32 run timed in the SAME "
    "process right after the bf16 one, after the bf16 row's peak memory was recorded.",
    "peak RSS: getrusage ru_maxrss of the row's own subprocess (torch import included; start RSS = RSS after "
    "imports, data and model load); peak CUDA: torch.cuda.max_memory_allocated.",
    "faults/step: minor page faults per yielded step of the timed run (fresh pages from the kernel for large "
    "temporaries; each costs CPU time to map and zero).",
    "params critic: ONE critic (SAC training uses two plus two target copies; inference uses none).",
    "target: on the wall time s/N steps (and peak RSS) of 3d128 rows; they assume N = 20.",
]


# ---------------------------------------------------------------------------------- driver
def _child(args: argparse.Namespace, name: str, device: str, precision: str, workdir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, device, precision, "--json",
           "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--reps", str(args.reps),
           "--workdir", str(workdir)]
    if args.breakdown:
        cmd.append("--breakdown")
    env = dict(os.environ)
    env.update(kv.split("=", 1) for kv in args.child_env)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(JSON_PREFIX):
            return json.loads(line[len(JSON_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return {"config": name, "device": device, "precision": precision, "error": tail[0][:200]}


def _wanted(items: Iterable[str], allowed: Iterable[str], what: str) -> list[str]:
    items, allowed = list(items), list(allowed)
    bad = [i for i in items if i not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {allowed}")
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), help=f"of {list(CONFIGS)}")
    p.add_argument("--devices", nargs="+", default=list(DEVICES), help="cpu and/or cuda (cuda skipped if absent)")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), help="fp32 and/or bf16 (autocast)")
    p.add_argument("--steps", type=int, default=20, help="policy steps per timed run (default 20)")
    p.add_argument("--warmup-steps", type=int, default=3, help="steps of the warm-up run (default 3)")
    p.add_argument("--reps", type=int, default=5, help="repetitions of the bare forward baseline (median)")
    p.add_argument("--breakdown", action="store_true", help="also time each part of one step")
    p.add_argument("--child-env", nargs="+", default=[], metavar="KEY=VALUE",
                   help="environment variables for the measuring subprocesses (e.g. allocator settings)")
    p.add_argument("--markdown", type=Path, help="also write the table as markdown to this file (atomic)")
    p.add_argument("--one", nargs=3, metavar=("CONFIG", "DEVICE", "PRECISION"), help="measure one row here")
    p.add_argument("--json", action="store_true", help="with --one: print the row as one JSON line")
    p.add_argument("--workdir", type=Path, help="with --one: folder with the prepared model and pair")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 1 or args.reps < 1:
        raise SystemExit("--steps, --warmup-steps and --reps must be >= 1")
    if any("=" not in kv for kv in args.child_env):
        raise SystemExit("--child-env takes KEY=VALUE pairs")

    if args.one:
        name, device, precision = args.one
        _wanted([name], CONFIGS, "config")
        _wanted([precision], PRECISIONS, "precision")
        from steprl.errors import StepRLError

        try:
            row = run_one(name, device, precision, args.steps, args.warmup_steps, args.workdir, args.breakdown,
                          args.reps)
        except StepRLError as exc:  # e.g. cuda asked for on a machine without it
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.json:
            print(JSON_PREFIX + json.dumps(row), flush=True)
        else:
            print(format_text(table([row], args.steps)))
            print("\n".join(format_breakdowns([row])))
        return 0

    import torch

    configs = _wanted(args.configs, CONFIGS, "config")
    devices = _wanted(args.devices, DEVICES, "device")
    precisions = _wanted(args.precisions, PRECISIONS, "precision")
    head = header()
    if args.child_env:
        head.append(f"subprocess environment: {' '.join(args.child_env)}")
    print("\n".join(head), flush=True)
    notes = []
    if "cuda" in devices and not torch.cuda.is_available():
        devices = [d for d in devices if d != "cuda"]
        notes.append("cuda rows skipped: CUDA is not available on this machine.")
        print(notes[-1], flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_spac_") as tmp:
        workdir = Path(tmp)
        for name in configs:
            prepare(name, workdir)
            for device in devices:
                for precision in precisions:
                    print(f"... {name} {device} {precision}", flush=True)
                    rows.append(_child(args, name, device, precision, workdir))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    head.append(f"load average at end (1/5/15 min): {load}")
    print(f"load average at end (1/5/15 min): {load}\n")
    if not rows:
        print("nothing to measure (no device left)")
        return 0
    cells = table(rows, args.steps)
    print(format_text(cells))
    extra = format_breakdowns(rows)
    if extra:
        print("\n" + "\n".join(extra))
    print("\n" + "\n".join(f"- {n}" for n in NOTES + notes))
    if args.markdown:
        md = ["# SPAC inference benchmark", "", *[f"- {h}" for h in head], "", format_markdown(cells), ""]
        if extra:
            md += ["```", *extra, "```", ""]
        md += [f"- {n}" for n in NOTES + notes] + [""]
        from steprl.atomic import write_text

        write_text(args.markdown, "\n".join(md))
        print(f"\nwrote {args.markdown}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
