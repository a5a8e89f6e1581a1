"""``steprl evaluate registration``: run a SPAC model over pairs and tabulate the metrics.

Two tables:

- Default (one row per pair): Dice (with labels) and local NCC before registration, after the
  first step (what a one-shot network of the same size would give) and after the last step;
  the final field's folding (% det J <= 0) and std of log det J; HD95 (mm, with labels); seconds.
- Method comparison (``--baselines syn elastix`` and/or ``--report-steps 1 10 20``): per pair
  one row per METHOD (identity, each baseline, SPAC after each report step), every method scored
  by the same code on the FIXED grid (:func:`compare_case`):

  * ``dice`` (mean over labels) and ``dice_per_label`` (JSON only), the moving labels pulled
    through each method's field with nearest-neighbour interpolation;
  * ``hd95``: mean over labels of the 95th-percentile Hausdorff distance (mm), labels whose HD95
    is undefined (absent from one map) left out and counted in ``hd95_undefined``;
  * ``folding_percent`` (% det J <= 0) and ``std_log_jacobian`` of the TOTAL transform (affine
    stage included; it changes neither) sampled on the fixed grid, so SPAC's network-grid
    field and the tools' fixed-grid fields are judged on the same voxels;
  * ``ncc``: local NCC (window 9 voxels) of the fixed and the warped moving image on the fixed grid;
  * ``seconds``: wall time until that method's result exists. SPAC's is taken from a second,
    label-free run of the same pair (the first run, with labels, pays for per-step Dice), and
    counts the affine pre-alignment when ``prealign`` is on; the tools' count their own affine
    stage (see :mod:`steprl.registration.baselines`). Identity costs 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from steprl.errors import InputError

#: SPAC steps reported by default in method-comparison mode (clipped to the run's steps).
DEFAULT_REPORT_STEPS = (1, 10, 20)


def _stem(path: Path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _pair_name(pair: dict) -> str:
    return f"{_stem(pair['moving'])} -> {_stem(pair['fixed'])}"


def _read_pair(pair: dict):
    from steprl import io

    fixed = io.read_image(pair["fixed"], name="fixed image")
    moving = io.read_image(pair["moving"], name="moving image")
    labels = {}
    if pair.get("fixed_labels") and pair.get("moving_labels"):
        labels = {"fixed_labels": io.read_labels(pair["fixed_labels"], fixed.geometry, name="fixed labels"),
                  "moving_labels": io.read_labels(pair["moving_labels"], moving.geometry, name="moving labels")}
    return fixed, moving, labels


def evaluate_pairs(pairs: list[dict], model, *, steps=None, device="auto", prealign=False, quiet=False,
                   baselines: Sequence[str] = (), report_steps: Sequence[int] | None = None,
                   threads: int | None = None, refine: int | None = None) -> list[dict]:
    """Register every pair (dicts with fixed, moving[, fixed_labels, moving_labels] paths).

    ``refine``: refinement steps after the policy's (None: the model card's default); with
    ``baselines``/``report_steps`` the policy's rows stay the policy alone and the refined
    result is one more row (``spac@N+refineM``), so both are always reported.

    Without ``baselines`` and ``report_steps``: one row per pair (module docstring, first table).
    With either: one row per pair and method, from :func:`compare_case`.
    """
    from tqdm import tqdm

    from steprl.device import resolve_device
    from steprl.limits import check_steps
    from steprl.modelfile import default_model
    from steprl.registration.model import load_spac
    from steprl.registration.overlap import check_overlap

    check_steps(steps)
    dev = resolve_device(device)
    compare = bool(baselines) or report_steps is not None
    if compare:
        from steprl.registration.baselines import require, set_tool_threads

        for method in baselines:
            require(method)  # fail before the first (slow) registration, not after it
        if threads is not None:
            import torch

            torch.set_num_threads(int(threads))
        set_tool_threads(threads)
    rows, spac = [], None
    for pair in tqdm(pairs, desc="pairs", disable=quiet):
        fixed, moving, labels = _read_pair(pair)
        check_overlap(fixed.geometry, moving.geometry, prealign=prealign,
                      names=(f"fixed image '{Path(pair['fixed']).name}'",
                             f"moving image '{Path(pair['moving']).name}'"))
        if spac is None:
            spac = load_spac(model or default_model(fixed.ndim), dev)
        if compare:
            case_rows, _ = compare_case(fixed, moving, spac, name=_pair_name(pair), baselines=baselines,
                                        report_steps=report_steps, steps=steps, device=dev, prealign=prealign,
                                        threads=threads, refine=spac.default_refine_steps if refine is None
                                        else refine, **labels)
            rows.extend(case_rows)
        else:
            rows.append(_pair_row(pair, fixed, moving, labels, spac, steps, dev, prealign, refine))
    return rows


def _pair_row(pair: dict, fixed, moving, labels: dict, spac, steps, dev, prealign: bool, refine: int | None) -> dict:
    """The default table's row of one pair (final = after the refinement steps, if any)."""
    from steprl import metrics, spatial
    from steprl.registration.inference import register

    history = list(register(fixed, moving, spac, steps, dev, prealign=prealign, refine_steps=refine, **labels))
    first, one, last = history[0], history[min(1, len(history) - 1)], history[-1]
    jac = spatial.jacobian_determinant(last.voxel_field)[0].cpu().numpy()
    row = {"pair": _pair_name(pair), "steps": last.step,
           "ncc_identity": first.metrics["ncc"], "ncc_step1": one.metrics["ncc"], "ncc_final": last.metrics["ncc"],
           **metrics.jacobian_stats(jac), "seconds": last.metrics["seconds"]}
    if labels:
        row.update(dice_identity=first.metrics["dice"], dice_step1=one.metrics["dice"],
                   dice_final=last.metrics["dice"])
        per = metrics.hd95_per_label(last.warped_labels, last.fixed_labels_array,
                                     labels["fixed_labels"].geometry.spacing)
        finite = [v for v in per.values() if math.isfinite(v)]
        row["hd95"] = float(np.mean(finite)) if finite else float("nan")
    return row


