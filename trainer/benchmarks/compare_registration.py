"""SPAC against the tools users would pick instead (ANTs SyN, Elastix B-spline), on the same cases.

One run, one process, the same thread count for every method, so the timing RATIOS are fair
even on a busy machine (absolute seconds depend on the neighbours). Every method is scored by
the same code (:func:`steprl.registration.evaluation.compare_case`): identity, ``syn``,
``elastix``, SPAC after 1, 10 and 20 steps (and SPAC's whole curve over steps 0..20).

Cases:

(a) ``synth``: synthetic 3D pairs of the HELD-OUT SynthSeg subjects (``split_subjects(...).test``,
    never seen in training or validation), cyclic pairs (subject k+1 onto subject k). Each label
    map is resampled (nearest) onto a 2 mm isotropic cube of ``--size`` voxels centred on its brain
    (:func:`steprl.synth.synthseg.load_canonical`); the cube is then placed at the same physical spot
    for every subject (centre at 0), so "identity" means "brain centres aligned". The image is
    synthesised from the labels with a T1-like contrast (SynthSeg T1 priors, bias field, noise,
    blur: :func:`steprl.synth.from_labels.synthesize` with ``t1_probability=1``). Dice and HD95 over the
    32 SynthSeg brain structures, exact labels. The 2 mm grid is what makes SyN affordable here
    (~30-60 s per pair on one thread); 106 voxels x 2 mm = 212 mm spans a head and matches the
    64^3 x 3.3 mm field of view the 3D model was trained on.
(b) ``oasis``: pairs of real 2D OASIS slices (``oasis2d_0072..0079``, the 2D model's
    validation images: the 2D data have no untouched test split), cyclic, with the bundled
    ``spac2d_brain``. No labels: local NCC (window 9), folding, time.
(c) ``real``: real 3D T1 scans from the package registries, registered in both directions:
    nilearn's MNI152 2009a template (its grey/white-matter probability maps give the labels)
    and Debian ``mricron-data``'s Colin27 (``ch2.nii.gz``; labels from the AAL atlas drawn on it
    and its brain mask ``ch2bet``). The common label set is tissue: 1 = GM, 2 = WM (see
    :func:`real_cases` for exactly how each is derived and how far to trust it). Both images are
    resampled onto a 2 mm cube of ``--size`` voxels centred on their brain, keeping their own
    physical (MNI) coordinates: they are both in MNI space already, so identity is a good start.

SPAC runs with its affine pre-alignment in 3D (``prealign``; the 3D model was trained on
affinely aligned pairs, and the tools run their own affine stage too) and without it in 2D
(oasis2d is affinely pre-aligned, as the 2D model was trained). The time of every method counts
its affine stage.

Usage (from the repository root; about 15-25 minutes on a shared 2-core CPU)::

    python trainer/benchmarks/compare_registration.py --model3d runs/spac3d/model_best.safetensors \\
        --threads 1
    python trainer/benchmarks/compare_registration.py --model3d ... --parts synth --quick   # smoke run

Writes ``trainer/benchmarks/results/compare_registration_cpu.md`` (tables, command, machine),
``compare_registration_dice_vs_step.png`` (Dice against step, the paper's Fig. 5 analogue) and
``compare_registration_cpu.json`` (every row and curve) next to it, each atomically.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common
import numpy as np
from steprl.atomic import atomic_path, write_text

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = REPO.parent / "shared" / "data"
METHOD_ORDER = ("identity", "syn", "elastix")
GROUPS = {
    "synth": "(a) synthetic 3D pairs, held-out SynthSeg subjects (T1-like contrast, 32 structures, exact labels)",
    "oasis": "(b) real 2D OASIS slices (similarity only)",
    "real": "(c) real 3D T1 scans: MNI152 2009a <-> Colin27 (GM / WM)",
}
log = logging.getLogger("compare_registration")


@dataclass
class Case:
    """One registration pair of a group, with what SPAC needs to run it."""

    group: str
    name: str
    fixed: object  # steprl Image
    moving: object
    model: object  # LoadedSPAC
    prealign: bool
    fixed_labels: object | None = None
    moving_labels: object | None = None
    notes: dict = field(default_factory=dict)


# ---- (a) synthetic 3D pairs from held-out SynthSeg subjects ------------------------------------
def synthetic_heads(folder: Path, subjects: list[Path], spacing: float, size: int, seed: int,
                    strip: bool = False, same_contrast: bool = False) -> list[tuple]:
    """``(name, T1-like image, brain labels)`` per SynthSeg subject, on a centred ``size``^3 cube of ``spacing`` mm.

    ``strip``: paint everything outside the brain labels as background (a brain-extracted scan).
    ``same_contrast``: one T1-like contrast draw for every subject (scans of one sequence, as a real
    study's), instead of a draw per subject. Independent draws from SynthSeg's T1 priors often
    invert the low-contrast deep nuclei between two subjects (pallidum 152 +- 20 against white
    matter 160 +- 22 of 255), which two scans of one sequence do not. Blur, bias, gamma and noise are drawn
    per subject either way.
    """
    import torch
    from steprl.geometry import Geometry, Image
    from steprl.synth import synthseg
    from steprl.synth.from_labels import IntensityModel, draw_contrast, synthesize

    intensity = IntensityModel.from_synthseg_folder(folder)
    table = synthseg.lookup_table({v: v for v in synthseg.BRAIN_STRUCTURES})
    rng = np.random.default_rng(seed)
    contrast = draw_contrast(intensity, rng, t1_probability=1.0) if same_contrast else None
    images = []
    for path in subjects:
        labels, grid, _ = synthseg.load_canonical(path, spacing, size)
        half = np.asarray(grid.spacing) * (np.asarray(grid.shape) - 1) / 2
        centred = Geometry(grid.shape, grid.spacing, tuple(-half), grid.direction)
        with torch.no_grad():
            image = synthesize(labels[None, None].long(), intensity, rng, t1_probability=1.0,
                               contrast=contrast)[0, 0].numpy()
        brain = table[labels.numpy().astype(np.int64).clip(0, len(table) - 1)].astype(np.int32)
        if strip:
            image = image * (brain > 0)
        images.append((path.name.removesuffix(".nii.gz"), Image(image, centred), Image(brain, centred)))
    return images


def cyclic_pairs(n: int) -> list[tuple[int, int]]:
    """``(fixed, moving)`` index pairs: subject k+1 onto subject k (one pair for two subjects)."""
    return [(k, (k + 1) % n) for k in range(n if n > 2 else 1)]


def synth_cases(args, model) -> list[Case]:
    from steprl.synth import synthseg

    folder = args.synthseg
    split = synthseg.split_subjects(synthseg.list_label_maps(folder))
    trained = set(model.card.get("training", {}).get("data", {}).get("train_subjects", [])) | set(
        model.card.get("training", {}).get("data", {}).get("validation_subjects", []))
    leaked = sorted(p.name for p in split.test if p.name in trained)
    if leaked:
        raise SystemExit(f"held-out subjects {leaked} were used to train {model.path.name}: not a fair test")
    subjects = split.test[: 2 if args.quick else len(split.test)]
    images = synthetic_heads(folder, subjects, args.spacing, args.size, args.seed)
    return [Case("synth", f"{images[m][0]} -> {images[f][0]}", images[f][1], images[m][1], model, True,
                 images[f][2], images[m][2]) for f, m in cyclic_pairs(len(images))]


# ---- (b) real 2D OASIS slices ----------------------------------------------------------------------
def oasis_cases(args, model2d) -> list[Case]:
    from steprl import io

    files = sorted(Path(args.oasis).glob("oasis2d_*.nrrd"))[72:80]
    if not files:
        raise SystemExit(f"no oasis2d_*.nrrd in {args.oasis}")
    files = files[: 3 if args.quick else len(files)]
    images = [(p.name.removesuffix(".nrrd"), io.read_image(p, name=p.name)) for p in files]
    n = len(images)
    count = min(args.oasis_pairs, n if n > 2 else 1)
    return [Case("oasis", f"{images[(k + 1) % n][0]} -> {images[k][0]}", images[k][1], images[(k + 1) % n][1],
                 model2d, False) for k in range(count)]


# ---- (c) real 3D scans: MNI152 and Colin27 --------------------------------------------------------------
def nilearn_data() -> Path:
    try:
        import nilearn.datasets
    except ImportError as err:
        raise SystemExit("nilearn is not installed: pip install 'steprl[compare]'") from err
    folder = Path(nilearn.datasets.__file__).parent / "data"
    if not (folder / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").is_file():
        raise SystemExit(f"nilearn's MNI152 template is not in {folder}")
    return folder


def mricron_templates(cache: Path, download: bool) -> Path:
    """``usr/share/mricron/templates`` of Debian's mricron-data, unpacked into ``cache`` (once)."""
    templates = cache / "mricron-data" / "usr" / "share" / "mricron" / "templates"
    if (templates / "ch2.nii.gz").is_file():
        return templates
    if not download:
        raise SystemExit(f"Colin27 not found in {templates}; run without --no-download, or: cd {cache} && "
                         "apt-get download mricron-data && dpkg-deb -x mricron-data_*.deb mricron-data")
    cache.mkdir(parents=True, exist_ok=True)
    log.info("fetching Debian mricron-data (Colin27 + AAL) into %s", cache)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(["apt-get", "download", "mricron-data"], cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob("mricron-data_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / "mricron-data")], check=True)
    return templates


def tissue_kmeans(t1: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """GM and WM masks from a 3-class intensity K-means of a T1 inside its brain mask.

    Classes by mean intensity: darkest = CSF (left out), middle = GM, brightest = WM. Uses
    :func:`steprl.preprocess.kmeans_labels` (SimpleITK's scalar K-means) on the brain voxels only.
    Returns the two masks and the three class means.
    """
    from steprl.preprocess import kmeans_labels

    values = t1[brain].astype(np.float32)
    classes = kmeans_labels(values[None, :], 3)[0]
    means = [float(values[classes == k].mean()) for k in (1, 2, 3)]
    gm, wm = np.zeros(t1.shape, dtype=bool), np.zeros(t1.shape, dtype=bool)
    gm[brain], wm[brain] = classes == 2, classes == 3
    return gm, wm, means


def brain_cube(image, masks: list[np.ndarray], spacing: float, size: int):
    """Image and tissue labels on an axis-aligned ``size``^3 cube of ``spacing`` mm centred on the brain.

    ``masks`` are the 1 mm tissue masks (GM, WM) on the image grid; each is resampled linearly
    (a partial-volume fraction) and a 2 mm voxel gets the tissue covering at least half of it.
    """
    import torch
    from steprl import spatial
    from steprl.geometry import Geometry, Image

    g = image.geometry
    nz = np.argwhere(np.logical_or.reduce(masks))
    a, b = g.tensor_index_to_physical()
    centre = a @ ((nz.min(0) + nz.max(0)) / 2.0) + b
    cube = Geometry((size,) * 3, (spacing,) * 3, tuple(centre - spacing * (size - 1) / 2), np.eye(3))
    stack = torch.from_numpy(np.stack([image.array, *masks]).astype(np.float32))[None]
    out = spatial.resample(stack, g, cube, padding="zeros")[0].numpy()
    fractions = out[1:]
    labels = np.where(fractions.max(0) >= 0.5, fractions.argmax(0) + 1, 0).astype(np.int32)
    return Image(out[0], cube), Image(labels, cube)


def real_cases(args, model) -> list[Case]:
    """MNI152 <-> Colin27, both directions, brain-extracted T1, labels 1 = GM and 2 = WM.

    - Images: nilearn's MNI152 2009a T1 is brain-extracted (no skull), so Colin27 is used
      brain-extracted too (``ch2bet.nii.gz``, shipped with it); registering a brain to a whole
      head would judge the skull, not the method. NOTE: SPAC's 3D model was trained on whole
      heads only, so skull-stripped input is outside its training distribution.
    - MNI152 labels: GM = voxels whose GM probability (nilearn's map) is >= 0.5 and >= the WM
      one; WM likewise. The maps are the template's own population tissue probabilities:
      trustworthy at tissue level.
    - Colin27 labels: 3-class intensity K-means of the T1 inside its brain mask (CSF / GM / WM by
      mean intensity; CSF left out). Colin27 is an average of 27 scans of one subject with very
      high SNR and contrast, so this tissue split is reliable along the cortex; the deep grey
      nuclei (thalamus, pallidum), whose T1 lies between GM and WM, and partial-volume rims may
      be classed differently than the MNI maps class them. (The AAL atlas on the same grid was
      tried first as GM: its regions extend deep into the white matter, so it is not a tissue map.)
    - Both label sets come from different procedures, which caps every method's Dice below 1
      alike; it does not favour one method.
    """
    from steprl import io

    mni = nilearn_data()
    t1 = io.read_image(mni / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", name="MNI152 T1")
    gm = io.read_image(mni / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz", name="MNI152 GM").array / 255.0
    wm = io.read_image(mni / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz", name="MNI152 WM").array / 255.0
    mni_masks = [(gm >= 0.5) & (gm >= wm), (wm >= 0.5) & (wm > gm)]
    templates = mricron_templates(args.cache, not args.no_download)
    ch2 = io.read_image(templates / "ch2bet.nii.gz", name="Colin27 brain T1")
    colin_gm, colin_wm, means = tissue_kmeans(ch2.array, ch2.array > 0)
    mni_img, mni_lab = brain_cube(t1, [m.astype(np.float32) for m in mni_masks], args.spacing, args.size)
    col_img, col_lab = brain_cube(ch2, [colin_gm.astype(np.float32), colin_wm.astype(np.float32)], args.spacing,
                                   args.size)
    notes = {"colin_kmeans_means": means}
    return [Case("real", "Colin27 -> MNI152", mni_img, col_img, model, True, mni_lab, col_lab, notes),
            Case("real", "MNI152 -> Colin27", col_img, mni_img, model, True, col_lab, mni_lab, notes)]


# ---- running ------------------------------------------------------------------------------------------------
def run(cases: list[Case], args) -> dict:
    from steprl.registration.evaluation import compare_case

    out: dict = {}
    for k, case in enumerate(cases, 1):
        start = time.perf_counter()
        rows, curve = compare_case(case.fixed, case.moving, case.model, name=case.name,
                                   fixed_labels=case.fixed_labels, moving_labels=case.moving_labels,
                                   baselines=("syn", "elastix"), report_steps=args.report_steps, steps=args.steps,
                                   refine=_refine_steps(case.model, args),
                                   device=args.device, prealign=case.prealign, threads=args.threads,
                                   quick_baselines=args.quick)
        group = out.setdefault(case.group, {"rows": [], "curves": [], "cases": []})
        group["rows"].extend(rows)
        group["curves"].append(curve)
        group["cases"].append({"name": case.name, "shape": list(case.fixed.geometry.shape),
                               "spacing": list(case.fixed.geometry.spacing), **case.notes})
        summary = "  ".join(f"{r['method']} {r.get('dice', r['ncc']):.3f}/{r['seconds']:.1f}s" for r in rows)
        log.info("[%d/%d] %s %s (%.0f s): %s", k, len(cases), case.group, case.name,
                 time.perf_counter() - start, summary)
    return out


def _refine_steps(model, args) -> int:
    """Refinement steps after the policy for this model: ``--refine``, else the model card's default."""
    return model.default_refine_steps if args.refine is None else args.refine


def warm_up_tools(threads: int) -> None:
    """Run both tools once on tiny 2D and 3D images, so loading their libraries (ITK loads its
    wrapped templates lazily, on first use) is not timed as part of the first real case."""
    from steprl.geometry import Geometry, Image
    from steprl.registration.baselines import run_baseline
    from steprl.synth.toy import synthetic_pair

    rng = np.random.default_rng(0)
    for shape in ((32, 32), (16, 16, 16)):
        pair = synthetic_pair(shape, rng)
        g = Geometry(shape, (1.0,) * len(shape), (0.0,) * len(shape), np.eye(len(shape)))
        labels = Image(pair["moving_labels"].astype(np.int32), g)
        for tool in ("syn", "elastix"):
            run_baseline(tool, Image(pair["fixed"], g), Image(pair["moving"], g), moving_labels=labels,
                         threads=threads, quick=True)


# ---- report ---------------------------------------------------------------------------------------------------
def _per_step(curves: list[dict]) -> float:
    """Mean seconds per SPAC policy step (after step 0) over the cases of a group."""
    seconds = _mean_curve(curves, "seconds")
    return float((seconds[-1] - seconds[0]) / (len(seconds) - 1)) if len(seconds) > 1 else float("nan")


def _f(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else fmt.format(value)


def _s(seconds) -> str:
    """Seconds with two significant decimals below 10 s (2D steps take milliseconds)."""
    return _f(seconds, "{:.2f}" if seconds is not None and seconds < 10 else "{:.1f}")


def _means(rows: list[dict]) -> dict[str, dict]:
    from steprl.registration.evaluation import method_means

    return {m["method"]: m for m in method_means(rows)}


def _mean_curve(curves: list[dict], key: str) -> np.ndarray:
    n = min(len(c[key]) for c in curves)
    return np.mean([c[key][:n] for c in curves], axis=0) if n else np.array([])


def group_table(rows: list[dict], has_labels: bool) -> list[str]:
    means = _means(rows)
    syn_s = means.get("syn", {}).get("seconds")
    headers = ["method"] + (["Dice", "HD95 mm"] if has_labels else []) + [
        "local NCC", "% det J <= 0", "std log det J", "seconds", "x faster than SyN"]
    body = []
    for method, m in means.items():
        speed = syn_s / m["seconds"] if syn_s and m.get("seconds") else None
        body.append([method] + ([_f(m.get("dice"), "{:.3f}"), _f(m.get("hd95"), "{:.2f}")] if has_labels else []) + [
            _f(m.get("ncc"), "{:.3f}"), _f(m.get("folding_percent"), "{:.3f}"),
            _f(m.get("std_log_jacobian"), "{:.3f}"), _s(m.get("seconds")),
            "-" if method == "identity" else _f(speed, "{:.1f}")])
    return _common.markdown_table(headers, body)


def case_table(rows: list[dict], has_labels: bool) -> list[str]:
    headers = ["case", "method"] + (["Dice", "HD95 mm"] if has_labels else []) + [
        "NCC", "% det J <= 0", "std log det J", "s"]
    body = [[r["case"], r["method"]] + ([_f(r.get("dice"), "{:.3f}"), _f(r.get("hd95"), "{:.2f}")] if has_labels
                                       else []) +
            [_f(r["ncc"], "{:.3f}"), _f(r["folding_percent"], "{:.3f}"), _f(r["std_log_jacobian"], "{:.3f}"),
             _s(r["seconds"])] for r in rows]
    return _common.markdown_table(headers, body, left=2)


def structure_table(rows: list[dict], names: dict[int, str]) -> list[str]:
    means = _means(rows)
    methods = list(means)
    body = []
    for value in sorted(names):
        cells = [_f(means[m].get("dice_per_label", {}).get(str(value)), "{:.3f}") for m in methods]
        body.append([f"{names[value]} ({value})", *cells])
    return _common.markdown_table(["structure"] + methods, body)


def default_method(means: dict, final: str) -> str:
    """The row of what ``steprl register`` does by default: the policy, plus refinement when it ran."""
    refined = [m for m in means if m.startswith(final + "+refine")]
    return refined[0] if refined else final


def verdict(results: dict, final: str) -> list[str]:
    """Issue 11's acceptance targets, checked on each labelled 3D group, in plain words."""
    lines = []
    for group in ("synth", "real"):
        if group not in results:
            continue
        means = _means(results[group]["rows"])
        spac, syn, ela = means.get(final), means.get("syn"), means.get("elastix")
        if not (spac and syn and ela):
            continue
        tag = group.split()[0]
        curve = _mean_curve(results[group]["curves"], "dice")
        steps = int(final.split("@")[1])
        marks = [k for k in (0, 1, 10, steps) if k < len(curve)]
        values = [float(curve[k]) for k in marks]
        rising = all(b > a for a, b in zip(values, values[1:]))
        lines += [
            f"- **{tag}, policy alone** — Dice at steps {', '.join(map(str, marks))}: "
            + " -> ".join(f"{v:.3f}" for v in values) + (": **rises** at each." if rising else ": does **not** rise "
                                                         "at each of these steps."),
            f"- **{tag}, policy alone** — Dice {spac['dice']:.3f} vs Elastix {ela['dice']:.3f}: "
            + ("**meets** the target." if spac["dice"] >= ela["dice"] else
               f"**falls short** by {ela['dice'] - spac['dice']:.3f}."),
            f"- **{tag}, policy alone** — std log det J {spac['std_log_jacobian']:.3f}, folding "
            f"{spac['folding_percent']:.3f}%: " + ("**meets** <= 0.5 and < 0.5%." if spac["std_log_jacobian"] <= 0.5
                                                   and spac["folding_percent"] < 0.5 else "**misses** <= 0.5 / < 0.5%."
                                                   ),
        ]
        default = default_method(means, final)
        if default != final:
            d = means[default]
            best = max(syn["dice"], ela["dice"])
            lines += [
                f"- **{tag}, default command** ({default}) — Dice {d['dice']:.3f} vs SyN {syn['dice']:.3f} / Elastix "
                f"{ela['dice']:.3f}: " + ("**meets** the target (>= both)" if d["dice"] >= best else
                                          f"**falls short** by {best - d['dice']:.3f} of the better tool")
                + f"; folding {d['folding_percent']:.3f}% " + ("(**meets** < 0.5%)." if d["folding_percent"] < 0.5
                                                                else "(**misses** < 0.5%)."),
                f"- **{tag}, default command** — {_s(d['seconds'])} s vs Elastix {_s(ela['seconds'])} s "
                f"({ela['seconds'] / d['seconds']:.1f}x faster) and SyN {_s(syn['seconds'])} s "
                f"({syn['seconds'] / d['seconds']:.1f}x faster), same threads, same process.",
            ]
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("synth", "dice", "(a) synthetic 3D, held-out subjects\nDice, 32 structures"),
              ("real", "dice", "(c) real 3D, MNI152 <-> Colin27\nDice, GM / WM"),
              ("oasis", "ncc", "(b) real 2D OASIS slices\nlocal NCC")]
    panels = [p for p in panels if p[0] in results]
    n = len(panels) + 1
    cols = 2 if n > 2 else n
    rows = (n + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.4 * rows), squeeze=False)
    axes = list(grid.ravel())
    for extra in axes[n:]:
        extra.axis("off")
    axes = axes[:n]
    colours = {"identity": "0.5", "syn": "tab:red", "elastix": "tab:green", "spac": "tab:blue"}
    for ax, (group, key, title) in zip(axes, panels):
        data = results[group]
        means = _means(data["rows"])
        curve = _mean_curve(data["curves"], key)
        seconds = _mean_curve(data["curves"], "seconds")
        ax.plot(range(len(curve)), curve, "-o", ms=3, color=colours["spac"],
                label=f"SPAC step 0..{len(curve) - 1} ({_s(seconds[-1])} s at {len(curve) - 1})")
        refined = [r.get("refine_steps", 0) for r in data["rows"] if "+refine" in r["method"]]
        if refined:  # the policy's steps end here; the refinement steps follow
            policy_steps = len(curve) - 1 - refined[0]
            ax.axvline(policy_steps + 0.5, color="0.3", ls=":", lw=1.2,
                       label=f"policy steps 1..{policy_steps} | refinement steps after")
        for method in METHOD_ORDER:
            if method in means and key in means[method]:
                extra = "" if method == "identity" else f" ({_s(means[method]['seconds'])} s)"
                ax.axhline(means[method][key], color=colours[method], ls="--" if method == "identity" else "-",
                           lw=1.5, label=f"{method}{extra}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("SPAC step")
        ax.set_ylabel("mean Dice" if key == "dice" else "mean local NCC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    ax = axes[-1]
    markers = {"synth": "o", "real": "s", "oasis": "^"}
    for group, _key, _ in panels:
        data = results[group]
        means = _means(data["rows"])
        seconds = _mean_curve(data["curves"], "seconds")
        ax.plot(range(len(seconds)), seconds, "-", marker=markers[group], ms=3, color=colours["spac"], alpha=0.8,
                label=f"SPAC {group}")
        for method in ("syn", "elastix"):
            if method in means:
                ax.plot([len(seconds) - 1], [means[method]["seconds"]], marker=markers[group], ms=8, ls="none",
                        color=colours[method], label=f"{method} {group}")
    ax.set_yscale("log")
    ax.set_xlabel("SPAC step (tools: final result, at the right)")
    ax.set_ylabel("seconds (log)")
    ax.set_title("time to result, same process and threads", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "not installed"


def model_notes(model) -> str:
    """Which model, and how far its training had got (``history.jsonl`` beside it, else its card)."""
    card = model.card.get("training", {})
    text = f"`{model.path}` (sha256 {str(model.card.get('sha256', '?'))[:12]}…, card epoch {card.get('epoch', '?')}"
    refine = model.card.get("inference", {}).get("refine")
    if refine:
        text += f"; refinement by default: {refine.get('steps', 0)} steps, grid factor {refine.get('factor', 2)}"
    history = model.path.parent / "history.jsonl"
    if history.is_file():
        lines = [json.loads(x) for x in history.read_text().splitlines() if x.strip()]
        best = [x for x in lines if x.get("best")]
        if lines:
            text += f"; history.jsonl: {len(lines)} epochs done"
            if best:
                v = best[-1].get("validation", {})
                nan = float("nan")
                text += (f", best epoch {best[-1].get('epoch')} with validation Dice "
                         f"{v.get('dice_final', nan):.3f} (identity {v.get('dice_identity', nan):.3f})")
    return text + ")"


def report(results: dict, args, argv: list[str], started: str, load_start: tuple, wall: float, models: dict,
           load_end: float | None = None) -> str:
    from steprl.synth.synthseg import BRAIN_STRUCTURES

    final = f"spac@{max(args.report_steps)}"
    lines = ["# Registration: SPAC against ANTs SyN and Elastix (CPU)", "",
             "Generated by `trainer/benchmarks/compare_registration.py` (issues 6 and 11). Every method ran on the "
             "same cases, in one process, on the same number of threads; every metric is computed by the same code "
             "(`steprl.registration.evaluation.compare_case`) on the fixed image's grid.", "",
             "## Command", "", "```", "python " + " ".join(shlex.quote(a) for a in argv), "```", "",
             "## Machine and run", "",
             f"- Date: {started}; wall time of the whole run {wall / 60:.1f} min.",
             f"- CPU: {_common.cpu_model()}, {os.cpu_count()} cores, SHARED with a training run and other jobs "
             f"(load average at start {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f}, at the end "
             f"{os.getloadavg()[0] if load_end is None else load_end:.2f}): absolute seconds measure the "
             "neighbours too; the RATIOS between methods, "
             "measured in the same process, are what this report compares.",
             f"- Threads: {args.threads} for every method (torch `set_num_threads`, ITK's global default for "
             "Elastix and SimpleITK, `ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS` for ANTs).",
             f"- Versions: steprl {_version('steprl')}, torch {_version('torch')}, antspyx {_version('antspyx')}, "
             f"itk-elastix {_version('itk-elastix')}, SimpleITK {_version('SimpleITK')}, "
             f"nilearn {_version('nilearn')}, "
             f"Python {platform.python_version()}.",
             f"- 3D model: {models.get('3d', '-')}.",
             f"- 2D model: {models.get('2d', '-')}.",
             f"- Grids: 3D cases on a {args.size}^3 cube of {args.spacing:g} mm (SyN's cost decides this; see the "
             "script's docstring); SPAC's network grid is the model's (its card) over the fixed image; "
             "refinement steps run on the model card's refinement grid (`inference.refine.factor` times the network "
             "grid; see the model line above).",
             "- Settings: SyN = ANTsPy `SyN` (affine + SyN, Mattes MI) with reg_iterations (40, 20, 10); Elastix = "
             "itk-elastix default affine + B-spline maps (10 mm grid, 256 iterations x 3 resolutions, 2048 samples) "
             "(`steprl.registration.baselines` documents every value). SPAC: deterministic policy (plan mean), "
             "affine pre-alignment (SimpleITK, Mattes MI) in 3D, none in 2D. Time counts every method's affine stage.",
             "- Repeatability: SPAC and Elastix (fixed seed) give the same Dice run after run; ANTs SyN does not, "
             "its affine stage's sampling is seeded from the clock (ANTsPy's `set_ants_deterministic` did not make "
             "two runs agree on a test pair). On the held-out synthetic pair seg_20 -> seg_19 SyN gave 0.598 in one "
             "run of this script and 0.296 in the next: read SyN's per-case rows with that in mind.",
             "- Metrics: Dice of the moving labels pulled through each method's field (nearest neighbour, same code "
             "for all), HD95 mean over labels (mm), % det J <= 0 and std log det J of the total transform on the "
             "fixed grid, local NCC (9-voxel window) on the fixed grid, seconds until the result exists.",
             ""]
    if args.quick:
        lines += ["**QUICK SMOKE RUN**: fewer cases, tiny tool settings. Not a comparison.", ""]
    lines += ["## Acceptance targets (issue 11)", ""] + (verdict(results, final) or ["- no labelled 3D group ran."])
    lines += ["", "![Dice against step](compare_registration_dice_vs_step.png)", "",
              "Left panels: SPAC's mean score after each step (0 = input, after the affine pre-alignment in 3D) with "
              "identity, SyN and Elastix as horizontal lines (their times in the legend). Right: time to result.", ""]
    for group, title in GROUPS.items():
        if group not in results:
            continue
        data = results[group]
        has_labels = "dice" in data["rows"][0]
        lines += [f"## {title}", ""]
        if group == "synth":
            lines += [f"Held-out subjects: {', '.join(sorted({c['name'].split(' ')[0] for c in data['cases']}))}; "
                      f"{len(data['cases'])} cyclic pairs; image grid {data['cases'][0]['shape']} at "
                      f"{data['cases'][0]['spacing'][0]:g} mm.", ""]
        if group == "real":
            lines += ["Images: both brain-extracted T1 (nilearn's MNI152 2009a T1 has no skull, so Colin27's "
                      "`ch2bet` is used; the 3D model's card says whether brain-extracted heads were in its "
                      "training data). Labels (1 = GM, 2 = WM; `real_cases` in the script says exactly "
                      "how, and how far to trust them): MNI152 from its GM/WM probability maps (>= 0.5, the larger "
                      "of the two); Colin27 from a 3-class intensity K-means inside its brain mask (class means "
                      + ", ".join(f"{v:.1f}" for v in data["cases"][0].get("colin_kmeans_means", []))
                      + "; CSF left out). The two label sets come from different procedures, which caps every "
                      "method's Dice alike.", ""]
        lines += ["Mean over cases:", ""] + group_table(data["rows"], has_labels) + [""]
        seconds = _mean_curve(data["curves"], "seconds")
        lines += [f"SPAC's time: step 0 (set-up{', affine pre-alignment' if group != 'oasis' else ''}) "
                  f"{seconds[0]:.2f} s, then {_per_step(data['curves']):.3f} s per policy step.", ""]
        if group == "synth" and has_labels:
            lines += ["<details><summary>Dice per structure (mean over pairs)</summary>", ""]
            lines += structure_table(data["rows"], BRAIN_STRUCTURES) + ["", "</details>", ""]
        if group == "real" and has_labels:
            lines += structure_table(data["rows"], {1: "grey matter", 2: "white matter"}) + [""]
        lines += ["<details><summary>Every case</summary>", ""] + case_table(data["rows"], has_labels)
        lines += ["", "</details>", ""]
    lines += ["## Where SPAC falls short, and why", "", *shortfalls(results, final), "",
              "Raw rows and per-step curves: `compare_registration_cpu.json`.", ""]
    return "\n".join(lines)


def shortfalls(results: dict, final: str) -> list[str]:
    """Plain statements from the numbers: where SPAC is behind, and what the run shows about why."""
    out = []
    for group, data in results.items():
        means = _means(data["rows"])
        spac = means.get(final)
        if not spac:
            continue
        key = "dice" if "dice" in spac else "ncc"
        tools = {m: means[m][key] for m in ("syn", "elastix") if m in means}
        worse = {m: v - spac[key] for m, v in tools.items() if v > spac[key]}
        line = f"- **{group}**: {final} {key} {spac[key]:.3f} " + (
            "is below " + ", ".join(f"{m} by {d:.3f}" for m, d in worse.items()) + "." if worse
            else "is at or above both tools.")
        curve = _mean_curve(data["curves"], key)
        if len(curve) > 1:
            peak = int(np.argmax(curve))
            if curve[peak] - curve[-1] > 0.005:
                line += (f" SPAC's mean {key} peaks at step {peak} ({curve[peak]:.3f}) and falls to {curve[-1]:.3f} "
                         f"at step {len(curve) - 1}: later steps make the alignment worse.")
        seconds = _mean_curve(data["curves"], "seconds")
        if len(seconds) and spac.get("seconds"):
            line += (f" Step 0 (set-up{', affine pre-alignment' if group != 'oasis' else ''}) is "
                     f"{100 * seconds[0] / spac['seconds']:.0f}% of SPAC's {spac['seconds']:.2f} s.")
        if key == "ncc":
            tool_std = max((means[m]["std_log_jacobian"] for m in ("syn", "elastix") if m in means), default=0.0)
            line += (f" Without labels NCC is the only score, and it rewards matching intensities at any cost: "
                     f"SPAC's field is rougher (std log det J {spac['std_log_jacobian']:.3f} vs at most "
                     f"{tool_std:.3f} for the tools; {spac['folding_percent']:.3f}% folding), so a higher NCC here "
                     "is not evidence of better anatomy alignment.")
        out.append(line)
    out += ["- The 3D model is the one named under *Machine and run*; if it was taken while still training, its "
            "epoch and validation Dice are there: rerun this script on the final model before reading the 3D rows "
            "as its quality.",
            "- The real 3D scans are brain-extracted (nilearn's MNI152 has no skull); the 3D model's card says what "
            "share of its synthesised training heads were brain-extracted too.",
            "- SPAC's time in 3D is dominated by step 0, its SimpleITK affine pre-alignment (Mattes MI, 200 iterations "
            "per level, the last level at the images' full resolution), not by the policy steps; the tools' affine "
            "stages count in their times too. Running the pre-alignment on the coarser network grid would change the "
            "speed ratio most."]
    return out


# ---- main -----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model3d", required=False, default="spac3d_brain",
                   help="3D SPAC model file or bundled name (default spac3d_brain)")
    p.add_argument("--model2d", default="spac2d_brain", help="2D SPAC model (default the bundled spac2d_brain)")
    p.add_argument("--parts", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    p.add_argument("--synthseg", type=Path, default=DEFAULT_DATA / "synthseg")
    p.add_argument("--oasis", type=Path, default=DEFAULT_DATA / "oasis2d")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "steprl",
                   help="where Debian's mricron-data is unpacked (default ~/.cache/steprl)")
    p.add_argument("--no-download", action="store_true", help="fail instead of apt-get downloading mricron-data")
    p.add_argument("--threads", type=int, default=1, help="threads for EVERY method (default 1)")
    p.add_argument("--steps", type=int, default=20, help="SPAC steps (the curve runs 0..steps)")
    p.add_argument("--report-steps", nargs="+", type=int, default=[1, 10, 20])
    p.add_argument("--refine", type=int, default=None, metavar="N",
                   help="refinement steps after SPAC's policy steps (default: the model card's; 0: the policy "
                        "alone). The policy's rows stay the policy alone; SPAC + refinement is one more row")
    p.add_argument("--spacing", type=float, default=2.0, help="3D grid spacing in mm (default 2)")
    p.add_argument("--size", type=int, default=106, help="3D grid size in voxels (default 106: 212 mm at 2 mm)")
    p.add_argument("--oasis-pairs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer cases, small grids, tiny tool settings")
    p.add_argument("--out", type=Path, default=RESULTS / "compare_registration_cpu.md")
    p.add_argument("--from-json", type=Path, default=None, metavar="JSON",
                   help="only rewrite the report and plot of an earlier run from its JSON (no registration)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.spacing = min(args.size, 56), max(args.spacing, 4.0)
    if max(args.report_steps) > args.steps:
        p.error("--report-steps beyond --steps")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.from_json is not None:
        return rewrite(args)
    # threads first: ANTs reads this once, at its first use in the process
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("steprl.registration.prealign", "steprl.registration.baselines"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import SimpleITK as sitk
    import torch
    from steprl.registration.baselines import require, set_tool_threads
    from steprl.registration.model import load_spac

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    set_tool_threads(args.threads)
    for tool in ("syn", "elastix"):
        require(tool)
    warm_up_tools(args.threads)
    started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    cases: list[Case] = []
    models: dict[str, str] = {}
    if {"synth", "real"} & set(args.parts):
        model3d = load_spac(args.model3d, args.device)
        models["3d"] = model_notes(model3d)
        if "synth" in args.parts:
            cases += synth_cases(args, model3d)
        if "real" in args.parts:
            cases += real_cases(args, model3d)
    if "oasis" in args.parts:
        model2d = load_spac(args.model2d, args.device)
        models["2d"] = model_notes(model2d)
        cases += oasis_cases(args, model2d)
    log.info("%d cases prepared in %.0f s", len(cases), time.perf_counter() - t0)
    results = run(cases, args)
    record = {"argv": argv, "started": started, "threads": args.threads, "models": models,
              "load_start": list(load_start), "load_end": os.getloadavg()[0], "wall": time.perf_counter() - t0,
              "results": results}
    write_text(args.out.with_suffix(".json"), json.dumps(record, indent=1, default=float))
    write_outputs(record, args)
    log.info("wrote %s (%.1f min)", args.out, record["wall"] / 60)
    return 0


def write_outputs(record: dict, args) -> None:
    """The plot and the markdown report of a run record (what ``main`` saves as JSON)."""
    plot(record["results"], args.out.with_name("compare_registration_dice_vs_step.png"))
    command = ["trainer/benchmarks/compare_registration.py", *record["argv"]]
    nan = float("nan")
    write_text(args.out, report(record["results"], args, command, record["started"],
                                   tuple(record.get("load_start", (nan,) * 3)), record.get("wall", nan),
                                   record["models"], record.get("load_end")))


def rewrite(args) -> int:
    """``--from-json``: redraw the plot and rewrite the report of an earlier run, without running it."""
    record = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
    run_args = parse_args([a for a in record["argv"]])
    run_args.out = args.out
    write_outputs(record, run_args)
    print(f"rewrote {args.out} from {args.from_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
