"""Python dependencies of the StepRL worker inside Slicer, installed only when the user agrees.

What the worker needs beyond Slicer's own Python: ``torch`` (from the PyTorch extension's
``PyTorchUtils``, which picks the CUDA build that fits the driver, or the CPU build),
``safetensors`` (pip, lower bound only), and what the chosen model's kind needs on top
(:data:`METHOD_REQUIREMENTS`: MONAI for a U-Net segmentation model; a test runs the worker on
each kind with everything else hidden, so the list cannot fall behind the code). numpy and
SimpleITK come with Slicer and are never replaced: the pip step skips them
(``slicer.pydeps.pip_ensure(skip_packages=...)`` in Slicer 5.11+, a constraints file pinning the
installed versions on older Slicer).

Nothing here runs at import time, and checking what is missing imports nothing (it reads the
installed packages' metadata), so opening the module never loads torch into Slicer's process.

Example (the widget's Apply button)::

    if not ensure_dependencies(confirm=slicer.util.confirmOkCancelDisplay, purpose="SPAC registration"):
        return  # the user declined; nothing was installed
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from typing import Protocol

log = logging.getLogger(__name__)

TORCH_REQUIREMENT = "torch>=2.2"
PIP_REQUIREMENTS = ("safetensors>=0.4",)
#: What the worker needs for a model of each kind (card ``method``), beyond torch and safetensors.
METHOD_REQUIREMENTS: dict[str, tuple[str, ...]] = {"spac": (), "pixeldrl-mg": (), "unet": ("monai>=1.3",)}
#: Distributions Slicer (or the PyTorch extension) provides; pip must never replace them.
NEVER_REPLACE = ("numpy", "SimpleITK", "torch")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def satisfied(requirement: str) -> bool:
    """Whether ``name>=version`` (or a bare name) is installed, read from package metadata only."""
    name, _, minimum = requirement.partition(">=")
    try:
        installed = importlib.metadata.version(name.strip())
    except importlib.metadata.PackageNotFoundError:
        return False
    if not minimum:
        return True
    try:
        from packaging.version import Version

        return Version(installed) >= Version(minimum.strip())
    except ImportError:  # packaging is not importable: compare the numeric parts
        return _version_tuple(installed) >= _version_tuple(minimum)


def requirements_for(method: str | None = None) -> tuple[str, ...]:
    """What the worker needs to run a model of kind ``method`` (None: any model's common needs)."""
    return (TORCH_REQUIREMENT, *PIP_REQUIREMENTS, *METHOD_REQUIREMENTS.get(method or "", ()))


def missing_requirements(requirements: Sequence[str] = (TORCH_REQUIREMENT, *PIP_REQUIREMENTS)) -> list[str]:
    """The requirements not yet satisfied, in the order given."""
    return [r for r in requirements if not satisfied(r)]


class Installer(Protocol):
    """How packages get installed (Slicer's way in Slicer; a fake in tests)."""

    def install_torch(self, requirement: str) -> bool:
        """Install torch through the PyTorch extension; False when it did not happen."""

    def pip_ensure(self, requirements: Sequence[str], never_replace: Sequence[str]) -> None:
        """Install ``requirements`` with pip, leaving ``never_replace`` untouched."""


class SlicerInstaller:
    """The real :class:`Installer`: PyTorchUtils for torch, ``slicer.pydeps`` / ``slicer.util`` for pip."""

    def install_torch(self, requirement: str) -> bool:
        try:
            import PyTorchUtils
        except ImportError as err:
            raise RuntimeError("The PyTorch extension is not installed: install it from the Extensions Manager, "
                               "restart Slicer, then apply again.") from err
        version = requirement[len("torch"):]
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=version)
        return torch is not None

    def pip_ensure(self, requirements: Sequence[str], never_replace: Sequence[str]) -> None:
        import slicer

        pydeps = getattr(slicer, "pydeps", None)
        if pydeps is not None and hasattr(pydeps, "pip_ensure"):  # Slicer 5.11+
            from packaging.requirements import Requirement

            pydeps.pip_ensure([Requirement(r) for r in requirements], skip_packages=list(never_replace),
                              requester="StepRL")
            return
        pins = []
        for name in never_replace:
            try:
                pins.append(f"{name}=={importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                continue
        with tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", delete=False) as handle:
            handle.write("\n".join(pins) + "\n")
        try:
            slicer.util.pip_install(" ".join(requirements), constraints=handle.name)
        except TypeError:  # an old Slicer without the constraints argument
            slicer.util.pip_install(" ".join([*requirements, "-c", handle.name]))
        finally:
            os.unlink(handle.name)


def ensure_dependencies(confirm: Callable[[str], bool], installer: Installer | None = None, *,
                        purpose: str = "StepRL", requirements: Sequence[str] | None = None) -> bool:
    """Install what is missing after asking ``confirm(message)``; True when everything is there.

    ``purpose`` names what needs the packages in the question ("SPAC registration needs ...");
    ``requirements`` (default: :func:`requirements_for` any model) lists them, e.g.
    ``requirements_for("unet")`` for a U-Net model.

    Raises RuntimeError with a user-facing message when an installation failed.
    """
    requirements = tuple(requirements or requirements_for())
    missing = missing_requirements(requirements)
    if not missing:
        return True
    message = (f"{purpose} needs these Python packages, which are not installed yet:\n\n  "
               + "\n  ".join(missing)
               + "\n\nPyTorch comes from the PyTorch extension (the build that fits your GPU, or the CPU build); "
                 "the download may take minutes. Slicer's own numpy and SimpleITK are not changed.\n\nInstall now?")
    if not confirm(message):
        log.info("Installation of %s declined by the user", ", ".join(missing))
        return False
    installer = installer or SlicerInstaller()
    if TORCH_REQUIREMENT in missing and not installer.install_torch(TORCH_REQUIREMENT):
        raise RuntimeError("PyTorch was not installed. Open the PyTorch Utils module to install it, then apply again.")
    others = [r for r in missing if r != TORCH_REQUIREMENT]
    if others:
        installer.pip_ensure(others, NEVER_REPLACE)
    still = missing_requirements(requirements)
    if still:
        raise RuntimeError(f"Could not install {', '.join(still)}. Restart Slicer and try again; the Python "
                           "console shows pip's messages.")
    return True
