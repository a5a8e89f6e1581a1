"""Cerebral white matter: PixelDRL-MG against a U-Net and against what a user would run instead.

Issues 6 and 12. One run scores, on the same cases and with the same metric code
(:func:`steprl.metrics.segmentation_metrics`):

- the learned models: PixelDRL-MG (``--pixeldrl``) and the U-Net trained on the same data and
  budget (``--unet``), both by ``steprl train segmentation --synthseg`` (see the reports for the
  exact commands);
- the intensity baselines of :mod:`steprl.segmentation.baselines` (``--baselines``, default all
  three): 4-class Otsu, 3-class K-means and ANTs Atropos 3-class, white matter = the brightest
  class, inside the case's brain mask.

Cases (``Case.notes`` says how each reference and brain mask was made; the report repeats it):

- **MNI152** (real): nilearn's ICBM152 2009a symmetric T1 template (1 mm, skull-stripped).
  Reference: its white-matter probability map > 0.5 (APPROXIMATE: a population map of the same
  template, not a segmentation of a subject). Brain mask: nilearn's own for this template
  (``load_mni152_brain_mask``: the T1 above 20% of its maximum; the template is skull-stripped,
  and its nonzero voxels, 0.2% more of them, give Otsu 0.93 instead of 0.96). The
  map also holds cerebellar white matter and the brain stem, which the models (trained on
  FreeSurfer labels 2 and 41, cerebral white matter) are not meant to segment, so two rows:
  ``mni152`` (whole map) and ``mni152-cerebrum`` (prediction and reference both restricted to
  z > -10 mm in MNI space, above the cerebellum and the pons).
- **Colin27** (real, Debian ``mricron-data``, unpacked by ``compare_registration.mricron_templates``;
  ``--no-colin`` leaves it out): ``colin27`` is the whole-head T1 ``ch2.nii.gz`` (the models see
  the head; the baselines classify inside the brain mask ``ch2bet.nii.gz`` > 0, shipped with
  it), ``colin27-bet`` the brain-extracted ``ch2bet.nii.gz`` for every method, and a cerebrum row
  for each. Reference (APPROXIMATE): the MNI152 white-matter probability map carried onto Colin27
  by an ANTs SyN registration of the MNI152 T1 to ``ch2bet`` (ANTsPy's default ``SyN``, full
  resolution, seed 0), > 0.5. It does not come from Colin27's own intensities, so it does not
  favour the intensity baselines (a K-means reference, as ``compare_registration`` uses for
  tissue, would); it inherits the registration's errors and the population map's smoothness,
  which caps every method's Dice below 1 alike.
- **MNI152 with a bias field** (``--no-bias-case`` leaves it out): the cerebrum row of MNI152 with
  the image multiplied by a smooth +-20 % field (:func:`biased_mni_case`): a coil's bias on the same
  real anatomy, the same reference.
- **MNI152 with noise** (``--no-noise-case`` leaves it out): the cerebrum row of MNI152 with Rician
  noise of 3 % of white matter's level (:func:`noisy_mni_case`; SNR 33, one subject's 3T scan; the
  template, an average of 152 scans, has almost none): the same anatomy and reference.
- **Held-out synthetic subjects**: the 3 SynthSeg subjects :func:`steprl.synth.synthseg.split_subjects`
  keeps for testing (never seen in training or validation), each synthesised twice (T1-like and
  a random contrast, fixed seeds) on a 1.5 mm whole-head grid. Reference: EXACT (labels 2, 41).
  Brain mask: EXACT, the subject's 32 SynthSeg brain structures (CSF included) of the same
  synthesis (same seed, so the same image).

Per method and case: DICE, PPV, SEN, IoU, boundary IoU, HD95 (mm) on the volume's own grid, the
Dice after every step (models), seconds; per model: parameters and training seconds (from the
run's ``history.jsonl``). Threads: torch, SimpleITK and ANTs all use ``--threads`` (default 1).

    python trainer/benchmarks/compare_segmentation.py --pixeldrl pixeldrl_wm --json out.json
    python trainer/benchmarks/compare_segmentation.py --pixeldrl /work/runs/pixeldrl_wm \\
        --unet /work/runs/unet_wm --json out.json --plot steps.png --figure mni.png

``--pixeldrl`` / ``--unet`` take a run folder (its ``model_best``) or a model file / bundled name.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SYNTHSEG = REPO.parent / "shared" / "data" / "synthseg"
CEREBRUM_Z_MM = -10.0
BIAS_AMPLITUDE = 0.2
#: Rician noise of the noisy MNI152 case, as a share of white matter's median intensity (SNR 33).
NOISE_LEVEL = 0.03
METRICS = ("dice", "ppv", "sen", "iou", "biou", "hd95")
log = logging.getLogger("compare_segmentation")


@dataclass
class Case:
    """One scored case: an image, its white-matter reference, where the baselines classify, and
    optionally a region that restricts the scoring (prediction and reference) to it."""

    name: str
    group: str  # the report's row
    image: object  # steprl Image
    reference: np.ndarray  # bool, image shape
    brain: np.ndarray  # bool, image shape
    roi: np.ndarray | None = None
    notes: str = ""


def nilearn_file(kind: str) -> Path:
    """``mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz`` from nilearn's package data."""
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data" / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"


