"""Key index backends (imported as ``ndb.indexes``): one interface, several implementations."""

from __future__ import annotations

from pathlib import Path

from ndb.indexes.base import KeyIndex
from ndb.indexes.flat import FlatIndex, Fp16FlatIndex

BACKENDS: dict[str, type[KeyIndex]] = {cls.kind: cls for cls in (FlatIndex, Fp16FlatIndex)}


def make_index(kind: str, dim: int) -> KeyIndex:
    if kind not in BACKENDS:
        raise ValueError(f"unknown index kind {kind!r} (known: {', '.join(sorted(BACKENDS))})")
    return BACKENDS[kind](dim)


def load_index(kind: str, path: Path, dim: int) -> KeyIndex:
    return BACKENDS[kind].load(path, dim)


__all__ = ["BACKENDS", "KeyIndex", "load_index", "make_index"]
