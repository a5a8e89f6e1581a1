"""Command-line options made from a config dataclass, so that each hyper-parameter is written once.

In the style of CleanRL's ``Args``: the dataclass holds each setting's type, default and meaning
(the ``Attributes:`` section of its docstring, Google style), and the options come from it::

    @dataclass
    class LearnerConfig:
        '''What the learner needs.

        Attributes:
            gamma: discount of the returns.
            steps_per_epoch: updates per epoch.
            revival: a pixel set to zero may come back.
        '''

        gamma: float = 0.95
        steps_per_epoch: int = 50
        revival: bool = True

    options = ConfigOptions(LearnerConfig, rename={"steps_per_epoch": "iterations"})
    options.add_to(parser)       # --gamma GAMMA, --iterations ITERATIONS, --revival / --no-revival
    config = options.build(parser.parse_args())

Options from annotations (``X | None`` is ``X`` with None allowed as the default):

=========================== ===============================================================
``int``, ``float``, ``str`` ``--name VALUE``
``Literal["a", "b"]``       ``--name {a,b}``
``bool`` defaulting False   ``--name`` (a flag)
``bool`` True or None       ``--name`` / ``--no-name`` (None: the option was not given)
``tuple[int, int]``         ``--name A B`` (as many values as the tuple has entries)
``tuple[int, ...]``         ``--name A [B ...]``
=========================== ===============================================================

The help text is the field's documentation with its default appended, so the default is never
written in a help string. No torch here: the command line imports this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

#: ``name: text`` or ``a, b: text`` (names shared one description) at an entry's indentation.
_ENTRY = re.compile(r"^(\w+(?:\s*,\s*\w+)*)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its description in the ``Attributes:`` section of ``cls``'s docstring (Google style).

    An entry is ``name: text`` with any continuation lines indented further; ``a, b: text``
    describes two fields at once. The section ends at the first line indented no deeper than
    its ``Attributes:`` line.
    """
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    if start is None:
        return {}
    section_indent = _indent(lines[start])
    docs: dict[str, list[str]] = {}
    entry_indent, current = None, []
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        indent = _indent(line)
        if indent <= section_indent:
            break
        entry_indent = indent if entry_indent is None else entry_indent
        match = _ENTRY.match(line.strip()) if indent == entry_indent else None
        if match:
            current = [match.group(2)]
            for name in re.split(r"\s*,\s*", match.group(1)):
                docs[name] = current
        elif current:
            current.append(line.strip())
    return {name: " ".join(part for part in text if part) for name, text in docs.items()}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None`` / ``Optional[X]``, else ``(annotation, False)``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _format_default(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple | list):
        return " ".join(str(v) for v in value)
    return str(value)


