"""``steprl train registration``: build the data source, the SPAC learner, and run the fit loop.

Runs unchanged under torchrun: ``torchrun --nproc_per_node 2 -m steprl train registration ...``
(gloo on CPU, nccl on GPU); every rank draws its own pairs, gradients are averaged.
"""

from __future__ import annotations

import logging
import sys

from steprl.errors import InputError

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
    out = {"unroll": args.unroll}
    test_max_step = args.test_max_step if args.test_max_step is not None else (
        args.train_max_step if args.unroll else None)
    if test_max_step is not None:
        out["test_max_step"] = test_max_step
    val_steps = args.val_steps if args.val_steps is not None else (20 if args.unroll else None)
    if val_steps is not None:
        if val_steps < 1:
            raise InputError(f"--val-steps must be >= 1, got {val_steps}.", "Give e.g. --val-steps 20.")
        out["val_steps"] = val_steps
    return out


def train_registration(args) -> None:
    from steprl.registration.learner import SPACLearner, SPACTrainConfig
    from steprl.registration.networks import SPACConfig
    from steprl.training.distributed import cleanup, exit_if_distributed, init_distributed
    from steprl.training.loop import fit

    dist = init_distributed(args.device)
    try:
        source, grid, data = build_source(args)
        ndim = len(grid)
        try:
            net_cfg = SPACConfig(ndim=ndim, grid=grid, channels=tuple(args.channels or (16, 32, 32, 32)),
                                 plan_dim=args.plan_dim or (32 if ndim == 2 else 64), field_level=args.field_level,
                                 norm=args.norm, stem=args.stem, features=args.features,
                                 step_bound=args.step_bound, zero_mean=args.zero_mean_step,
                                 field_input=args.field_input, prior_scale=args.prior_scale,
                                 prior_window=args.ncc_window, prior_sigma=args.prior_sigma)
        except ValueError as err:
            problem = f"Invalid network settings: {str(err).rstrip('.')}."
            raise InputError(problem, "Choose a --grid divisible by 2**len(--channels), a --field-level "
                                      "below len(--channels), and --stem / --step-bound >= 0.") from err
        weights = {}
        if args.synthseg:  # exact labels: Dice in the loss too; NCC only when both images share a contrast
            weights = {"ncc_weight": 0.0 if args.cross_contrast else 1.0, "dice_weight": 1.0}
        if args.known_pairs > 0:
            weights["field_weight"] = args.field_weight
        if args.ncc_weight is not None:
            weights["ncc_weight"] = args.ncc_weight
        if args.dice_weight is not None:
            weights["dice_weight"] = args.dice_weight
        cfg = SPACTrainConfig(batch_pairs=args.batch, episode_steps=args.episode_steps, lr=args.lr, seed=args.seed,
                              replay_batch=args.replay_batch, sac_start=args.sac_start, grad_clip=args.grad_clip,
                              train_max_step=args.train_max_step, smooth_weight=args.smooth_weight,
                              ncc_window=args.ncc_window, label_sigma=args.label_sigma, bf16=args.bf16,
                              distance_weight=args.distance_weight, distance_clip=args.distance_clip, **weights,
                              **_rollout_settings(args))
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
            print(f"best validation Dice {result.best_score:.4f} at epoch {result.best_epoch}; "
                  f"model: {args.out}/model_best.safetensors", file=sys.stdout)
    finally:
        cleanup()
    exit_if_distributed(dist)
