"""Training checkpoints: ONE safetensors file, no pickle, enough to continue bit-identically.

Layout of the file:

- tensors
    - ``module.<name>.<key>``: every module's ``state_dict()``;
    - ``optim.<name>.<path>``: every tensor inside an optimiser's ``state_dict()`` (Adam's
      ``exp_avg``, ``exp_avg_sq``, ``step``...), ``<path>`` being its place in that nested dict;
    - ``rng.<rank>.torch`` / ``rng.<rank>.cuda``: torch's CPU (and current CUDA device's, if
      CUDA was used) RNG state as uint8 tensors, one set per rank;
    - ``extra.<name>``: any further tensors the learner wants back (e.g. a replay buffer).
- metadata ``{"steprl": <JSON string>}`` with: ``format``/``format_version``/``steprl_version``,
  ``tensor_sha256`` (a checksum of every tensor, checked on load: safetensors has none),
  the caller's ``state`` dict (epoch, global step, best score, config, learner scalars...), the
  non-tensor part of each optimiser's state (param_groups, non-tensor step counts; each tensor
  replaced by ``{"__tensor__": name}``), and each rank's python / numpy RNG states.

Writes are atomic (temporary file in the same folder, fsync, ``os.replace``): an interruption
mid-write keeps the previous checkpoint intact. On load, a checkpoint whose tensors do not match
their checksum, or hold a NaN or an infinity (a diverged run saved as is, or a file damaged in a
way safetensors cannot see; resuming one crashed the process), is refused like a truncated one.

Learners that keep their own ``numpy.random.Generator`` put ``rng.bit_generator.state`` (a JSON-
able dict) in their ``state()``; only the global python / numpy / torch RNGs are captured here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import steprl
from steprl.atomic import atomic_path, write_text
from steprl.errors import CheckpointError
from steprl.modelfile import make_shareable, nonfinite_tensors

logger = logging.getLogger(__name__)

FORMAT = "steprl-checkpoint"
FORMAT_VERSION = 1
_META_KEY = "steprl"
_CORRUPT_FIX = "Delete it to start afresh, or copy checkpoints/best.safetensors over it to resume from the best epoch."
_CONFIG_FIX = "This checkpoint was made with another configuration: use a new --out folder or the same settings."

#: One rank's RNG snapshot: {"python": json, "numpy": json, "torch": uint8 tensor[, "cuda": uint8 tensor]}.
RngState = dict[str, Any]


# ------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> RngState:
    """Snapshot of this process's global RNGs (python, numpy, torch CPU, current CUDA device)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    snapshot: RngState = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snapshot["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return snapshot


def restore_rng_state(snapshot: RngState) -> None:
    """Put back a :func:`capture_rng_state` snapshot into this process's global RNGs."""
    version, mt, gauss = snapshot["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = snapshot["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(snapshot["torch"].to("cpu", torch.uint8))
    if "cuda" in snapshot:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(snapshot["cuda"].to("cpu", torch.uint8), torch.cuda.current_device())
        else:
            logger.warning("The checkpoint holds a CUDA RNG state but CUDA is not available: not restored.")


def encode_rng_state(snapshot: RngState) -> bytes:
    """Bytes of a snapshot (JSON, tensors in base64), to send it between ranks without pickle."""
    doc = {k: v for k, v in snapshot.items() if not isinstance(v, torch.Tensor)}
    doc["tensors"] = {
        k: base64.b64encode(v.cpu().numpy().tobytes()).decode("ascii")
        for k, v in snapshot.items()
        if isinstance(v, torch.Tensor)
    }
    return json.dumps(doc).encode("utf-8")


def decode_rng_state(data: bytes) -> RngState:
    """Inverse of :func:`encode_rng_state`."""
    doc = json.loads(data.decode("utf-8"))
    tensors = doc.pop("tensors")
    for k, b64 in tensors.items():
        doc[k] = torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8).clone()
    return doc


