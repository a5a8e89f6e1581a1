"""What the benchmark scripts share: the CPU's name, CUDA-exact timing, peak memory, markdown tables.

The scripts run as ``python trainer/benchmarks/NAME.py`` (their folder is then on ``sys.path``),
so each imports this module as ``import _common``.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time

GIB = 2.0**30


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_summary() -> str:
    """The CPU's model, logical CPU count and bf16 flags (bf16 is fast only with AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    except OSError:
        flags = set()
    bf = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs; bf16 flags: {', '.join(bf) or 'none'})"


def sync(dev) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a clock read is exact."""
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_rss_gib() -> float:
    """Peak RSS of this process so far (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / GIB if sys.platform == "darwin" else peak * 1024 / GIB


def markdown_table(headers: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """A markdown table's lines: the first ``left`` columns left-aligned, the others right-aligned."""
    rule = "|" + "|".join("---" if i < left else "---:" for i in range(len(headers))) + "|"
    return ["| " + " | ".join(headers) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows)]


#: runs its arguments as a command and prints that command's own peak RSS (KiB) as its last stderr line
RSS_WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def run_child(argv: list[str], threads: int) -> tuple[float, float, str]:
    """Run a command in a fresh process on ``threads`` threads (torch and ITK); returns (wall seconds,
    its peak RSS in GiB, its stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *argv], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return wall, int(done.stderr.strip().splitlines()[-1]) / 2**20, done.stdout


def publish(lines: list[str], path) -> int:
    """Write a report's ``lines`` to ``path`` (atomically) and print them; the script's exit code (0)."""
    from steprl.atomic import write_text

    text = "\n".join(lines)
    write_text(path, text)
    print(text)
    return 0
