"""Command-line arguments of the registration sub-commands (``register``, ``train registration``,
``evaluate registration``). Each parser names its handler as ``"module:function"`` so the heavy
modules are imported only for the command that runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from steprl.configargs import ConfigOptions
from steprl.outputfolder import output_path
from steprl.registration.config import SPACConfig, SPACTrainConfig

#: ``train registration``'s hyper-parameters: one option per field of the config classes, whose
#: docstrings and defaults are the options' help and defaults (steprl.configargs). The ``unset``
#: ones default to what the data or another option asks for (steprl.registration.training).
TRAIN_OPTIONS = ConfigOptions(SPACTrainConfig, rename={"batch_pairs": "batch"},
                              unset=("ncc_weight", "dice_weight", "test_max_step", "val_steps"),
                              metavar={"sac_start": "N", "grad_clip": "NORM", "train_max_step": "VOXELS",
                                       "test_max_step": "VOXELS", "label_sigma": "VOXELS", "distance_clip": "VOXELS",
                                       "unroll": "W"})
NETWORK_OPTIONS = ConfigOptions(SPACConfig, exclude=("ndim", "grid", "prior_window"),
                                rename={"zero_mean": "zero-mean-step"}, unset=("plan_dim",),
                                metavar={"log_std_range": ("MIN", "MAX"), "field_level": "K", "stem": "C",
                                         "step_bound": "VOXELS", "prior_scale": "S", "prior_sigma": "VOXELS"})


def add_parsers(sub, train_sub, evaluate_sub, add_common) -> None:
    """Register the registration commands on the top-level, ``train`` and ``evaluate`` sub-parsers."""
    _add_register(sub, add_common)
    _add_train(train_sub, add_common)
    _add_evaluate(evaluate_sub, add_common)


def _add_register(sub, add_common) -> None:
    p = sub.add_parser("register", help="register MOVING onto FIXED with a SPAC model, step by step",
                       description="Writes warped image, displacement fields, metrics.json and steps.png to --out.")
    p.add_argument("fixed", type=Path, help="fixed image (NIfTI, NRRD, MHA, PNG, or a DICOM folder)")
    p.add_argument("moving", type=Path, help="moving image (any grid, orientation and intensity range)")
    p.add_argument("--model", default=None, help="model file (.safetensors) or bundled model name "
                                                 "(default: the bundled model for the images' dimension)")
    p.add_argument("--steps", type=int, default=None, help="policy steps (default: the model's, usually 20)")
    p.add_argument("--out", type=output_path, required=True,
                   help="output folder (created; the files of an earlier steprl run there are replaced, other "
                        "files are never touched)")
    p.add_argument("--fixed-labels", type=Path, help="label map of the fixed image (for Dice per step)")
    p.add_argument("--moving-labels", type=Path, help="label map of the moving image (for Dice per step)")
    p.add_argument("--prealign", action="store_true", help="affine pre-alignment (SimpleITK) before SPAC")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast of the policy network (default: on for CUDA and CPUs with native bf16)")
    p.add_argument("--max-step", type=float, default=None, help="per-step clamp in voxels (default: model's)")
    p.add_argument("--early-stop", type=int, default=None, metavar="K",
                   help="stop after K steps without NCC improvement")
    p.add_argument("--no-step-fields", action="store_true", help="do not write the per-step displacement fields")
    p.add_argument("--refine", type=int, default=None, metavar="N",
                   help="N refinement steps after the policy's: Adam on local NCC + smoothness of the composed field "
                        "(test-time optimisation), shown as further steps (default: the model card's; 0: off)")
    p.set_defaults(handler="steprl.registration.commands:register_command")
    add_common(p)


def _add_train(tsub, add_common) -> None:
    r = tsub.add_parser("registration", help="train a SPAC registration model",
                        description="Pairs are drawn at random among the images. Runs unchanged under torchrun.")
    _add_train_data(r)
    _add_synthseg(r)
    _add_run(r)
    TRAIN_OPTIONS.add_to(r.add_argument_group("SPAC learner"))
    NETWORK_OPTIONS.add_to(r.add_argument_group("SPAC network"))
    r.set_defaults(handler="steprl.registration.commands:train_command")
    add_common(r)


def _add_train_data(r) -> None:
    """The training data and the run folder."""
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", type=Path, help="image files, or one folder of images")
    src.add_argument("--synthetic", nargs="+", type=int, metavar="N",
                     help="train on endless synthetic blob pairs of this grid (e.g. 64 64): a quick self-check")
    src.add_argument("--synthseg", type=Path, metavar="DIR",
                     help="train a contrast-agnostic 3D model on images synthesised from the SynthSeg label maps "
                          "in DIR (training_seg_*.nii.gz); the last --test-count subjects are never used")
    r.add_argument("--labels", nargs="+", type=Path, help="label maps (files in image order, or one folder); "
                                                         "default: 3-class K-means pseudo-labels")
    r.add_argument("--out", type=output_path, required=True,
                   help="run folder (checkpoints, models, logs); resumed if present")
    r.add_argument("--grid", nargs="+", type=int, help="network grid, array order (default 128 128 / 128 128 128)")
    r.add_argument("--val-count", type=int, default=2, help="images (or --synthseg subjects) kept for validation")
    r.add_argument("--gamma-augment", type=float, default=0.0, metavar="R",
                   help="random gamma on training images, log-uniform in +-R (e.g. 0.4; default off)")
    r.add_argument("--data-licence", default=None, help="licence / attribution of the training data, kept in the "
                                                        "model card (e.g. 'OASIS: research use, cite ...')")


def _add_synthseg(r) -> None:
    """The pairs synthesised from SynthSeg label maps."""
    r.add_argument("--test-count", type=int, default=3, help="--synthseg subjects held out for comparisons")
    r.add_argument("--synth-spacing", type=float, default=3.3, help="--synthseg voxel size in mm (default 3.3: "
                                                                     "64^3 voxels span a whole head)")
    r.add_argument("--cross-contrast", action="store_true",
                   help="--synthseg: give each image of a pair its own contrast (multi-modal; loss from labels "
                        "only) instead of one random contrast per pair")
    r.add_argument("--known-pairs", type=float, default=0.0, metavar="FRACTION",
                   help="--synthseg: share of training pairs made from ONE subject deformed by a known random "
                        "field, which the loss also regresses (default 0: all pairs are two subjects)")
    r.add_argument("--known-field-scale", type=float, default=1.0, metavar="S",
                   help="--known-pairs: multiply the ranges of the known field (rotation, scaling, shear, shift, "
                        "elastic) by S; larger fields are learned sooner (default 1: what an affine alignment leaves)")
    r.add_argument("--supersample", type=int, default=1, metavar="F",
                   help="--synthseg: paint images on a grid F times finer and average them down (partial volume: "
                        "sub-voxel shifts stay visible; default 1; costs F^3 in synthesis)")
    r.add_argument("--t1-fraction", type=float, default=0.3, metavar="P",
                   help="--synthseg: share of contrasts drawn from SynthSeg's T1 priors (default 0.3; 1 for a "
                        "T1-first stage)")
    r.add_argument("--strip-fraction", type=float, default=0.0, metavar="P",
                   help="--synthseg: share of pairs shown brain-extracted (skull and other non-brain labels "
                        "painted as background), for skull-stripped scans and templates (default 0)")


def _add_run(r) -> None:
    """The schedule, warm start and the run's options."""
    r.add_argument("--epochs", type=int, default=20)
    r.add_argument("--iterations", type=int, default=50, help="episodes per epoch")
    r.add_argument("--init-from", default=None, metavar="MODEL",
                   help="start from the policy weights of a model file or bundled model (same network layout; "
                        "the grid may differ): warm-start a new recipe, or fine-tune a model on your own scans. "
                        "Ignored when --out holds a run to resume")
    r.add_argument("--no-resume", action="store_true",
                   help="start afresh even if --out holds an interrupted run (its files are overwritten)")
    r.add_argument("--no-tensorboard", action="store_true")


