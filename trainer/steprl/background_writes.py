"""Writing output files on one background thread while the registration computes the next step.

Why: ``steprl register`` writes one displacement field per step (the Slicer slider's), about
0.1 s each for a 160x192x144 volume, which is most of a policy step's time. SimpleITK releases
Python's GIL while it compresses and writes, so one writer thread overlaps the writing with
the next step's computation. Files are written in submission order; at most ``max_pending``
wait (each holds its array in memory). The first failure is raised, at the next submission or
on leaving the ``with`` block, so an error is never lost; leaving waits for every write.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class BackgroundWrites:
    """``with BackgroundWrites() as writes: writes.submit(io.write_image, image, path)``."""

    def __init__(self, max_pending: int = 2) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.max_pending = max_pending
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    def __enter__(self) -> BackgroundWrites:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steprl-writer")
        return self

    def submit(self, write: Callable, *args, **kwargs) -> None:
        """Queue ``write(*args, **kwargs)``; blocks while ``max_pending`` writes wait, raising a failed one's error."""
        if self._pool is None:
            raise RuntimeError("BackgroundWrites.submit outside its 'with' block")
        while len(self._pending) >= self.max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(write, *args, **kwargs))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            while self._pending:
                future = self._pending.popleft()
                if exc_type is not None:  # already failing: drop what has not started, keep that error
                    future.cancel()
                    continue
                future.result()  # raises the first failed write's error
        finally:
            self._pool.shutdown(wait=True)
            self._pool = None
