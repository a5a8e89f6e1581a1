"""Device choice, mixed precision and seeding, decided at run time (CPU and CUDA alike).

Precision policy (see DESIGN.md, performance notes):

- Training (:func:`autocast` with ``enabled=None``): bf16 autocast on CUDA when the GPU supports
  it (Ampere and newer); on CPU it is OFF by default, because the measured training speed-up on
  CPU is small (0.99x-1.14x for SPAC updates) and a flag (``--bf16``) decides.
- Inference (:func:`default_inference_bf16`): bf16 on CUDA with support and on CPUs that compute
  bf16 natively (oneDNN's own test: AVX512-BF16 or AMX); fp32 elsewhere, where bf16 is several
  times slower. Measured on a 2-core AVX512-BF16 CPU: the PixelDRL network 3.2x faster, the 3D
  SPAC policy's forward pass 2.8x faster. Every command exposes ``--bf16 / --no-bf16``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import re

import numpy as np
import torch

from steprl.errors import InputError

logger = logging.getLogger(__name__)

_CUDA_NAME = re.compile(r"^(?:cuda|gpu)(?::(\d+))?$")


def _cuda_unavailable_reason() -> str:
    """What was detected when CUDA cannot be used, in words."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    return f"this torch ({torch.__version__}, CUDA {torch.version.cuda}) found no usable NVIDIA GPU or driver"


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn a user's device choice into a ``torch.device``.

    Args:
        name: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
            ``"gpu"`` (same as ``"cuda"``), or a ``torch.device``.

    Raises:
        InputError: CUDA asked for but not available (saying what was detected), a GPU index
            that does not exist, or an unknown name.
    """
    if isinstance(name, torch.device):
        name = str(name)
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA_NAME.match(text)
    if match is None:
        raise InputError(f"Unknown device {name!r}.", "Use auto, cpu, cuda or cuda:N.")
    if not torch.cuda.is_available():
        raise InputError(
            f"Device {name!r} asked for, but CUDA is not available: {_cuda_unavailable_reason()}.",
            "Use the device 'cpu' (or 'auto'), or install a CUDA build of torch and the NVIDIA driver.",
        )
    if match.group(1) is None:
        return torch.device("cuda")
    index = int(match.group(1))
    count = torch.cuda.device_count()
    if index >= count:
        raise InputError(
            f"Device {name!r} asked for, but only {count} CUDA device(s) were found (cuda:0..cuda:{count - 1}).",
            "Choose an existing GPU index, or 'cuda' for the first one.",
        )
    return torch.device("cuda", index)


def list_devices() -> list[tuple[str, str]]:
    """``(value, label)`` pairs for a device selector: the value goes to :func:`resolve_device`."""
    devices = [("cpu", f"CPU ({torch.get_num_threads()} threads)")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append((f"cuda:{i}", f"CUDA {i}: {props.name} ({props.total_memory / 2**30:.0f} GiB)"))
    return devices


def describe_devices() -> list[str]:
    """Human labels of the usable devices, e.g. ``["CPU (8 threads)", "CUDA 0: NVIDIA H100 (79 GiB)"]``."""
    return [label for _, label in list_devices()]


def bf16_supported(device: str | torch.device) -> bool:
    """Whether bf16 autocast is available on ``device`` (on CPU: available, not necessarily fast)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return dev.type == "cpu"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's test: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - other torch builds
        return False


def default_inference_bf16(device: str | torch.device) -> bool:
    """Whether inference autocasts to bf16 by default on ``device`` (the module docstring's policy)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bf16_supported(dev)
    return dev.type == "cpu" and cpu_has_fast_bf16()


def autocast(device: str | torch.device, enabled: bool | None = None) -> contextlib.AbstractContextManager:
    """A bf16 autocast context for ``device``, or an fp32 one.

    Args:
        device: where the computation runs.
        enabled: None = the default policy (on for CUDA with bf16 support, off on CPU);
            True / False force it (True falls back to fp32, with a warning, where bf16 is
            not supported).

    Usage::

        with autocast(device):
            out = net(x)

    When disabled on CPU/CUDA the returned context actively disables autocast, so an outer
    autocast region does not leak into code that asked for fp32.
    """
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    if enabled is None:
        enabled = dev.type == "cuda" and bf16_supported(dev)
    if enabled and not bf16_supported(dev):
        logger.warning("bf16 autocast is not supported on %s: computing in fp32.", dev)
        enabled = False
    if enabled and dev.type == "cpu" and not cpu_has_fast_bf16():
        _warn_emulated_bf16()
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bool(enabled))


@functools.lru_cache(maxsize=1)
def _warn_emulated_bf16() -> None:
    """Once per process: bf16 asked for on a CPU that only emulates it. Measured on a 2-core AVX2 CPU
    (no AVX512-BF16): a pixeldrl_wm training epoch (20 updates) did not finish in 27 minutes with
    ``--bf16``, against 3 minutes in fp32; the request is kept (the user asked), the cost is said."""
    logger.warning("bf16 was asked for, but this CPU has no native bf16 (AVX512-BF16 or AMX): torch emulates it, "
                   "several times slower than fp32. Drop --bf16 (or pass --no-bf16) on this machine.")


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and every CUDA device).

    Learners that keep their own ``numpy.random.Generator`` seed it themselves.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices (lazily)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
