"""SPAC inference: ``register()`` yields the registration step by step, in physical space.

    for result in register(fixed, moving, "spac2d_brain", steps=20):
        print(result.step, result.metrics["ncc"])
    final = result.displacement      # Image (*S, ndim): mm, LPS, pull-back, on the network grid
    warped = result.warped           # Image on the fixed grid (computed on first access)

Pipeline: both images are normalised on their own grids (percentiles), then resampled in
physical space onto the network grid covering the FIXED image (the moving one through the
optional affine pre-alignment), so fixed and moving may differ in size, spacing, orientation
and intensity range. Every step runs the policy with the plan MEAN (deterministic), clamps
the step to ``max_step`` voxels, composes it into the accumulated field and warps the ORIGINAL
moving image by it. Step 0 is the input (identity, or the affine alone).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from steprl import spatial
from steprl.errors import InputError
from steprl.geometry import Geometry, Image
from steprl.preprocess import normalise_percentile
from steprl.registration.model import LoadedSPAC, load_spac

log = logging.getLogger(__name__)


@dataclass
class _Context:
    """What every step shares: grids, tensors on the device, the affine."""

    fixed: Image
    moving: Image
    net: Geometry
    affine: np.ndarray | None
    moving_raw: torch.Tensor  # (1, 1, *S_moving) original intensities
    fixed_labels: torch.Tensor | None  # (1, 1, *S_fixed)
    moving_labels: Image | None
    labels: list[int]


@dataclass
class StepResult:
    """One step of a registration.

    Attributes:
        step: 0 (input) .. n.
        voxel_field: accumulated voxel displacement on the network grid ``(1, ndim, *S_net)``
            (device tensor; the affine is not included).
        metrics: ``ncc`` (local NCC on the network grid), ``folding_percent``, ``seconds``
            since the start, and with labels ``dice`` (mean) and ``dice_per_label`` on the fixed grid.
    """

    step: int
    voxel_field: torch.Tensor
    metrics: dict
    _ctx: _Context = field(repr=False)
    _warped_labels: torch.Tensor | None = field(default=None, repr=False)
    #: the grid ``voxel_field`` lives on: the network grid, or the finer refinement grid
    grid: Geometry | None = None
    #: "input", "policy" or "refine": what produced this step
    kind: str = "policy"

    @property
    def field_grid(self) -> Geometry:
        return self._ctx.net if self.grid is None else self.grid

    @property
    def warped_labels(self) -> np.ndarray | None:
        """The moving labels warped onto the fixed grid (nearest), when labels were given."""
        return None if self._warped_labels is None else self._warped_labels[0, 0].cpu().numpy().astype(np.int32)

    @property
    def fixed_labels_array(self) -> np.ndarray | None:
        """The fixed labels on the fixed grid, when labels were given."""
        lab = self._ctx.fixed_labels
        return None if lab is None else lab[0, 0].cpu().numpy().astype(np.int32)

    @cached_property
    def physical_field(self) -> torch.Tensor:
        """Total physical displacement ``(1, ndim, *S_net)`` in mm (LPS), affine included."""
        ctx = self._ctx
        u = spatial.voxel_to_physical(self.voxel_field, self.field_grid)
        return spatial.total_displacement(u, self.field_grid, ctx.affine)

    @cached_property
    def displacement(self) -> Image:
        """The accumulated field as a vector Image on the network grid (an ITK displacement field)."""
        arr = self.physical_field[0].movedim(0, -1).float().cpu().numpy()
        return Image(arr, self.field_grid)

    def field_on_fixed_grid(self, reference: Geometry | None = None) -> torch.Tensor:
        """Physical displacement WITHOUT the affine, resampled onto the fixed grid ``(1, ndim, *S_fixed)``
        (or onto ``reference``, e.g. one slice of it)."""
        u = spatial.voxel_to_physical(self.voxel_field, self.field_grid)
        return spatial.resample(u, self.field_grid, reference or self._ctx.fixed.geometry)

    def warp_moving(self, moving: torch.Tensor, geometry: Geometry, mode: str = "linear",
                    reference: Geometry | None = None) -> torch.Tensor:
        """Resample any image on the moving side ``(1, C, *S)`` onto the fixed grid (or ``reference``) by this step."""
        ctx = self._ctx
        reference = reference or ctx.fixed.geometry
        return spatial.resample(moving, geometry, reference, self.field_on_fixed_grid(reference), ctx.affine, mode)

    def warped_slice(self, axis: int = 0) -> np.ndarray:
        """The middle slice along array ``axis`` of :attr:`warped`, warping that slice alone (3D; a 2D image whole).

        For pictures of many steps: one slice of a 160x192x144 volume costs 1/144 of the full warp.
        """
        fixed = self._ctx.fixed.geometry
        if fixed.ndim == 2:
            return self.warped.array
        slab = fixed.slab(axis, fixed.shape[axis] // 2)
        out = self.warp_moving(self._ctx.moving_raw, self._ctx.moving.geometry, reference=slab)
        return out[0, 0].select(axis, 0).cpu().numpy()

    @cached_property
    def warped(self) -> Image:
        """The ORIGINAL moving image (its own intensities) warped onto the fixed grid."""
        ctx = self._ctx
        out = self.warp_moving(ctx.moving_raw, ctx.moving.geometry)
        return Image(out[0, 0].cpu().numpy(), ctx.fixed.geometry)


def _tensor(array: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)


def _check_inputs(fixed: Image, moving: Image, model: LoadedSPAC) -> None:
    from steprl.io import validate_image

    validate_image(fixed, "fixed image")
    validate_image(moving, "moving image", ndim=fixed.ndim, reference_name="fixed image")
    if fixed.ndim != model.config.ndim:
        raise InputError(f"The images are {fixed.ndim}D but model '{model.path.stem}' is {model.config.ndim}D.",
                         f"Choose a {fixed.ndim}D SPAC model.")


def _labels_on_fixed(labels: Image | None, fixed: Geometry, device) -> torch.Tensor | None:
    if labels is None:
        return None
    t = _tensor(labels.array, device)
    if labels.geometry.matches(fixed):
        return t
    return spatial.resample(t, labels.geometry, fixed, mode="nearest")


def _step_settings(spac: LoadedSPAC, steps: int | None, max_step: float | None, early_stop: int | None,
                   refine_steps: int | None) -> tuple[int, float, int]:
    """``(steps, max_step, refine_steps)`` with the model card's defaults, after checking what was asked."""
    from steprl.limits import check_steps

    check_steps(steps)
    steps = spac.default_steps if steps is None else int(steps)
    max_step = spac.max_step if max_step is None else float(max_step)
    if not max_step > 0:
        raise InputError(f"max_step must be a positive number of voxels, got {max_step}.", "Use e.g. --max-step 3.")
    if early_stop is not None and early_stop < 1:
        raise InputError(f"early_stop must be at least 1 step, got {early_stop}.", "Use e.g. --early-stop 3.")
    check_steps(refine_steps, "--refine")
    refine_steps = spac.default_refine_steps if refine_steps is None else int(refine_steps)
    return steps, max_step, refine_steps