def above_z(image, z_mm: float = CEREBRUM_Z_MM) -> np.ndarray:
    """Voxels of ``image`` whose physical (LPS = RAS) z is above ``z_mm``: the cerebrum in MNI space."""
    matrix, offset = image.geometry.tensor_index_to_physical()
    grids = np.ogrid[tuple(slice(0, n) for n in image.array.shape)]
    z = offset[2] + sum(matrix[2, k] * grids[k] for k in range(3))
    return np.broadcast_to(z > z_mm, image.array.shape)


def _with_cerebrum(case: Case, group: str) -> list[Case]:
    return [case, Case(f"{case.name}-cerebrum", group, case.image, case.reference, case.brain, above_z(case.image),
                       case.notes + f"; scored above z = {CEREBRUM_Z_MM:g} mm only")]


def mni_cases() -> list[Case]:
    """MNI152: the whole white-matter map and the cerebrum (see the module docstring)."""
    from steprl import io

    image = io.read_image(nilearn_file("t1"), name="MNI152 T1")
    wm = io.read_image(nilearn_file("wm"), name="MNI152 white matter")
    reference = wm.array.astype(np.float32) / float(wm.array.max()) > 0.5  # stored 0..255
    brain = image.array > 0.2 * float(image.array.max())  # nilearn's load_mni152_brain_mask rule
    notes = ("reference APPROXIMATE: template WM probability > 0.5; brain: nilearn's template mask "
             "(T1 > 20% of its maximum)")
    case = Case("mni152", "MNI152 (whole WM map)", image, reference, brain, None, notes)
    return _with_cerebrum(case, "MNI152 cerebrum (z > -10 mm)")


def biased_mni_case(mni: Case, amplitude: float = BIAS_AMPLITUDE) -> Case:
    """MNI152's cerebrum row with a smooth multiplicative bias field, ``1 +- amplitude`` over the
    volume (a slope along z and x, a curvature along y, a twist): how each method holds up to a coil's
    bias on otherwise the same real scan, against the same reference."""
    from steprl.geometry import Image

    z, y, x = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in mni.image.array.shape], indexing="ij")
    raw = 0.6 * z + 0.5 * x + 0.4 * y * y - 0.3 * x * z
    field = 1.0 + amplitude * raw / np.abs(raw).max()
    image = Image((mni.image.array * field).astype(np.float32), mni.image.geometry)
    name = f"mni152-bias{round(100 * amplitude)}-cerebrum"
    return Case(name, f"MNI152 cerebrum, +-{100 * amplitude:g} % bias field", image, mni.reference, mni.brain,
                above_z(mni.image), mni.notes + f"; image times a smooth +-{100 * amplitude:g} % bias field")


def noisy_mni_case(mni: Case, level: float = NOISE_LEVEL, seed: int = 0) -> Case:
    """MNI152's cerebrum row with Rician noise (the magnitude of a complex Gaussian, each part of
    standard deviation ``level`` x white matter's median intensity), fixed ``seed``."""
    from steprl.geometry import Image

    image = mni.image.array.astype(np.float64)
    sigma = level * float(np.median(image[mni.reference & mni.brain]))
    rng = np.random.default_rng(seed)
    noisy = np.hypot(image + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
    name = f"mni152-noise{round(100 * level)}-cerebrum"
    return Case(name, f"MNI152 cerebrum, {100 * level:g} % Rician noise", Image(
        noisy.astype(np.float32), mni.image.geometry), mni.reference, mni.brain, above_z(mni.image),
        mni.notes + f"; Rician noise, sigma {100 * level:g} % of white matter's median (seed {seed})")


def colin_reference(templates: Path) -> tuple[np.ndarray, float]:
    """The MNI152 white-matter map carried onto Colin27 by ANTs SyN, > 0.5 (bool on ch2's grid), and
    the registration's seconds. See the module docstring for why and how far to trust it."""
    import ants
    from steprl import io

    start = time.perf_counter()
    fixed = ants.image_read(str(templates / "ch2bet.nii.gz"))
    moving = ants.image_read(str(nilearn_file("t1")))
    reg = ants.registration(fixed=fixed, moving=moving, type_of_transform="SyN", random_seed=0)
    wm = ants.apply_transforms(fixed=fixed, moving=ants.image_read(str(nilearn_file("wm"))),
                               transformlist=reg["fwdtransforms"], interpolator="linear")
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="steprl-colin-") as tmp:  # through a file: steprl's axis order
        ants.image_write(wm, str(Path(tmp) / "wm.nii.gz"))
        probability = io.read_image(Path(tmp) / "wm.nii.gz", name="Colin27 white matter").array
    return probability > 127.5, seconds  # the map is stored 0..255


