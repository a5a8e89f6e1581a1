"""The top-level sub-commands of ``steprl`` that belong to no single task: ``demo`` and ``info``.

Each function takes the parsed ``argparse.Namespace`` and returns an exit code (see
:mod:`steprl.cli`; the task commands live in ``registration/commands.py`` and
``segmentation/commands.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

from steprl.outputfolder import check_output_folder

#: The bundled sample pair (ITK's example brain slices, see ``data/ATTRIBUTION.md``).
SAMPLE_DIR = Path(__file__).resolve().parent / "data"


def demo(args) -> int:
    """The main job on the embedded default: the bundled sample pair and the bundled 2D model."""
    from steprl import io
    from steprl.modelfile import default_model
    from steprl.registration.outputs import print_summary, run_and_write

    check_output_folder(args.out)
    fixed = io.read_image(SAMPLE_DIR / "sample_fixed.nrrd", name="sample fixed image")
    moving = io.read_image(SAMPLE_DIR / "sample_moving.nrrd", name="sample moving image")
    summary = run_and_write(fixed, moving, default_model(2), args.out, steps=args.steps, device=args.device,
                            quiet=args.quiet, inputs={"fixed": "bundled sample_fixed.nrrd",
                                                      "moving": "bundled sample_moving.nrrd"})
    print_summary(summary)
    print(f"Open {Path(args.out) / 'steps.png'} to see the steps.")
    return 0


def info(args) -> int:
    """Print the card of ``args.model`` (readable, or raw with ``args.json``) and the parameter counts."""
    from steprl.modelfile import read_card, resolve_model_path
    from steprl.modelinfo import describe

    path = resolve_model_path(args.model)
    card = read_card(path)
    if args.json:
        print(json.dumps(card, indent=2))
        return 0
    parameters = None
    if card.get("method") == "spac":
        from steprl.registration.model import load_spac
        from steprl.registration.networks import Critic, count_parameters

        spac = load_spac(path)
        parameters = (f"policy (planner + actor) {count_parameters(spac.policy):,}; each critic (training only) "
                      f"{count_parameters(Critic(spac.config)):,}")
    print(describe(card, path, parameters))
    return 0