@dataclasses.dataclass(frozen=True)
class ConfigOptions:
    """The command-line options of a config dataclass, and the way back from parsed arguments.

    Attributes:
        config: the dataclass; every field it turns into an option must be documented.
        only: the fields to offer (declaration order is kept); default: every field.
        exclude: fields not to offer (they keep their dataclass default, or what ``build`` is given).
        rename: field -> option name without the dashes, e.g. ``{"allow_revival": "revival"}``;
            default: the field name with ``-`` for ``_``. The parsed value's attribute is the
            option name with ``_`` for ``-`` (``args.revival``).
        metavar: field -> the value's name in the help, e.g. ``{"grad_clip": "NORM"}``.
        unset: fields whose option defaults to None, meaning "not given": ``build`` then uses
            its keyword argument for that field, else the dataclass default (for settings whose
            default depends on something else, e.g. on a model to fine-tune). Their help shows
            no default: the field's documentation says what happens.
    """

    config: type
    only: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    rename: Mapping[str, str] = dataclasses.field(default_factory=dict)
    metavar: Mapping[str, str | tuple[str, ...]] = dataclasses.field(default_factory=dict)
    unset: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.config):
            raise TypeError(f"{self.config!r} is not a dataclass")
        known = [f.name for f in dataclasses.fields(self.config)]
        named = [*(self.only or ()), *self.exclude, *self.rename, *self.metavar, *self.unset]
        unknown = sorted(set(named) - set(known))
        if unknown:
            raise ValueError(f"{self.config.__name__} has no field {', '.join(unknown)} (fields: {', '.join(known)})")
        undocumented = [name for name in self.names if name not in field_docs(self.config)]
        if undocumented:
            raise ValueError(f"{self.config.__name__}: document {', '.join(undocumented)} in the Attributes section "
                             "of its docstring (the option's help comes from there)")

    @property
    def names(self) -> list[str]:
        """The fields offered as options, in declaration order."""
        return [f.name for f in dataclasses.fields(self.config)
                if (self.only is None or f.name in self.only) and f.name not in self.exclude]

    def option(self, name: str) -> str:
        """The option string of field ``name``, e.g. ``--class-balance``."""
        return "--" + self.rename.get(name, name.replace("_", "-"))

    def dest(self, name: str) -> str:
        """The attribute of field ``name`` in the parsed namespace."""
        return self.option(name)[2:].replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        """Add one option per field to ``parser`` (or an argument group)."""
        hints = typing.get_type_hints(self.config)
        docs = field_docs(self.config)
        fields = {f.name: f for f in dataclasses.fields(self.config)}
        for name in self.names:
            self._add(parser, fields[name], hints[name], docs[name])

    def _add(self, parser, field: dataclasses.Field, annotation: Any, doc: str) -> None:
        kind, optional = _unwrap_optional(annotation)
        default = _default(field)
        kwargs: dict[str, Any] = {"dest": self.dest(field.name)}
        if field.name in self.metavar:
            kwargs["metavar"] = self.metavar[field.name]
        if kind is bool:
            kwargs["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
            kwargs.pop("metavar", None)
        else:
            kwargs.update(_value_kwargs(field.name, kind, optional))
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = None if field.name in self.unset else default
        text = doc.replace("``", "")
        if field.name not in self.unset and default is not dataclasses.MISSING and default is not None \
                and kwargs.get("action") != "store_true":
            text = f"{text.rstrip('.')} (default: {_format_default(default)})"
        action = parser.add_argument(self.option(field.name), **kwargs)
        # set afterwards: BooleanOptionalAction appends a default of its own on Python < 3.13
        action.help = text.replace("%", "%%")

    def values(self, namespace: argparse.Namespace) -> dict[str, Any]:
        """Field -> parsed value of every option (lists become tuples; ``unset`` options not given are left out)."""
        hints = typing.get_type_hints(self.config)
        out = {}
        for name in self.names:
            value = getattr(namespace, self.dest(name))
            if value is None and name in self.unset:
                continue
            if isinstance(value, list) and typing.get_origin(_unwrap_optional(hints[name])[0]) is tuple:
                value = tuple(value)
            out[name] = value
        return out

    def build(self, namespace: argparse.Namespace, **values: Any):
        """The dataclass from the parsed options; ``values`` give the fields that are not options here
        (else their dataclass default) and the ``unset`` ones, unless the user gave them."""
        parsed = self.values(namespace)
        clash = sorted((set(self.names) - set(self.unset)) & set(values))
        if clash:
            raise TypeError(f"{', '.join(clash)} come(s) from the command line: do not pass them to build()")
        return self.config(**{**values, **parsed})


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _value_kwargs(name: str, kind: Any, optional: bool) -> dict[str, Any]:
    """``type``, ``nargs`` and ``choices`` of a non-boolean option of annotation ``kind``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        return {"type": type(args[0]), "choices": args}
    if origin in (tuple, list, Sequence) or kind in (tuple, list):
        item = args[0] if args else str
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(set(args)) != 1:
                raise TypeError(f"field {name}: a tuple option needs one item type, got {kind}")
            return {"type": item, "nargs": len(args)}
        return {"type": item, "nargs": "+"}
    if kind in (int, float, str):
        return {"type": kind}
    raise TypeError(f"field {name}: no command-line form for the type {kind}"
                    + (" | None" if optional else ""))

