"""Command-line arguments of the registration sub-commands (``register``, ``train registration``,
``evaluate registration``). Each parser names its handler as ``"module:function"`` so the heavy
modules are imported only for the command that runs.
"""

from __future__ import annotations

from pathlib import Path

from steprl.outputfolder import output_path


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
    _add_train_loss(r)
    _add_train_network(r)
    _add_train_recipe(r)
    r.set_defaults(handler="steprl.registration.commands:train_command")
    add_common(r)


def _add_train_data(r) -> None:
    """The training data, the run folder and the schedule."""
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
    r.add_argument("--epochs", type=int, default=20)
    r.add_argument("--iterations", type=int, default=50, help="episodes per epoch")
    r.add_argument("--batch", type=int, default=4, help="pairs per episode")
    r.add_argument("--episode-steps", type=int, default=5, help="steps per training episode")
    r.add_argument("--replay-batch", type=int, default=16,
                   help="states per SAC update (default 16; the SAC update dominates a step's cost in 3D)")
    r.add_argument("--val-count", type=int, default=2, help="images (or --synthseg subjects) kept for validation")
    r.add_argument("--test-count", type=int, default=3, help="--synthseg subjects held out for comparisons")
    r.add_argument("--synth-spacing", type=float, default=3.3, help="--synthseg voxel size in mm (default 3.3: "
                                                                     "64^3 voxels span a whole head)")
    r.add_argument("--cross-contrast", action="store_true",
                   help="--synthseg: give each image of a pair its own contrast (multi-modal; loss from labels "
                        "only) instead of one random contrast per pair")


def _add_train_loss(r) -> None:
    """The registration loss's weights, SAC's start, and the known-field pairs."""
    r.add_argument("--ncc-weight", type=float, default=None,
                   help="weight of -LNCC in the registration loss (default 1; 0 with --cross-contrast)")
    r.add_argument("--dice-weight", type=float, default=None,
                   help="weight of (1 - label soft Dice) in the loss (default 0; 1 with --synthseg)")
    r.add_argument("--sac-start", type=int, default=0, metavar="N",
                   help="episodes before the first SAC update (warm-up on the registration loss alone; default 0)")
    r.add_argument("--grad-clip", type=float, default=None, metavar="NORM",
                   help="clip the registration loss's gradient norm (default: no clipping)")
    r.add_argument("--train-max-step", type=float, default=1.0, metavar="VOXELS",
                   help="per-step clamp in training episodes (default 1, as official SPAC; test time uses 3)")
    r.add_argument("--known-pairs", type=float, default=0.0, metavar="FRACTION",
                   help="--synthseg: share of training pairs made from ONE subject deformed by a known random "
                        "field, which the loss also regresses (default 0: all pairs are two subjects)")
    r.add_argument("--known-field-scale", type=float, default=1.0, metavar="S",
                   help="--known-pairs: multiply the ranges of the known field (rotation, scaling, shear, shift, "
                        "elastic) by S; larger fields are learned sooner (default 1: what an affine alignment leaves)")
    r.add_argument("--supersample", type=int, default=1, metavar="F",
                   help="--synthseg: paint images on a grid F times finer and average them down (partial volume: "
                        "sub-voxel shifts stay visible; default 1; costs F^3 in synthesis)")
    r.add_argument("--field-weight", type=float, default=1.0,
                   help="weight of the squared error to the known field (voxels^2) with --known-pairs (default 1)")


