"""One-off: let a segmentation run started before the settings moved to ``steprl.segmentation.config`` resume.

A run resumes only when its stored settings equal the new command's (``steprl.training.loop``).
Since the move the stored settings are the whole config classes: ``training`` always has
``grad_clip``; ``pa3c`` always has the three ``class_balance`` keys and no longer the unused
``lr``, ``lr_decay`` and ``lr_decay_every``; ``network`` has every field of ``PixelDRLConfig``.
This rewrites those settings in a run folder's ``config.json`` and checkpoints (the weights,
optimiser states and their checksums are untouched), so ``--out RUN`` resumes as before::

    python trainer/tools/convert_segmentation_run.py runs/pixeldrl_wm

Safe to run twice; registration runs are left alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from steprl.atomic import atomic_path, write_text
from steprl.segmentation.config import PA3CConfig, PixelDRLConfig, SegTrainConfig

_META_KEY = "steprl"  # steprl.training.checkpoint's metadata key


def convert_config(config: dict) -> dict:
    """A run's ``config`` in today's form (a copy; unchanged when it is not a segmentation run's)."""
    if config.get("method") not in ("pixeldrl-mg", "unet"):
        return dict(config)
    out = dict(config)
    out["training"] = {**SegTrainConfig().to_dict(), **config.get("training", {})}
    if config["method"] == "pixeldrl-mg":
        out["network"] = PixelDRLConfig.from_dict(config["network"]).to_dict()
        known = {k: v for k, v in config.get("pa3c", {}).items() if k in PA3CConfig.__dataclass_fields__}
        out["pa3c"] = {**asdict(PA3CConfig()), **known}
    return out


def rewrite_checkpoint_config(path: Path, change) -> bool:
    """Replace the settings stored in one checkpoint by ``change(settings)``; True when they changed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    meta = json.loads(metadata[_META_KEY])
    before = meta["state"]["config"]
    after = change(before)
    if after == before:
        return False
    meta["state"]["config"] = after
    tensors = load_file(str(path))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**metadata, _META_KEY: json.dumps(meta)})
    return True


def convert_run(run: Path) -> list[Path]:
    """Convert ``config.json`` and every checkpoint of a run folder; the files that changed."""
    changed = []
    config_file = run / "config.json"
    if config_file.is_file():
        saved = json.loads(config_file.read_text(encoding="utf-8"))
        converted = {**saved, "config": convert_config(saved["config"])}
        if converted != saved:
            write_text(config_file, json.dumps(converted, indent=2))
            changed.append(config_file)
    checkpoints = sorted((run / "checkpoints").glob("*.safetensors"))
    changed += [p for p in checkpoints if rewrite_checkpoint_config(p, convert_config)]
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (steprl train segmentation --out)")
    for run in parser.parse_args(argv).runs:
        changed = convert_run(run)
        print(f"{run}: " + (", ".join(str(p.relative_to(run)) for p in changed) if changed else "already current"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
