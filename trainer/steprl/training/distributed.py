"""Data parallelism that runs unchanged as one process or under ``torchrun``.

Every rank runs the same learner on its own episodes (seed it with ``seed + rank``), and
before each optimiser step the learner calls :func:`average_gradients` on the parameters that
optimiser updates. Averaging the gradients over ranks before an identical optimiser step is
what ``DistributedDataParallel`` does (it overlaps the all-reduce with the backward pass;
here it runs after it). We do it by hand because an RL learner has several networks and
optimisers updated from different losses at different times (SAC: actor, twin critics,
temperature, plus target networks that are never stepped); one DDP wrapper per network, each
with its own forward-call bookkeeping and unused-parameter rules, is awkward and error prone,
whereas "average, then step" is one line per optimiser and obviously correct.

Ranks start identical (:func:`broadcast_parameters` from rank 0) and stay identical because
they apply identical averaged gradients with identical optimisers.

Backends: ``gloo`` on CPU, ``nccl`` on CUDA (one GPU per process, ``cuda:LOCAL_RANK``).
Nothing here pickles (no ``*_object`` collectives): RNG states travel as bytes tensors.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from steprl.device import resolve_device
from steprl.errors import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands.

    Attributes:
        rank: global rank, 0..world_size-1.
        world_size: number of processes (1 when not distributed).
        local_rank: rank on this machine (the GPU index under CUDA).
        device: the device this process computes on.
        is_main: True on rank 0, the only rank that writes files and logs progress.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def single_process(device_preference: str | torch.device = "auto") -> DistInfo:
    """A :class:`DistInfo` for a plain, non-distributed run."""
    return DistInfo(rank=0, world_size=1, local_rank=0, device=resolve_device(device_preference), is_main=True)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError as exc:
        raise InputError(f"Environment variable {name}={value!r} is not an integer.", "Launch with torchrun.") from exc


def init_distributed(device_preference: str | torch.device = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun (``WORLD_SIZE`` > 1), else run alone.

    Under torchrun the device type comes from ``device_preference`` and the index from
    ``LOCAL_RANK`` (one GPU per process); the backend is nccl for CUDA, gloo for CPU.

    Raises:
        InputError: torch.distributed missing, CUDA asked for but absent, or fewer GPUs on
            this machine than processes.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return single_process(device_preference)
    if not torch_dist.is_available():
        raise InputError(
            "Launched with several processes, but this torch build has no torch.distributed.",
            "Run a single process, or install a torch build with distributed support.",
        )
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_preference)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise InputError(
                f"Process with local rank {local_rank} needs its own GPU, but this machine has {count}.",
                "Start at most one process per GPU (torchrun --nproc_per_node), or use --device cpu.",
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    logger.info("Rank %d/%d on %s (backend %s)", rank, world_size, device, backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_main=rank == 0)


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def _collective_device() -> torch.device:
    """Device that small helper tensors must live on for the current backend (nccl: the GPU)."""
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Replace each ``.grad`` by its mean over ranks (no-op in a single process).

    Call it after ``backward()`` and before ``optimizer.step()``, with the parameters that
    optimiser updates, in the same order on every rank (``module.parameters()`` is).

    A ``None`` gradient counts as zeros, so every rank runs the same collectives; a parameter
    whose gradient is None on EVERY rank keeps ``None`` (as in a single process, optimisers
    then skip it), otherwise every rank ends with the same averaged gradient. Gradients are
    packed into one buffer per dtype/device: two or three all-reduces per call, not one per tensor.
    """
    if not is_distributed():
        return
    params = list(parameters)
    if not params:
        return
    world = torch_dist.get_world_size()
    device = _collective_device()
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    torch_dist.all_reduce(present)
    used = [p for p, n in zip(params, present.tolist(), strict=True) if n > 0]
    groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for p in used:
        if p.grad is not None and p.grad.is_sparse:
            raise NotImplementedError("average_gradients does not support sparse gradients")
        groups.setdefault((p.dtype, p.device), []).append(p)
    for group in groups.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        torch_dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in group:
            chunk = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)


@torch.no_grad()
def broadcast_parameters(modules: Iterable[nn.Module] | dict[str, nn.Module]) -> None:
    """Copy every parameter and buffer of ``modules`` from rank 0 to all ranks (in place)."""
    if not is_distributed():
        return
    items = modules.values() if isinstance(modules, dict) else modules
    for module in items:
        for tensor in list(module.parameters()) + list(module.buffers()):
            torch_dist.broadcast(tensor.data, src=0)


def all_reduce_mean(value: float) -> float:
    """Mean of a Python number over ranks (for logged and validation metrics); identity alone."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    torch_dist.all_reduce(t)
    return float(t.item()) / torch_dist.get_world_size()


def all_agree(value: int) -> bool:
    """True when every rank passed the same integer (e.g. "I can see the checkpoint").

    Lets all ranks take the same decision, or all raise the same error, instead of one rank
    raising while the others wait forever in the next collective.
    """
    if not is_distributed():
        return True
    t = torch.tensor([int(value), -int(value)], dtype=torch.int64, device=_collective_device())
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return int(t[0]) == -int(t[1])


def all_gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's ``data``, in rank order (pickle-free ``all_gather_object`` for bytes)."""
    if not is_distributed():
        return [bytes(data)]
    device = _collective_device()
    world = torch_dist.get_world_size()
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch_dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    buffer = torch.zeros(longest, dtype=torch.uint8)
    if data:
        buffer[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buffer = buffer.to(device)
    gathered = [torch.zeros_like(buffer) for _ in range(world)]
    torch_dist.all_gather(gathered, buffer)
    return [g[: int(s.item())].cpu().numpy().tobytes() for g, s in zip(gathered, sizes, strict=True)]


def barrier() -> None:
    """Wait for all ranks (no-op alone)."""
    if is_distributed():
        torch_dist.barrier()


def cleanup() -> None:
    """Leave the process group (call once at the end of a torchrun script).

    Observed with torch 2.13 + gloo: in about 2% of runs a process aborts during interpreter
    shutdown, after this returned ("terminate called without an active exception"), which
    torchrun reports as a failure although all work was done. A script whose outputs are
    written may therefore end with ``sys.stdout.flush(); sys.stderr.flush(); os._exit(code)``.
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def exit_if_distributed(dist: DistInfo) -> None:
    """End a finished torchrun process at once (flushing output), see :func:`cleanup` for why.

    Call after :func:`cleanup`, once every output is written; a no-op in a single process.
    """
    if dist.distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
