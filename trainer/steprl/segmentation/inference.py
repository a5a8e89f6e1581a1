"""Segmentation inference: ``segment()`` yields the mask step by step, on the input's own grid.

    for result in segment(image, "runs/seg/model_best.safetensors"):   # the card's steps (and border)
        print(result.step, result.metrics["object_fraction"])
    labelmap = result.mask          # Image, uint8 0/1, exactly image.geometry
    result.changed                  # Image, uint8: the voxels this step changed

Pipeline (the same preparation as training, :func:`steprl.segmentation.data.prepare_case`):
normalise the whole image by percentiles, cut a 3D volume into 2D slices along ``axis``
(``"axial"`` by default, found from the direction matrix), resample every slice onto the
model's network grid (isotropic pixels covering the slice), run the policy, and bring every
step's mask back onto the slice grid (bilinear, >= 0.5). The output has the input's array
shape and geometry (spacing, origin, direction) whatever the orientation.

- **Grey / white level matching** (when the card gives ``normalisation.tissue_levels``; off with
  ``match_levels=False``): a one-step first pass on at most 16 slices finds the scan's grey and
  white levels and the image is remapped to the card's ratio before the pass that is yielded
  (:mod:`steprl.segmentation.tissue_levels` says why: +0.04-0.06 Dice on every real scan here).
  Probed and not shipped: correcting the image with that first pass's mask before the policy (its
  white matter's intensity field divided out, its noise smoothed, as the border does after it). On
  MNI152 made to look like a flat one-subject scan (grey at 0.9 of white, bias, noise) 0.855 ->
  0.919, but one of 15 synthetic heads fell 0.881 -> 0.758 (the field, fitted to 16 slices of a
  one-step mask, brightened its brain stem into the policy's white matter), brain-extracted Colin27
  -0.003; the flat case's loss came from the border's field threshold instead
  (:data:`steprl.segmentation.intensity_field.MIN_SPAN`). The noise smoothing alone: the noisy
  MNI152 rows +0.002-0.005, the synthetic heads +0.007 in the mean from one of them (noise at 48 % of
  the gap: 0.584 -> 0.725) while three of the other five it smoothed lost 0.008-0.013.
- **Step 0** is the initial mask ``f(0) = 1`` everywhere (PixelDRL-MG's start: every pixel
  is object until it zeroes itself); steps ``1..steps`` apply the greedy (most probable)
  action of every pixel. A U-Net model runs through the same entry point with one step.
- **The border** (when the card gives ``inference.border``; off with ``border=False``): one more
  result, ``steps + 1``, whose ``metrics["stage"]`` is ``"border"`` (the others: ``"start"``,
  ``"policy"``): the last policy mask with its border re-decided at the scan's own resolution by
  the scan's own grey and white levels (:mod:`steprl.segmentation.border`; not learned).
- **Batching.** Slices go through the network ``batch_slices`` at a time, and each batch runs
  all its steps before the next (the image-only part of the network, ``encode``, is computed
  once per slice and dropped after its batch, so memory does not grow with the volume). The
  per-step masks are kept at network resolution (1 byte per pixel and step); step 0 is
  yielded at once, steps ``1..steps`` when the whole volume is done. ``progress(done,
  total)`` reports slices as they finish.
- **Slices between decisions** (``slice_stride``; default :func:`auto_slice_stride`): the policy
  decides on every n-th slice, n = the whole slices that fit in one network pixel, and the slices
  between get their two neighbours' masks interpolated (bilinear on their slices, linear across,
  >= 0.5): decisions as far apart across slices as within them, the network's time divided by n.
  A 256 mm head in 1 mm slices (2 mm pixels): every second slice; MNI152 (1.8 mm pixels) and
  thicker slices: every slice. Forced to 2 on the comparison's cases, the final Dice moved by
  -0.002 to +0.001 (MNI152 cerebrum 0.9723 both; ``trainer/benchmarks/results/compare_segmentation_field_cpu.md``).
- **Constant slices** (all input values equal: outside a skull-stripped brain, zero padding)
  are background at every step without running the network (``skip_constant=True``): exact
  for them and free; the rule is recorded in the outputs.
- **Precision** (measured, see ``trainer/benchmarks/bench_pixeldrl_speed.py``): bf16 autocast
  on CPUs with native bf16 (AVX512-BF16 / AMX) and on CUDA; fp32 elsewhere; channels-last tensors
  on every CPU (fp32 on a 2-core AVX2 CPU: the network's image encoding 0.76x the time).
  ``bf16=False`` forces fp32.

Speed (2-core CPU with AVX512-BF16, load < 1, torch 2.13, default 7.5M-parameter network,
10 steps, 128 x 128 grid): a 240 x 240 x 155 volume in 5.0 s with bf16 (15.8 s fp32); with
the paper's mask-at-the-input network 26 s (bf16) and 79 s (fp32); one 256 x 256 slice in
0.04 s. Running the paper's network at 256 x 256, slice by slice, would take ~0.15 s per
forward, ~230 s per volume. On a loaded machine (load average 5-6 on 2 cores) expect 2-4x
more.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from steprl.device import default_inference_bf16
from steprl.errors import InputError
from steprl.geometry import Image
from steprl.limits import check_steps
from steprl.metrics import dice
from steprl.segmentation.config import BATCH_SLICES
from steprl.segmentation.data import CaseSlices, prepare_case
from steprl.segmentation.model import LoadedSegmenter, load_segmenter

log = logging.getLogger(__name__)


@dataclass
class SegmentationStep:
    """One step of a segmentation.

    Attributes:
        step: 0 (the initial all-object mask) .. n.
        mask: uint8 0/1 Image with the input's shape and geometry (1 = object).
        changed: uint8 0/1 Image, the voxels whose value this step changed (all 0 at step 0).
        metrics: ``seconds`` since the start, ``object_fraction``, ``changed_voxels``, and
            with ``labels`` the step's ``dice``.
    """

    step: int
    mask: Image
    changed: Image
    metrics: dict = field(default_factory=dict)


def _check_arguments(image: Image, labels: Image | None, batch_slices: int, slice_stride: int | None) -> None:
    """Refuse what :func:`segment` cannot do, before any work (InputError naming the fix)."""
    if image.ndim not in (2, 3):
        raise InputError(f"Segmentation takes 2D images or 3D volumes, got {image.ndim}D.", "Give a 2D or 3D image.")
    _check_labels(labels, image)
    if batch_slices < 1:
        raise InputError(f"batch_slices must be >= 1, got {batch_slices}.", f"Use e.g. --batch-slices {BATCH_SLICES}.")
    if slice_stride is not None and slice_stride < 1:
        raise InputError(f"slice_stride must be >= 1, got {slice_stride}.", "Use 1 for every slice, or None.")


def _check_labels(labels: Image | None, image: Image) -> None:
    if labels is not None and tuple(labels.array.shape) != tuple(image.array.shape):
        raise InputError(
            f"The label map has shape {tuple(labels.array.shape)}, the image {tuple(image.array.shape)}.",
            "Read the label map with steprl.io.read_labels(path, image.geometry): it resamples it onto the image grid.",
        )


class _Runner:
    """Runs the network over the slices of one case and keeps every step's network-grid masks."""

    def __init__(self, model: LoadedSegmenter, device: torch.device, bf16: bool, channels_last: bool) -> None:
        self.model, self.device, self.bf16, self.channels_last = model, device, bf16, channels_last

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    @torch.no_grad()
    def run(self, images: torch.Tensor, steps: int) -> torch.Tensor:
        """``images`` ``(B, 1, H, W)`` -> masks ``(steps, B, 1, H, W)`` uint8 on the CPU."""
        from steprl.device import autocast
        from steprl.segmentation.environment import apply_actions
        from steprl.segmentation.pa3c import greedy_actions

        x = self._prepare(images)
        out = torch.empty((steps, *images.shape), dtype=torch.uint8)
        with autocast(self.device, self.bf16):
            if not self.model.is_rl:
                out[:] = (self.model.net(x).float() >= 0).to("cpu", torch.uint8)
                return out
            net = self.model.net
            encoded = net.encode(x, with_value=False)
            mask = torch.ones_like(x, dtype=torch.float32)
            for t in range(steps):
                logits, _ = net.decide(encoded, mask, with_value=False)
                mask = apply_actions(mask, greedy_actions(logits.float()), self.model.allow_revival)
                out[t] = mask.to("cpu", torch.uint8)
        return out


    def run_slices(self, case: CaseSlices, active: np.ndarray, steps: int, batch_slices: int,
                   progress: Callable[[int, int], None] | None) -> torch.Tensor:
        """Every step's network-grid masks ``(steps, N, 1, h, w)`` of the ``active`` slices (others stay 0)."""
        net_masks = torch.zeros((steps, case.images.shape[0], 1, *self.model.size), dtype=torch.uint8)
        for first in range(0, len(active), batch_slices):
            index = torch.from_numpy(active[first : first + batch_slices])
            net_masks[:, index] = self.run(case.images[index], steps)
            if progress is not None:
                progress(min(first + batch_slices, len(active)), len(active))
        return net_masks


