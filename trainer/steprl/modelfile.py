"""Model files: ``NAME.safetensors`` (weights) next to ``NAME.json`` (the model card).

Why this format: a clinician may be sent a model file, so loading one must never run code.
safetensors holds only named tensors (no pickle), and the JSON card says what the weights are
for, which network to build (``config``), and the sha256 of the weights so that a truncated or
edited file is refused with a clear message instead of producing a wrong registration.

Card keys written by :func:`save_model` (the caller provides the first three and may add any
JSON-able keys, e.g. normalisation, training data and licence, metrics):

- ``method``: ``"spac"``, ``"pixeldrl-mg"``, ``"unet"``...: which learner made it.
- ``ndim``: 2 or 3, the image dimension the network works on.
- ``config``: the network constructor arguments (dict), so inference rebuilds the same network.
- ``format`` (``"steprl-model"``), ``format_version``, ``steprl_version``, ``created`` (ISO UTC),
  ``sha256`` (of the weights file), ``parameters`` (total number of tensor elements).

``import steprl.modelfile`` does not import torch: :func:`read_card` and :func:`list_models`
serve Slicer's model selector, which must stay light. torch is imported inside the functions
that handle tensors.

Example::

    path = save_model("models/spac_brain", net.state_dict(), {"method": "spac", "ndim": 3, "config": cfg})
    state, card = load_model(path, method="spac", ndim=3, device="cpu")
    net = build_network(**card["config"]); check_state_dict(net, state, path)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import steprl
from steprl.atomic import atomic_path
from steprl.errors import InputError, ModelFileError

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps torch out of the import
    import torch

logger = logging.getLogger(__name__)

FORMAT = "steprl-model"
FORMAT_VERSION = 1
WEIGHTS_SUFFIX = ".safetensors"
CARD_SUFFIX = ".json"
REQUIRED_CARD_KEYS = ("method", "ndim", "config")

#: What each method is used for, to phrase "the registration needs a spac model".
_TASK_OF_METHOD = {"spac": "registration", "pixeldrl-mg": "segmentation", "unet": "segmentation"}

_REEXPORT = "Re-download or re-export it."

#: The models shipped with steprl (``steprl/models``); a ``model`` argument may name one of them.
BUNDLED_DIR = Path(__file__).resolve().parent / "models"
#: The bundled registration model used when none is given, by image dimension.
DEFAULT_MODELS = {2: "spac2d_brain", 3: "spac3d_brain"}


# ----------------------------------------------------------------------------------------- paths
def model_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(weights, card)`` paths of a model given as ``NAME.safetensors``, ``NAME.json`` or ``NAME``.

    A stem may itself contain dots (``spac.v2``): only the two known suffixes are stripped.
    """
    p = Path(path)
    name = p.name
    for suffix in (WEIGHTS_SUFFIX, CARD_SUFFIX):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return p.with_name(name + WEIGHTS_SUFFIX), p.with_name(name + CARD_SUFFIX)



def resolve_model_path(model: str | os.PathLike[str]) -> Path:
    """A path as given if it exists, else a bundled model of that name; ModelFileError otherwise."""
    path = Path(model)
    for candidate in (path, path.with_suffix(WEIGHTS_SUFFIX), BUNDLED_DIR / f"{path.name}{WEIGHTS_SUFFIX}",
                      BUNDLED_DIR / path.name):
        if candidate.is_file():
            return candidate
    bundled = ", ".join(sorted(p.stem for p in BUNDLED_DIR.glob(f"*{WEIGHTS_SUFFIX}"))) or "none"
    raise ModelFileError(f"Model '{model}' not found (neither a file nor a bundled model).",
                         f"Give a .safetensors model path, or one of the bundled models: {bundled}.")


def default_model(ndim: int) -> str:
    """The bundled registration model for ``ndim``-D images; InputError naming the way out when none ships."""
    name = DEFAULT_MODELS[ndim]
    if not (BUNDLED_DIR / f"{name}{WEIGHTS_SUFFIX}").is_file():
        raise InputError(f"No {ndim}D registration model is bundled with this steprl version.",
                         "Pass --model with a model file, e.g. one trained with `steprl train registration "
                         "--synthseg DIR` (contrast-agnostic 3D brain MRI).")
    return name

def _sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (weights can be hundreds of MiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask is set-and-get)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_shareable(path: Path) -> None:
    """Give a written file the usual ``0666 & ~umask`` mode: safetensors creates files 0600,
    which would hide a model in a shared folder from the other users."""
    os.chmod(path, 0o666 & ~_umask())