def _label_ids(fixed_labels: Image | None, moving_labels: Image | None) -> list[int]:
    """The non-zero labels present in either map (none without labels)."""
    if fixed_labels is None:
        return []
    present = set(np.unique(fixed_labels.array).tolist()) | set(np.unique(moving_labels.array).tolist())
    return sorted(int(v) for v in present if v != 0)


@dataclass
class _Scorer:
    """Step ``t``'s metrics: NCC on the network grid, folding of the field, Dice with labels."""

    ctx: _Context
    f_net: torch.Tensor
    window: int
    moving_labels: torch.Tensor | None  # on the moving grid
    start: float

    def __call__(self, t: int, u: torch.Tensor, warped: torch.Tensor, kind: str,
                 grid: Geometry | None = None) -> StepResult:
        from steprl.metrics import dice_per_label, local_ncc

        with torch.no_grad():
            ncc = float(local_ncc(self.f_net, warped, self.window))
            folding = float((spatial.jacobian_determinant(u) <= 0).float().mean() * 100)
        metrics: dict = {"ncc": ncc, "folding_percent": folding}
        out = StepResult(t, u, metrics, self.ctx, grid=grid, kind=kind)
        if self.moving_labels is not None:
            warped_labels = out.warp_moving(self.moving_labels, self.ctx.moving_labels.geometry, mode="nearest")
            out._warped_labels = warped_labels
            per_label = dice_per_label(warped_labels, self.ctx.fixed_labels, self.ctx.labels)
            metrics["dice_per_label"] = per_label
            metrics["dice"] = float(np.mean(list(per_label.values()))) if per_label else float("nan")
        metrics["seconds"] = time.perf_counter() - self.start
        return out


class _EarlyStop:
    """Stop after ``patience`` policy steps without a local-NCC gain of 1e-4 (None: never)."""

    def __init__(self, patience: int | None) -> None:
        self.patience, self.best, self.since_best = patience, -np.inf, 0

    def stop(self, t: int, ncc: float) -> bool:
        if t == 0:
            self.best = ncc
            return False
        if self.patience is None:
            return False
        if ncc > self.best + 1e-4:
            self.best, self.since_best = ncc, 0
            return False
        self.since_best += 1
        if self.since_best >= self.patience:
            log.info("early stop at step %d: no NCC improvement for %d steps", t, self.patience)
            return True
        return False


