"""Generic training infrastructure shared by the learners (SPAC, PixelDRL-MG).

- :mod:`~steprl.training.loop`: :func:`fit` drives epochs, validation, checkpoints, resume,
  logs and model export for any object implementing the :class:`Learner` protocol.
- :mod:`~steprl.training.checkpoint`: one-file, pickle-free, bit-exact-resume checkpoints.
- :mod:`~steprl.training.distributed`: data parallelism under torchrun (manual gradient averaging).
"""

from steprl.training.checkpoint import load_checkpoint, read_checkpoint_state, save_checkpoint
from steprl.training.distributed import (
    DistInfo,
    all_reduce_mean,
    average_gradients,
    barrier,
    broadcast_parameters,
    cleanup,
    init_distributed,
)
from steprl.training.loop import FitResult, Learner, fit

__all__ = [
    "DistInfo",
    "FitResult",
    "Learner",
    "all_reduce_mean",
    "average_gradients",
    "barrier",
    "broadcast_parameters",
    "cleanup",
    "fit",
    "init_distributed",
    "load_checkpoint",
    "read_checkpoint_state",
    "save_checkpoint",
]
