"""Command-line arguments of the segmentation sub-commands (``segment``, ``train segmentation``,
``evaluate segmentation``). Each parser names its handler as ``"module:function"`` so torch and
the heavy modules are imported only for the command that runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from steprl.outputfolder import output_path

#: The bundled segmentation model ``steprl segment`` uses without ``--model``.
DEFAULT_MODEL = "pixeldrl_wm"
AXES = ("axial", "coronal", "sagittal", "0", "1", "2")
#: ``evaluate segmentation --baselines`` (steprl.segmentation.baselines.METHODS; not imported here, to keep
#: the CLI's start light).
BASELINES = ("otsu", "kmeans", "atropos")


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
    p.add_argument("--steps", type=int, default=None, help="policy steps (default: the model's, 10)")
    _add_slicing(p)
    p.add_argument("--batch-slices", type=int, default=16, metavar="N", help="slices per network call (default 16)")
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
    r.add_argument("--iterations", type=int, default=50, help="updates per epoch (episodes for PixelDRL-MG)")
    r.add_argument("--batch", type=int, default=8, help="slices per update")
    r.add_argument("--size", nargs=2, type=int, default=[128, 128], metavar=("H", "W"),
                   help="network grid the slices are resampled to (default 128 128)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (x0.9 every 25 epochs)")
    r.add_argument("--revival", action=argparse.BooleanOptionalAction, default=True,
                   help="a pixel set to zero may come back (default; --no-revival: a zero is final)")
    r.add_argument("--t-max", type=int, default=10, help="steps per episode (paper: 10)")
    r.add_argument("--gamma", type=float, default=0.95, help="discount (paper: 0.95)")
    r.add_argument("--class-balance", action="store_true",
                   help="PixelDRL-MG: weight each pixel's rewards so object and background count equally "
                        "(a deviation from the paper against the all-background collapse on small objects; "
                        "see steprl.segmentation.pa3c.class_weights)")
    r.add_argument("--class-balance-anneal", type=int, default=0, metavar="N",
                   help="fade the class-balance weights out to the paper's plain rewards over the first N updates "
                        "(implies --class-balance; default 0: constant weights)")
    r.add_argument("--class-balance-floor", type=float, default=0.0, metavar="F",
                   help="with --class-balance-anneal: the share of the balancing kept after the fade (default 0)")
    r.add_argument("--grad-clip", type=float, default=None, metavar="NORM",
                   help="clip the global gradient norm (default: none, as in the paper)")
    r.add_argument("--fusion", choices=("late", "input"), default="late",
                   help="where the mask enters the network: late (fast, default) or input (the paper's reading)")
    r.add_argument("--fusion-width", type=int, default=32, metavar="C",
                   help="channels of the late-fusion blocks (default 32; they dominate a step's cost)")
    r.add_argument("--widths", nargs=4, type=int, default=[32, 64, 128, 256], metavar="C",
                   help="PixelDRL-MG encoder widths, VGG16 blocks 1-4 (default 32 64 128 256, the paper's)")
    r.add_argument("--unet-channels", nargs="+", type=int, default=None,
                   help="U-Net widths per level (default 64 128 256 512 1024)")
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
    r.add_argument("--synth-subjects", type=int, default=None, metavar="N",
                   help="--synthseg: use only the first N training subjects (quick smoke tests)")
    _add_precision(r)
    r.add_argument("--data-licence", default=None, help="licence / attribution of the training data, kept in the "
                                                        "model card")
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
    r.add_argument("--batch-slices", type=int, default=16, metavar="N")
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