def _make_runner(loaded: LoadedSegmenter, dev: torch.device, bf16: bool | None = None,
                 channels_last: bool | None = None) -> _Runner:
    """The runner with the measured precision defaults for ``dev`` (``None``); channels-last moves the net."""
    use_bf16 = default_inference_bf16(dev) if bf16 is None else bool(bf16)
    use_cl = (dev.type == "cpu") if channels_last is None else bool(channels_last)  # fp32 too: 0.76x on AVX2
    if use_cl:
        loaded.net.to(memory_format=torch.channels_last)
    return _Runner(loaded, dev, use_bf16, use_cl)


def _step_count(loaded: LoadedSegmenter, steps: int | None) -> int:
    """The steps to run: the card's default for None, checked; a U-Net takes one."""
    n_steps = loaded.default_steps if steps is None else int(steps)
    check_steps(n_steps, "steps")  # at most MAX_STEPS: the masks of every step are kept in memory
    if not loaded.is_rl and n_steps > 1:
        log.info("A U-Net segments in one step: running 1 step instead of %d.", n_steps)
        n_steps = 1
    return n_steps


def _active_slices(case: CaseSlices, skip_constant: bool) -> np.ndarray:
    """Indices of the slices the network runs on (all, or the non-constant ones)."""
    return np.flatnonzero(~case.constant) if skip_constant else np.arange(case.images.shape[0])


