"""Strict JSON for ndb's reports and results: NaN and infinities become null (Python's json
writes bare NaN/Infinity, which strict readers reject)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ndb.store import atomic_write_bytes


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (also inside dicts, lists, numpy scalars) as None."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_or_none(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes NaN or Infinity."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def write_strict_json(path: str | Path, obj: Any, **kwargs: Any) -> None:
    """Write ``obj`` as strict JSON to ``path``, atomically (old or new file, never half)."""
    atomic_write_bytes(Path(path), (dumps_strict(obj, **kwargs) + "\n").encode())
