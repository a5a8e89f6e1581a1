"""A toy learner for the training-infrastructure tests, and a torchrun script that trains it.

The toy: noisy linear regression ``y = x @ w_true + noise`` fitted by ``nn.Linear`` with Adam.
Data come from torch's global RNG, the noise scale from numpy's and python's, so a resume
that forgot any of the three RNG states would not be bit-identical.

Run under torchrun (the test does this with gloo on CPU)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 Testing/toy_ddp_train.py OUT

Each rank writes ``OUT/rank{r}.txt`` (JSON: weight hashes of a straight run and of a run
resumed after 2 of 3 epochs, and the gradient-averaging checks); rank 0 also writes the run
folders ``OUT/straight`` and ``OUT/resumed``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from steprl.training import distributed as tdist
from steprl.training.loop import fit
from torch import nn


class ToyLearner:
    """Linear regression learner implementing the ``steprl.training.loop.Learner`` protocol."""

    def __init__(self, dim: int = 4, lr: float = 0.05, batch: int = 16, width: int = 1) -> None:
        self.dim, self.batch = dim, batch
        self.net = nn.Linear(dim, width)
        self.w_true = torch.arange(1, dim + 1, dtype=torch.float32).reshape(dim, 1) / dim
        gen = torch.Generator().manual_seed(1234)  # fixed validation set, independent of training RNG
        self.val_x = torch.randn(64, dim, generator=gen)
        self.val_y = self.val_x @ self.w_true
        self.modules = {"net": self.net}
        self.optimizers = {"adam": torch.optim.Adam(self.net.parameters(), lr=lr)}
        self.updates = 0
        self.train_calls = 0

    def train_iteration(self, iteration: int) -> dict[str, float]:
        self.train_calls += 1
        x = torch.randn(self.batch, self.dim)
        scale = 0.1 * (1.0 + float(np.random.rand())) * (1.0 + 0.1 * random.random())
        y = x @ self.w_true + scale * torch.randn(self.batch, 1)
        loss = ((self.net(x)[:, :1] - y) ** 2).mean()
        opt = self.optimizers["adam"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        tdist.average_gradients(self.net.parameters())
        opt.step()
        self.updates += 1
        return {"loss": float(loss.item()), "noise": scale}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        mse = float(((self.net(self.val_x)[:, :1] - self.val_y) ** 2).mean())
        return {"score": -mse, "mse": mse}

    def end_epoch(self, epoch: int) -> None:
        for group in self.optimizers["adam"].param_groups:
            group["lr"] *= 0.9  # lives in the optimiser's param_groups: restored on resume

    def export_model(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.net.state_dict(), {"method": "toy", "ndim": 2, "config": {"dim": self.dim}}

    def state(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def load_state(self, d: dict[str, Any]) -> None:
        self.updates = int(d["updates"])


def weights_hash(module: nn.Module) -> str:
    """sha256 over the module's tensors (names and raw bytes): equal iff bit-identical."""
    digest = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def seed_rank(seed: int, rank: int) -> None:
    """Different data on every rank, reproducible."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def _gradient_checks(dist: tdist.DistInfo) -> dict[str, Any]:
    """average_gradients with a grad that is None on rank 0 only, and one that is None everywhere."""
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(2))
    c = nn.Parameter(torch.zeros(2))
    if dist.rank != 0:
        a.grad = torch.full((3,), 2.0 * dist.world_size / (dist.world_size - 1))
    c.grad = torch.full((2,), float(dist.rank))
    tdist.average_gradients([a, b, c])
    return {
        "a": a.grad.tolist() if a.grad is not None else None,
        "b": b.grad.tolist() if b.grad is not None else None,
        "c": c.grad.tolist() if c.grad is not None else None,
        "mean_rank": tdist.all_reduce_mean(float(dist.rank)),
    }


def main(out: Path) -> None:
    dist = tdist.init_distributed("cpu")
    try:
        config = {"lr": 0.05, "batch": 16}
        seed_rank(7, dist.rank)
        straight = ToyLearner()
        fit(straight, out / "straight", epochs=3, iterations_per_epoch=4, config=config, dist=dist,
            tensorboard=False, progress=False)

        seed_rank(7, dist.rank)
        first = ToyLearner()
        fit(first, out / "resumed", epochs=2, iterations_per_epoch=4, config=config, dist=dist,
            tensorboard=False, progress=False)
        seed_rank(99, dist.rank)  # the checkpoint's RNG states must replace these
        second = ToyLearner()
        fit(second, out / "resumed", epochs=3, iterations_per_epoch=4, config=config, dist=dist,
            tensorboard=False, progress=False)

        report = {
            "rank": dist.rank,
            "world_size": dist.world_size,
            "straight": weights_hash(straight.net),
            "resumed": weights_hash(second.net),
            "grads": _gradient_checks(dist),
        }
        (out / f"rank{dist.rank}.txt").write_text(json.dumps(report))
        tdist.barrier()
    finally:
        tdist.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # torch 2.13 + gloo sometimes aborts during interpreter shutdown, AFTER destroy_process_group
    # ("terminate called without an active exception", ~2% of runs on this machine): the work is
    # done and written, so leave without running the C++ static destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