def _first_pass_levels(image: Image, loaded: LoadedSegmenter, runner: _Runner, axis: str | int, batch_slices: int,
                       skip_constant: bool) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The percentile-normalised image and its ``(grey, white)`` levels from a one-step first pass on at
    most ``LEVEL_SLICES`` evenly spread slices (:mod:`steprl.segmentation.tissue_levels`)."""
    from steprl.preprocess import normalise_percentile
    from steprl.segmentation import tissue_levels

    normalised = normalise_percentile(image.array)
    case = prepare_case(image, None, size=loaded.size, axis=axis, name="image", normalised=normalised)
    active = _active_slices(case, skip_constant)
    sampled = active[:: max(1, -(-len(active) // tissue_levels.LEVEL_SLICES))]
    first = _step_mask(runner.run_slices(case, sampled, 1, batch_slices, None)[0], case, sampled, batch_slices,
                       image.ndim)
    slice_axis = case.axis if image.ndim == 3 else None
    return normalised, tissue_levels.tissue_levels(normalised, first != 0, slice_axis)


def first_pass_levels(image: Image, model: LoadedSegmenter | str | Path, device: str | torch.device = "auto",
                      axis: str | int = "axial", batch_slices: int = BATCH_SLICES) -> tuple[float, float] | None:
    """``(grey, white)`` levels of ``image`` as :func:`segment` reads them before matching (``None``: not
    found); for calibrating a card's ``normalisation.tissue_levels`` with the same estimator."""
    from steprl.device import resolve_device

    dev = resolve_device(device)
    loaded = load_segmenter(model)
    loaded.net.to(dev)
    return _first_pass_levels(image, loaded, _make_runner(loaded, dev), axis, batch_slices, True)[1]


