"""The whole default ``steprl register`` command on a 160x192x144 pair, against Elastix and ANTs SyN.

Issue 11's speed targets are for what a user runs: the command, end to end (reading, the
policy's 20 steps, the refinement steps if on by default, writing every output), on a
160x192x144 1 mm T1 pair on this CPU: <= 10 s wall, the policy's steps <= 3 s of it, the
refinement <= 5 s, peak RSS <= 3 GiB. Elastix (affine + B-spline) and ANTs SyN register the same
pair in the same run, on the same threads, so the ratios hold on a busy machine too.

The pair: MNI152 2009a T1 (nilearn) and Colin27 (``ch2bet``, Debian mricron-data), both
resampled onto 160x192x144 voxels of 1 mm centred on their brains (brain-extracted T1 of two
different subjects: the kind of pair the model is for).

    python trainer/benchmarks/bench_register_default.py [--model spac3d_brain] [--threads 2]

Writes ``results/bench_register_default_cpu.md``. Each command runs in its own subprocess
(its own peak RSS, from ``getrusage(RUSAGE_CHILDREN)`` in a one-child wrapper).
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
from _common import publish, run_child

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (144, 192, 160)  # array order (z, y, x) = 160 x 192 x 144 voxels in ITK's (x, y, z)


def make_pair(folder: Path, cache: Path) -> tuple[Path, Path]:
    """MNI152 (fixed) and Colin27 (moving) T1 on 160x192x144 grids of 1 mm centred on each brain."""
    import torch
    from compare_registration import mricron_templates, nilearn_data
    from steprl import io, spatial
    from steprl.geometry import Geometry, Image

    mni = io.read_image(nilearn_data() / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", name="MNI152 T1")
    colin = io.read_image(mricron_templates(cache, download=True) / "ch2bet.nii.gz", name="Colin27 brain T1")
    paths = []
    for name, image in (("fixed_mni152", mni), ("moving_colin27", colin)):
        g = image.geometry
        nz = np.argwhere(image.array > 0)
        a, b = g.tensor_index_to_physical()
        centre = a @ ((nz.min(0) + nz.max(0)) / 2.0) + b
        size_xyz = np.asarray(SHAPE[::-1], dtype=float)
        grid = Geometry(SHAPE, (1.0, 1.0, 1.0), tuple(centre - (size_xyz - 1) / 2), np.eye(3))
        data = torch.from_numpy(image.array.astype(np.float32))[None, None]
        out = spatial.resample(data, g, grid, padding="zeros")[0, 0].numpy()
        path = folder / f"{name}.nii.gz"
        io.write_image(Image(out, grid), path)
        paths.append(path)
    return paths[0], paths[1]


TOOL_SCRIPT = """
import sys, time, os
from steprl import io
from steprl.registration.baselines import run_baseline, set_tool_threads
set_tool_threads(int(sys.argv[4]))
fixed, moving = io.read_image(sys.argv[2]), io.read_image(sys.argv[3])
result = run_baseline(sys.argv[1], fixed, moving)
print(result.seconds)
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="spac3d_brain")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "steprl")
    p.add_argument("--tools", nargs="*", default=["elastix", "syn"], choices=["elastix", "syn"])
    p.add_argument("--out", type=Path, default=RESULTS / "bench_register_default_cpu.md")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fixed, moving = make_pair(folder, args.cache)
        steprl = [sys.executable, "-m", "steprl", "register", str(fixed), str(moving), "--model", args.model,
                  "--prealign", "--quiet"]
        runs = {"steprl register (default)": steprl + ["--out", str(folder / "default")],
                "steprl register --refine 0 (policy alone)": steprl + ["--refine", "0", "--out", str(folder / "p")]}
        for name, command in runs.items():
            wall, rss, _ = run_child(command, args.threads)
            metrics = json.loads((Path(command[-1]) / "metrics.json").read_text())
            steps = metrics["steps"]
            policy_end = next((s["seconds"] for s in reversed(steps) if s.get("kind") in ("policy", "input")), 0.0)
            first = steps[0]["seconds"]
            rows.append({"name": name, "wall": wall, "rss": rss, "setup": first, "policy": policy_end - first,
                         "refine": steps[-1]["seconds"] - policy_end, "engine": steps[-1]["seconds"],
                         "policy_steps": metrics.get("policy_steps"), "refine_steps": metrics.get("refine_steps")})
        for tool in args.tools:
            wall, rss, out = run_child([sys.executable, "-c", TOOL_SCRIPT, tool, str(fixed), str(moving),
                                        str(args.threads)], args.threads)
            rows.append({"name": tool, "wall": wall, "rss": rss, "engine": float(out.strip().splitlines()[-1])})
    default = rows[0]
    lines = ["# The default `steprl register` on a 160x192x144 pair, against Elastix and ANTs SyN", "",
             f"`python trainer/benchmarks/bench_register_default.py --model {args.model} --threads {args.threads}`; "
             f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads for every method, load average "
             f"{os.getloadavg()[0]:.2f} at the end. Pair: MNI152 2009a T1 (fixed) and Colin27 `ch2bet` (moving), "
             "each on 160x192x144 voxels of 1 mm around its brain. Wall: the whole command in a fresh process "
             "(Python start, imports, reading, writing included); engine: the registration itself.", "",
             "| command | wall s | engine s | set-up + affine s | policy s | refinement s | peak RSS GiB | "
             "default is x faster (wall) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["wall"] / default["wall"]
        lines.append(f"| {r['name']} | {r['wall']:.1f} | {r['engine']:.1f} | {r.get('setup', float('nan')):.1f} | "
                     f"{r.get('policy', float('nan')):.2f} | {r.get('refine', float('nan')):.2f} | {r['rss']:.2f} | "
                     f"{ratio:.1f}x |")
    lines += ["", f"Targets (issue 11): whole default command <= 10 s wall: **{default['wall']:.1f} s**; the policy's "
              f"{default['policy_steps']} steps <= 3 s: **{default['policy']:.2f} s**; refinement "
              f"({default['refine_steps']} steps) <= 5 s: **{default['refine']:.2f} s**; peak RSS <= 3 GiB: "
              f"**{default['rss']:.2f} GiB**.", ""]
    return publish(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
