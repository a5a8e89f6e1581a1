"""PixelDRL-MG inference speed and memory: ``steprl.segmentation.inference.segment()`` end to end.

Why a script and not a test: the machines are shared and noisy, so speed and memory are
measured here and reported with ratios against baselines timed in the SAME process; nothing
is asserted. Targets (issue 3): a 240 x 240 x 155 volume in <= 60 s on the 2-core CPU, <= 2 s
on an H100; one 256 x 256 slice x 10 steps is measured.

One row = one configuration (case x network grid x fusion x device x precision), measured in
a fresh subprocess so its peak RSS is its own:

- a randomly initialised PixelDRL-MG of the paper's widths (32/64/128/256, heads 64/128/256;
  the cost does not depend on the weights) saved as a model file in a temporary folder and
  loaded once (not timed);
- the case, prepared by the parent as ``.npy`` (its generation does not count in the peak):
  ``slice256`` one 256 x 256 noisy-ellipse slice; ``vol240`` 155 slices of 240 x 240
  (1 mm) with an object in every slice and no constant slice (the worst case: nothing skipped);
  ``brats`` the FLAIR volume of BraTS 2013 pat0003 (only with ``../shared/data``; its
  constant slices outside the brain are skipped, as in real use);
- a warm-up ``segment()`` on a few slices, then the timed ``segment()`` of 10 steps: the total
  from the call to the last yielded step (normalisation, slicing, resampling both ways and
  the masks of every step on the input grid included, model load excluded), the time to
  the first yield (step 0), and the process CPU time of the same span;
- baselines in the same process (fastest of 3 after a warm-up): ``net`` = the bare network
  cost of the same work (``encode`` + 10 ``decide`` per slice, batched as ``segment``
  batches them, random input),
  so ``total / net`` is the pipeline's overhead; and ``paper`` = ONE forward (policy head) of
  the paper's reading (mask at the input, ``fusion="input"``) on one 256 x 256 slice in the
  row's precision; ``speed-up = slices x 10 x paper / total`` compares with running the
  paper's network at full resolution, slice by slice, 10 times;
- peak RSS (``getrusage``), and on CUDA ``torch.cuda.max_memory_allocated``.

Usage::

    python trainer/benchmarks/bench_pixeldrl_speed.py                 # default rows, cpu (+ cuda)
    python trainer/benchmarks/bench_pixeldrl_speed.py --rows vol240:128:late:bf16 slice256:256:input:fp32
    python trainer/benchmarks/bench_pixeldrl_speed.py --markdown out.md
    python trainer/benchmarks/bench_pixeldrl_speed.py --one vol240:128:late:bf16 cpu --json   # one row, here

A row is ``CASE:SIZE:FUSION:PRECISION``. Children run with ``OMP_WAIT_POLICY=PASSIVE`` (as the
``steprl`` CLI does) unless ``--child-env`` says otherwise; torch's thread count is left at its
default and printed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import numpy as np

DEFAULT_ROWS = (
    "slice256:128:late:fp32", "slice256:128:late:bf16", "slice256:256:late:bf16", "slice256:256:input:fp32",
    "vol240:128:late:fp32", "vol240:128:late:bf16", "vol240:96:late:bf16", "vol240:128:input:bf16",
    "brats:128:late:bf16",
)
STEPS = 10
JSON_PREFIX = "BENCH_JSON "
GIB = 2.0**30
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "brats2013"
TARGETS = {("vol240", "cpu"): 60.0, ("vol240", "cuda"): 2.0}


# ------------------------------------------------------------------------------ preparation
def prepare(folder: Path) -> None:
    """Write the cases (``.npy``) and the default-width models (one per grid and fusion) into ``folder``."""
    from steprl.synth.toy import noisy_ellipse

    rng = np.random.default_rng(0)
    np.save(folder / "slice256.npy", noisy_ellipse((256, 256), rng)[0])
    base = [noisy_ellipse((240, 240), rng)[0] for _ in range(8)]
    np.save(folder / "vol240.npy", np.stack([base[k % 8] for k in range(155)]).astype(np.float32))
    brats = SHARED / "brats_2013_pat0003_1" / "Flair_subtrMeanDivStd.nii.gz"
    if brats.is_file():
        from steprl import io

        np.save(folder / "brats.npy", io.read_image(brats).array)


def _model(folder: Path, size: int, fusion: str) -> Path:
    """A random PixelDRL-MG model file of the paper's widths for this grid (created on first use)."""
    import torch
    from steprl.modelfile import save_model
    from steprl.segmentation.config import PixelDRLConfig
    from steprl.segmentation.networks import PixelDRLNet

    path = folder / f"model_{size}_{fusion}.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        net = PixelDRLNet(PixelDRLConfig(fusion=fusion))
        card = {"method": "pixeldrl-mg", "ndim": 2, "config": net.cfg.to_dict(),
                "inference": {"size": [size, size], "steps": STEPS, "allow_revival": True}}
        save_model(path, net.state_dict(), card)
    return path


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _best_of(fn, reps: int) -> float:
    """The fastest of ``reps`` timed calls after one warm-up (on a shared machine the minimum is the signal)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# ------------------------------------------------------------------------------------ a row
def run_one(row: str, device: str, workdir: Path) -> dict:
    """Measure one row in this process (see the module docstring)."""
    import torch
    from steprl.device import autocast, resolve_device
    from steprl.geometry import Geometry, Image
    from steprl.segmentation.config import PixelDRLConfig
    from steprl.segmentation.inference import segment
    from steprl.segmentation.model import load_segmenter
    from steprl.segmentation.networks import PixelDRLNet

    case, size, fusion, precision = row.split(":")
    size = int(size)
    dev = resolve_device(device)
    bf16 = precision == "bf16"
    array = np.load(workdir / f"{case}.npy")
    spacing = (1.0,) * array.ndim
    image = Image(array, Geometry(array.shape, spacing, (0.0,) * array.ndim, np.eye(array.ndim)))
    loaded = load_segmenter(_model(workdir, size, fusion))
    start_rss = _common.peak_rss_gib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    middle = array[len(array) // 2 - 2 : len(array) // 2 + 2] if array.ndim == 3 else array  # not constant
    warm = Image(middle, Geometry(middle.shape, spacing, (0.0,) * array.ndim, np.eye(array.ndim)))
    for _ in segment(warm, loaded, 2, dev, bf16=bf16):
        pass
    _common.sync(dev)
    t0, c0 = time.perf_counter(), _cpu()
    first = None
    for _ in segment(image, loaded, STEPS, dev, bf16=bf16):
        if first is None:
            first = time.perf_counter() - t0
    _common.sync(dev)
    total, cpu_total = time.perf_counter() - t0, _cpu() - c0
    n_slices = 1 if array.ndim == 2 else array.shape[0]
    segmented = n_slices - int(sum(np.ptp(s) == 0 for s in (array[None] if array.ndim == 2 else array)))

    # baseline 1: the bare network for the same work (encode + STEPS decides per slice, batches of 16)
    net = loaded.net
    batch = min(16, segmented)
    x = torch.rand(batch, 1, size, size, device=dev)
    mask = torch.ones_like(x)
    if dev.type == "cpu" and bf16:
        x, mask = (t.contiguous(memory_format=torch.channels_last) for t in (x, mask))

    def network_work():
        with torch.no_grad(), autocast(dev, bf16):
            encoded = net.encode(x, with_value=False)
            for _ in range(STEPS):
                net.decide(encoded, mask, with_value=False)
        _common.sync(dev)

    net_per_slice = _best_of(network_work, 3) / batch

    # baseline 2: one forward of the paper's reading (mask at the input) on one 256 x 256 slice
    paper = PixelDRLNet(PixelDRLConfig(fusion="input")).to(dev).eval()
    state = torch.rand(1, 2, 256, 256, device=dev)

    def paper_forward():
        with torch.no_grad(), autocast(dev, bf16):
            paper(state, with_value=False)
        _common.sync(dev)

    paper_fwd = _best_of(paper_forward, 3)
    out = {
        "row": row, "case": case, "size": size, "fusion": fusion, "precision": precision, "device": str(dev),
        "threads": torch.get_num_threads(), "slices": n_slices, "segmented_slices": segmented,
        "total_s": total, "first_yield_s": first, "cpu_s": cpu_total,
        "net_s": net_per_slice * segmented, "overhead": total / max(net_per_slice * segmented, 1e-9),
        "paper_fwd_s": paper_fwd, "speedup_vs_paper": n_slices * STEPS * paper_fwd / total,
        "peak_rss_gib": _common.peak_rss_gib(), "start_rss_gib": start_rss,
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    if dev.type == "cuda":
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
    return out


# --------------------------------------------------------------------------------- reporting
def header() -> list[str]:
    import torch
    from steprl.device import cpu_has_fast_bf16

    lines = [f"date {_dt.datetime.now().isoformat(timespec='seconds')}  torch {torch.__version__}  "
             f"threads {torch.get_num_threads()}  CPU bf16 native: {cpu_has_fast_bf16()}"]
    lines.append(f"machine {_common.cpu_model()}  load average "
                 f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}  cores {os.cpu_count()}")
    if torch.cuda.is_available():
        lines.append(f"cuda {torch.cuda.get_device_name(0)}")
    return lines


COLUMNS = [("row", "row", "{}"), ("device", "device", "{}"), ("segmented_slices", "slices", "{}"),
           ("total_s", "total s", "{:.2f}"), ("first_yield_s", "step0 s", "{:.2f}"), ("cpu_s", "CPU s", "{:.1f}"),
           ("net_s", "net s", "{:.2f}"), ("overhead", "total/net", "{:.2f}"),
           ("paper_fwd_s", "paper fwd s", "{:.3f}"), ("speedup_vs_paper", "speed-up", "{:.0f}x"),
           ("peak_rss_gib", "peak RSS GiB", "{:.2f}"), ("peak_cuda_gib", "peak CUDA GiB", "{:.2f}"),
           ("target", "target", "{}")]


def _with_target(row: dict) -> dict:
    target = TARGETS.get((row["case"], row["device"].split(":")[0]))
    if target is not None:
        row = {**row, "target": f"<= {target:g} s: {'met' if row['total_s'] <= target else 'MISSED'}"}
    return row


def table(rows: list[dict], markdown: bool = False) -> str:
    rows = [_with_target(r) for r in rows]
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    cells = [[t for _, t, _ in cols]] + [[f.format(r[k]) if k in r else "-" for k, _, f in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "---|" * len(cols))
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _child(row: str, device: str, workdir: Path, env: dict) -> dict | str:
    cmd = [sys.executable, __file__, "--one", row, device, "--json", "--workdir", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(JSON_PREFIX):
            return json.loads(line[len(JSON_PREFIX):])
    return f"{row} on {device} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), help="CASE:SIZE:FUSION:PRECISION")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--one", nargs=2, metavar=("ROW", "DEVICE"), help="measure one row in this process")
    parser.add_argument("--json", action="store_true", help="with --one: print the row as JSON")
    parser.add_argument("--workdir", type=Path, help="prepared cases and models (default: a temporary folder)")
    parser.add_argument("--child-env", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--markdown", type=Path, help="also write the table as markdown")
    args = parser.parse_args(argv)

    if args.one:
        workdir = args.workdir
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="bench_pixeldrl_"))
            prepare(workdir)
        result = run_one(args.one[0], args.one[1], workdir)
        print(JSON_PREFIX + json.dumps(result) if args.json else table([result]))
        return 0

    import torch

    devices = [d for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    skipped = [d for d in args.devices if d not in devices]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    env.update(kv.split("=", 1) for kv in args.child_env)
    print("\n".join(header()))
    if skipped:
        print(f"skipped devices: {', '.join(skipped)} (CUDA not available)")
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="bench_pixeldrl_") as tmp:
        workdir = Path(tmp)
        prepare(workdir)
        for spec in args.rows:
            if spec.startswith("brats") and not (workdir / "brats.npy").is_file():
                print(f"skipped {spec}: {SHARED} not found")
                continue
            for device in devices:
                outcome = _child(spec, device, workdir, env)
                (rows if isinstance(outcome, dict) else failures).append(outcome)
                if isinstance(outcome, dict):
                    print(f"  {spec} {device}: {outcome['total_s']:.2f} s", flush=True)
    text = table(rows)
    print(text)
    for failure in failures:
        print(failure)
    if args.markdown:
        from steprl.atomic import atomic_path

        with atomic_path(args.markdown) as tmp_path:
            Path(tmp_path).write_text("\n".join(header()) + "\n\n" + table(rows, markdown=True) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
