"""The model selector's contents: bundled SPAC models plus a user models folder, with their cards.

Listing reads only the JSON model cards (``steprl.modelfile.read_card``): no torch, no weights,
so the panel opens fast inside Slicer. Bundled models live in ``steprl/models`` (shipped inside
the extension); a user folder holds ``NAME.safetensors`` + ``NAME.json`` pairs, e.g. models
trained with ``steprl train registration``. A user model with a bundled model's name is listed
too (the user's, marked as such): nothing is hidden.

Example::

    for entry in list_models("~/StepRLModels"):
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

#: The learner whose models this module runs.
METHOD = "spac"


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


def _entries(folder: Path, source: str, method: str) -> list[ModelEntry]:
    from steprl.modelfile import list_models as list_model_files

    entries = []
    for path, card in list_model_files(folder):
        if card.get("method") != method:
            log.debug("Skipping %s: a %s model, not %s", path, card.get("method"), method)
            continue
        entries.append(ModelEntry(path.stem, path, source, card))
    return entries


def list_models(user_folder: str | os.PathLike | None = None, *, method: str = METHOD,
                bundled_folder: str | os.PathLike | None = None) -> list[ModelEntry]:
    """Bundled models first, then the user folder's; only models of ``method``; cards validated."""
    bundled = Path(bundled_folder) if bundled_folder is not None else bundled_models_dir()
    entries = _entries(bundled, "bundled", method)
    if user_folder:
        user = Path(user_folder).expanduser()
        if user.resolve() != bundled.resolve():
            entries += _entries(user, "user", method)
    return entries


def find_model(model: str | os.PathLike, user_folder: str | os.PathLike | None = None,
               **kwargs) -> ModelEntry | None:
    """The entry for a model given as a file path, a listed weights path, or a name (user folder wins).

    Returns None when nothing matches; raises ``steprl.errors.ModelFileError`` for a model file
    whose card is missing or invalid (its message says what is wrong).
    """
    path = Path(model).expanduser()
    if path.suffix in (".safetensors", ".json") and path.is_file():
        from steprl.modelfile import model_paths, read_card

        weights, _ = model_paths(path)
        return ModelEntry(weights.stem, weights, "file", read_card(weights))  # ModelFileError says what is wrong
    matches = [e for e in list_models(user_folder, **kwargs) if str(model) in (e.name, str(e.path))]
    users = [e for e in matches if e.source == "user"]
    return (users or matches or [None])[0]


def describe_card(card: dict[str, Any]) -> str:
    """A short plain-text description of a model card for the panel (one fact per line)."""
    config = card.get("config") or {}
    inference = card.get("inference") or {}
    lines = [f"{str(card.get('method', '?')).upper()} model, {card.get('ndim', '?')}D"]
    if config.get("grid"):
        lines.append("network grid: " + " x ".join(str(g) for g in config["grid"]))
    if inference.get("steps") is not None:
        lines.append(f"default steps: {inference['steps']} (max {inference.get('max_step', 3)} voxels per step)")
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
