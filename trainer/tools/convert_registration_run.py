"""One-off: let a registration run begun before every setting was stored resume.

A run resumes only when its stored settings equal the new command's (``steprl.training.loop``),
and ``steprl train registration`` refuses a run whose settings lack a key, naming this tool.
Before, the learner's settings left out eight keys while they had their original value
(``field_weight``, ``sac_start``, ``grad_clip``, ``unroll``, ``label_sigma``, ``bf16``,
``distance_weight``, ``distance_clip``), and a run begun before a network option existed lacks
that option. This writes them into a run folder's ``config.json`` and checkpoints (the weights,
optimiser states and their checksums are untouched), so ``--out RUN`` resumes as before::

    python trainer/tools/convert_registration_run.py runs/spac3d_s7

The values written are those the run trained with: the original value of each learner setting,
the default of each network option (what older model cards rebuild with, too), and the NCC
window of the loss for the ``ncc-gradient`` feature's window (as the command line gives it).
Safe to run twice; segmentation runs are left alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

from steprl.registration.config import SPACConfig, SPACTrainConfig
from steprl.training.checkpoint import convert_run_folder, convert_runs_main

#: the learner settings an older run may lack, with the value it trained with (a key absent from
#: its settings meant this value: the resume shim that this tool replaces)
ORIGINAL_VALUES = {"ncc_weight": 1.0, "dice_weight": 0.0, "field_weight": 0.0, "sac_start": 0, "grad_clip": None,
                   "unroll": 0, "label_sigma": 0.0, "bf16": False, "distance_weight": 0.0, "distance_clip": 3.0}
#: the learner's state in a checkpoint (``SPACLearner.state``), for runs older than its last two keys
ORIGINAL_LEARNER_STATE = {"seconds": 0.0, "earlier_runs": []}


def convert_config(config: dict) -> dict:
    """A run's ``config`` in today's form (a copy; unchanged when it is not a registration run's)."""
    if config.get("method") != "spac":
        return dict(config)
    training = {**SPACTrainConfig().to_dict(), **ORIGINAL_VALUES, **config["training"]}
    network = {"prior_window": training["ncc_window"], **config["network"]}
    return {**config, "training": training, "network": SPACConfig.from_dict(network).to_dict()}


def convert_state(state: dict) -> dict:
    """A checkpoint's ``state`` in today's form (a copy): its ``config``, and the learner's own state."""
    if state.get("config", {}).get("method") != "spac":
        return dict(state)
    return {**state, "config": convert_config(state["config"]),
            "learner": {**ORIGINAL_LEARNER_STATE, **state["learner"]}}


def convert_run(run: Path) -> list[Path]:
    """Convert ``config.json`` and every checkpoint of a run folder; the files that changed."""
    return convert_run_folder(run, convert_config, convert_state)


def main(argv: list[str] | None = None) -> int:
    return convert_runs_main(argv, __doc__.split("\n\n")[0], convert_run, "steprl train registration")


if __name__ == "__main__":
    sys.exit(main())
