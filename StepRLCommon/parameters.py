"""What the StepRL modules' parameter nodes share: the wrapper (or its stand-ins), devices, folders.

In Slicer a module's parameter-node class is decorated with ``parameterNodeWrapper``, and
``connectGui`` binds each field to the .ui widget whose dynamic property ``SlicerParameterName``
names it. Outside Slicer (slicer-core, no Qt) ``slicer.parameterNodeWrapper`` does not exist: the
decorator below then leaves the class a plain annotated class, with stand-ins for the two
annotations, so that the headless tests can read the field names, types and defaults. A module's
parameter file must not use ``from __future__ import annotations``: parameterNodeWrapper reads
the real types.
"""

import dataclasses
import pathlib
import typing

try:
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
except ImportError:  # slicer-core: no Qt, no parameterNodeWrapper

    @dataclasses.dataclass(frozen=True)
    class WithinRange:  # noqa: D101 - stand-in with the same fields as Slicer's validator
        minimum: float
        maximum: float

    @dataclasses.dataclass(frozen=True)
    class Choice:  # noqa: D101 - stand-in with the same field as Slicer's validator
        choices: tuple

    def parameterNodeWrapper(classtype):  # noqa: N802 - Slicer's name
        return classtype


__all__ = ["DEVICES", "Choice", "WithinRange", "parameterNodeWrapper", "parameter_types", "user_folder"]

#: Device choices (the widget relabels them with what was detected, e.g. "GPU: NVIDIA ...").
DEVICES = ("auto", "cpu", "cuda")


def parameter_types(cls) -> dict[str, typing.Any]:
    """Field name -> annotated type of a parameter-node class, in declaration order (for binding checks)."""
    return typing.get_type_hints(cls, include_extras=True)


def user_folder(path: pathlib.Path | str | None) -> pathlib.Path | None:
    """The user models folder, or None when unset (the wrapper's default Path is ".")."""
    if path is None or str(path) in ("", "."):
        return None
    return pathlib.Path(path).expanduser()