def _levels_matched(image: Image, loaded: LoadedSegmenter, runner: _Runner, axis: str | int, batch_slices: int,
                    skip_constant: bool) -> tuple[Image, np.ndarray | None]:
    """``image`` normalised and remapped to the card's grey / white ratio, when its
    ``normalisation.tissue_levels.grey_to_white`` gives one; else ``image`` itself. Implausible
    levels leave the image as it is, with a warning. Second: ``image`` percentile-normalised, when the
    first pass computed it (the border reads it; ``None`` otherwise)."""
    from steprl.segmentation import tissue_levels

    target = loaded.card.get("normalisation", {}).get("tissue_levels", {}).get("grey_to_white")
    if target is None:
        return image, None
    normalised, levels = _first_pass_levels(image, loaded, runner, axis, batch_slices, skip_constant)
    if not tissue_levels.plausible(levels):
        log.warning("Grey / white levels not found (%s): segmenting the image without matching them. Is it a "
                    "T1-weighted scan?", "no first-pass mask" if levels is None else
                    f"ratio {levels[0] / levels[1]:.2f}")
        return image, normalised
    log.info("grey / white levels %.3f / %.3f (ratio %.2f) matched to the model card's ratio %.2f",
             levels[0], levels[1], levels[0] / levels[1], float(target))
    return Image(tissue_levels.match_levels(normalised, *levels, float(target)), image.geometry), normalised


def _sliced(image: Image, loaded: LoadedSegmenter, axis: str | int) -> CaseSlices:
    """:func:`prepare_case` for the policy's pass, saying in the log when the slices are transposed."""
    case = prepare_case(image, None, size=loaded.size, axis=axis, name="image")
    if case.transposed:
        log.info("the slices are stored with their rows along an earlier physical axis than their columns (e.g. a "
                 "sagittal acquisition): each is transposed for the network and back")
    return case


def _step_mask(net_masks: torch.Tensor, case: CaseSlices, computed: np.ndarray, batch_slices: int, ndim: int,
               active: np.ndarray | None = None) -> np.ndarray:
    """One step's network-grid masks ``(N, 1, h, w)`` of the ``computed`` slices brought back onto the
    image's grid (bilinear, >= 0.5), as a volume; the other slices are 0, except those of ``active``
    that are not computed: linearly interpolated between their two computed neighbours before the
    threshold (:func:`auto_slice_stride`)."""
    soft = np.zeros((net_masks.shape[0], *case.grid.shape), dtype=np.float32)
    for first in range(0, len(computed), batch_slices):
        index = computed[first : first + batch_slices]
        soft[index] = case.grid.from_network(net_masks[torch.from_numpy(index)])[:, 0].numpy()
    between = np.setdiff1d(active, computed) if active is not None else np.array([], dtype=int)
    if len(between):
        upper = np.searchsorted(computed, between)
        below, above = computed[upper - 1], computed[upper]
        weight = ((between - below) / (above - below)).astype(np.float32)[:, None, None]
        soft[between] = (1 - weight) * soft[below] + weight * soft[above]
    return case.to_volume((soft >= 0.5).astype(np.uint8), ndim)


