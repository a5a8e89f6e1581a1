"""The whole default ``steprl segment`` command on a 256x256x180 whole-head T1, against Otsu and Atropos.

Issue 12's speed target is for what a user runs: the command, end to end (Python start,
reading, the grey / white level matching's first pass, the policy's 10 steps on every slice, the
native-resolution border, writing every output), on a 256x256x180 T1 volume on this CPU: <= 15 s
wall. The intensity baselines of :mod:`steprl.segmentation.baselines` (4-class Otsu and ANTs
Atropos 3-class, inside the brain mask) run on the same volume in the same run, each as a fresh
process on the same threads, so the ratios hold on a busy machine too.

The volume: Colin27's whole-head T1 (``ch2.nii.gz``, Debian mricron-data, 181x217x181 at 1 mm)
placed in a 256x256x180 grid of 1 mm around its centre (zero margin; 1 slice cut at each end);
the baselines get ``ch2bet``'s nonzero voxels as the brain mask, carried the same way.

    python trainer/benchmarks/bench_segment_command.py [--model pixeldrl_wm] [--threads 2]

Writes ``results/bench_segment_command_cpu.md``; each command's peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import cpu_summary, publish, run_child

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (180, 256, 256)  # array order (z, y, x): 256 x 256 x 180 voxels in ITK's (x, y, z)


def make_volume(folder: Path, cache: Path) -> tuple[Path, Path]:
    """Colin27's whole-head T1 and its brain mask on the 256x256x180 grid (files in ``folder``)."""
    from compare_registration import mricron_templates
    from steprl import io
    from steprl.geometry import Geometry, Image

    templates = mricron_templates(cache, download=True)
    head = io.read_image(templates / "ch2.nii.gz", name="Colin27 T1")
    brain = io.read_image(templates / "ch2bet.nii.gz", name="Colin27 brain").array != 0
    out = [np.zeros(SHAPE, dtype=np.float32), np.zeros(SHAPE, dtype=np.uint8)]
    src = [slice(max(0, (n - m) // 2), max(0, (n - m) // 2) + min(n, m)) for n, m in zip(head.array.shape, SHAPE)]
    dst = [slice(max(0, (m - n) // 2), max(0, (m - n) // 2) + min(n, m)) for n, m in zip(head.array.shape, SHAPE)]
    out[0][tuple(dst)] = head.array[tuple(src)]
    out[1][tuple(dst)] = brain[tuple(src)]
    g = head.geometry  # the new grid's voxel 0 sits where the old grid's index (src - dst) is
    shift_xyz = np.array([a.start - b.start for a, b in zip(src, dst)][::-1], dtype=float)
    origin = np.asarray(g.origin) + np.asarray(g.direction) @ (np.asarray(g.spacing) * shift_xyz)
    grid = Geometry(SHAPE, g.spacing, tuple(origin), g.direction)
    paths = folder / "colin27_256x256x180.nii.gz", folder / "brain.nii.gz"
    for array, path in zip(out, paths):
        io.write_image(Image(array, grid), path)
    return paths


BASELINE_SCRIPT = """
import sys, time
from steprl import io
from steprl.segmentation.baselines import white_matter
image, brain = io.read_image(sys.argv[2]), io.read_image(sys.argv[3]).array != 0
start = time.perf_counter()
white_matter(sys.argv[1], image.array, brain, image.geometry.spacing)
print(time.perf_counter() - start)
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pixeldrl_wm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "steprl")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_segment_command_cpu.md")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        image, brain = make_volume(folder, args.cache)
        steprl = [sys.executable, "-m", "steprl", "segment", str(image), "--model", args.model, "--quiet"]
        runs = {"steprl segment (default)": [],
                "steprl segment --no-border": ["--no-border"],
                "steprl segment --no-border --no-match-levels": ["--no-border", "--no-match-levels"]}
        for k, (name, extra) in enumerate(runs.items()):
            out = folder / f"out{k}"
            wall, rss, _ = run_child(steprl + extra + ["--out", str(out)], args.threads)
            steps = json.loads((out / "metrics.json").read_text())["steps"]
            policy_end = next(s["seconds"] for s in reversed(steps) if s["stage"] in ("policy", "start"))
            rows.append({"name": name, "wall": wall, "rss": rss, "engine": steps[-1]["seconds"],
                         "policy": policy_end - steps[0]["seconds"], "border": steps[-1]["seconds"] - policy_end})
        for method in ("otsu", "atropos"):
            wall, rss, out = run_child([sys.executable, "-c", BASELINE_SCRIPT, method, str(image), str(brain)],
                                       args.threads)
            rows.append({"name": method, "wall": wall, "rss": rss, "engine": float(out.strip().splitlines()[-1])})
    default = rows[0]
    lines = ["# The whole `steprl segment` command on a 256x256x180 whole-head T1, against Otsu and Atropos", "",
             f"`python trainer/benchmarks/bench_segment_command.py --model {args.model} --threads {args.threads}`; "
             f"{cpu_summary()}, {platform.machine()}, {args.threads} threads for every method, load average "
             f"{os.getloadavg()[0]:.2f} at the end. Volume: Colin27's whole-head T1 on 256x256x180 voxels of 1 mm. "
             "Wall: the whole command in a fresh process (Python start, imports, reading, writing included); "
             "engine: the segmentation itself (steprl: first pass, policy, border; baselines: the classifier).", "",
             "| command | wall s | engine s | policy s | border s | peak RSS GiB | wall / default |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['wall']:.1f} | {r['engine']:.1f} | {r.get('policy', float('nan')):.2f} | "
                     f"{r.get('border', float('nan')):.2f} | {r['rss']:.2f} | {r['wall'] / default['wall']:.2f} |")
    lines += ["", f"Target (issue 12): the whole default command <= 15 s wall: **{default['wall']:.1f} s**.", ""]
    return publish(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
