"""Cerebral white matter: PixelDRL-MG against a U-Net and against what a user would run instead.

Issues 6 and 12. One run scores, on the same cases and with the same metric code
(:func:`steprl.metrics.segmentation_metrics`):

- the learned models: PixelDRL-MG (``--pixeldrl``) and the U-Net trained on the same data and
  budget (``--unet``), both by ``steprl train segmentation --synthseg`` (see the reports for the
  exact commands);
- the intensity baselines of :mod:`steprl.segmentation.baselines` (``--baselines``, default all
  three): 4-class Otsu, 3-class K-means and ANTs Atropos 3-class, white matter = the brightest
  class, inside the case's brain mask.

Cases: :mod:`segmentation_cases` (MNI152 with its cerebrum row, with a bias field, with noise, and
as one subject's scan: flatter contrast, bias and noise together, and that scan stored in a
sagittal acquisition's order with ``--stored-sagittal``; Colin27 whole head and
brain-extracted; held-out synthetic subjects), each with how its reference and brain mask were
made (``Case.notes``; the report repeats it). References on MNI152 and Colin27 are APPROXIMATE,
the synthetic ones EXACT.

Per method and case: DICE, PPV, SEN, IoU, boundary IoU, HD95 (mm) on the volume's own grid, the
Dice after every step (models), seconds; per model: parameters and training seconds (from the
run's ``history.jsonl``). Threads: torch, SimpleITK and ANTs all use ``--threads`` (default 1).

    python trainer/benchmarks/compare_segmentation.py --pixeldrl pixeldrl_wm --json out.json
    python trainer/benchmarks/compare_segmentation.py --pixeldrl /work/runs/pixeldrl_wm \\
        --unet /work/runs/unet_wm --json out.json --plot steps.png --figure mni.png
    python trainer/benchmarks/compare_segmentation.py --pixeldrl /work/runs/RUN --pipeline-from pixeldrl_wm \
        --synthetic-draws 5 --baselines   # a training run's candidate, scored as the bundled model is

``--pixeldrl`` / ``--unet`` take a run folder (its ``model_best``) or a model file / bundled name.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from segmentation_cases import (
    DEFAULT_SYNTHSEG,
    SAGITTAL_STORAGE,
    SUBJECT_GREY_TO_WHITE,
    Case,
    biased_mni_case,
    colin_cases,
    mni_cases,
    noisy_mni_case,
    stored_as,
    subject_mni_case,
    synthetic_cases,
)

METRICS = ("dice", "ppv", "sen", "iou", "biou", "hd95")
log = logging.getLogger("compare_segmentation")


def resolve_model(arg: str) -> tuple[str, Path | None]:
    """A model file (or bundled name) and the run folder it came from (None for a bare model)."""
    path = Path(arg)
    if path.is_dir():
        return str(path / "model_best.safetensors"), path
    return arg, None


def training_seconds(run: Path | None, card: dict) -> float | None:
    """Sum of the epochs' seconds of the run (all epochs), else the card's figure."""
    if run is not None and (run / "history.jsonl").is_file():
        lines = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines() if x.strip()]
        return float(sum(x.get("seconds", 0.0) for x in lines))
    value = card.get("training_seconds")
    return float(value) if value is not None else None


def score(case: Case, masks: list[np.ndarray], seconds: float, bordered: bool = False) -> dict:
    """The metrics of the last of ``masks`` (bool, the image's shape) and the Dice of each (the
    per-step curve), inside the case's region when it has one. ``bordered``: the last mask is the
    native-resolution border after the policy's steps (its Dice before it: ``dice_policy``)."""
    from steprl.metrics import dice, segmentation_metrics

    ref = case.reference if case.roi is None else case.reference & case.roi
    masks = masks if case.roi is None else [m & case.roi for m in masks]
    row = segmentation_metrics(masks[-1], ref, case.image.geometry.spacing)
    row.update(dice_per_step=[round(dice(m, ref), 4) for m in masks], seconds=seconds, border=bordered)
    if bordered:
        row["dice_policy"] = row["dice_per_step"][-2]
    return row


MASKS: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
"""method -> (MNI152 image, reference, final mask), for :func:`plot_mni`."""


