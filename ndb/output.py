"""Where ndb writes: paths checked before any work (a file, a new database), and strict
JSON (NaN and infinities become null: Python's json writes bare NaN/Infinity, which strict
readers reject).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ndb.errors import ConfigError, StoreError
from ndb.store import atomic_write_bytes, is_database


def check_writable(path: str | Path, what: str = "file") -> None:
    """Refuse, before any work, a ``path`` that could not be written when the work is done:
    a directory where a file is meant, or a location whose nearest existing folder is not
    a writable directory."""
    path = Path(path)
    if what == "file" and path.is_dir():
        raise ConfigError(f"{path} is a directory, not a file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {path}: {folder} is not a writable directory")


def check_creatable(path: str | Path) -> None:
    """A new database can be made at ``path``: nothing is there (or an empty directory),
    and the nearest existing folder is writable."""
    path = Path(path)
    if path.is_dir() and not any(path.iterdir()):
        return
    if path.exists():
        what = ("a fact database" if is_database(path)
                else "a directory that is not empty" if path.is_dir() else "a file")
        raise StoreError(f"{path} already exists and is {what}")
    check_writable(path, what="directory")


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
