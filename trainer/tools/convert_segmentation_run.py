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

import sys
from dataclasses import asdict
from pathlib import Path

from steprl.segmentation.config import PA3CConfig, PixelDRLConfig, SegTrainConfig
from steprl.training.checkpoint import convert_run_folder, convert_runs_main


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


def convert_state(state: dict) -> dict:
    """A checkpoint's ``state`` in today's form (a copy): its ``config``."""
    return {**state, "config": convert_config(state["config"])}


def convert_run(run: Path) -> list[Path]:
    """Convert ``config.json`` and every checkpoint of a run folder; the files that changed."""
    return convert_run_folder(run, convert_config, convert_state)


def main(argv: list[str] | None = None) -> int:
    return convert_runs_main(argv, __doc__.split("\n\n")[0], convert_run, "steprl train segmentation")


if __name__ == "__main__":
    sys.exit(main())