# ------------------------------------------------------------------------------------------ save
def _validate_new_card(card: dict[str, Any]) -> None:
    """The caller's part of the card: raise ValueError (a programming error) when incomplete."""
    if not isinstance(card, dict):
        raise ValueError(f"card must be a dict, got {type(card).__name__}")
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise ValueError(f"model card lacks required key(s) {missing}: give method, ndim and config")
    if not isinstance(card["method"], str) or not card["method"]:
        raise ValueError(f"card['method'] must be a non-empty string, got {card['method']!r}")
    if card["ndim"] not in (2, 3) or isinstance(card["ndim"], bool):
        raise ValueError(f"card['ndim'] must be 2 or 3, got {card['ndim']!r}")
    if not isinstance(card["config"], dict):
        raise ValueError(f"card['config'] must be a dict of network constructor arguments, got {card['config']!r}")


def save_model(path: str | os.PathLike[str], state_dict: dict[str, torch.Tensor], card: dict[str, Any]) -> Path:
    """Write ``NAME.safetensors`` and ``NAME.json`` atomically; return the weights path.

    Args:
        path: ``NAME`` or ``NAME.safetensors`` (or ``NAME.json``); the folder must exist.
        state_dict: name -> tensor (any device/dtype; saved on CPU, contiguous, unshared).
        card: JSON-able dict with at least ``method``, ``ndim`` and ``config``; not modified.
            The format keys listed in the module docstring are added (overwritten if present).

    Raises:
        ValueError: missing/invalid required card keys, or a card that is not JSON-able.

    Each file is written under a temporary name and renamed, so a reader never sees a half
    file; the weights are renamed first, so an interruption between the two renames leaves a
    card whose sha256 no longer matches and :func:`load_model` says so.
    """
    from safetensors.torch import save_file

    _validate_new_card(card)
    weights_path, card_path = model_paths(path)
    # Copy: safetensors refuses tensors that share memory (tied weights), and a copy on CPU is
    # what would be written anyway.
    tensors = {str(k): v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    full_card = dict(card)
    full_card.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        steprl_version=steprl.__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        parameters=int(sum(t.numel() for t in tensors.values())),
    )
    from steprl.jsonvalues import finite_json

    full_card = finite_json(full_card)  # an undefined metric (NaN) is written as null: a bare NaN is not JSON
    try:
        json.dumps(full_card, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model card is not JSON-serialisable: {exc}") from exc

    # the inner block is renamed into place first: the weights, then the card that names their sha256
    with atomic_path(card_path) as tmp_card, atomic_path(weights_path) as tmp_weights:
        save_file(tensors, str(tmp_weights), metadata={"format": "pt", "steprl_method": str(card["method"])})
        make_shareable(tmp_weights)
        full_card["sha256"] = _sha256(tmp_weights)
        with open(tmp_card, "w", encoding="utf-8") as f:
            json.dump(full_card, f, indent=2, sort_keys=True, allow_nan=False)
            f.write("\n")
    logger.debug("Saved %s model (%d parameters) to %s", card["method"], full_card["parameters"], weights_path)
    return weights_path


# ------------------------------------------------------------------------------------------ read
def _validate_card(card: Any, card_path: Path) -> dict[str, Any]:
    """Check that a parsed card is a StepRL model card this version can read."""
    not_ours = ModelFileError(
        f"{card_path} is not a StepRL model card.",
        "Choose a model written by steprl (NAME.safetensors with its NAME.json card).",
    )
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise not_ours
    version = card.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise not_ours
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"Model {card_path.name} has format version {version}; steprl {steprl.__version__} reads up to "
            f"version {FORMAT_VERSION}.",
            "Update steprl (the Slicer extension or `pip install -U steprl`).",
        )
    problems = []
    if not isinstance(card.get("method"), str) or not card["method"]:
        problems.append("method")
    if card.get("ndim") not in (2, 3):
        problems.append("ndim")
    if not isinstance(card.get("config"), dict):
        problems.append("config")
    sha = card.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        problems.append("sha256")
    if problems:
        raise ModelFileError(
            f"Model card {card_path} has missing or invalid field(s): {', '.join(problems)}.", _REEXPORT
        )
    return card