def _add_evaluate(esub, add_common) -> None:
    r = esub.add_parser("registration", help="evaluate SPAC over pairs (optionally against ANTs SyN and Elastix)")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", type=Path, help="CSV with columns fixed,moving[,fixed_labels,moving_labels]")
    src.add_argument("--images", nargs="+", type=Path, help="images; each is registered to the next (cyclic)")
    r.add_argument("--labels", nargs="+", type=Path, help="label maps for --images, same order")
    r.add_argument("--model", default=None)
    r.add_argument("--steps", type=int, default=None)
    r.add_argument("--prealign", action="store_true")
    r.add_argument("--baselines", nargs="+", choices=("syn", "elastix"), default=(), metavar="TOOL",
                   help="also register every pair with these tools (syn: ANTs affine + SyN; elastix: affine + "
                        "B-spline; pip install 'steprl[compare]') and print one row per pair and method")
    r.add_argument("--report-steps", nargs="+", type=int, default=None, metavar="K",
                   help="one row per pair and method, SPAC after each of these steps (e.g. 1 10 20; "
                        "default with --baselines: 1 10 20 up to --steps)")
    r.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the tools and torch in the method comparison (default: all cores)")
    r.add_argument("--refine", type=int, default=None, metavar="N",
                   help="refinement steps after the policy's (default: the model card's; 0: the policy alone). With "
                        "--baselines the policy's rows stay the policy alone and SPAC + refinement is one more row")
    r.add_argument("--json", type=output_path, help="also write the table as JSON")
    r.set_defaults(handler="steprl.registration.commands:evaluate_command")
    add_common(r)
