"""A fixed-size replay buffer of SPAC transitions ``(s, z, r, s', done)``.

States are image pairs, so they dominate memory: they are stored in float16 on the CPU
(``2 * prod(S) * 2`` bytes per state; a 128^3 state is 8 MiB, so keep ``capacity`` modest in
3D) and moved to the learner's device per sampled batch.
"""

from __future__ import annotations

import numpy as np
import torch


class ReplayBuffer:
    """Ring buffer. ``add`` takes batched tensors (any device); ``sample`` returns tensors on ``device``."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("replay capacity must be >= 1")
        self.capacity = capacity
        self.items: list[tuple[torch.Tensor, ...]] = []
        self.next = 0

    def __len__(self) -> int:
        return len(self.items)

    def add(self, state: torch.Tensor, plan: torch.Tensor, reward: torch.Tensor, next_state: torch.Tensor,
            done: bool) -> None:
        """Add a batch: states ``(B, 2, *S)``, plans ``(B, P)``, rewards ``(B,)``."""
        d = torch.full((state.shape[0],), float(done))
        for row in zip(state.detach().half().cpu(), plan.detach().float().cpu(), reward.detach().float().cpu(),
                       next_state.detach().half().cpu(), d):
            if len(self.items) < self.capacity:
                self.items.append(row)
            else:
                self.items[self.next] = row
            self.next = (self.next + 1) % self.capacity

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Stacked contents for a checkpoint (empty dict when empty)."""
        if not self.items:
            return {}
        return {f"replay.{name}": torch.stack(col).contiguous()
                for name, col in zip(("state", "plan", "reward", "next_state", "done"), zip(*self.items))}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`to_tensors`."""
        if "replay.state" not in tensors:
            self.items = []
            return
        cols = [tensors[f"replay.{n}"] for n in ("state", "plan", "reward", "next_state", "done")]
        self.items = [tuple(c[i] for c in cols) for i in range(cols[0].shape[0])]

    def sample(self, n: int, rng: np.random.Generator, device) -> tuple[torch.Tensor, ...]:
        """``n`` transitions drawn uniformly: ``(s, z, r, s2, done)`` with ``r``/``done`` ``(n,)``."""
        idx = rng.integers(0, len(self.items), size=n)
        cols = zip(*(self.items[i] for i in idx))
        s, z, r, s2, d = (torch.stack(c).to(device) for c in cols)
        return s.float(), z, r, s2.float(), d