def _run_cases(method: str, cases: list[Case], run) -> dict:
    """Score ``run(case) -> (masks, seconds)`` on every case; a case that shares its predecessor's
    image and brain (the cerebrum rows) reuses its output."""
    out, last = {}, None
    for case in cases:
        if last is None or case.image is not last.image or case.brain is not last.brain:
            masks, seconds, bordered = run(case)
            last = case
        row = score(case, masks, seconds, bordered)
        out[case.name] = row
        if case.name == "mni152":
            MASKS[method] = (case.image.array, case.reference, masks[-1])
        log.info("%s %s: Dice %.3f (%.1f s)", method, case.name, row["dice"], seconds)
    return out


def with_pipeline(card: dict, source: dict) -> dict:
    """``card`` with the inference pipeline of ``source`` (another model's card): its level matching
    (``normalisation.tissue_levels``), its steps and its border (``inference.steps`` / ``border``).
    A run's own card has neither: this scores a candidate the way the bundled model is scored."""
    card.setdefault("normalisation", {}).pop("tissue_levels", None)
    if "tissue_levels" in source.get("normalisation", {}):
        card["normalisation"]["tissue_levels"] = source["normalisation"]["tissue_levels"]
    inference = card.setdefault("inference", {})
    for key in ("steps", "border"):
        inference.pop(key, None)
        if key in source.get("inference", {}):
            inference[key] = source["inference"][key]
    return card


def evaluate_model(model_arg: str, cases: list[Case], steps: int | None, border: bool = True,
                   pipeline_from: str | None = None) -> dict:
    """Segment every case with one model: per-case metrics and Dice per step. ``pipeline_from``: a
    model whose card's level matching, steps and border replace this one's (:func:`with_pipeline`)."""
    from steprl.segmentation.inference import segment
    from steprl.segmentation.model import load_segmenter
    from steprl.segmentation.networks import count_parameters

    model_path, run = resolve_model(model_arg)
    model = load_segmenter(model_path)
    if pipeline_from:
        with_pipeline(model.card, load_segmenter(resolve_model(pipeline_from)[0]).card)

    def run_model(case: Case):
        start = time.perf_counter()
        history = list(segment(case.image, model, steps, "cpu", border=border))
        bordered = history[-1].metrics["stage"] == "border"
        return [h.mask.array != 0 for h in history], time.perf_counter() - start, bordered

    return {"method": model.method, "model": model_path, "parameters": count_parameters(model.net, False),
            "training_seconds": training_seconds(run, model.card), "grid": list(model.size),
            "best_epoch": model.card.get("training", {}).get("epoch"),
            "cases": _run_cases(model.method, cases, run_model)}


def evaluate_baseline(method: str, cases: list[Case]) -> dict:
    """Run one intensity baseline on every case, inside its brain mask."""
    from steprl.segmentation.baselines import white_matter

    def run_baseline(case: Case):
        start = time.perf_counter()
        mask = white_matter(method, case.image.array, case.brain, case.image.geometry.spacing)
        return [mask], time.perf_counter() - start, False

    return {"method": method, "parameters": 0, "training_seconds": None, "cases": _run_cases(method, cases,
                                                                                            run_baseline)}


