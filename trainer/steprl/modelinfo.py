"""A model card as a reader wants it: what ``steprl info MODEL`` prints (``--json``: the raw card;
the command itself is :func:`steprl.commands.info`).

Why: a card holds ~150 lines of JSON (network config, training settings, provenance); a user
deciding whether a model fits their data wants the task, the data it learned from and under
which licence, how well it did and where it must not be used. Those come first, one labelled
paragraph each, then the file facts; ``--json`` prints the card as stored.

Example output::

    spac2d_brain: SPAC 2D brain MRI (T1, axial slices)
      task          deformable registration of 2D brain MRI slices (inter-subject), step by step
      method        spac, 2D, network grid 128 x 128, 20 steps by default
      ...
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

WIDTH = 100
_LABEL = 14


def _text(value: Any) -> str:
    """A card value in words: dicts as ``key: value; ...``, lists joined, numbers rounded."""
    if isinstance(value, dict):
        return "; ".join(f"{k.replace('_', ' ')}: {_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _paragraph(label: str, value: Any) -> list[str]:
    if value in (None, "", {}, []):
        return []
    indent = " " * (2 + _LABEL)
    lines = textwrap.wrap(_text(value), WIDTH - len(indent)) or [""]
    return [f"  {label:<{_LABEL}}{lines[0]}", *(indent + line for line in lines[1:])]


def _method_line(card: dict[str, Any]) -> str:
    config, inference = card.get("config") or {}, card.get("inference") or {}
    grid = config.get("grid") or inference.get("size") or card.get("grid")
    parts = [str(card.get("method", "?")), f"{card.get('ndim', '?')}D"]
    if grid:
        parts.append("network grid " + " x ".join(str(g) for g in grid) + (" per slice" if "size" in inference else ""))
    if inference.get("steps") is not None:
        parts.append(f"{inference['steps']} steps by default")
    return ", ".join(parts)


def _calibration_line(card: dict[str, Any]) -> str | None:
    """What ``calibrate_prior_scale.py`` changed after training (a SPAC prior's scale and smoothing), and how."""
    cal = card.get("calibration")
    if not isinstance(cal, dict) or "chosen" not in cal:
        return None
    sigma = f", sigma {cal['chosen_sigma']:g} voxels" if "chosen_sigma" in cal else ""
    was = f"{cal['previous']:g}" + (f", {cal['previous_sigma']:g}" if "previous_sigma" in cal else "")
    pairs = f" on {len(cal['pairs'])} validation pairs" if cal.get("pairs") else ""
    contrast = f" ({cal['contrast']} contrast)" if cal.get("contrast") else ""
    line = f"prior scale {cal['chosen']:g}{sigma} (was {was}){pairs}{contrast}"
    return f"{line}: {cal['command']}" if cal.get("command") else line


def describe(card: dict[str, Any], path: Path, parameters: str | None = None) -> str:
    """The readable card (see the module docstring); ``parameters`` replaces the card's count."""
    training = card.get("training") or {}
    data = card.get("training_data") or training.get("data")
    licence = card.get("licence_of_weights") or card.get("attribution") or (
        (training.get("data") or {}).get("licence") if isinstance(training.get("data"), dict) else None)
    lines = [f"{card.get('name', path.stem)}: {card.get('title', 'a ' + str(card.get('method', '?')) + ' model')}"]
    for label, value in (("task", card.get("task")), ("method", _method_line(card)),
                         ("modality", card.get("modality")), ("segment", (card.get("segment") or {}).get("name")),
                         ("data", data), ("licence", licence),
                         ("metrics", card.get("validation") or card.get("metrics")),
                         ("intended use", card.get("intended_use")),
                         ("limits", card.get("limitations") or card.get("limits")),
                         ("trained with", card.get("training_command") or training.get("command")),
                         ("calibrated", _calibration_line(card)),
                         ("training time", card.get("training_time")),
                         ("file", f"{path} (steprl {card.get('steprl_version', '?')}, created "
                                  f"{card.get('created', '?')})"),
                         ("sha256", card.get("sha256")),
                         ("parameters", parameters or (f"{int(card['parameters']):,}" if card.get("parameters")
                                                       else None))):
        lines += _paragraph(label, value)
    return "\n".join(lines)