def read_card(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a model card without touching the weights (and without torch).

    Args:
        path: ``NAME.json``, ``NAME.safetensors`` or ``NAME``.

    Raises:
        ModelFileError: card missing, not JSON, not a StepRL card, newer format, or incomplete.
    """
    _, card_path = model_paths(path)
    if not card_path.is_file():
        raise ModelFileError(
            f"Model card {card_path} does not exist.",
            "A model is two files side by side, NAME.safetensors and NAME.json: keep them together "
            "(re-download or re-export the model if the card was lost).",
        )
    try:
        with open(card_path, encoding="utf-8") as f:
            card = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"Model card {card_path} is not valid JSON ({exc}).", _REEXPORT) from exc
    except OSError as exc:
        raise ModelFileError(f"Model card {card_path} cannot be read ({exc}).", "Check its permissions.") from exc
    return _validate_card(card, card_path)


def _check_purpose(card: dict[str, Any], name: str, method: str | Iterable[str] | None, ndim: int | None) -> None:
    """Refuse a model made for another method or image dimension."""
    if method is not None:
        wanted = [method] if isinstance(method, str) else list(method)
        if card["method"] not in wanted:
            task = _TASK_OF_METHOD.get(wanted[0], "this task")
            needs = " or ".join(wanted)
            raise ModelFileError(
                f"{name} is a {card['method']} model, the {task} needs a {needs} model.",
                f"Choose a {needs} model file.",
            )
    if ndim is not None and card["ndim"] != ndim:
        raise ModelFileError(
            f"{name} is a {card['ndim']}D model given for a {ndim}D image.",
            f"Choose a {ndim}D model, or give a {card['ndim']}D image.",
        )


def load_model(
    path: str | os.PathLike[str],
    *,
    method: str | Iterable[str] | None = None,
    ndim: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a model's weights and validated card; never unpickles.

    Args:
        path: ``NAME.safetensors``, ``NAME.json`` or ``NAME``.
        method: the method(s) the caller can run (e.g. ``"spac"``); None accepts any.
        ndim: the image dimension (2 or 3) the caller has; None accepts any.
        device: where to put the tensors.

    Returns:
        ``(state_dict, card)``.

    Raises:
        ModelFileError: with what was wrong and what to do (see the module docstring).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path, card_path = model_paths(path)
    if not weights_path.is_file():
        raise ModelFileError(
            f"Model weights file {weights_path} does not exist.",
            "Check the path; a model is NAME.safetensors with its NAME.json card next to it.",
        )
    card = read_card(card_path)
    _check_purpose(card, weights_path.name, method, ndim)
    if _sha256(weights_path) != card["sha256"]:
        raise ModelFileError(
            f"Model weights {weights_path} do not match the checksum in their card: the file is corrupt or was "
            "modified.",
            _REEXPORT,
        )
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(
            f"Model weights {weights_path} are not a readable safetensors file ({exc}).",
            f"{_REEXPORT} StepRL never loads pickled (.pt/.pth) files.",
        ) from exc
    bad = nonfinite_tensors(state)
    if bad:
        raise ModelFileError(
            f"Model weights {weights_path} hold NaN or infinite values (in {_list(bad)}): the training diverged, "
            "or the weights were damaged before they were saved.",
            "Use another model (e.g. model_best rather than model_last of the run), or train again.",
        )
    import torch

    target = torch.device(device)
    if target.type != "cpu":
        state = {k: v.to(target) for k, v in state.items()}
    return state, card


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity (a diverged run or a
    damaged file: either would poison, or crash, whatever computes with them)."""
    import torch

    return [name for name, t in tensors.items()
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]


def _list(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_state_dict(
    module: torch.nn.Module, state_dict: dict[str, torch.Tensor], model_path: str | os.PathLike[str]
) -> None:
    """Load ``state_dict`` into ``module`` after strict key and shape checks.

    Raises:
        ModelFileError: naming the first missing, unexpected and mis-shaped tensors, which
            means the card's ``config`` does not build the network the weights came from.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} (file {tuple(state_dict[k].shape)}, network {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{label} tensors: {', '.join(names[:3])}{more}")
    if parts:
        raise ModelFileError(
            f"Model {model_path} does not fit the network built from its card's config ({'; '.join(parts)}).",
            "The card's config does not match the weights: re-export the model with this steprl version, "
            "or ask its author for a matching card.",
        )
    module.load_state_dict(state_dict, strict=True)


def list_models(folder: str | os.PathLike[str]) -> list[tuple[Path, dict[str, Any]]]:
    """``(weights_path, card)`` of every valid model in ``folder`` (not recursive), sorted by name.

    Weights files without a valid card are skipped with a logged warning; the weights
    themselves are not hashed here (that happens in :func:`load_model`), so listing is cheap.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    found: list[tuple[Path, dict[str, Any]]] = []
    for weights in sorted(root.glob("*" + WEIGHTS_SUFFIX)):
        if weights.name.startswith("."):
            continue  # a temporary file of a save in progress
        try:
            found.append((weights, read_card(weights)))
        except ModelFileError as exc:
            logger.warning("Skipping %s: %s", weights, exc)
    return found