def plot_mni(path: Path) -> None:
    """Three axial MNI152 slices: reference (green) and each method's final mask (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(MASKS)
    image, reference, _ = MASKS[methods[0]]
    per_slice = reference.sum(axis=(1, 2))
    top = int(np.argmax(per_slice))
    levels = [max(0, top - 25), top, min(len(per_slice) - 1, top + 20)]
    fig, axes = plt.subplots(len(methods), len(levels), figsize=(3.2 * len(levels), 3.4 * len(methods)), squeeze=False)
    for row, method in enumerate(methods):
        for col, z in enumerate(levels):
            ax = axes[row, col]
            ax.imshow(image[z], cmap="gray", origin="lower")
            ax.contour(reference[z], [0.5], colors="lime", linewidths=0.6)
            ax.contour(MASKS[method][2][z], [0.5], colors="red", linewidths=0.6)
            ax.set_title(f"{method}, axial slice {z}", fontsize=8)
            ax.axis("off")
    fig.suptitle("MNI152 T1: white matter > 0.5 (green) and final masks (red)", fontsize=9)
    fig.tight_layout()
    _save(fig, path, 100)


def _save(fig, path: Path, dpi: int) -> None:
    from steprl.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def mean_over(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if np.isfinite(r[key])]
    return float(np.mean(values)) if values else float("nan")


def groups(cases: list[Case]) -> dict[str, list[str]]:
    """Report row -> its case names, in case order."""
    out: dict[str, list[str]] = {}
    for case in cases:
        out.setdefault(case.group, []).append(case.name)
    return out


def format_report(results: list[dict], cases: list[Case]) -> str:
    lines = []
    header = (f"{'method':<12} {'cases':<40} {'DICE':>6} {'PPV':>6} {'SEN':>6} {'IoU':>6} {'BIoU':>6} "
              f"{'HD95mm':>7} {'params':>8} {'train s':>8} {'s/case':>8}")
    lines += [header, "-" * len(header)]
    for group, names in groups(cases).items():
        for res in results:
            rows = [res["cases"][n] for n in names]
            train = res["training_seconds"]
            params = f"{res['parameters'] / 1e6:>7.2f}M" if res["parameters"] else f"{'-':>8}"
            lines.append(f"{res['method']:<12} {group:<40} " + " ".join(
                f"{mean_over(rows, m):>6.3f}" if m != "hd95" else f"{mean_over(rows, m):>7.2f}" for m in METRICS)
                + f" {params} {'-' if train is None else round(train):>8} {mean_over(rows, 'seconds'):>8.1f}")
    lines.append("")
    lines.append("Dice per step (models; step 0 = the all-object start; after '|': the native-resolution "
                 "border; mean over the group's cases):")
    for res in results:
        for group, names in groups(cases).items():
            curves = [res["cases"][n]["dice_per_step"] for n in names]
            if len(curves[0]) > 1:
                text = [f"{c:.3f}" for c in np.mean(curves, axis=0)]
                if res["cases"][names[0]].get("border"):
                    text.insert(len(text) - 1, "|")
                lines.append(f"  {res['method']:<12} {group:<40} " + " ".join(text))
    lines.append("")
    lines.append("Per case (Dice):")
    for res in results:
        lines.append(f"  {res['method']}: " + ", ".join(f"{n} {r['dice']:.3f}" for n, r in res["cases"].items()))
    return "\n".join(lines)


def plot_steps(results: list[dict], cases: list[Case], path: Path) -> None:
    """Dice against step per model and case group (the paper's Fig. 5 analogue); baselines as
    horizontal lines at their Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = groups(cases)
    real = [g for g in grouped if not g.startswith("synthetic")]
    panels = [p for p in (real, [g for g in grouped if g.startswith("synthetic")]) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for k, group in enumerate(panel):
            colour = f"C{k}"
            for res in results:
                curve = np.mean([res["cases"][n]["dice_per_step"] for n in grouped[group]], axis=0)
                if len(curve) > 1:
                    style = "-o" if res["method"] == "pixeldrl-mg" else "--s"
                    bordered = res["cases"][grouped[group][0]].get("border")
                    policy = curve[:-1] if bordered else curve
                    ax.plot(range(len(policy)), policy, style, color=colour, ms=3, label=f"{res['method']}: {group}")
                    if bordered:  # not a policy step: its own marker, no line to it
                        ax.plot([len(curve) - 1], curve[-1:], "*", color=colour, ms=8)
                else:
                    ax.axhline(curve[-1], color=colour, lw=0.8, ls=":", alpha=0.8)
                    ax.annotate(res["method"], (10, curve[-1]), fontsize=6, color=colour, va="bottom", ha="right")
        ax.set_xlabel("step (star: the native-resolution border; dotted: baselines, labelled at the right)")
        ax.set_ylabel("Dice")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("Cerebral white matter: Dice per step")
    fig.tight_layout()
    _save(fig, path, 110)


def set_threads(threads: int) -> None:
    """One thread count for torch, SimpleITK and ANTs (set before ANTs first runs: it reads it once)."""
    import SimpleITK as sitk
    import torch
    from steprl.registration.baselines import set_tool_threads

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    set_tool_threads(threads)


def main(argv: list[str] | None = None) -> int:
    from steprl.segmentation.baselines import METHODS, require

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pixeldrl", default="pixeldrl_wm", help="PixelDRL-MG run folder or model (default: bundled)")
    parser.add_argument("--unet", help="U-Net run folder or model")
    parser.add_argument("--baselines", nargs="*", choices=METHODS, default=list(METHODS),
                        help="intensity baselines (default: all; none: --baselines with no name)")
    parser.add_argument("--synthseg", type=Path, default=DEFAULT_SYNTHSEG, help="SynthSeg folder (held-out cases)")
    parser.add_argument("--steps", type=int, default=None, help="PixelDRL-MG steps (default: the model's)")
    parser.add_argument("--pipeline-from", metavar="MODEL",
                        help="run --pixeldrl with MODEL's level matching, steps and border (a training run's "
                             "candidate has none in its card; e.g. --pipeline-from pixeldrl_wm)")
    parser.add_argument("--no-border", action="store_true",
                        help="the models' policy masks only (no native-resolution border, even where the card asks)")
    parser.add_argument("--no-synthetic", action="store_true", help="leave out the synthetic cases")
    parser.add_argument("--synthetic-draws", type=int, default=1, metavar="N",
                        help="T1-like volumes per held-out synthetic subject (default 1; each draw a new seed)")
    parser.add_argument("--no-colin", action="store_true", help="leave out Colin27")
    parser.add_argument("--no-bias-case", action="store_true", help="leave out MNI152 with a bias field")
    parser.add_argument("--no-noise-case", action="store_true", help="leave out MNI152 with noise")
    parser.add_argument("--stored-sagittal", action="store_true",
                        help="also the first one-subject case stored in a sagittal acquisition's order (P-I-L)")
    parser.add_argument("--subject-grey-to-white", type=float, nargs="*", default=[SUBJECT_GREY_TO_WHITE],
                        metavar="R", help="MNI152 as one subject's scan (grey matter at R of white matter's level, "
                        "bias and noise): one case per R (default %(default)s; none: left out)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "steprl",
                        help="where Debian's mricron-data is unpacked (default ~/.cache/steprl)")
    parser.add_argument("--no-download", action="store_true", help="fail instead of apt-get downloading mricron-data")
    parser.add_argument("--threads", type=int, default=1, help="threads of torch, SimpleITK and ANTs (default 1)")
    parser.add_argument("--json", type=Path, help="write all figures as JSON")
    parser.add_argument("--plot", type=Path, help="write the Dice-per-step plot (PNG)")
    parser.add_argument("--figure", type=Path, help="write MNI152 slices with the masks (PNG)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for method in args.baselines:
        require(method)
    if not args.no_colin:
        require("atropos")  # the Colin27 reference is an ANTs registration
    set_threads(args.threads)
    import torch

    torch.manual_seed(0)
    started = time.perf_counter()
    cases = mni_cases()
    if not args.no_bias_case:
        cases.append(biased_mni_case(cases[0]))
    if not args.no_noise_case:
        cases.append(noisy_mni_case(cases[0]))
    subjects = [subject_mni_case(cases[0], None, ratio) for ratio in args.subject_grey_to_white]
    cases += subjects
    if args.stored_sagittal and subjects:
        cases.append(stored_as(subjects[0], *SAGITTAL_STORAGE, f"{subjects[0].name}-sagittal",
                               f"{subjects[0].group}, stored P-I-L (a sagittal acquisition's order)"))
    if not args.no_colin:
        cases += colin_cases(args.cache, not args.no_download)
    if not args.no_synthetic:
        if args.synthseg.is_dir():
            cases += synthetic_cases(args.synthseg, args.synthetic_draws)
        else:
            log.warning("no SynthSeg folder at %s: no synthetic cases", args.synthseg)
    results = [evaluate_model(args.pixeldrl, cases, args.steps, not args.no_border, args.pipeline_from)]
    if args.unet:
        results.append(evaluate_model(args.unet, cases, None, not args.no_border))
    results += [evaluate_baseline(method, cases) for method in args.baselines]
    print(f"threads {args.threads}, {time.perf_counter() - started:.0f} s; cases: " + ", ".join(c.name for c in cases))
    print(format_report(results, cases))
    print("\nReferences and brain masks:")
    for case in cases:
        if not case.name.endswith("-cerebrum"):
            print(f"  {case.name}: {case.notes}")
    if args.json:
        from steprl.io import write_json

        write_json({"results": results, "notes": {c.name: c.notes for c in cases}, "command": " ".join(sys.argv)},
                   args.json)
    if args.plot:
        plot_steps(results, cases, args.plot)
    if args.figure and MASKS:
        plot_mni(args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