# ---- method comparison --------------------------------------------------------------------------
def resolve_report_steps(report_steps: Sequence[int] | None, steps: int | None, default_steps: int) -> list[int]:
    """The SPAC steps to report, sorted; an InputError if one exceeds ``steps`` or is negative.

    Default: :data:`DEFAULT_REPORT_STEPS` up to the run's last step, plus that last step.
    """
    total = default_steps if steps is None else int(steps)
    if report_steps is None:
        return sorted({s for s in DEFAULT_REPORT_STEPS if s <= total} | {total})
    chosen = sorted({int(s) for s in report_steps})
    if not chosen or chosen[0] < 0:
        raise InputError(f"--report-steps must be steps >= 0, got {list(report_steps)}.",
                         "Use e.g. --report-steps 1 10 20.")
    if steps is not None and chosen[-1] > total:
        raise InputError(f"--report-steps asks for step {chosen[-1]} but --steps is {total}.",
                         "Raise --steps or drop the later report steps.")
    return chosen


def _crop_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to their joint bounding box plus a 2-voxel margin (HD95 does not change:
    the surfaces and their distances are the same, the distance transforms are far smaller)."""
    nz = np.argwhere(a | b)
    low = np.maximum(nz.min(0) - 2, 0)
    high = np.minimum(nz.max(0) + 3, a.shape)
    box = tuple(slice(int(lo), int(hi)) for lo, hi in zip(low, high))
    return a[box], b[box]


def hd95_mean(warped_labels: np.ndarray, fixed_labels: np.ndarray, spacing_xyz: Sequence[float],
              labels: Sequence[int]) -> tuple[float, int]:
    """Mean HD95 (mm) over ``labels`` present in either map, and how many were undefined (nan)."""
    from steprl.metrics import hd95

    values, undefined = [], 0
    for label in labels:
        a, b = warped_labels == label, fixed_labels == label
        if not a.any() and not b.any():
            continue
        if not a.any() or not b.any():
            undefined += 1
            continue
        values.append(hd95(*_crop_pair(a, b), spacing_xyz))
    return (float(np.mean(values)) if values else float("nan")), undefined


def _ncc(fixed: np.ndarray, warped: np.ndarray, window: int) -> float:
    """Local NCC of two arrays on the same grid (each standardised inside, so ranges do not matter)."""
    import torch

    from steprl.metrics import local_ncc

    f = torch.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32))[None, None]
    w = torch.from_numpy(np.ascontiguousarray(warped, dtype=np.float32))[None, None]
    with torch.no_grad():
        return float(local_ncc(f, w, window))


def _method_row(case: str, method: str, fixed, warped: np.ndarray, total_field, seconds: float,
                warped_labels: np.ndarray | None, fixed_labels: np.ndarray | None, labels: Sequence[int],
                window: int) -> dict:
    """Score one method's result on the fixed grid (see the module docstring)."""
    from steprl import metrics, spatial

    row: dict = {"case": case, "method": method}
    if total_field is None:
        row.update(folding_percent=0.0, std_log_jacobian=0.0)
    else:
        voxel = spatial.physical_to_voxel(total_field.float(), fixed.geometry)
        row.update(metrics.jacobian_stats(spatial.jacobian_determinant(voxel)[0].numpy()))
    row["ncc"] = _ncc(fixed.array, warped, window)
    if warped_labels is not None and fixed_labels is not None:
        per = metrics.dice_per_label(warped_labels, fixed_labels, labels)
        row["dice"] = float(np.mean(list(per.values()))) if per else float("nan")
        row["dice_per_label"] = {str(k): v for k, v in per.items()}
        row["hd95"], row["hd95_undefined"] = hd95_mean(warped_labels, fixed_labels, fixed.geometry.spacing, labels)
    row["seconds"] = float(seconds)
    return row


