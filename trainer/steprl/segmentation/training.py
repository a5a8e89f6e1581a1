"""``steprl train segmentation``: build the slice source and the learner, then run the fit loop.

    steprl train segmentation --images imgs/ --labels labs/ --out runs/seg            # PixelDRL-MG
    steprl train segmentation --images imgs/ --labels labs/ --out runs/unet --method unet
    steprl train segmentation --synthetic 64 64 --out runs/ellipses --epochs 4       # self-check
    steprl train segmentation --synthseg ../shared/data/synthseg --out runs/wm     # white matter, synthetic MRI
    steprl train segmentation --synthseg ../shared/data/synthseg --out runs/wm2 --init-from pixeldrl_wm ...

Checkpoints, resume, validation, TensorBoard and torchrun (DDP: every rank draws its own
batches from ``seed + 1000 * rank``, gradients are averaged) come from
:func:`steprl.training.loop.fit`, exactly as for registration.

For scripts and tests, :func:`build_learner` and :func:`train` do the same without argparse; the
hyper-parameters and their defaults are those of :mod:`steprl.segmentation.config`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

from steprl.errors import InputError

log = logging.getLogger(__name__)

METHODS = {"pixeldrl": "pixeldrl-mg", "pixeldrl-mg": "pixeldrl-mg", "unet": "unet"}


def build_source(args):
    """The slice source from the CLI arguments (files, SynthSeg-synthesised brains, or synthetic ellipses)."""
    from steprl.segmentation.data import SliceSet, SyntheticSliceSource

    if getattr(args, "synthseg", None):
        from steprl.synth.segmentation_slices import SynthSegSliceSource

        return SynthSegSliceSource(args.synthseg, tuple(args.size), label_values=args.label_values, seed=args.seed,
                                   val_slices=args.val_slices, empty_fraction=args.empty_fraction,
                                   volumes_per_batch=args.synth_volumes, max_train_subjects=args.synth_subjects,
                                   t1_probability=args.synth_t1, bright_fat=args.synth_bright_fat,
                                   soft_grey=args.synth_soft_grey, wild_head=args.synth_wild_head,
                                   match_levels=args.synth_match_levels, strip_probability=args.synth_strip,
                                   strip_margin_mm=args.synth_strip_margin)
    if args.synthetic:
        if len(args.synthetic) != 2:
            raise InputError(f"--synthetic takes 2 values (H W), got {len(args.synthetic)}.", "E.g. --synthetic 64 64.")
        return SyntheticSliceSource(tuple(args.synthetic), seed=args.seed, val_count=args.val_slices)
    from steprl.io import expand_files

    if not args.labels:
        raise InputError("Training a segmentation needs --labels (one label map per image).",
                         "Give --labels in the same order as --images (or one folder of label maps).")
    images = expand_files(args.images, "training images")
    labels = expand_files(args.labels, "label maps")
    return SliceSet.from_files(images, labels, size=tuple(args.size), axis=args.axis, label_values=args.label_values,
                               val_count=args.val_count, empty_fraction=args.empty_fraction,
                               val_slices=args.val_slices, seed=args.seed, augment=not args.no_augment)


def build_learner(method: str, source, dist, *, unet_channels=None, init_from=None, **settings):
    """A :class:`PixelDRLLearner` or :class:`UNetLearner` and the JSON config that ``fit`` compares on resume.

    ``settings`` are fields of :class:`~steprl.segmentation.config.SegTrainConfig`,
    :class:`~steprl.segmentation.config.PA3CConfig` and
    :class:`~steprl.segmentation.config.PixelDRLConfig` by name (e.g. ``batch=2, t_max=3,
    widths=(4, 8, 16, 32)``); the others keep their defaults. ``unet_channels``: the U-Net's
    widths per level (default :data:`steprl.segmentation.config.UNET_CHANNELS`). ``init_from``: a
    model file or bundled model name to start from (``--init-from``, same method and layout).
    """
    from steprl.segmentation.config import segmentation_configs

    cfg, pa3c, network = segmentation_configs(**settings)
    return make_learner(method, source, dist, cfg, pa3c, network, unet_channels, init_from)


def make_learner(method: str, source, dist, cfg, pa3c, network, unet_channels=None, init_from=None):
    """:func:`build_learner` from the three configs (``SegTrainConfig``, ``PA3CConfig``, ``PixelDRLConfig``).

    With ``init_from`` the learner starts from that model's weights and record
    (:meth:`~steprl.segmentation.learner.PixelDRLLearner.init_from`), and the data description (in
    the config and the card) names it. A run that resumes loads its checkpoint over these weights.
    """
    from steprl.segmentation.learner import PixelDRLLearner, UNetLearner

    method = METHODS.get(method, method)
    if cfg.batch < 1 or cfg.iterations_per_epoch < 1:
        raise InputError(f"--batch and --iterations must be at least 1 (got {cfg.batch}, {cfg.iterations_per_epoch}).",
                         "Use e.g. --batch 8 --iterations 50.")
    if not 0 <= cfg.ema_decay < 1:
        raise InputError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}.",
                         "Use e.g. --ema-decay 0.99 (about the last 100 updates), or 0 for the latest weights.")
    if method == "pixeldrl-mg":
        if pa3c.t_max < 1:
            raise InputError(f"--t-max must be at least 1, got {pa3c.t_max}.", "The paper uses 10.")
        learner = PixelDRLLearner(network, pa3c, cfg, source, dist)
        network_dict, extra = network.to_dict(), {"pa3c": asdict(pa3c)}
    elif method == "unet":
        from steprl.segmentation.config import UNET_CHANNELS
        from steprl.segmentation.unet import unet_config

        unet_cfg = unet_config(unet_channels or UNET_CHANNELS)
        learner = UNetLearner(unet_cfg, cfg, source, dist)
        network_dict, extra = unet_cfg, {}
    else:
        raise InputError(f"Unknown segmentation method {method!r}.", "Use --method pixeldrl or --method unet.")
    if init_from:
        learner.init_from(init_from)
        learner.data_description["init_from"] = str(init_from)
    config = {"method": method, "network": network_dict, "training": cfg.to_dict(),
              "data": learner.data_description, **extra}
    return learner, config


def train(learner, config: dict, out: str | os.PathLike, *, epochs: int, dist=None, resume: bool = True,
          tensorboard: bool = True, progress: bool = True):
    """Run :func:`steprl.training.loop.fit` for a learner from :func:`build_learner`."""
    from steprl.training.loop import fit

    return fit(learner, out, epochs=epochs, iterations_per_epoch=learner.cfg.iterations_per_epoch,
               config={**config, "epochs": epochs}, dist=dist, resume=resume, tensorboard=tensorboard,
               progress=progress)


def train_segmentation(args) -> None:
    """The handler behind ``steprl train segmentation`` (see the module docstring)."""
    from steprl.segmentation.cli_args import configs_from_args
    from steprl.training.distributed import cleanup, exit_if_distributed, init_distributed
    from steprl.training.loop import print_result

    dist = init_distributed(args.device)
    try:
        source = build_source(args)
        learner, config = make_learner(args.method, source, dist, *configs_from_args(args), args.unet_channels,
                                       args.init_from)
        if args.data_licence:
            learner.data_description["licence"] = args.data_licence  # config["data"] is this dict
        result = train(learner, config, args.out, epochs=args.epochs, dist=dist, resume=not args.no_resume,
                       tensorboard=not args.no_tensorboard, progress=not args.quiet)
        if dist.is_main:
            print_result(result, args.out)
    finally:
        cleanup()
    exit_if_distributed(dist)
