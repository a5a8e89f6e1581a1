"""The model selector's contents: bundled models plus a user models folder, with their cards.

Listing reads only the JSON model cards (``steprl.modelfile.read_card``): no torch, no weights,
so the panel opens fast inside Slicer. Bundled models live in ``steprl/models`` (shipped inside
the extension); a user folder holds ``NAME.safetensors`` + ``NAME.json`` pairs, e.g. models
trained with ``steprl train registration`` or ``steprl train segmentation``. A user model with
a bundled model's name is listed too (the user's, marked as such): nothing is hidden.

Each module lists only the models of its learners (``method=`` a card ``method`` or a tuple of
them: ``"spac"`` for registration, ``("pixeldrl-mg", "unet")`` for segmentation).

Example::

    for entry in list_models("~/StepRLModels", method="spac"):
        print(entry.label, entry.path)
    print(describe_card(entry.card))
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: One card ``method`` or several.
Methods = str | tuple[str, ...]


def bundled_models_dir() -> Path:
    """``steprl/models``: the models shipped with the extension (the folder may not exist)."""
    import steprl

    return Path(steprl.__file__).resolve().parent / "models"


@dataclass(frozen=True)
class ModelEntry:
    """One selectable model: its weights path, card, and where it came from (``bundled``/``user``)."""

    name: str
    path: Path
    source: str
    card: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ndim(self) -> int:
        return int(self.card.get("ndim", 0))

    @property
    def label(self) -> str:
        """What the selector shows, e.g. ``spac3d_brain (3D, bundled)``."""
        return f"{self.name} ({self.ndim}D, {self.source})"


def _as_tuple(method: Methods) -> tuple[str, ...]:
    return (method,) if isinstance(method, str) else tuple(method)


def _entries(folder: Path, source: str, method: Methods) -> list[ModelEntry]:
    from steprl.modelfile import list_models as list_model_files

    methods = _as_tuple(method)
    entries = []
    for path, card in list_model_files(folder):
        if card.get("method") not in methods:
            log.debug("Skipping %s: a %s model, not %s", path, card.get("method"), method)
            continue
        entries.append(ModelEntry(path.stem, path, source, card))
    return entries


def list_models(user_folder: str | os.PathLike | None = None, *, method: Methods,
                bundled_folder: str | os.PathLike | None = None) -> list[ModelEntry]:
    """Bundled models first, then the user folder's; only models of ``method`` (one or a tuple); cards validated."""
    bundled = Path(bundled_folder) if bundled_folder is not None else bundled_models_dir()
    entries = _entries(bundled, "bundled", method)
    if user_folder:
        user = Path(user_folder).expanduser()
        if user.resolve() != bundled.resolve():
            entries += _entries(user, "user", method)
    return entries


def find_model(model: str | os.PathLike, user_folder: str | os.PathLike | None = None, *, method: Methods,
               **kwargs) -> ModelEntry | None:
    """The entry for a model given as a file path, a listed weights path, or a name (user folder wins).

    A name or listed path matches only models of ``method``; a file path is returned whatever its
    method (the caller's check says what is wrong with it). Returns None when nothing matches;
    raises ``steprl.errors.ModelFileError`` for a model file whose card is missing or invalid (its
    message says what is wrong).
    """
    path = Path(model).expanduser()
    if path.suffix in (".safetensors", ".json") and path.is_file():
        from steprl.modelfile import model_paths, read_card

        weights, _ = model_paths(path)
        return ModelEntry(weights.stem, weights, "file", read_card(weights))  # ModelFileError says what is wrong
    matches = [e for e in list_models(user_folder, method=method, **kwargs) if str(model) in (e.name, str(e.path))]
    users = [e for e in matches if e.source == "user"]
    return (users or matches or [None])[0]


def describe_card(card: dict[str, Any]) -> str:
    """A short plain-text description of a model card for the panel (one fact per line)."""
    config = card.get("config") or {}
    inference = card.get("inference") or {}
    lines = [f"{str(card.get('method', '?')).upper()} model, {card.get('ndim', '?')}D"]
    if config.get("grid"):
        lines.append("network grid: " + " x ".join(str(g) for g in config["grid"]))
    if config.get("grid") is None and inference.get("size"):
        lines.append("network grid: " + " x ".join(str(g) for g in inference["size"]) + " (per slice)")
    if inference.get("steps") is not None:
        lines.append(f"default steps: {inference['steps']}"
                     + (f" (max {inference['max_step']} voxels per step)" if inference.get("max_step") else ""))
    segment = card.get("segment") or {}
    if segment.get("name"):
        lines.append(f"segment: {segment['name']}")
    if card.get("parameters"):
        lines.append(f"parameters: {int(card['parameters']):,}")
    training = card.get("training") or {}
    data = training.get("data") or {}
    if data:
        where = Path(str(data["folder"])).name if data.get("folder") else data.get("kind", "")
        lines.append(f"trained on: {data.get('count', '?')} images ({where})" if where else "trained on: ?")
    licence = data.get("licence") or card.get("licence")
    if licence:
        lines.append(f"data licence: {licence}")
    metrics = training.get("validation") or card.get("metrics")
    if isinstance(metrics, dict) and metrics:
        shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in list(metrics.items())[:4])
        lines.append(f"validation: {shown}")
    lines.append(f"steprl {card.get('steprl_version', '?')}, created {card.get('created', '?')}")
    return "\n".join(lines)


def index_of(entries: list[ModelEntry], wanted: str) -> int:
    """The selector index of the model ``wanted`` (a path or a name): 0 when absent, -1 for no entries."""
    return next((i for i, e in enumerate(entries) if wanted in (str(e.path), e.name)), 0 if entries else -1)