def _resample_to_fixed(image, fixed_geometry, mode: str) -> np.ndarray:
    """An Image (any grid) resampled onto the fixed grid in physical space, no transform (identity)."""
    import torch

    from steprl import spatial

    t = torch.from_numpy(np.ascontiguousarray(image.array, dtype=np.float32))[None, None]
    out = spatial.resample(t, image.geometry, fixed_geometry, mode=mode)[0, 0].numpy()
    return np.rint(out).astype(np.int32) if mode == "nearest" else out


def compare_case(fixed, moving, spac, *, name: str, fixed_labels=None, moving_labels=None,
                 baselines: Sequence[str] = (), report_steps: Sequence[int] | None = None, steps: int | None = None,
                 device="auto", prealign: bool = False, threads: int | None = None, labels: Sequence[int] | None = None,
                 quick_baselines: bool = False, timing_run: bool = True, window: int = 9,
                 refine: int = 0) -> tuple[list[dict], dict]:
    """Register one pair by every method and score each on the fixed grid.

    Args:
        fixed, moving: scalar :class:`~steprl.geometry.Image` s (2D or 3D, any geometry).
        spac: a :class:`~steprl.registration.model.LoadedSPAC` (or model path / bundled name).
        name: the case's label in the table.
        fixed_labels, moving_labels: optional label maps (any grid); without them only NCC,
            folding and time are reported.
        baselines: tool names of :data:`steprl.registration.baselines.METHODS`, run in that order.
        report_steps: SPAC steps to report (default :func:`resolve_report_steps`); SPAC runs to the
            largest (or to ``steps``).
        labels: the label values to score (default: every non-zero value in either map).
        quick_baselines: the tools' tiny test settings (tests and smoke runs only).
        timing_run: time SPAC in a second, label-free run (module docstring); off: time the
            labelled run (a little slower: it also computes Dice at every step).
        refine: refinement steps after the policy's last step; its result is one more row,
            ``spac@N+refineM`` (the ``spac@K`` rows are always the policy alone).

    Returns ``(rows, curve)``: one row per method (identity, baselines, ``spac@K`` per report
    step) and SPAC's per-step curve ``{"step", "dice" (with labels), "ncc", "seconds"}`` over
    steps ``0..N``, scored like the rows (on the fixed grid; ``seconds`` from the timing run).
    """
    import torch

    from steprl import spatial
    from steprl.device import resolve_device
    from steprl.registration.baselines import run_baseline
    from steprl.registration.inference import register
    from steprl.registration.model import LoadedSPAC, load_spac

    dev = resolve_device(device)
    spac = spac if isinstance(spac, LoadedSPAC) else load_spac(spac, dev)
    chosen = resolve_report_steps(report_steps, steps, spac.default_steps)
    n_steps = chosen[-1] if steps is None else int(steps)
    has_labels = fixed_labels is not None and moving_labels is not None
    fixed_lab = _resample_to_fixed(fixed_labels, fixed.geometry, "nearest") if has_labels else None
    labels = _label_values(fixed_lab, moving_labels, labels) if has_labels else list(labels or [])

    def row(method, warped, field, seconds, warped_labels):
        return _method_row(name, method, fixed, warped, field, seconds, warped_labels, fixed_lab, labels, window)

    rows = [row("identity", _resample_to_fixed(moving, fixed.geometry, "linear"), None, 0.0,
                _resample_to_fixed(moving_labels, fixed.geometry, "nearest") if has_labels else None)]
    for method in baselines:
        result = run_baseline(method, fixed, moving, moving_labels=moving_labels if has_labels else None,
                              threads=threads, quick=quick_baselines)
        rows.append(row(method, result.warped.array, result.physical_field, result.seconds, result.warped_labels))

    label_kw = {"fixed_labels": fixed_labels, "moving_labels": moving_labels} if has_labels else {}
    curve: dict = {"step": [], "dice": [], "ncc": [], "seconds": []}
    spac_rows = {}
    for result in register(fixed, moving, spac, n_steps, dev, prealign=prealign, refine_steps=refine, **label_kw):
        curve["step"].append(result.step)
        curve["ncc"].append(_ncc(fixed.array, result.warped.array, window))
        curve["seconds"].append(result.metrics["seconds"])
        if has_labels:
            curve["dice"].append(result.metrics["dice"])
        refined = result.kind == "refine" and result.step == n_steps + refine
        if (result.step in chosen and result.kind != "refine") or refined:
            net = result.displacement.geometry
            with torch.no_grad():
                field = spatial.resample(result.physical_field.float().cpu(), net, fixed.geometry)
            method = f"spac@{n_steps}+refine{refine}" if refined else f"spac@{result.step}"
            spac_rows[result.step] = row(method, result.warped.array, field, result.metrics["seconds"],
                                         result.warped_labels)
    if has_labels and timing_run:
        seconds = [r.metrics["seconds"] for r in register(fixed, moving, spac, n_steps, dev, prealign=prealign,
                                                          refine_steps=refine)]
        curve["seconds"] = seconds
        for step, r in spac_rows.items():
            r["seconds"] = seconds[step]
    rows.extend(spac_rows[s] for s in sorted(spac_rows))  # the refined row's step is past every policy step
    _tag_spac_rows(rows, refine)
    return rows, curve