def colin_cases(cache: Path, download: bool) -> list[Case]:
    """Colin27 whole head and brain-extracted, each with its cerebrum row (module docstring)."""
    from compare_registration import mricron_templates
    from steprl import io

    templates = mricron_templates(cache, download)
    head = io.read_image(templates / "ch2.nii.gz", name="Colin27 T1")
    bet = io.read_image(templates / "ch2bet.nii.gz", name="Colin27 brain T1")
    if head.array.shape != bet.array.shape:
        raise SystemExit("ch2.nii.gz and ch2bet.nii.gz are not on one grid: not the mricron-data this expects")
    log.info("Colin27 reference: ANTs SyN of MNI152 onto ch2bet (about 2 minutes on one thread)")
    reference, seconds = colin_reference(templates)
    brain = bet.array != 0
    notes = (f"reference APPROXIMATE: MNI152 WM map > 0.5 carried by ANTs SyN ({seconds:.0f} s); "
             "brain: ch2bet nonzero")
    return [*_with_cerebrum(Case("colin27", "Colin27 whole head", head, reference, brain, None, notes),
                            "Colin27 whole head, cerebrum"),
            *_with_cerebrum(Case("colin27-bet", "Colin27 brain-extracted", bet, reference, brain, None, notes),
                            "Colin27 brain-extracted, cerebrum")]


def synthetic_cases(folder: Path) -> list[Case]:
    """Held-out synthetic subjects: one T1-like and one random-contrast volume each, exact labels and brain."""
    from steprl.synth.segmentation_slices import synth_case
    from steprl.synth.synthseg import BRAIN_STRUCTURES, list_label_maps, split_subjects

    split = split_subjects(list_label_maps(folder))
    cases = []
    for k, path in enumerate(split.test):
        for t1 in (True, False):
            seed = 1000 + 10 * k + int(t1)
            image, mask = synth_case(path, folder, seed=seed, t1=t1)
            same, brain = synth_case(path, folder, seed=seed, t1=t1, label_values=tuple(BRAIN_STRUCTURES))
            if not np.array_equal(same.array, image.array):
                raise SystemExit("synth_case is not deterministic in its seed: the brain mask would not fit")
            subject = path.name.split(".")[0].replace("training_seg_", "s")
            group = f"synthetic held-out, {'T1-like' if t1 else 'random contrast'} ({len(split.test)})"
            cases.append(Case(f"synth-{subject}-{'t1' if t1 else 'random'}", group, image, mask.array != 0,
                              brain.array != 0, None, "reference and brain EXACT (label map)"))
    return cases


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


def evaluate_model(model_arg: str, cases: list[Case], steps: int | None, border: bool = True) -> dict:
    """Segment every case with one model: per-case metrics and Dice per step."""
    from steprl.segmentation.inference import segment
    from steprl.segmentation.model import load_segmenter
    from steprl.segmentation.networks import count_parameters

    model_path, run = resolve_model(model_arg)
    model = load_segmenter(model_path)

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
    parser.add_argument("--no-border", action="store_true",
                        help="the models' policy masks only (no native-resolution border, even where the card asks)")
    parser.add_argument("--no-synthetic", action="store_true", help="leave out the synthetic cases")
    parser.add_argument("--no-colin", action="store_true", help="leave out Colin27")
    parser.add_argument("--no-bias-case", action="store_true", help="leave out MNI152 with a bias field")
    parser.add_argument("--no-noise-case", action="store_true", help="leave out MNI152 with noise")
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
    if not args.no_colin:
        cases += colin_cases(args.cache, not args.no_download)
    if not args.no_synthetic:
        if args.synthseg.is_dir():
            cases += synthetic_cases(args.synthseg)
        else:
            log.warning("no SynthSeg folder at %s: no synthetic cases", args.synthseg)
    results = [evaluate_model(args.pixeldrl, cases, args.steps, not args.no_border)]
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
