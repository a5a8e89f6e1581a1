"""Values made strict JSON: NaN and infinity become ``null``, numpy values plain Python.

Why: Python's ``json`` writes a bare ``NaN`` by default, which is not JSON: other tools (and
browsers, ``jq``, JavaScript) refuse the whole file. A metric that is undefined (Dice of two
empty label maps, HD95 to an empty mask) is written as ``null`` instead, everywhere steprl
writes JSON (reports, model cards, worker events).

Example::

    json.dumps(finite_json({"dice": float("nan"), "hd95": np.float32(2.5)}), allow_nan=False)
    # '{"dice": null, "hd95": 2.5}'
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np


def finite_json(value: Any) -> Any:
    """``value`` with non-finite floats as None, numpy scalars and arrays as Python values, paths
    as strings and dict keys as strings; other objects are returned unchanged (``json`` decides)."""
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return finite_json(value.tolist())
    if isinstance(value, np.generic):
        return finite_json(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