def _refined(result: _Scorer, t: int, u: torch.Tensor, images: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
             refine_steps: int, settings) -> Iterator[StepResult]:
    """The refinement steps after policy step ``t`` (field ``u`` on the network grid), on the finer grid.

    ``images``: the normalised fixed and moving images on their own grids, the moving on the network grid.
    """
    from steprl.registration.refine import field_on, refine, refine_grid

    ctx, (f_norm, m_norm, m_net) = result.ctx, images
    fine = refine_grid(ctx.net, settings.factor)
    f_fine = spatial.resample(f_norm, ctx.fixed.geometry, fine)
    m_fine = spatial.resample(m_norm, ctx.moving.geometry, fine, affine=ctx.affine)
    fields = refine(f_fine, m_fine, field_on(u, ctx.net, fine), refine_steps, settings)
    for k, refined in enumerate(fields, start=1):
        with torch.no_grad():
            warped = spatial.warp(m_net, field_on(refined, fine, ctx.net))
        yield result(t + k, refined, warped, "refine", fine)


def register(
    fixed: Image,
    moving: Image,
    model: LoadedSPAC | str | Path,
    steps: int | None = None,
    device: str | torch.device = "auto",
    *,
    fixed_labels: Image | None = None,
    moving_labels: Image | None = None,
    prealign: bool = False,
    max_step: float | None = None,
    early_stop: int | None = None,
    bf16: bool | None = None,
    refine_steps: int | None = None,
    refine_settings=None,
) -> Iterator[StepResult]:
    """Register ``moving`` to ``fixed`` step by step; yields ``steps + 1`` :class:`StepResult`.

    Args:
        fixed, moving: scalar Images (2D or 3D, any geometry; intensities any range).
        model: a :class:`LoadedSPAC`, a model file path or a bundled model name.
        steps: number of policy steps (default: the model card's, usually 20).
        device: "auto", "cpu", "cuda", "cuda:N".
        fixed_labels, moving_labels: optional label maps (any grid) for per-step Dice.
        prealign: run an affine pre-alignment first (SimpleITK, mutual information).
        max_step: per-step clamp in voxels (default: the card's, official SPAC 3).
        early_stop: stop after this many steps without local-NCC improvement (None: never).
        bf16: bfloat16 autocast of the network (default: :func:`steprl.device.default_inference_bf16`).
        refine_steps: test-time optimisation steps after the policy's (``--refine N``;
            :mod:`steprl.registration.refine`), yielded as further steps with ``kind == "refine"``
            (default: the model card's ``inference.refine.steps``, 0 when absent).
        refine_settings: a :class:`steprl.registration.refine.RefineSettings` (default: the card's).
    """
    from steprl.device import resolve_device

    dev = resolve_device(device)
    spac = model if isinstance(model, LoadedSPAC) else load_spac(model, dev)
    spac.policy.to(dev)
    _check_inputs(fixed, moving, spac)
    if (fixed_labels is None) != (moving_labels is None):
        raise InputError("Only one label map was given.", "Give both fixed and moving labels, or neither.")
    steps, max_step, refine_steps = _step_settings(spac, steps, max_step, early_stop, refine_steps)
    if refine_settings is None:
        refine_settings = spac.refine_settings()
    from steprl.device import default_inference_bf16

    use_bf16 = default_inference_bf16(dev) if bf16 is None else bool(bf16)
    start = time.perf_counter()

    from steprl.registration.prealign import affine_prealign

    affine = affine_prealign(fixed, moving) if prealign else None
    net = spac.network_grid(fixed.geometry)
    f_norm = _tensor(normalise_percentile(fixed.array), dev)
    f_net = spatial.resample(f_norm, fixed.geometry, net)
    m_norm = _tensor(normalise_percentile(moving.array), dev)
    m_net = spatial.resample(m_norm, moving.geometry, net, affine=affine)
    label_ids = _label_ids(fixed_labels, moving_labels)
    ctx = _Context(fixed, moving, net, affine, _tensor(moving.array, dev),
                   _labels_on_fixed(fixed_labels, fixed.geometry, dev), moving_labels, label_ids)
    moving_label_t = None if moving_labels is None else _tensor(moving_labels.array, dev)
    result = _Scorer(ctx, f_net, int(spac.card.get("inference", {}).get("ncc_window", 9)), moving_label_t, start)

    u = f_net.new_zeros(1, net.ndim, *net.shape)
    warped = m_net
    stopper = _EarlyStop(early_stop)
    t = 0
    for t in range(steps + 1):
        if t > 0:
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                state = torch.cat([f_net, warped, u] if spac.config.field_input else [f_net, warped], dim=1)
                _, step = spac.policy.act(state, deterministic=True)
            u = spatial.compose(u, step.float().clamp(-max_step, max_step))
            warped = spatial.warp(m_net, u)
        current = result(t, u, warped, "policy" if t else "input")
        yield current
        if stopper.stop(t, current.metrics["ncc"]):
            break
    if refine_steps:
        yield from _refined(result, t, u, (f_norm, m_norm, m_net), refine_steps, refine_settings)
