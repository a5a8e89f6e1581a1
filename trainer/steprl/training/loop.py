"""The generic training driver: epochs, validation, checkpoints, resume, logs, model export.

A learner (SPAC, PixelDRL-MG, ...) implements :class:`Learner`; :func:`fit` does the rest.
Files in ``out_dir`` (rank 0 writes them, each atomically)::

    config.json                     {"config": ..., "fit": {epochs, iterations_per_epoch, world_size}, ...}
    history.jsonl                   one line per finished epoch: train means + validation metrics
    checkpoints/last.safetensors    after every epoch: everything needed to continue
    checkpoints/best.safetensors    the epoch with the highest validation "score"
    model_last.safetensors / .json  modelfile format, loadable by inference
    model_best.safetensors / .json
    tensorboard/                    scalars (when tensorboard is installed)

Resume: with ``resume=True`` and an existing ``checkpoints/last.safetensors``, training
restores everything (weights, optimisers, RNGs, learner scalars) and continues at the next
epoch, bit-identically to an uninterrupted run on the same device and number of processes.
An interruption therefore loses at most the epoch in progress. ``last.safetensors`` is written
LAST at the end of an epoch: it is the commit point, so files written before it (best, models,
history) are redone identically if the epoch is redone.

Distributed (torchrun): every rank calls :func:`fit` with the same arguments; every rank runs
``train_iteration`` (learners call ``average_gradients`` before each optimiser step) and
``validate`` (its metrics are averaged over ranks; every rank must return the same keys);
only rank 0 writes files, logs progress and TensorBoard (the logged training scalars are
rank 0's own; only validation metrics are averaged). ``out_dir`` must be visible to every
rank for resuming (one machine, or a shared file system).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

import steprl
from steprl import modelfile
from steprl.atomic import write_text
from steprl.errors import CheckpointError
from steprl.jsonvalues import finite_json
from steprl.training import distributed as tdist
from steprl.training.checkpoint import (
    capture_rng_state,
    decode_rng_state,
    encode_rng_state,
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
)
from steprl.training.distributed import DistInfo

logger = logging.getLogger(__name__)

#: Config keys that may change between an interrupted run and its resumption: they do not
#: change what is learned epoch by epoch (more epochs, another output/device/logging choice).
#: Every other key of ``config`` must be equal, and so must ``iterations_per_epoch``.
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "epochs",
        "out",
        "out_dir",
        "output",
        "resume",
        "device",
        "progress",
        "tensorboard",
        "log_level",
        "verbose",
        "quiet",
        "num_workers",
        "workers",
    }
)

_tensorboard_warned = False


@runtime_checkable
class Learner(Protocol):
    """What :func:`fit` needs from a learner.

    Optional extras, used when present:

    - ``state() -> dict`` / ``load_state(d: dict) -> None``: the learner's own JSON-able
      scalars (episode counters, a numpy Generator's ``bit_generator.state``...).
    - ``state_tensors() -> dict[str, Tensor]`` / ``load_state_tensors(d) -> None``: tensors
      that are not in a module but must survive a resume (e.g. a replay buffer).

    Under torchrun, ``export_model``, ``state`` and ``state_tensors`` run on rank 0 only, so
    they must not call collectives; ``train_iteration``, ``validate`` and ``end_epoch`` run on
    every rank.
    """

    #: Everything to checkpoint (networks, target networks, a temperature wrapped in a module...).
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]

    def train_iteration(self, iteration: int) -> dict[str, float]:
        """One update (e.g. one episode); ``iteration`` counts from 0 over all epochs. Returns scalars to log."""
        ...

    def validate(self) -> dict[str, float]:
        """Validation metrics; must contain ``"score"`` (higher is better)."""
        ...

    def end_epoch(self, epoch: int) -> None:
        """Called after each epoch's validation (``epoch`` from 1), e.g. to step an LR schedule."""
        ...

    def export_model(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(state_dict, card)`` for :func:`steprl.modelfile.save_model` (card: method, ndim, config...)."""
        ...


@dataclass(frozen=True)
class FitResult:
    """Outcome of :func:`fit`. ``best_epoch`` is 0 and ``best_score`` -inf when no epoch finished."""

    best_score: float
    best_epoch: int
    epochs_done: int
    out_dir: Path


# ----------------------------------------------------------------------------------------- files
def print_result(result: FitResult, out: str | Path) -> None:
    """The last line of a ``steprl train`` command: the best validation score and where the model is."""
    print(f"best validation Dice {result.best_score:.4f} at epoch {result.best_epoch}; "
          f"model: {Path(out) / 'model_best.safetensors'}", file=sys.stdout)


def _jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples -> lists; Paths and other objects -> str)."""
    return json.loads(json.dumps(obj, default=str))


def _read_history(path: Path, before_epoch: int) -> list[dict[str, Any]]:
    """History lines of epochs < ``before_epoch`` (later ones belong to an epoch being redone)."""
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("epoch", before_epoch) < before_epoch:
            lines.append(entry)
    return lines


def _config_differences(saved: dict[str, Any], current: dict[str, Any], volatile: frozenset[str]) -> list[str]:
    """Human list of the config keys that differ (volatile ones ignored)."""
    keys = sorted((set(saved) | set(current)) - volatile)
    missing = object()
    return [
        f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
        for k in keys
        if saved.get(k, missing) != current.get(k, missing)
    ]


def _open_tensorboard(log_dir: Path, purge_step: int | None) -> Any:
    """A SummaryWriter, or None (warning once) when tensorboard is not installed."""
    global _tensorboard_warned
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _tensorboard_warned:
            logger.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard).")
            _tensorboard_warned = True
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


# ----------------------------------------------------------------------------------------- epoch
def _same_keys_everywhere(keys: Iterable[str]) -> bool:
    """Whether every rank has the same key set (checked before per-key all-reduces)."""
    digest = zlib.crc32("\n".join(sorted(keys)).encode("utf-8"))
    return tdist.all_agree(digest)


def _reduce_validation(metrics: dict[str, float], dist: DistInfo) -> dict[str, float]:
    if "score" not in metrics:
        raise ValueError(f"Learner.validate() must return a 'score' (higher is better), got keys {sorted(metrics)}")
    if dist.distributed and not _same_keys_everywhere(metrics):
        raise RuntimeError("Learner.validate() returned different metric names on different ranks")
    return {k: tdist.all_reduce_mean(float(metrics[k])) for k in sorted(metrics)}


def _train_epoch(
    learner: Learner, epoch: int, epochs: int, iterations: int, dist: DistInfo, writer: Any, progress: bool
) -> dict[str, float]:
    """Run one epoch of ``train_iteration``; return this rank's mean of each logged scalar."""
    from tqdm import tqdm

    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    running: float | None = None
    first = (epoch - 1) * iterations
    bar = tqdm(
        total=iterations,
        desc=f"epoch {epoch}/{epochs}",
        unit="it",
        disable=None if (progress and dist.is_main) else True,  # None: off when not a TTY
        leave=False,
        file=sys.stderr,
    )
    try:
        for i in range(iterations):
            step = first + i
            scalars = learner.train_iteration(step)
            for k, v in scalars.items():
                value = float(v)
                sums[k] = sums.get(k, 0.0) + value
                counts[k] = counts.get(k, 0) + 1
                if writer is not None:
                    writer.add_scalar(f"train/{k}", value, step + 1)
            shown = scalars.get("loss", next(iter(scalars.values()), None))
            if shown is not None and math.isfinite(float(shown)):
                running = float(shown) if running is None else 0.9 * running + 0.1 * float(shown)
                bar.set_postfix(loss=f"{running:.4g}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    return {k: sums[k] / counts[k] for k in sums}


def _gather_rng(dist: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG snapshot (rank order); collective, call on all ranks."""
    mine = capture_rng_state()
    if not dist.distributed:
        return [mine]
    return [decode_rng_state(b) for b in tdist.all_gather_bytes(encode_rng_state(mine))]


def _learner_state(learner: Learner) -> dict[str, Any]:
    getter = getattr(learner, "state", None)
    return _jsonable(getter()) if callable(getter) else {}


def _learner_tensors(learner: Learner) -> dict[str, torch.Tensor]:
    getter = getattr(learner, "state_tensors", None)
    return dict(getter()) if callable(getter) else {}


def _export(learner: Learner, path: Path, epoch: int, step: int, metrics: dict[str, float]) -> None:
    state_dict, card = learner.export_model()
    card = dict(card)
    training = dict(card.get("training", {}))
    training.update(epoch=epoch, global_step=step, validation=metrics)
    card["training"] = training
    modelfile.save_model(path, state_dict, card)


# ------------------------------------------------------------------------------------------- fit
@dataclass
class _Run:
    """What :func:`fit` carries from epoch to epoch (the counters are those of the last committed epoch)."""

    out: Path
    epochs: int
    iterations_per_epoch: int
    config: dict[str, Any]
    dist: DistInfo
    start_epoch: int = 1
    step: int = 0
    best_score: float = -math.inf
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    writer: Any = None

    @property
    def last_path(self) -> Path:
        return self.out / "checkpoints" / "last.safetensors"

    @property
    def best_path(self) -> Path:
        return self.out / "checkpoints" / "best.safetensors"

    @property
    def history_path(self) -> Path:
        return self.out / "history.jsonl"


def _resume(learner: Learner, run: _Run, resume: bool, volatile: frozenset[str]) -> FitResult | None:
    """Restore ``run`` and ``learner`` from ``checkpoints/last.safetensors`` when asked and present;
    a :class:`FitResult` when that checkpoint already holds every epoch asked for."""
    last_path, dist = run.last_path, run.dist
    exists = last_path.is_file()
    if resume and not tdist.all_agree(int(exists)):
        raise CheckpointError(
            f"Some processes see {last_path} and others do not.",
            "Put the output folder on a file system that every process can read, or use a new --out folder.",
        )
    if not (exists and resume):
        if exists and dist.is_main:
            logger.warning("Starting afresh in %s (resume off): the previous run's files will be overwritten.",
                           run.out)
        return None
    saved = read_checkpoint_state(last_path)
    differences = _config_differences(saved.get("config", {}), run.config, volatile)
    if saved.get("iterations_per_epoch") != run.iterations_per_epoch:
        differences.append(f"iterations_per_epoch: {saved.get('iterations_per_epoch')} -> {run.iterations_per_epoch}")
    if differences:
        raise CheckpointError(
            f"Cannot resume from {last_path}: the settings differ ({'; '.join(differences)}).",
            "This checkpoint was made with another configuration: use a new --out folder or the same settings.",
        )
    done = int(saved["epoch"])
    if done >= run.epochs:
        if dist.is_main:
            logger.info("%s already holds a finished run of %d epoch(s) (asked for %d): nothing to do. "
                        "Ask for more epochs to continue training it.", run.out, done, run.epochs)
        return FitResult(float(saved["best_score"]), int(saved["best_epoch"]), done, run.out)
    if saved.get("world_size", 1) != dist.world_size and dist.is_main:
        logger.warning("Resuming with %d process(es), the checkpoint was made with %d: training continues, "
                       "but not bit-identically.", dist.world_size, saved.get("world_size", 1))
    state = load_checkpoint(last_path, learner.modules, learner.optimizers, dist.device, rank=dist.rank)
    loader = getattr(learner, "load_state", None)
    if callable(loader):
        loader(state.get("learner", {}))
    tensor_loader = getattr(learner, "load_state_tensors", None)
    if callable(tensor_loader):
        tensor_loader(state["extra_tensors"])
    run.start_epoch, run.step = done + 1, int(state["global_step"])
    run.best_score, run.best_epoch = float(state["best_score"]), int(state["best_epoch"])
    if dist.is_main:
        logger.info("Resuming %s at epoch %d/%d (best score %.6g at epoch %d)", run.out, run.start_epoch,
                    run.epochs, run.best_score, run.best_epoch)
    return None


def _open_outputs(run: _Run, tensorboard: bool) -> None:
    """Rank 0: the history so far, ``config.json`` and the TensorBoard writer."""
    run.history = _read_history(run.history_path, run.start_epoch)
    fit_settings = {"epochs": run.epochs, "iterations_per_epoch": run.iterations_per_epoch,
                    "world_size": run.dist.world_size}
    write_text(run.out / "config.json", json.dumps({"config": run.config, "fit": fit_settings,
                                                    "steprl_version": steprl.__version__},
                                                   indent=2, sort_keys=True) + "\n")
    if tensorboard:
        run.writer = _open_tensorboard(run.out / "tensorboard",
                                       purge_step=run.step + 1 if run.start_epoch > 1 else None)


def _run_epoch(learner: Learner, run: _Run, epoch: int, progress: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Train one epoch and validate it: ``(train means, validation metrics averaged over ranks)``."""
    train_means = _train_epoch(learner, epoch, run.epochs, run.iterations_per_epoch, run.dist, run.writer, progress)
    run.step += run.iterations_per_epoch
    metrics = _reduce_validation(learner.validate(), run.dist)
    learner.end_epoch(epoch)
    return train_means, metrics


def _commit_epoch(learner: Learner, run: _Run, epoch: int, train_means: dict[str, float],
                  metrics: dict[str, float], is_best: bool, rng_states: list[dict[str, Any]], seconds: float) -> None:
    """Rank 0: best checkpoint and models, history, then ``last.safetensors``, the commit point."""
    ckpt_state = {
        "epoch": epoch,
        "global_step": run.step,
        "best_score": run.best_score,
        "best_epoch": run.best_epoch,
        "epochs": run.epochs,
        "iterations_per_epoch": run.iterations_per_epoch,
        "world_size": run.dist.world_size,
        "config": run.config,
        "validation": metrics,
        "learner": _learner_state(learner),
    }
    extra = _learner_tensors(learner)
    if is_best:
        save_checkpoint(run.best_path, learner.modules, learner.optimizers, ckpt_state, extra, rng_states=rng_states)
        _export(learner, run.out / "model_best", epoch, run.step, metrics)
    _export(learner, run.out / "model_last", epoch, run.step, metrics)
    run.history.append({"epoch": epoch, "global_step": run.step, "train": train_means, "validation": metrics,
                        "best": is_best, "seconds": round(seconds, 3)})
    write_text(run.history_path, "".join(json.dumps(finite_json(h), allow_nan=False) + "\n"
                                         for h in run.history))  # a NaN loss is null, not bare NaN
    # The commit point: written last (see the module docstring).
    save_checkpoint(run.last_path, learner.modules, learner.optimizers, ckpt_state, extra, rng_states=rng_states)


def _log_epoch(run: _Run, epoch: int, train_means: dict[str, float], metrics: dict[str, float]) -> None:
    """Rank 0: validation scalars to TensorBoard and one log line."""
    if run.writer is not None:
        for k, v in metrics.items():
            run.writer.add_scalar(f"val/{k}", v, run.step)
        run.writer.flush()
    shown = " ".join(f"{k}={v:.4g}" for k, v in train_means.items())
    logger.info("epoch %d/%d  train %s | val %s | best %.6g (epoch %d)", epoch, run.epochs, shown or "-",
                " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), run.best_score, run.best_epoch)


def _log_interrupt(run: _Run, epoch: int) -> None:
    if epoch > 1:
        logger.warning("Interrupted during epoch %d: nothing of it was saved; %s holds epoch %d. "
                       "Run the same command again (with resume) to continue from there.",
                       epoch, run.last_path, epoch - 1)
    else:
        logger.warning("Interrupted during epoch 1: no epoch had finished, nothing was saved.")


def fit(
    learner: Learner,
    out_dir: str | os.PathLike[str],
    *,
    epochs: int,
    iterations_per_epoch: int,
    config: dict[str, Any],
    dist: DistInfo | None = None,
    resume: bool = True,
    tensorboard: bool = True,
    progress: bool = True,
    volatile_keys: Iterable[str] = VOLATILE_CONFIG_KEYS,
) -> FitResult:
    """Train ``learner`` for ``epochs`` epochs of ``iterations_per_epoch`` updates, resuming if possible.

    Args:
        learner: see :class:`Learner`. Seed the RNGs before building it (rank-dependent seeds
            under torchrun); on resume the checkpointed RNG states replace them.
        out_dir: output folder (layout in the module docstring), created if needed.
        epochs: total number of epochs (a resumed run may ask for more than before).
        iterations_per_epoch: ``train_iteration`` calls per epoch and per rank.
        config: JSON-able settings of the run, saved to config.json and in checkpoints, and
            compared on resume (except ``volatile_keys``).
        dist: from :func:`steprl.training.distributed.init_distributed`; None = single process.
        resume: continue from ``checkpoints/last.safetensors`` when it exists (else start afresh,
            overwriting a previous run's files).
        tensorboard, progress: TensorBoard scalars and a tqdm bar (rank 0 only).
        volatile_keys: config keys allowed to differ on resume.

    Raises:
        CheckpointError: the checkpoint cannot be resumed (other configuration, corrupt, not
            visible to every rank).
        KeyboardInterrupt: re-raised after logging how to resume; nothing partial is written.
    """
    if epochs < 0 or iterations_per_epoch < 1:
        raise ValueError(f"need epochs >= 0 and iterations_per_epoch >= 1, got {epochs}, {iterations_per_epoch}")
    if dist is None:
        device = next((p.device for m in learner.modules.values() for p in m.parameters()), torch.device("cpu"))
        dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_main=True)
    run = _Run(Path(out_dir), epochs, iterations_per_epoch, _jsonable(config), dist)
    if dist.is_main:
        run.last_path.parent.mkdir(parents=True, exist_ok=True)
    tdist.barrier()
    finished = _resume(learner, run, resume, frozenset(volatile_keys))
    if finished is not None:
        return finished
    tdist.broadcast_parameters(learner.modules)  # all ranks start identical (a no-op alone)
    if dist.is_main:
        _open_outputs(run, tensorboard)

    epoch = run.start_epoch
    try:
        for epoch in range(run.start_epoch, epochs + 1):
            started = time.monotonic()
            train_means, metrics = _run_epoch(learner, run, epoch, progress)
            score = metrics["score"]
            is_best = math.isfinite(score) and score > run.best_score
            if not math.isfinite(score) and dist.is_main:
                logger.warning("Epoch %d: validation score is %s, not a candidate for best.", epoch, score)
            if is_best:
                run.best_score, run.best_epoch = score, epoch
            rng_states = _gather_rng(dist)  # collective: before the rank-0-only block
            if dist.is_main:
                _commit_epoch(learner, run, epoch, train_means, metrics, is_best, rng_states,
                              time.monotonic() - started)
                _log_epoch(run, epoch, train_means, metrics)
            tdist.barrier()
    except KeyboardInterrupt:
        if dist.is_main:
            _log_interrupt(run, epoch)
        raise
    finally:
        if run.writer is not None:
            run.writer.close()
    return FitResult(run.best_score, run.best_epoch, max(epochs, run.start_epoch - 1), run.out)