def _label_values(fixed_lab: np.ndarray, moving_labels, labels: Sequence[int] | None) -> list[int]:
    """The labels to score: as given, else every non-zero value in either map."""
    if labels is None:
        present = set(np.unique(fixed_lab).tolist()) | set(np.unique(moving_labels.array).tolist())
        labels = sorted(int(v) for v in present if v != 0)
    return list(labels or [])


def _tag_spac_rows(rows: list[dict], refine: int) -> None:
    """Give each ``spac@N[+refineM]`` row its ``steps`` (and ``refine_steps``)."""
    for r in rows:
        if r["method"].startswith("spac@"):
            r["steps"] = int(r["method"][5:].split("+")[0])
            if "+refine" in r["method"]:
                r["refine_steps"] = refine


def method_means(rows: list[dict]) -> list[dict]:
    """One mean row per method (in first-seen order) over the cases, NaN-aware; ``dice_per_label``
    is averaged per label over the cases that have it."""
    from steprl.reporting import mean_row

    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        mean = mean_row(group, [("case", "", "")] + [(k, "", "") for k in METHOD_KEYS])
        mean["method"] = method
        mean["cases"] = len(group)
        per: dict[str, list[float]] = {}
        for r in group:
            for label, value in r.get("dice_per_label", {}).items():
                per.setdefault(label, []).append(value)
        if per:
            mean["dice_per_label"] = {k: float(np.mean(v)) for k, v in per.items()}
        out.append(mean)
    return out


METHOD_KEYS = ("dice", "hd95", "folding_percent", "std_log_jacobian", "ncc", "seconds")
METHOD_COLUMNS = [("case", "case", "{}"), ("method", "method", "{}"), ("dice", "Dice", "{:.3f}"),
                  ("hd95", "HD95 mm", "{:.2f}"), ("folding_percent", "% detJ<=0", "{:.3f}"),
                  ("std_log_jacobian", "std logJ", "{:.3f}"), ("ncc", "NCC", "{:.3f}"), ("seconds", "s", "{:.2f}")]


def format_method_table(rows: list[dict]) -> str:
    """Plain-text table: one line per case and method, then one ``mean`` line per method."""
    means = method_means(rows)
    cols = [c for c in METHOD_COLUMNS if any(c[0] in r for r in rows)]
    cells = [[title for _, title, _ in cols]]
    for r in [*rows, *means]:
        cells.append([fmt.format(r[key]) if key in r and r[key] is not None else "-" for key, _, fmt in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    rule = "-" * len(lines[0])
    lines.insert(1, rule)
    lines.insert(len(lines) - len(means), rule)
    return "\n".join(lines)


COLUMNS = [("pair", "pair", "{}"), ("dice_identity", "Dice id", "{:.3f}"), ("dice_step1", "Dice 1", "{:.3f}"),
           ("dice_final", "Dice N", "{:.3f}"), ("ncc_identity", "NCC id", "{:.3f}"), ("ncc_final", "NCC N", "{:.3f}"),
           ("hd95", "HD95 mm", "{:.2f}"), ("folding_percent", "% detJ<=0", "{:.3f}"),
           ("std_log_jacobian", "std logJ", "{:.3f}"), ("seconds", "s", "{:.2f}")]


def format_table(rows: list[dict]) -> str:
    """A plain-text table with a final 'mean' row (NaN-aware)."""
    from steprl.reporting import format_table as table

    return table(rows, COLUMNS)
