"""``steprl train segmentation``: build the slice source and the learner, then run the fit loop.

    steprl train segmentation --images imgs/ --labels labs/ --out runs/seg            # PixelDRL-MG
    steprl train segmentation --images imgs/ --labels labs/ --out runs/unet --method unet
    steprl train segmentation --synthetic 64 64 --out runs/ellipses --epochs 4       # self-check
    steprl train segmentation --synthseg ../shared/data/synthseg --out runs/wm     # white matter, synthetic MRI

Checkpoints, resume, validation, TensorBoard and torchrun (DDP: every rank draws its own
batches from ``seed + 1000 * rank``, gradients are averaged) come from
:func:`steprl.training.loop.fit`, exactly as for registration.

For scripts and tests, :func:`build_learner` and :func:`train` do the same without argparse.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

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
                                   t1_probability=args.synth_t1)
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


def build_learner(method: str, source, dist, *, batch: int = 8, iterations_per_epoch: int = 50, seed: int = 0,
                  lr: float = 1e-3, bf16: bool | None = None, allow_revival: bool = True, t_max: int = 10,
                  gamma: float = 0.95, fusion: str = "late", widths=(32, 64, 128, 256), unet_channels=None,
                  reward_conv_size: int = 33, class_balance: bool = False, class_balance_anneal: int = 0,
                  class_balance_floor: float = 0.0, grad_clip: float | None = None,
                  fusion_width: int = 32):
    """A :class:`PixelDRLLearner` or :class:`UNetLearner` and the JSON config that ``fit`` compares on resume."""
    from steprl.segmentation.learner import PixelDRLLearner, SegTrainConfig, UNetLearner
    from steprl.segmentation.pa3c import PA3CConfig

    method = METHODS.get(method, method)
    if batch < 1 or iterations_per_epoch < 1:
        raise InputError(f"--batch and --iterations must be at least 1 (got {batch}, {iterations_per_epoch}).",
                         "Use e.g. --batch 8 --iterations 50.")
    cfg = SegTrainConfig(batch=batch, iterations_per_epoch=iterations_per_epoch, lr=lr, seed=seed, bf16=bf16,
                         grad_clip=grad_clip)
    if method == "pixeldrl-mg":
        if t_max < 1:
            raise InputError(f"--t-max must be at least 1, got {t_max}.", "The paper uses 10.")
        pa3c = PA3CConfig(t_max=t_max, gamma=gamma, lr=lr, allow_revival=allow_revival,
                          reward_conv_size=reward_conv_size, class_balance=class_balance or class_balance_anneal > 0,
                          class_balance_anneal=class_balance_anneal, class_balance_floor=class_balance_floor)
        net_config = {"widths": list(widths), "fusion": fusion}
        if fusion == "late" and int(fusion_width) != 32:  # 32 (the network's default) stays implicit
            net_config["fusion_width"] = int(fusion_width)
        learner = PixelDRLLearner(net_config, pa3c, cfg, source, dist)
        network = dict(learner.net.config)
        extra = {"pa3c": asdict(pa3c)}
        # absent = the paper's rewards (so older runs still resume)
        for key in ("class_balance", "class_balance_anneal", "class_balance_floor"):
            if not extra["pa3c"][key]:
                del extra["pa3c"][key]
    elif method == "unet":
        from steprl.segmentation.unet import DEFAULT_CHANNELS, unet_config

        unet_cfg = unet_config(unet_channels or DEFAULT_CHANNELS)
        learner = UNetLearner(unet_cfg, cfg, source, dist)
        network, extra = unet_cfg, {}
    else:
        raise InputError(f"Unknown segmentation method {method!r}.", "Use --method pixeldrl or --method unet.")
    config = {"method": method, "network": network, "training": cfg.to_dict(), "data": source.description, **extra}
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
    from steprl.training.distributed import cleanup, exit_if_distributed, init_distributed

    dist = init_distributed(args.device)
    try:
        source = build_source(args)
        learner, config = build_learner(
            args.method, source, dist, batch=args.batch, iterations_per_epoch=args.iterations, seed=args.seed,
            lr=args.lr, bf16=args.bf16, allow_revival=args.revival, t_max=args.t_max, gamma=args.gamma,
            fusion=args.fusion, widths=args.widths, unet_channels=args.unet_channels,
            class_balance=getattr(args, "class_balance", False),
            class_balance_anneal=getattr(args, "class_balance_anneal", 0),
            class_balance_floor=getattr(args, "class_balance_floor", 0.0), grad_clip=getattr(args, "grad_clip", None),
            fusion_width=getattr(args, "fusion_width", 32))
        if args.data_licence:
            learner.data_description["licence"] = args.data_licence
            config["data"] = learner.data_description
        result = train(learner, config, args.out, epochs=args.epochs, dist=dist, resume=not args.no_resume,
                       tensorboard=not args.no_tensorboard, progress=not args.quiet)
        if dist.is_main:
            print(f"best validation Dice {result.best_score:.4f} at epoch {result.best_epoch}; "
                  f"model: {Path(args.out) / 'model_best.safetensors'}", file=sys.stdout)
    finally:
        cleanup()
    exit_if_distributed(dist)
