"""``steprl train registration``: build the data source, the SPAC learner, and run the fit loop.

Runs unchanged under torchrun: ``torchrun --nproc_per_node 2 -m steprl train registration ...``
(gloo on CPU, nccl on GPU); every rank draws its own pairs, gradients are averaged.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from steprl.errors import CheckpointError, InputError
from steprl.registration.cli_args import NETWORK_OPTIONS, TRAIN_OPTIONS
from steprl.registration.config import TEST_STEPS, SPACConfig, SPACTrainConfig, missing_settings

log = logging.getLogger(__name__)


def _default_grid(ndim: int) -> tuple[int, ...]:
    return (128,) * ndim


def build_source(args, ndim_hint: int | None = None):
    """The pair source and a JSON description of the data, from the CLI arguments."""
    from steprl.io import expand_files
    from steprl.registration.data import ImagePairSource, SyntheticPairSource

    if getattr(args, "known_pairs", 0.0) and not args.synthseg:
        raise InputError("--known-pairs needs --synthseg: only synthesised pairs have a known field.",
                         "Drop --known-pairs, or train with --synthseg DIR.")
    if args.synthetic:
        grid = tuple(args.synthetic)
        return SyntheticPairSource(grid, seed=args.seed), grid, {"kind": "synthetic blobs", "grid": list(grid)}
    if args.synthseg:
        return _synthseg_source(args)
    images = expand_files(args.images, "training images")
    labels = expand_files(args.labels, "label maps") if args.labels else None
    from steprl.io import read_image

    ndim = read_image(images[0], name="training image").ndim
    grid = tuple(args.grid) if args.grid else _default_grid(ndim)
    if len(grid) != ndim:
        raise InputError(f"--grid has {len(grid)} values but the images are {ndim}D.", f"Give {ndim} values.")
    source, _ = ImagePairSource.from_files(images, labels, grid, val_count=args.val_count, seed=args.seed,
                                           gamma_range=args.gamma_augment)
    data = {"kind": "files", "count": len(images), "folder": str(images[0].parent),
            "labels": "given" if labels else "3-class K-means pseudo-labels", "gamma_augment": args.gamma_augment}
    return source, grid, data


def _synthseg_source(args):
    """Pairs synthesised from SynthSeg label maps (held-out subjects validate), 3D only."""
    from steprl.synth import synthseg
    from steprl.synth.from_labels import scaled_augment
    from steprl.synth.registration_pairs import PAIR_AUGMENT, SynthSegPairSource

    grid = tuple(args.grid) if args.grid else (64, 64, 64)
    if not 0.0 <= args.known_pairs <= 1.0:
        raise InputError(f"--known-pairs is a fraction of the training pairs, got {args.known_pairs}.",
                         "Give a value from 0 to 1, e.g. --known-pairs 0.5.")
    if args.supersample < 1:
        raise InputError(f"--supersample must be a whole number >= 1, got {args.supersample}.",
                         "Give 1 (paint the training grid itself) or 2.")
    if args.known_field_scale <= 0:
        raise InputError(f"--known-field-scale must be positive, got {args.known_field_scale}.",
                         "Give e.g. --known-field-scale 2 for fields twice the default ranges.")
    if len(grid) != 3:
        raise InputError(f"--synthseg trains 3D models but --grid has {len(grid)} values.",
                         "Give 3 values, e.g. --grid 64 64 64.")
    split = synthseg.split_subjects(synthseg.list_label_maps(args.synthseg), args.val_count, args.test_count)
    for option, value in (("--t1-fraction", args.t1_fraction), ("--strip-fraction", args.strip_fraction)):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"{option} is a share, from 0 to 1; got {value}.",
                             f"Give a value from 0 to 1, e.g. {option} 0.5.")
    source = SynthSegPairSource(split.train, split.validation, grid, spacing=args.synth_spacing, seed=args.seed,
                                same_contrast=not args.cross_contrast, known_fraction=args.known_pairs,
                                pair_augment=scaled_augment(PAIR_AUGMENT, args.known_field_scale),
                                supersample=args.supersample, t1_probability=args.t1_fraction,
                                strip_probability=args.strip_fraction)
    data = {"kind": "images synthesised from SynthSeg label maps (random contrast, bias, noise, blur, "
                    "affine + elastic augmentation), subjects affinely aligned by structure centroids",
            "folder": str(args.synthseg), "train_subjects": [p.name for p in split.train],
            "validation_subjects": [p.name for p in split.validation],
            "held_out_subjects": [p.name for p in split.test], "spacing_mm": args.synth_spacing,
            "labels": "32 SynthSeg brain structures",
            "contrast": "each image its own" if args.cross_contrast else "one random contrast per pair",
            "known_field_pairs": args.known_pairs, "known_field_scale": args.known_field_scale,
            "supersample": args.supersample, "t1_fraction": args.t1_fraction,
            "brain_extracted_fraction": args.strip_fraction}
    return source, grid, data


def _rollout_settings(args) -> dict:
    """Validation depth and test clamp: with ``--unroll``, those of the training rollout (same steps, same clamp)."""
    if args.unroll < 0:
        raise InputError(f"--unroll must be >= 0 steps, got {args.unroll}.",
                         "Give e.g. --unroll 4, or 0 to turn it off.")
    if args.unroll > args.episode_steps:
        raise InputError(f"--unroll {args.unroll} is longer than an episode (--episode-steps {args.episode_steps}).",
                         "Give an --unroll window of at most --episode-steps.")
    return {"test_max_step": args.train_max_step, "val_steps": TEST_STEPS} if args.unroll else {}


def _loss_weights(args) -> dict:
    """The loss weights the data asks for: the exact labels of --synthseg add Dice; NCC needs one contrast per pair."""
    if not args.synthseg:
        return {}
    return {"dice_weight": 1.0, **({"ncc_weight": 0.0} if args.cross_contrast else {})}


def registration_configs(args, grid: tuple[int, ...]) -> tuple[SPACConfig, SPACTrainConfig]:
    """The network and learner settings from the parsed ``train registration`` arguments, for the
    data's network ``grid``."""
    try:
        net_cfg = NETWORK_OPTIONS.build(args, ndim=len(grid), grid=grid, prior_window=args.ncc_window,
                                        **({"plan_dim": 64} if len(grid) == 3 else {}))
    except ValueError as err:
        problem = f"Invalid network settings: {str(err).rstrip('.')}."
        raise InputError(problem, "Choose a --grid divisible by 2**len(--channels), a --field-level "
                                  "below len(--channels), and --stem / --step-bound >= 0.") from err
    cfg = TRAIN_OPTIONS.build(args, **_loss_weights(args), **_rollout_settings(args))
    if cfg.val_steps < 1:
        raise InputError(f"--val-steps must be >= 1, got {cfg.val_steps}.", "Give e.g. --val-steps 20.")
    if not args.known_pairs:  # no pair has a known field: no field loss, recorded as such
        cfg = dataclasses.replace(cfg, field_weight=0.0)
    return net_cfg, cfg