def segment(
    image: Image,
    model: LoadedSegmenter | str | Path,
    steps: int | None = None,
    device: str | torch.device = "auto",
    axis: str | int = "axial",
    batch_slices: int = BATCH_SLICES,
    *,
    labels: Image | None = None,
    bf16: bool | None = None,
    channels_last: bool | None = None,
    skip_constant: bool = True,
    progress: Callable[[int, int], None] | None = None,
    match_levels: bool = True,
    border: bool = True,
    slice_stride: int | None = None,
) -> Iterator[SegmentationStep]:
    """Segment ``image``: yields ``steps + 1`` :class:`SegmentationStep` (+ 1 with the border; module docstring).

    Args:
        image: a scalar 2D image or 3D volume (any geometry, any intensity range).
        model: a :class:`LoadedSegmenter`, or a PixelDRL-MG / U-Net model file.
        steps: policy steps (``None``: the model card's ``inference.steps``: 10 for a trained
            PixelDRL-MG, 3 for the bundled ``pixeldrl_wm``); a U-Net always takes one step.
        device: "auto", "cpu", "cuda", "cuda:N".
        axis: slicing axis of a 3D volume: "axial", "coronal", "sagittal", or array axis 0/1/2.
        batch_slices: slices per network call (memory vs speed; :data:`~steprl.segmentation.config.BATCH_SLICES`).
        labels: optional label map ON THE IMAGE GRID (0/1 or a multi-label map: > 0 = object)
            for the per-step Dice.
        bf16, channels_last: ``None`` = the measured default for the device.
        skip_constant: leave slices of one constant value out (background).
        progress: called with ``(slices done, slices total)`` while the network runs.
        match_levels: when the card gives ``normalisation.tissue_levels``, first remap the image's
            grey / white levels to the card's ratio (:mod:`steprl.segmentation.tissue_levels`; a
            one-step first pass of the model finds them). False: the image as it is.
        border: when the card gives ``inference.border``, yield the native-resolution border as a
            last result (:func:`border_enabled`). False: the policy's steps only.
        slice_stride: the policy decides on every n-th slice, the rest interpolated (None:
            :func:`auto_slice_stride`, the slices in a network pixel; 1: every slice).

    Raises:
        InputError: an image that cannot be segmented (empty, constant, NaN, vector, wrong
            dimension), labels on another grid, bad ``steps`` / ``batch_slices``.
        ModelFileError: a model file that is not a segmentation model.
    """
    from steprl.device import resolve_device

    dev = resolve_device(device)
    loaded = load_segmenter(model)
    loaded.net.to(dev)
    _check_arguments(image, labels, batch_slices, slice_stride)
    n_steps = _step_count(loaded, steps)
    start = time.perf_counter()
    runner = _make_runner(loaded, dev, bf16, channels_last)
    geometry, original, original_normalised = image.geometry, image, None
    if match_levels:
        image, original_normalised = _levels_matched(image, loaded, runner, axis, batch_slices, skip_constant)
    case = _sliced(image, loaded, axis)
    reference = None if labels is None else np.asarray(labels.array) > 0

    def result(step: int, mask: np.ndarray, changed: np.ndarray, stage: str = "policy") -> SegmentationStep:
        metrics = {"seconds": time.perf_counter() - start, "object_fraction": float(mask.mean()),
                   "changed_voxels": int(changed.sum()), "stage": stage}
        if reference is not None:
            metrics["dice"] = dice(mask, reference)
        return SegmentationStep(step, Image(mask, geometry), Image(changed.astype(np.uint8), geometry), metrics)

    previous = np.ones(image.array.shape, dtype=np.uint8)
    yield result(0, previous, np.zeros_like(previous), "start")
    if n_steps == 0:
        return
    if slice_stride is None:
        slice_stride = auto_slice_stride(case, image.geometry.spacing[::-1][case.axis]) if image.ndim == 3 else 1
    policy = _policy_masks(runner, case, image.ndim, n_steps, batch_slices, skip_constant, progress, slice_stride)
    for t, mask in enumerate(policy):
        yield result(t + 1, mask, mask != previous)
        previous = mask
    if border_enabled(loaded, border):
        mask = _bordered(original, previous, case, loaded.card["inference"]["border"], original_normalised)
        yield result(n_steps + 1, mask, mask != previous, "border")


def _policy_masks(runner: _Runner, case: CaseSlices, ndim: int, n_steps: int, batch_slices: int,
                  skip_constant: bool, progress: Callable[[int, int], None] | None,
                  stride: int = 1) -> Iterator[np.ndarray]:
    """The policy's masks of steps ``1..n_steps`` on the ``ndim``-D image's grid (uint8), once the network
    has run over every ``stride``-th slice (:func:`auto_slice_stride`; the slices between are interpolated)."""
    active = _active_slices(case, skip_constant)
    skipped = case.images.shape[0] - len(active)
    if skipped:
        log.info("%d of %d slices are constant: background, not segmented.", skipped, case.images.shape[0])
    computed = _computed_slices(active, stride)
    if len(computed) < len(active):
        log.info("the policy decides on every %d-th slice (%d of %d; the network's pixels are %.2g mm), the "
                 "slices between are interpolated", stride, len(computed), len(active), max(case.grid.network_spacing))
    net_masks = runner.run_slices(case, computed, n_steps, batch_slices, progress)
    for t in range(n_steps):
        yield _step_mask(net_masks[t], case, computed, batch_slices, ndim, active)