def _add_train_network(r) -> None:
    """The planner and actor's layout, and the one-step or unrolled update."""
    r.add_argument("--channels", nargs="+", type=int, default=None, help="encoder widths (default 16 32 32 32)")
    r.add_argument("--field-level", type=int, default=1, metavar="K",
                   help="the actor predicts each step on a grid 2**K times coarser than the network grid "
                        "(default 1: half resolution; 2: smoother, cheaper steps)")
    r.add_argument("--plan-dim", type=int, default=None, help="plan size (default 32 in 2D, 64 in 3D)")
    r.add_argument("--norm", choices=("none", "instance"), default="none",
                   help="normalisation after every conv of planner and actor (default none; the 3D recipe: instance)")
    r.add_argument("--stem", type=int, default=0, metavar="C",
                   help="width of a full-resolution conv block before the first stride (default 0: none)")
    r.add_argument("--features", choices=("pair", "diff", "demons", "ncc-gradient"), default="pair",
                   help="what the planner reads: the pair (default), + fixed - warped (diff), + the demons force "
                        "(fixed - warped) * grad(warped) (demons), or + the smoothed local-NCC gradient direction "
                        "(ncc-gradient; with --prior-scale the actor also steps along it)")
    r.add_argument("--prior-scale", type=float, default=0.0, metavar="VOXELS",
                   help="with --features ncc-gradient: the initial RMS size of a prior step along the NCC gradient, "
                        "a learned scale the actor corrects (default 0: the scale starts at 0)")
    r.add_argument("--prior-sigma", type=float, default=2.0, metavar="VOXELS",
                   help="Gaussian smoothing of the ncc-gradient feature, in network-grid voxels (default 2)")
    r.add_argument("--step-bound", type=float, default=0.0, metavar="VOXELS",
                   help="bound each step inside the network, b * tanh(a / b) (default 0: unbounded, the "
                        "environment's clamp alone)")
    r.add_argument("--field-input", action="store_true",
                   help="the state also holds the accumulated field, so the policy knows how far it has moved "
                        "(--init-from a model without it widens its input layer with zero weights)")
    r.add_argument("--zero-mean-step", action="store_true",
                   help="remove each step's mean displacement (no global shift per step: the affine pre-alignment "
                        "handles it; stops a normalised policy's constant drift)")
    r.add_argument("--unroll", type=int, default=0, metavar="W",
                   help="train through the policy's own rollout, backpropagating through windows of W composed "
                        "steps (the 3D recipe; default 0: the paper's one-step update)")


def _add_train_recipe(r) -> None:
    """Smoothness and label losses, precision, validation, contrasts, warm start, the run's options."""
    r.add_argument("--smooth-weight", type=float, default=1.0,
                   help="weight of the |grad u|^2 smoothness loss (of the step; of the composed field with --unroll)")
    r.add_argument("--label-sigma", type=float, default=0.0, metavar="VOXELS",
                   help="blur both label maps by this Gaussian before the loss's Dice (thin structures then overlap, "
                        "and give a gradient, over a wider range of misalignment; default 0)")
    r.add_argument("--distance-weight", type=float, default=0.0,
                   help="weight of the labels' truncated signed-distance loss (voxels^2; unbiased by interpolation "
                        "blur, unlike soft Dice on coarse grids: the 3D recipe uses it instead of --dice-weight)")
    r.add_argument("--distance-clip", type=float, default=3.0, metavar="VOXELS",
                   help="truncation of the signed distance maps (default 3 voxels)")
    r.add_argument("--bf16", action="store_true",
                   help="--unroll: run the policy under bfloat16 autocast (faster on GPUs and on CPUs with AMX or "
                        "AVX512-BF16; warps and losses stay float32). Measure first: "
                        "trainer/benchmarks/bench_spac_updates.py")
    r.add_argument("--ncc-window", type=int, default=9, help="local NCC window in voxels (default 9)")
    r.add_argument("--test-max-step", type=float, default=None, metavar="VOXELS",
                   help="per-step clamp at validation and in the model card (default 3; --train-max-step with "
                        "--unroll: the same clamp in training and at test)")
    r.add_argument("--val-steps", type=int, default=None,
                   help="policy steps of the validation rollouts (default 10; 20 with --unroll, as at test)")
    r.add_argument("--t1-fraction", type=float, default=0.3, metavar="P",
                   help="--synthseg: share of contrasts drawn from SynthSeg's T1 priors (default 0.3; 1 for a "
                        "T1-first stage)")
    r.add_argument("--strip-fraction", type=float, default=0.0, metavar="P",
                   help="--synthseg: share of pairs shown brain-extracted (skull and other non-brain labels "
                        "painted as background), for skull-stripped scans and templates (default 0)")
    r.add_argument("--init-from", default=None, metavar="MODEL",
                   help="start from the policy weights of a model file or bundled model (same network layout; "
                        "the grid may differ): warm-start a new recipe, or fine-tune a model on your own scans. "
                        "Ignored when --out holds a run to resume")
    r.add_argument("--lr", type=float, default=1e-3, help="learning rate of the registration loss (planner + actor)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--gamma-augment", type=float, default=0.0, metavar="R",
                   help="random gamma on training images, log-uniform in +-R (e.g. 0.4; default off)")
    r.add_argument("--data-licence", default=None, help="licence / attribution of the training data, kept in the "
                                                        "model card (e.g. 'OASIS: research use, cite ...')")
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
