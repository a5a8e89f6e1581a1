"""Command-line arguments of the segmentation sub-commands (``segment``, ``train segmentation``,
``evaluate segmentation``). Each parser names its handler as ``"module:function"`` so torch and
the heavy modules are imported only for the command that runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from steprl.configargs import ConfigOptions
from steprl.outputfolder import output_path
from steprl.segmentation.config import (
    BATCH_SLICES,
    DEFAULT_SIZE,
    UNET_CHANNELS,
    PA3CConfig,
    PixelDRLConfig,
    SegTrainConfig,
)

#: The bundled segmentation model ``steprl segment`` uses without ``--model``.
DEFAULT_MODEL = "pixeldrl_wm"
AXES = ("axial", "coronal", "sagittal", "0", "1", "2")
#: ``evaluate segmentation --baselines`` (steprl.segmentation.baselines.METHODS; not imported here, to keep
#: the CLI's start light).
BASELINES = ("otsu", "kmeans", "atropos")

#: ``train segmentation``'s hyper-parameters: one option per field of the config classes, whose
#: docstrings and defaults are the options' help and defaults (steprl.configargs).
TRAIN_OPTIONS = ConfigOptions(SegTrainConfig, exclude=("val_batch",), rename={"iterations_per_epoch": "iterations"},
                              metavar={"grad_clip": "NORM", "ema_decay": "DECAY"})
PA3C_OPTIONS = ConfigOptions(PA3CConfig, rename={"allow_revival": "revival"},
                             metavar={"class_balance_anneal": "N", "class_balance_floor": "F"})
NETWORK_OPTIONS = ConfigOptions(PixelDRLConfig, exclude=("in_channels",),
                                metavar={"widths": "C", "head_widths": "C", "head_depths": "N", "fusion_width": "C",
                                         "fusion_depth": "N"})


def configs_from_args(args) -> tuple[SegTrainConfig, PA3CConfig, PixelDRLConfig]:
    """The three segmentation configs from the parsed ``train segmentation`` arguments."""
    return TRAIN_OPTIONS.build(args), PA3C_OPTIONS.build(args), NETWORK_OPTIONS.build(args)


def add_parsers(sub, train_sub, evaluate_sub, add_common) -> None:
    """Register the segmentation commands on the top-level, ``train`` and ``evaluate`` sub-parsers."""
    _add_segment(sub, add_common)
    _add_train(train_sub, add_common)
    _add_evaluate(evaluate_sub, add_common)


def _add_slicing(p) -> None:
    p.add_argument("--axis", default="axial", choices=AXES,
                   help="slicing axis of 3D volumes: axial, coronal, sagittal (from the image orientation) "
                        "or the array axis 0, 1, 2 (default axial)")
    p.add_argument("--label-values", nargs="+", type=int, default=None, metavar="V",
                   help="label values that form the object (default: every label > 0)")


def _add_precision(p) -> None:
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: on for CUDA and CPUs with native bf16)")
    p.add_argument("--match-levels", action=argparse.BooleanOptionalAction, default=True,
                   help="remap the image's grey / white levels to the training data's first, when the model "
                        "card gives them (a one-step first pass finds them; default on)")
    p.add_argument("--border", action=argparse.BooleanOptionalAction, default=True,
                   help="end with the native-resolution border when the model card asks for it: within one "
                        "network pixel of the policy's border, the scan's own grey / white midpoint decides "
                        "(one more step, not learned; default on)")


def _add_segment(sub, add_common) -> None:
    p = sub.add_parser("segment", help="segment IMAGE with a PixelDRL-MG (or U-Net) model, step by step",
                       description="Writes labelmap, per-step masks, metrics.json (with --labels) and steps.png.")
    p.add_argument("image", type=Path, help="2D image or 3D volume (NIfTI, NRRD, MHA, PNG, or a DICOM folder)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="segmentation model file (.safetensors with its .json card) or bundled model name "
                        f"(default: {DEFAULT_MODEL}, cerebral white matter in brain MRI)")
    p.add_argument("--out", type=output_path, required=True,
                   help="output folder (created; the files of an earlier steprl run there are replaced, other "
                        "files are never touched)")
    p.add_argument("--labels", type=Path, help="reference label map (any grid: resampled onto the image) "
                                               "for per-step Dice and the final metrics")
    p.add_argument("--steps", type=int, default=None, help="policy steps (default: the model card's; "
                   "pixeldrl_wm: 3)")
    _add_slicing(p)
    p.add_argument("--batch-slices", type=int, default=BATCH_SLICES, metavar="N",
                   help=f"slices per network call (default {BATCH_SLICES}; raise it on a GPU)")
    p.add_argument("--slice-stride", type=int, default=None, metavar="N",
                   help="the policy decides on every N-th slice, the slices between are interpolated (default: "
                        "as many slices as fit in one network pixel, e.g. 2 for a 256 mm head in 1 mm slices; "
                        "1: every slice)")
    p.add_argument("--format", choices=("nii.gz", "nrrd"), default="nii.gz", help="labelmap file format")
    p.add_argument("--no-step-masks", action="store_true", help="do not write the per-step masks")
    _add_precision(p)
    p.set_defaults(handler="steprl.segmentation.commands:segment_command")
    add_common(p)


def _add_train(tsub, add_common) -> None:
    r = tsub.add_parser("segmentation", help="train a PixelDRL-MG (or U-Net baseline) segmentation model",
                        description="2D, slice by slice. Runs unchanged under torchrun.")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", type=Path, help="image files (2D or 3D), or one folder of images")
    src.add_argument("--synthetic", nargs="+", type=int, metavar="N",
                     help="train on endless synthetic noisy-ellipse slices of H W pixels: a quick self-check")
    src.add_argument("--synthseg", type=Path, metavar="DIR",
                     help="train on axial slices of images synthesised from the SynthSeg label maps in DIR "
                          "(contrast-agnostic; object: --label-values, default cerebral white matter 2 41; "
                          "the last 3 subjects are held out for tests, the 3 before validate)")
    r.add_argument("--labels", nargs="+", type=Path, help="label maps (files in image order, or one folder)")
    r.add_argument("--out", type=output_path, required=True,
                   help="run folder (checkpoints, models, logs); resumed if present")
    r.add_argument("--method", choices=("pixeldrl", "pixeldrl-mg", "unet"), default="pixeldrl",
                   help="pixeldrl (PixelDRL-MG, PA3C) or unet (MONAI U-Net baseline, Dice + BCE); default pixeldrl")
    r.add_argument("--epochs", type=int, default=20)
    r.add_argument("--size", nargs=2, type=int, default=list(DEFAULT_SIZE), metavar=("H", "W"),
                   help=f"network grid the slices are resampled to (default {DEFAULT_SIZE[0]} {DEFAULT_SIZE[1]})")
    TRAIN_OPTIONS.add_to(r.add_argument_group("training (both methods)"))
    PA3C_OPTIONS.add_to(r.add_argument_group("PixelDRL-MG learner (PA3C)"))
    NETWORK_OPTIONS.add_to(r.add_argument_group("PixelDRL-MG network"))
    r.add_argument("--unet-channels", nargs="+", type=int, default=None,
                   help=f"U-Net widths per level (default {' '.join(map(str, UNET_CHANNELS))})")
    _add_slicing(r)
    r.add_argument("--empty-fraction", type=float, default=0.2,
                   help="slices without object kept per slice with object (default 0.2)")
    r.add_argument("--val-count", type=int, default=None, help="cases kept for validation (default 20%%, >= 1)")
    r.add_argument("--val-slices", type=int, default=64, help="validation slices (evenly spaced; default 64)")
    r.add_argument("--no-augment", action="store_true", help="no random flips")
    r.add_argument("--synth-volumes", type=int, default=2, metavar="N",
                   help="--synthseg: synthetic volumes per batch, the batch's slices spread over them (default 2)")
    r.add_argument("--synth-t1", type=float, default=0.5, metavar="P",
                   help="--synthseg: share of T1-like contrasts, the rest random contrasts (default 0.5)")
    r.add_argument("--synth-bright-fat", type=float, default=0.0, metavar="P",
                   help="--synthseg: share of T1-like volumes whose fat is brighter than white matter, as in real "
                        "T1 whole-head scans (default 0; e.g. 0.5)")
    r.add_argument("--synth-soft-grey", type=float, default=0.0, metavar="P",
                   help="--synthseg: share of T1-like volumes whose grey matter is brought toward white matter "
                        "(grey/white intensity 0.60 -> up to 0.82), as flat as real T1 scans (default 0; e.g. 0.5)")
    r.add_argument("--synth-wild-head", type=float, default=0.0, metavar="P",
                   help="--synthseg: share of T1-like volumes whose scalp, skull, muscle and eyes get random levels "
                        "(0-1.8x white matter), unrelated to the brain's (default 0; e.g. 0.5)")
    r.add_argument("--synth-strip", type=float, default=0.3, metavar="P",
                   help="--synthseg: share of volumes synthesised brain-extracted, as MNI152 and BET outputs are "
                        "(default 0.3)")
    r.add_argument("--synth-strip-margin", type=float, default=0.0, metavar="MM",
                   help="--synthseg: a brain-extracted volume keeps a rim of dura, skull and scalp drawn uniform in "
                        "0-MM mm, as real extractions do (default 0: the brain alone; e.g. 15)")
    r.add_argument("--synth-match-levels", type=float, default=0.0, metavar="RATIO",
                   help="--synthseg: remap every T1-like volume to this grey / white ratio, as segment then remaps "
                        "each scan (the card records it; default 0 = off; e.g. 0.6)")
    r.add_argument("--synth-subjects", type=int, default=None, metavar="N",
                   help="--synthseg: use only the first N training subjects (quick smoke tests)")
    r.add_argument("--data-licence", default=None, help="licence / attribution of the training data, kept in the "
                                                        "model card")
    r.add_argument("--init-from", default=None, metavar="MODEL",
                   help="start from the network weights of a segmentation model file or bundled model (same --method "
                        "and network options; --size may differ), e.g. to fine-tune pixeldrl_wm on your own scans or "
                        "carry training over runs; its training record goes into the new card. Ignored when --out "
                        "holds a run to resume")
    r.add_argument("--no-resume", action="store_true",
                   help="start afresh even if --out holds an interrupted run (its files are overwritten)")
    r.add_argument("--no-tensorboard", action="store_true")
    r.set_defaults(handler="steprl.segmentation.commands:train_command")
    add_common(r)


def _add_evaluate(esub, add_common) -> None:
    r = esub.add_parser("segmentation", help="evaluate a segmentation model over a dataset (six metrics)")
    r.add_argument("--images", nargs="+", type=Path, required=True, help="images, or one folder")
    r.add_argument("--labels", nargs="+", type=Path, required=True, help="label maps in image order, or one folder")
    r.add_argument("--model", required=True)
    r.add_argument("--steps", type=int, default=None)
    _add_slicing(r)
    r.add_argument("--batch-slices", type=int, default=BATCH_SLICES, metavar="N")
    _add_precision(r)
    r.add_argument("--json", type=output_path, help="also write the table as JSON")
    r.add_argument("--baselines", nargs="+", choices=BASELINES, default=(), metavar="METHOD",
                   help="also run these white-matter baselines on every case, inside its brain mask, scored "
                        "alike: otsu (4-class Otsu), kmeans (3-class K-means), atropos (ANTs Atropos 3-class; "
                        "pip install 'steprl[compare]'); each takes the brightest class as white matter")
    brain = r.add_mutually_exclusive_group()
    brain.add_argument("--brain-masks", nargs="+", type=Path, metavar="MASK",
                       help="brain masks for the baselines (files in image order, or one folder; > 0 = brain); "
                            "default: the image's nonzero voxels, right for skull-stripped images only")
    brain.add_argument("--brain-from-labels", action="store_true",
                       help="the baselines' brain mask = every labelled voxel of the label map (for whole-brain "
                            "label maps such as FreeSurfer's aseg)")
    r.set_defaults(handler="steprl.segmentation.evaluation:evaluate_command")
    add_common(r)
