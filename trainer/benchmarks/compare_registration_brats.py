"""3D registration on real inter-subject pairs beyond MNI152 <-> Colin27: the BraTS 2013 patients in ``../shared``.

Why (issue 11): the acceptance is judged on real T1 pairs of different subjects, and
``compare_registration.py`` has exactly one real 3D pair (both directions). This adds four more
real subjects, so that a choice made on one pair can be checked on others before it ships.

Cases: the four BraTS 2013 glioma patients (``brats_2013_pat0003..0006_1``), the post-contrast T1
(``T1c``, z-scored by the data's providers) inside its brain mask, in the ordered pairs
4 -> 3, 3 -> 4, 6 -> 5, 5 -> 6 (moving -> fixed). Images and labels go onto the same 2 mm, 106^3
axis-aligned cube around the brain as the MNI152 <-> Colin27 pairs.

Labels (APPROXIMATE, as for Colin27): 1 = GM and 2 = WM from a 3-class intensity K-means inside
the brain mask with the tumour (``OTMultiClass > 0``) left out, after clipping the T1c at its 98th
percentile there (contrast-enhanced vessels are otherwise the brightest class: WM came out at
3,000 voxels). The tumours and the contrast agent make these pairs harder than healthy T1 pairs
for every method; the labels come from the same procedure in both images of a pair, so they cap
every method alike.

Methods: the SPAC model alone (steps 1, 10, 20), SPAC + its default refinement, Elastix
(affine + B-spline) and ANTs SyN, all from ``steprl.registration.evaluation.compare_case`` with the
settings of ``compare_registration.py``. Licence: BraTS data may be used for benchmarks only
(``../shared/data/README.md``); nothing here trains on it.

    python trainer/benchmarks/compare_registration_brats.py --threads 1 \
        --out trainer/benchmarks/results/compare_registration_brats_cpu.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_registration import DEFAULT_DATA, brain_cube, tissue_kmeans  # noqa: E402  (the MNI152 <-> Colin27 helpers)

DATA = DEFAULT_DATA / "brats2013"
PATIENTS = (3, 4, 5, 6)
ORDERED_PAIRS = ((4, 3), (3, 4), (6, 5), (5, 6))  # (moving, fixed)
VESSEL_CLIP_PERCENTILE = 98.0


def patient_cube(folder: Path, spacing: float = 2.0, size: int = 106):
    """``(image, labels)`` of one patient on the benchmark cube: T1c inside the brain (background 0),
    labels 1 = GM, 2 = WM (tumour left out; module docstring)."""
    from steprl import io
    from steprl.geometry import Image

    t1c = io.read_image(folder / "T1c_subtrMeanDivStd.nii.gz", name="BraTS T1c")
    brain = io.read_image(folder / "brainmask.nii.gz", name="BraTS brain mask").array > 0
    tumour = io.read_image(folder / "OTMultiClass.nii.gz", name="BraTS tumour labels").array > 0
    image = np.where(brain, t1c.array - t1c.array[brain].min(), 0).astype(np.float32)
    tissue = brain & ~tumour
    clipped = np.minimum(image, np.percentile(image[tissue], VESSEL_CLIP_PERCENTILE))
    gm, wm, _ = tissue_kmeans(clipped, tissue)
    return brain_cube(Image(image, t1c.geometry), [gm.astype(np.float32), wm.astype(np.float32)], spacing, size)


def run(args) -> list[dict]:
    """Every method on every ordered pair; returns the rows of ``compare_case`` (one per pair and method).

    SimpleITK (our affine pre-alignment) gets ``args.threads`` too, as in ``compare_registration.py``:
    the same threads for every method, and on one thread the affine is exactly reproducible.
    """
    import SimpleITK as sitk
    from steprl.registration.evaluation import compare_case
    from steprl.registration.model import load_spac

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    model = load_spac(args.model, "cpu")
    refine = model.default_refine_steps if args.refine is None else args.refine
    cubes = {p: patient_cube(args.data / f"brats_2013_pat{p:04d}_1") for p in PATIENTS}
    rows = []
    for moving, fixed in ORDERED_PAIRS:
        (f_img, f_lab), (m_img, m_lab) = cubes[fixed], cubes[moving]
        start = time.perf_counter()
        pair_rows, _ = compare_case(f_img, m_img, model, name=f"BraTS {moving} -> {fixed}", fixed_labels=f_lab,
                                    moving_labels=m_lab, baselines=args.baselines, report_steps=[1, 10, 20],
                                    steps=20, prealign=True, threads=args.threads, timing_run=False, refine=refine)
        rows += pair_rows
        print(f"{moving} -> {fixed}: " + ", ".join(f"{r['method']} {r['dice']:.3f}" for r in pair_rows)
              + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    return rows


def verdict(rows: list[dict]) -> list[str]:
    """The acceptance's comparisons on these pairs, in words (policy alone and default against the tools)."""
    from steprl.registration.evaluation import method_means

    means = {m["method"]: m for m in method_means(rows)}
    policy = means.get("spac@20")
    default = next((m for k, m in means.items() if "+refine" in k), policy)
    lines = []
    for tool in ("elastix", "syn"):
        if tool not in means or policy is None:
            continue
        t = means[tool]
        for label, ours in (("policy alone", policy), ("default (policy + refinement)", default)):
            lines.append(f"- {label}: Dice {ours['dice']:.3f} (std log det J {ours['std_log_jacobian']:.2f}, "
                         f"folding {ours['folding_percent']:.3f} %) vs {tool} {t['dice']:.3f} (std log det J "
                         f"{t['std_log_jacobian']:.2f}, folding {t['folding_percent']:.3f} %): "
                         f"{'above' if ours['dice'] >= t['dice'] else 'BELOW'} by {abs(ours['dice'] - t['dice']):.3f}")
    return lines


def report(rows: list[dict], args, wall: float) -> str:
    from steprl.registration.evaluation import format_method_table

    return "\n".join([
        "# 3D registration on real BraTS 2013 pairs (issue 11)", "",
        f"Measured {time.strftime('%Y-%m-%d')} on this CPU, {args.threads} thread(s) per tool, model "
        f"`{args.model}`, {wall:.0f} s in all. Module docstring of `compare_registration_brats.py`: cases, "
        "APPROXIMATE labels (K-means GM / WM, tumour left out), settings.", "",
        "    python trainer/benchmarks/compare_registration_brats.py " + " ".join(sys.argv[1:]), "",
        "## Verdict", "", *verdict(rows), "", "## Per pair", "",
        "Seconds: SPAC's include scoring Dice at every step (one labelled run, no separate timing run) on a "
        "shared CPU; `bench_register_default_cpu.md` times the command itself. HD95 in mm; std logJ = std of "
        "log det J of the total transform.", "", "```", format_method_table(rows), "```", ""])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="spac3d_brain", help="3D SPAC model file or bundled name")
    p.add_argument("--data", type=Path, default=DATA, help="the brats2013 folder of ../shared/data")
    p.add_argument("--baselines", nargs="*", default=["elastix", "syn"], help="tools to compare (default both)")
    p.add_argument("--refine", type=int, default=None, help="refinement steps (default: the model card's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="Markdown report (and a .json of the rows beside it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"no BraTS data at {args.data} (../shared/data/brats2013 on development machines only): nothing to do")
        return 0
    start = time.perf_counter()
    rows = run(args)
    text = report(rows, args, time.perf_counter() - start)
    print(text)
    if args.out:
        from steprl.atomic import write_text

        write_text(args.out, text)
        write_text(args.out.with_suffix(".json"), json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