def auto_slice_stride(case: CaseSlices, slice_spacing: float) -> int:
    """How many slices apart the policy decides: the most whole slices that fit in one network pixel
    (``floor(pixel / slice spacing)``, at least 1), so that its decisions are as far apart across
    slices as within them. A 256 mm head in 1 mm slices: 2-mm network pixels, every second slice
    (half the network's time); MNI152 (1.8 mm pixels) and thicker slices: every slice."""
    if not slice_spacing > 0:
        return 1
    return max(1, int(np.floor(max(case.grid.network_spacing) / float(slice_spacing) + 1e-6)))


def _computed_slices(active: np.ndarray, stride: int) -> np.ndarray:
    """Every ``stride``-th of the ``active`` slice indices, the last always among them (so that every
    other active slice lies between two computed ones)."""
    computed = active[::max(1, int(stride))]
    if len(active) and computed[-1] != active[-1]:
        computed = np.append(computed, active[-1])
    return computed


def border_enabled(model: LoadedSegmenter, border: bool = True) -> bool:
    """Whether :func:`segment` ends with the native-resolution border: the card asks for it
    (``inference.border``) and the caller did not turn it off."""
    return bool(border) and bool(model.card.get("inference", {}).get("border"))


def _field_outcome(done) -> str:
    """How the border treated the white-matter field, for the log (``done``: a ``BorderResult``)."""
    if done.field_applied:
        return "flattened"
    if done.surround_span is None:
        return "below the threshold: not applied"
    return (f"the grey matter around shares only {100 * done.surround_span:.1f} %: the mask's shape, not a bias; "
            "not applied")


def _bordered(image: Image, mask: np.ndarray, case: CaseSlices, settings: dict | bool,
              normalised: np.ndarray | None = None) -> np.ndarray:
    """The last policy ``mask`` (uint8, the image's shape) with its border re-decided at the image's
    resolution (:func:`steprl.segmentation.border.native_border`; band: one network pixel; the card's
    ``inference.border.fraction``, else the midpoint; detached pieces dropped unless its ``detached``
    is false). ``image`` is the user's, not the level-matched one: the matching's knots come from a
    first pass, not from this mask, so its piecewise-linear remap would move the midpoint. The
    levels' ring grows in 3D: the mask covers every slice (MNI152 0.958 with a 3D ring, 0.953
    in-plane). The card's ``field_order`` (default :data:`~steprl.segmentation.intensity_field.ORDER`;
    0: none) sets the white-matter intensity field the image is flattened by before the rule, when it
    spans enough; its ``noise_target`` (default :data:`~steprl.segmentation.denoise.NOISE_TARGET`; 0:
    never) the noise above which the image is smoothed first. ``normalised``:
    ``normalise_percentile(image.array)`` when the first pass has it."""
    from steprl.preprocess import normalise_percentile
    from steprl.segmentation.border import ATTACH_MM, FRACTION, band_voxels, native_border
    from steprl.segmentation.denoise import NOISE_TARGET
    from steprl.segmentation.intensity_field import ORDER as FIELD_ORDER

    settings = settings if isinstance(settings, dict) else {}
    fraction = float(settings.get("fraction", FRACTION))

    spacing = image.geometry.spacing[::-1]  # numpy axis order
    band = band_voxels(max(case.grid.network_spacing), spacing)
    reach = band_voxels(ATTACH_MM, spacing) if settings.get("detached", True) else None
    normalised = normalise_percentile(image.array) if normalised is None else normalised
    done = native_border(normalised, mask != 0, band, fraction, reach, int(settings.get("field_order", FIELD_ORDER)),
                         float(settings.get("noise_target", NOISE_TARGET)))
    if done.field_span is not None:
        log.info("border: white-matter intensity field spans %.1f %% (%s)", 100 * done.field_span, _field_outcome(done))
    if done.noise_ratio is not None:
        log.info("border: noise %.0f %% of the grey / white gap, %s", 100 * done.noise_ratio,
                 f"smoothed by {done.smoothing:.2f} voxels" if done.smoothing else "not smoothed")
    if done.applied:
        log.info("border: levels %.3f / %.3f, threshold %.3f, band %s voxels", *done.levels, done.threshold, band)
    else:
        log.warning("The native-resolution border was not applied: %s. The policy's last mask is kept.", done.reason)
    return done.mask.astype(np.uint8)
