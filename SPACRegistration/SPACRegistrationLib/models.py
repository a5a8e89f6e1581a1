"""The SPAC models of the model selector: ``StepRLCommon.models`` restricted to ``method="spac"``.

Example::

    for entry in list_models("~/StepRLModels"):
        print(entry.label, entry.path)
"""

from __future__ import annotations

import os

from StepRLCommon import models as common
from StepRLCommon.models import ModelEntry, bundled_models_dir, describe_card, index_of

__all__ = ["METHOD", "ModelEntry", "bundled_models_dir", "describe_card", "find_model", "index_of", "list_models"]

#: The learner whose models this module runs.
METHOD = "spac"


def list_models(user_folder: str | os.PathLike | None = None, *, method: common.Methods = METHOD,
                bundled_folder: str | os.PathLike | None = None) -> list[ModelEntry]:
    """Bundled SPAC models first, then the user folder's (see ``StepRLCommon.models.list_models``)."""
    return common.list_models(user_folder, method=method, bundled_folder=bundled_folder)


def find_model(model: str | os.PathLike, user_folder: str | os.PathLike | None = None, *,
               method: common.Methods = METHOD, **kwargs) -> ModelEntry | None:
    """A SPAC model by name or path (see ``StepRLCommon.models.find_model``)."""
    return common.find_model(model, user_folder, method=method, **kwargs)
