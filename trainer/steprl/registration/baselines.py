"""The registration tools users would pick instead of SPAC: ANTs SyN and Elastix B-spline.

Both run on steprl :class:`~steprl.geometry.Image` s (2D or 3D, any size, spacing, origin and
oblique direction; the tools work in physical LPS space like steprl) and return the same things
as a SPAC step, so one evaluation scores every method alike:

- ``displacement``: the TOTAL pull-back field on the FIXED grid, ``(*S_fixed, ndim)`` in mm
  (LPS, components in ITK ``x, y[, z]`` order), affine stage included: the fixed point ``x``
  maps to the moving point ``x + d(x)``, the convention of :mod:`steprl.spatial` and of
  :attr:`steprl.registration.inference.StepResult.physical_field`. It comes from the tool
  itself (ANTs: ``antsApplyTransforms`` composing its affine and warp into one field;
  Elastix: ``transformix`` deformation field), and the tests check that resampling the moving
  image through it reproduces the tool's own warped output, on oblique anisotropic grids.
- ``warped``: the moving image resampled by the tool itself (linear interpolation).
- ``warped_labels``: the moving labels pulled through ``displacement`` with nearest-neighbour
  interpolation by :func:`steprl.spatial.resample`, the code SPAC's labels go through, so a
  Dice difference between methods is never a difference of label resamplers.
- ``seconds``: wall time of the registration AND of extracting the field (what a user waits
  for before they can use the result); conversions in and out of the tools' image types are
  included, metric computation is not.

Settings (documented defaults; :data:`QUICK_SYN` / :data:`QUICK_ELASTIX` are tiny ones for tests):

- SyN: ANTsPy's own ``type_of_transform="SyN"`` (what ``ants.registration`` does by default):
  centre-of-mass initialisation, an affine stage (Mattes MI, 32 bins, 20% regular sampling,
  shrink 4-2-2-1, 2100x1200x1200x0 iterations), then symmetric normalisation (Mattes MI,
  gradient step 0.2, update-field smoothing 3 voxels, no total-field smoothing) over three
  levels (shrink 4-2-1, smoothing 2-1-0 voxels). Its default ``reg_iterations`` (40, 20, 0)
  skips the full-resolution level; ours is (40, 20, 10) so the field is refined at the
  images' own resolution too (documented choice: a stronger baseline for ~1/3 more time).
- Elastix: the affine and B-spline parameter maps of ``itk.ParameterObject.GetDefaultParameterMap``
  (Mattes MI, adaptive stochastic gradient descent, 2048 random samples per iteration,
  3 resolutions, 256 iterations per resolution; B-spline final grid 10 mm with the bending-energy
  penalty weight 1), plus centre-of-gravity initialisation of the affine stage, a fixed random
  seed, and linear final interpolation (so the warped image matches SPAC's resampler). Its
  cost grows with the field of view over the grid spacing, not with the voxel count: the
  optimiser's automatic step-size estimation (ASGD) dominates for a 10 mm grid over a head.

Threads: ``threads`` (default: all cores, ``os.cpu_count()``) becomes ITK's global default
thread count in both tools: ``itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads`` for
Elastix (NOT the registration method's own ``number_of_threads``, which crashes itk-elastix
0.25 with more than one thread), and ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` for ANTs. ANTs
(its own ITK inside ``antspyx``) reads that variable ONCE, at its first use in a process, so
the first call's thread count holds for the whole process: set it before anything else runs
(the benchmark and ``steprl evaluate`` do, through :func:`set_tool_threads`).

The packages are optional (``pip install 'steprl[compare]'``); a missing one raises an
:class:`~steprl.errors.InputError` that says so, and nothing here imports them at module import.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from steprl.errors import InputError
from steprl.geometry import Geometry, Image

log = logging.getLogger(__name__)

#: Baseline method names, as ``steprl evaluate registration --baselines`` takes them.
METHODS = ("syn", "elastix")
_PACKAGES = {"syn": ("ants", "antspyx"), "elastix": ("itk", "itk-elastix")}


@dataclass(frozen=True)
class SyNSettings:
    """ANTsPy ``ants.registration`` arguments (see the module docstring for what they mean)."""

    type_of_transform: str = "SyN"
    syn_metric: str = "mattes"
    syn_sampling: int = 32
    reg_iterations: tuple[int, ...] = (40, 20, 10)
    grad_step: float = 0.2
    flow_sigma: float = 3.0
    total_sigma: float = 0.0


@dataclass(frozen=True)
class ElastixSettings:
    """Elastix affine + B-spline parameter maps (defaults: itk-elastix's default maps)."""

    affine_iterations: int = 256
    bspline_iterations: int = 256
    resolutions: int = 3
    grid_spacing_mm: float = 10.0
    samples: int = 2048
    bending_weight: float = 1.0
    seed: int = 0


#: A few iterations only: for tests and smoke runs, not for comparisons.
QUICK_SYN = SyNSettings(reg_iterations=(20, 10))
QUICK_ELASTIX = ElastixSettings(affine_iterations=64, bspline_iterations=64, resolutions=2, samples=1024)


@dataclass
class BaselineResult:
    """One baseline registration (see the module docstring for each field's convention)."""

    method: str
    displacement: Image  # (*S_fixed, ndim) mm, LPS, total pull-back field incl. the affine stage
    warped: Image  # moving resampled onto the fixed grid by the tool (linear)
    warped_labels: np.ndarray | None  # (*S_fixed) int32, nearest, through ``displacement``
    seconds: float
    settings: dict = field(default_factory=dict)

    @property
    def physical_field(self):
        """``displacement`` as a torch tensor ``(1, ndim, *S_fixed)`` (mm), like ``StepResult.physical_field``."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(self.displacement.array, -1, 0)))[None].float()


# ---- optional packages and threads --------------------------------------------------------
def available(method: str) -> bool:
    """True when the package ``method`` needs can be imported (without importing it twice)."""
    module, _ = _PACKAGES[_check_method(method)]
    try:
        _import(module)
    except (ImportError, AttributeError):
        return False
    return True


#: What ``register_elastix`` uses of ``itk``, whose submodules load lazily on first attribute access.
_ITK_NAMES = ("elastix_registration_method", "transformix_deformation_field", "ParameterObject", "MultiThreaderBase",
              "image_from_array", "array_from_image", "matrix_from_array", "array_from_matrix")


def _import(module: str):
    """Import quietly: ITK's SWIG wrappers emit hundreds of DeprecationWarnings while loading, so
    the lazily loaded parts of ``itk`` that we use are loaded here, under the same filter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        imported = importlib.import_module(module)
        if module == "itk":
            for name in _ITK_NAMES:
                getattr(imported, name)  # AttributeError: an itk without elastix
    return imported


def _check_method(method: str) -> str:
    if method not in _PACKAGES:
        raise InputError(f"Unknown baseline {method!r}.", f"Use one of: {', '.join(METHODS)}.")
    return method


def require(method: str):
    """Import the package of ``method`` (``ants`` or ``itk``), or say how to install it."""
    module, package = _PACKAGES[_check_method(method)]
    if not available(method):
        raise InputError(f"The {method} baseline needs the optional package {package}, which is not installed.",
                         "Install the comparison tools: pip install 'steprl[compare]'.")
    return _import(module)


def resolve_threads(threads: int | None) -> int:
    """``threads`` if given (>= 1), else every core of this machine."""
    if threads is None:
        return max(1, os.cpu_count() or 1)
    if int(threads) < 1:
        raise InputError(f"threads must be at least 1, got {threads}.", "Use e.g. --threads 1.")
    return int(threads)


def set_tool_threads(threads: int | None) -> int:
    """Set the thread count the tools use (see the module docstring); returns it.

    Call it before the first registration of the process: ANTs reads the environment variable once.
    """
    n = resolve_threads(threads)
    previous = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    if previous is not None and previous != str(n) and "ants" in _started:
        log.warning("ANTs already runs with ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=%s in this process; "
                    "it cannot switch to %d threads", previous, n)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(n)
    return n


_started: set[str] = set()


# ---- shared helpers -------------------------------------------------------------------------
def _check_pair(fixed: Image, moving: Image, moving_labels: Image | None) -> None:
    from steprl.io import validate_image

    validate_image(fixed, "fixed image")
    validate_image(moving, "moving image", ndim=fixed.ndim, reference_name="fixed image")
    if moving_labels is not None and moving_labels.ndim != moving.ndim:
        raise InputError(f"The moving labels are {moving_labels.ndim}D but the moving image is {moving.ndim}D.",
                         "Give a label map of the moving image.")


def warp_through(image: Image, displacement: Image, mode: str = "linear", padding: str = "border") -> np.ndarray:
    """Resample ``image`` (any grid) onto ``displacement``'s grid through the pull-back field.

    ``out(x) = image(x + d(x))`` for every voxel ``x`` of the field's grid (physical space);
    ``mode`` ``"linear"`` or ``"nearest"`` (labels, returned as int32). Returns ``(*S_field)``.
    """
    import torch

    from steprl import spatial

    t = torch.from_numpy(np.ascontiguousarray(image.array, dtype=np.float32))[None, None]
    d = torch.from_numpy(np.ascontiguousarray(np.moveaxis(displacement.array, -1, 0), dtype=np.float32))[None]
    out = spatial.resample(t, image.geometry, displacement.geometry, d, mode=mode, padding=padding)[0, 0].numpy()
    return np.rint(out).astype(np.int32) if mode == "nearest" else out


def _finish(method: str, fixed: Image, displacement: np.ndarray, warped: np.ndarray, moving_labels: Image | None,
            seconds: float, settings: Any) -> BaselineResult:
    disp = Image(np.ascontiguousarray(displacement, dtype=np.float32), fixed.geometry)
    labels = None if moving_labels is None else warp_through(moving_labels, disp, mode="nearest")
    log.info("%s: %.1f s", method, seconds)
    return BaselineResult(method, disp, Image(np.asarray(warped, dtype=np.float32), fixed.geometry), labels,
                          seconds, asdict(settings))


# ---- ANTs SyN -----------------------------------------------------------------------------------
def _to_ants(image: Image):
    """An ANTsImage: ANTsPy arrays are in ITK index order ``(x, y[, z])``, the reverse of steprl's."""
    import ants

    g = image.geometry
    return ants.from_numpy(np.ascontiguousarray(image.array.astype(np.float32).T), origin=tuple(g.origin),
                           spacing=tuple(g.spacing), direction=np.asarray(g.direction, dtype=np.float64))


def _ants_field(path: str, geometry: Geometry) -> np.ndarray:
    """Read an ANTs displacement field file as ``(*S, ndim)`` in numpy order (components stay x, y[, z])."""
    import ants

    img = ants.image_read(path)
    arr = img.numpy()  # (x, y[, z], ndim)
    nd = geometry.ndim
    arr = np.transpose(arr, tuple(range(nd))[::-1] + (nd,))
    if arr.shape[:nd] != geometry.shape:
        raise RuntimeError(f"ANTs field shape {arr.shape} does not match the fixed grid {geometry.shape}")
    return arr


def register_syn(fixed: Image, moving: Image, *, moving_labels: Image | None = None, threads: int | None = None,
                 settings: SyNSettings | None = None) -> BaselineResult:
    """ANTs affine + SyN registration of ``moving`` onto ``fixed`` (see the module docstring)."""
    ants = require("syn")
    settings = settings or SyNSettings()
    _check_pair(fixed, moving, moving_labels)
    set_tool_threads(threads)
    _started.add("ants")
    work = tempfile.mkdtemp(prefix="steprl_syn_")
    try:
        start = time.perf_counter()
        f, m = _to_ants(fixed), _to_ants(moving)
        reg = ants.registration(f, m, type_of_transform=settings.type_of_transform, outprefix=os.path.join(work, "r_"),
                                syn_metric=settings.syn_metric, syn_sampling=settings.syn_sampling,
                                reg_iterations=tuple(settings.reg_iterations), grad_step=settings.grad_step,
                                flow_sigma=settings.flow_sigma, total_sigma=settings.total_sigma, verbose=False)
        composed = ants.apply_transforms(f, m, reg["fwdtransforms"], compose=os.path.join(work, "total_"))
        if not composed or not Path(composed).is_file():
            raise RuntimeError("antsApplyTransforms did not write the composed displacement field")
        disp = _ants_field(composed, fixed.geometry)
        warped = reg["warpedmovout"].numpy().T
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _finish("syn", fixed, disp, warped, moving_labels, seconds, settings)


# ---- Elastix ------------------------------------------------------------------------------------
def _to_itk(image: Image):
    import itk

    out = itk.image_from_array(np.ascontiguousarray(image.array, dtype=np.float32))
    g = image.geometry
    out.SetSpacing(tuple(g.spacing))
    out.SetOrigin(tuple(g.origin))
    out.SetDirection(itk.matrix_from_array(np.ascontiguousarray(g.direction, dtype=np.float64)))
    return out


def elastix_parameter_maps(ndim: int, settings: ElastixSettings | None = None):
    """The ``itk.ParameterObject`` of the affine then B-spline stages (see the module docstring)."""
    import itk

    s = settings or ElastixSettings()
    params = itk.ParameterObject.New()
    common = {"NumberOfResolutions": [str(s.resolutions)], "NumberOfSpatialSamples": [str(s.samples)],
              "RandomSeed": [str(s.seed)], "FinalBSplineInterpolationOrder": ["1"],
              "WriteResultImage": ["true"]}
    affine = params.GetDefaultParameterMap("affine", s.resolutions)
    for key, value in {**common, "MaximumNumberOfIterations": [str(s.affine_iterations)],
                       "AutomaticTransformInitialization": ["true"],
                       "AutomaticTransformInitializationMethod": ["CenterOfGravity"]}.items():
        affine[key] = value
    bspline = params.GetDefaultParameterMap("bspline", s.resolutions, s.grid_spacing_mm)
    for key, value in {**common, "MaximumNumberOfIterations": [str(s.bspline_iterations)],
                       "Metric1Weight": [str(s.bending_weight)]}.items():
        bspline[key] = value
    params.AddParameterMap(affine)
    params.AddParameterMap(bspline)
    return params


def register_elastix(fixed: Image, moving: Image, *, moving_labels: Image | None = None, threads: int | None = None,
                     settings: ElastixSettings | None = None) -> BaselineResult:
    """Elastix affine + B-spline registration of ``moving`` onto ``fixed`` (see the module docstring)."""
    itk = require("elastix")
    settings = settings or ElastixSettings()
    _check_pair(fixed, moving, moving_labels)
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(set_tool_threads(threads))
    start = time.perf_counter()
    with warnings.catch_warnings():  # ITK loads wrapped templates lazily, each load warns (SWIG)
        warnings.simplefilter("ignore", DeprecationWarning)
        f, m = _to_itk(fixed), _to_itk(moving)
        params = elastix_parameter_maps(fixed.ndim, settings)
        warped, transform = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False)
        with tempfile.TemporaryDirectory(prefix="steprl_transformix_") as out:  # else it writes into the cwd
            disp_img = itk.transformix_deformation_field(m, transform, output_directory=out)
        disp = np.asarray(itk.array_from_image(disp_img), dtype=np.float32)
        got = Geometry(disp.shape[:fixed.ndim], tuple(disp_img.GetSpacing()), tuple(disp_img.GetOrigin()),
                       itk.array_from_matrix(disp_img.GetDirection()))
    if not got.matches(fixed.geometry, tol=1e-3):
        raise RuntimeError(f"transformix field grid {got} does not match the fixed grid {fixed.geometry}")
    warped_arr = np.asarray(itk.array_from_image(warped), dtype=np.float32)
    seconds = time.perf_counter() - start
    return _finish("elastix", fixed, disp, warped_arr, moving_labels, seconds, settings)


# ---- one entry point --------------------------------------------------------------------------------
def run_baseline(method: str, fixed: Image, moving: Image, *, moving_labels: Image | None = None,
                 threads: int | None = None, quick: bool = False) -> BaselineResult:
    """Run the baseline ``method`` (``"syn"`` or ``"elastix"``); ``quick`` uses the tiny test settings."""
    if _check_method(method) == "syn":
        return register_syn(fixed, moving, moving_labels=moving_labels, threads=threads,
                            settings=QUICK_SYN if quick else None)
    return register_elastix(fixed, moving, moving_labels=moving_labels, threads=threads,
                            settings=QUICK_ELASTIX if quick else None)