# ------------------------------------------------------------------------- optimiser (de)flattening
def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of a nested optimiser state; tensors go to ``tensors`` under ``path``.

    dicts become ``{"__dict__": [[key, value], ...]}`` (optimiser state keys are ints, which
    JSON objects would turn into strings) and tuples ``{"__tuple__": [...]}`` (Adam's betas).
    """
    if isinstance(obj, torch.Tensor):
        if path in tensors:
            raise ValueError(f"duplicate checkpoint tensor name {path!r}")
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_encode`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


# ------------------------------------------------------------------------------------- integrity
def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (CPU tensors)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _check_integrity(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """CheckpointError when the tensors do not match their checksum or hold NaN / infinity."""
    expected = meta.get("tensor_sha256")
    if expected is not None and tensor_checksum(tensors) != expected:
        raise CheckpointError(f"Checkpoint {path} is unreadable or corrupt (its tensors do not match their "
                              "checksum).", _CORRUPT_FIX)
    bad = nonfinite_tensors(tensors)
    if bad:
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(f"Checkpoint {path} is unreadable or corrupt (NaN or infinite values in {names}).",
                              _CORRUPT_FIX)


# ------------------------------------------------------------------------------------------ save
def save_checkpoint(
    path: str | os.PathLike[str],
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    state: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
    *,
    rng_states: list[RngState] | None = None,
) -> Path:
    """Write a checkpoint atomically; return its path.

    Args:
        path: the checkpoint file (``.safetensors``); its folder is created if needed.
        modules: name -> module; every ``state_dict()`` is stored.
        optimizers: name -> optimiser; its whole ``state_dict()`` is stored.
        state: JSON-able dict (epoch, global_step, best_score, config, learner scalars...),
            given back by :func:`load_checkpoint`. Must not use the key ``"extra_tensors"``.
        extra_tensors: further tensors to give back (under ``"extra_tensors"``).
        rng_states: one RNG snapshot per rank (rank order) gathered by the caller; default:
            this process's, as rank 0.

    Raises:
        TypeError / ValueError: ``state`` not JSON-able, or a reserved key (programming errors).
    """
    from safetensors.torch import save_file

    if "extra_tensors" in state:
        raise ValueError("state must not contain the reserved key 'extra_tensors'")
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"module.{name}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    optim_meta = {name: _encode(opt.state_dict(), f"optim.{name}", tensors) for name, opt in optimizers.items()}
    rng_meta = []
    for rank, snapshot in enumerate(rng_states if rng_states is not None else [capture_rng_state()]):
        entry = {}
        for key, value in snapshot.items():
            if isinstance(value, torch.Tensor):
                tensors[f"rng.{rank}.{key}"] = value.detach().to("cpu", torch.uint8, copy=True).contiguous()
                entry[key] = {"__tensor__": f"rng.{rank}.{key}"}
            else:
                entry[key] = value
        rng_meta.append(entry)
    for name, value in (extra_tensors or {}).items():
        tensors[f"extra.{name}"] = value.detach().to("cpu", copy=True).contiguous()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "steprl_version": steprl.__version__,
        "modules": sorted(modules),
        "optimizers": optim_meta,
        "rng": rng_meta,
        "extra_tensors": sorted(extra_tensors or {}),
        "tensor_sha256": tensor_checksum(tensors),
        "state": state,
    }
    text = json.dumps(meta)  # raises TypeError before anything is written

    with atomic_path(final) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", _META_KEY: text})
        make_shareable(tmp)
    return final


# ------------------------------------------------------------------------------------------ load
def _read_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's JSON metadata; CheckpointError when unreadable or not ours."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.", "Check the path.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"Checkpoint {path} is unreadable or corrupt ({exc}).", _CORRUPT_FIX) from exc
    if raw is None:
        raise CheckpointError(f"{path} is not a StepRL training checkpoint.", "Give a checkpoint written by steprl.")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"Checkpoint {path} has corrupt metadata ({exc}).", _CORRUPT_FIX) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a StepRL training checkpoint.", "Give a checkpoint written by steprl.")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {path} has format version {meta['format_version']}, newer than this steprl "
            f"({steprl.__version__}) reads.",
            "Update steprl to resume it.",
        )
    return meta


def read_checkpoint_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``state`` dict saved in a checkpoint, without loading any tensor (cheap)."""
    return _read_meta(Path(path))["state"]


def rewrite_checkpoint_state(path: str | os.PathLike[str], change) -> bool:
    """Replace the ``state`` dict saved in a checkpoint by ``change(state)`` (which must not modify its
    argument); the tensors, and so their checksum, are untouched. For one-off conversions of runs
    begun by an older steprl. Written atomically; True when the state changed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = Path(path)
    meta = _read_meta(path)
    after = change(meta["state"])
    if after == meta["state"]:
        return False
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    tensors = load_file(str(path))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**metadata, _META_KEY: json.dumps({**meta, "state": after})})
        make_shareable(tmp)
    return True


def convert_run_folder(run: str | os.PathLike[str], convert_config, convert_state) -> list[Path]:
    """One-off conversion of a run folder begun by an older steprl: ``convert_config`` on the settings
    in its ``config.json`` (``{"config": ...}``, :mod:`steprl.training.loop`), ``convert_state`` on the
    state of every checkpoint (:func:`rewrite_checkpoint_state`). Neither may modify its argument;
    returns the files that changed (none when the run is current)."""
    run = Path(run)
    changed = []
    config_file = run / "config.json"
    if config_file.is_file():
        saved = json.loads(config_file.read_text(encoding="utf-8"))
        converted = {**saved, "config": convert_config(saved["config"])}
        if converted != saved:
            write_text(config_file, json.dumps(converted, indent=2))
            changed.append(config_file)
    checkpoints = sorted((run / "checkpoints").glob("*.safetensors"))
    return changed + [p for p in checkpoints if rewrite_checkpoint_state(p, convert_state)]


def convert_runs_main(argv: list[str] | None, description: str, convert_run, command: str) -> int:
    """The command line of the one-off converters (``trainer/tools/convert_*_run.py RUN [RUN ...]``):
    ``convert_run(folder) -> changed files`` on each run folder, printing what changed."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("runs", nargs="+", type=Path, help=f"run folders ({command} --out)")
    for run in parser.parse_args(argv).runs:
        changed = convert_run(run)
        print(f"{run}: " + (", ".join(str(p.relative_to(run)) for p in changed) if changed else "already current"))
    return 0


def _first(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _check_modules(path: Path, modules: dict[str, nn.Module], meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Same module names, tensor names and shapes as the checkpoint, or CheckpointError."""
    if sorted(modules) != meta["modules"]:
        raise CheckpointError(
            f"Checkpoint {path} holds the networks {meta['modules']}, this run has {sorted(modules)}.", _CONFIG_FIX
        )
    problems: list[str] = []
    for name, module in modules.items():
        prefix = f"module.{name}."
        saved = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        expected = module.state_dict()
        problems += [f"{name}.{k} missing" for k in expected if k not in saved]
        problems += [f"{name}.{k} unexpected" for k in saved if k not in expected]
        problems += [
            f"{name}.{k} shape {tuple(saved[k].shape)} vs {tuple(v.shape)}"
            for k, v in expected.items()
            if k in saved and saved[k].shape != v.shape
        ]
    if problems:
        raise CheckpointError(f"Checkpoint {path} does not fit the networks ({_first(problems)}).", _CONFIG_FIX)


def _check_optimizers(path: Path, optimizers: dict[str, torch.optim.Optimizer], saved: dict[str, dict]) -> None:
    """Same optimisers with the same parameter-group sizes, or CheckpointError."""
    if sorted(optimizers) != sorted(saved):
        raise CheckpointError(
            f"Checkpoint {path} holds the optimisers {sorted(saved)}, this run has {sorted(optimizers)}.", _CONFIG_FIX
        )
    for name, opt in optimizers.items():
        groups = saved[name]["param_groups"]
        sizes = [len(g["params"]) for g in groups]
        current = [len(g["params"]) for g in opt.param_groups]
        if sizes != current:
            raise CheckpointError(
                f"Checkpoint {path}: optimiser {name} has parameter groups of sizes {sizes}, this run {current}.",
                _CONFIG_FIX,
            )


def load_checkpoint(
    path: str | os.PathLike[str],
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    map_location: str | torch.device = "cpu",
    *,
    rank: int = 0,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore modules, optimisers and RNGs in place; return the saved ``state``.

    Network names, tensor names and shapes and optimiser group sizes are all checked before
    anything is modified, so a checkpoint of another configuration leaves the learner as it was.

    Args:
        path: a file written by :func:`save_checkpoint`.
        modules, optimizers: the live objects (same names, structure and shapes as saved);
            tensors are copied into them, so they stay on their own devices.
        map_location: device of the returned ``extra_tensors``.
        rank: whose RNG snapshot to restore (each rank has its own stream).
        restore_rng: False to leave the global RNGs alone (e.g. to evaluate a checkpoint).

    Returns:
        The ``state`` dict given to :func:`save_checkpoint`, plus ``"extra_tensors"`` (dict).

    Raises:
        CheckpointError: unreadable, not a checkpoint, newer format, tensors that fail their
            checksum or hold NaN / infinity, or another configuration
            (different networks, tensor names or shapes, optimisers).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = _read_meta(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"Checkpoint {path} is unreadable or corrupt ({exc}).", _CORRUPT_FIX) from exc
    _check_integrity(path, meta, tensors)
    _check_modules(path, modules, meta, tensors)
    optim_states = {name: _decode(enc, tensors) for name, enc in meta["optimizers"].items()}
    _check_optimizers(path, optimizers, optim_states)

    for name, module in modules.items():
        prefix = f"module.{name}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    for name, opt in optimizers.items():
        try:
            opt.load_state_dict(optim_states[name])
        except (ValueError, KeyError, RuntimeError) as exc:
            problem = f"Checkpoint {path}: optimiser {name} cannot be restored ({exc})."
            raise CheckpointError(problem, _CONFIG_FIX) from exc
    if restore_rng:
        ranks = meta["rng"]
        if rank < len(ranks):
            restore_rng_state(_decode_rng_entry(ranks[rank], tensors))
        else:
            logger.warning(
                "Checkpoint %s holds RNG states for %d rank(s), not for rank %d: this rank keeps its own seed "
                "(training continues, but not bit-identically).",
                path,
                len(ranks),
                rank,
            )
    state = dict(meta["state"])
    device = torch.device(map_location)
    state["extra_tensors"] = {name: tensors[f"extra.{name}"].to(device) for name in meta["extra_tensors"]}
    return state


def _decode_rng_entry(entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> RngState:
    return {k: tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v else v for k, v in entry.items()}