def _refuse_an_old_run(args) -> None:
    """A run begun before every setting was stored cannot resume as it is: name the one-off converter."""
    from steprl.training.checkpoint import read_checkpoint_state

    last = Path(args.out) / "checkpoints" / "last.safetensors"
    if args.no_resume or not last.is_file():
        return
    saved = read_checkpoint_state(last).get("config", {})
    missing = missing_settings(saved) if saved.get("method") == "spac" else []
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise CheckpointError(f"{args.out} holds a run begun by an older steprl: its settings lack {shown}.",
                              f"Convert it once: python trainer/tools/convert_registration_run.py {args.out} "
                              "(then run the same command again), or start afresh with --no-resume.")


def train_registration(args) -> None:
    from steprl.registration.learner import SPACLearner
    from steprl.training.distributed import cleanup, exit_if_distributed, init_distributed
    from steprl.training.loop import fit, print_result

    _refuse_an_old_run(args)
    dist = init_distributed(args.device)
    try:
        source, grid, data = build_source(args)
        net_cfg, cfg = registration_configs(args, grid)
        learner = SPACLearner(net_cfg, cfg, source, dist)
        if args.init_from:
            learner.init_from(args.init_from)
            data["init_from"] = str(args.init_from)
        if args.data_licence:
            data["licence"] = args.data_licence
        learner.data_description = data
        config = {"method": "spac", "network": net_cfg.to_dict(), "training": cfg.to_dict(), "data": data,
                  "epochs": args.epochs}
        result = fit(learner, args.out, epochs=args.epochs, iterations_per_epoch=args.iterations, config=config,
                     dist=dist, resume=not args.no_resume, tensorboard=not args.no_tensorboard,
                     progress=not args.quiet)
        if dist.is_main:
            print_result(result, args.out)
    finally:
        cleanup()
    exit_if_distributed(dist)
