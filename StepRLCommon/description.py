"""What a StepRL module tells the shared base classes about itself: one typed, checked object. No Qt, no torch.

Each module's Lib builds one :class:`ModuleDescription` in its ``logic.py`` and passes it to the
run life cycle's base class; the Slicer-side classes of the module file take it from there::

    DESCRIPTION = ModuleDescription(name="SPACRegistration", task_noun="registration", ...)

    class RegistrationLogic(WorkerLogic, description=DESCRIPTION): ...            # Lib (headless)

    class SPACRegistrationLogic(StepRLModuleLogic, worker_class=RegistrationLogic): ...    # module file
    class SPACRegistrationWidget(StepRLWidget, logic_class=SPACRegistrationLogic): ...
    class SPACRegistrationTest(StepRLModuleTest, logic_class=SPACRegistrationLogic, tests=(...)): ...

The description checks itself when it is made, so a misspelt parameter, request field or volume
parameter stops the module at import (in Slicer and in the headless tests alike), and a missing
or misspelt class keyword is a TypeError when the class is defined.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .stepresults import ResultKind

#: The request fields :class:`~.widgetbase.StepRLModuleLogic` fills for every module.
COMMON_REQUEST_FIELDS = ("model", "steps", "device", "user_models_folder", "keep_job_folder")
#: The parameter-node fields the shared panel uses (see the modules' ``...Lib/parameters.py``).
COMMON_PARAMETERS = ("model", "steps", "device", "userModelsFolder", "keepJobFolder", "sequenceBrowser")


def parameter_names(parameter_node_class: type) -> set[str]:
    """The fields of a parameter-node class (its annotations, without evaluating them)."""
    names: set[str] = set()
    for cls in parameter_node_class.__mro__:
        names |= set(vars(cls).get("__annotations__", {}))
    return names


@dataclass(frozen=True)
class ModuleDescription:
    """A StepRL module, as the shared code needs to know it.

    Attributes:
        name: the module's name, e.g. ``"SPACRegistration"`` (prefix of its temporary folders,
            tag of its plot view).
        task_noun: what a run does, in messages: ``"registration"``, ``"segmentation"``.
        methods: the model-card ``method`` values of the models it runs.
        model_kind: what such a model is called in messages, e.g. ``"SPAC registration model"``.
        result_kind: the nodes of its results (:class:`~.stepresults.ResultKind`).
        run_class: its :class:`~.workerlogic.WorkerRun` subclass.
        request_class: the request its logic's ``start`` takes: a dataclass with the fields of
            :data:`COMMON_REQUEST_FIELDS` and the module's own.
        parameter_node_class: its parameter-node class, with the fields of :data:`COMMON_PARAMETERS`.
        request_fields: request field -> parameter-node field, for the module's own inputs and
            options (the common ones are mapped by the shared logic).
        default_volume_parameter: the parameter the panel sets to the scene's first scalar volume.
    """

    name: str
    task_noun: str
    methods: tuple[str, ...]
    model_kind: str
    result_kind: ResultKind
    run_class: type
    request_class: type
    parameter_node_class: type
    request_fields: Mapping[str, str]
    default_volume_parameter: str

    def __post_init__(self) -> None:
        if not (isinstance(self.methods, tuple) and self.methods and all(isinstance(m, str) for m in self.methods)):
            raise TypeError(f"{self.name}: methods must be a non-empty tuple of card methods, got {self.methods!r}")
        if not isinstance(self.result_kind, ResultKind):
            raise TypeError(f"{self.name}: result_kind must be a ResultKind, got {self.result_kind!r}")
        if not dataclasses.is_dataclass(self.request_class):
            raise TypeError(f"{self.name}: request_class must be a dataclass, got {self.request_class!r}")
        request = {f.name for f in dataclasses.fields(self.request_class)}
        parameters = parameter_names(self.parameter_node_class)
        problems = [f"{self.request_class.__name__} has no field {n!r}"
                    for n in [*COMMON_REQUEST_FIELDS, *self.request_fields] if n not in request]
        problems += [f"{self.parameter_node_class.__name__} has no parameter {n!r}"
                     for n in [*COMMON_PARAMETERS, *self.request_fields.values(), self.default_volume_parameter]
                     if n not in parameters]
        problems += [f"request field {n!r} is mapped by the shared logic" for n in self.request_fields
                     if n in COMMON_REQUEST_FIELDS]
        problems += [f"nothing fills the request field {f.name!r}" for f in dataclasses.fields(self.request_class)
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                     and f.name not in (*COMMON_REQUEST_FIELDS, *self.request_fields)]
        if self.result_kind.module != self.name:
            problems.append(f"its result kind is {self.result_kind.module!r}'s")
        if problems:
            raise ValueError(f"{self.name} module description: " + "; ".join(problems))
        object.__setattr__(self, "request_fields", MappingProxyType(dict(self.request_fields)))
