"""The interface every key index implements.

Keys are L2-normalized float32 rows, so inner product is cosine. Ids are int64 fact ids
chosen by the caller. Only top-1 search is needed: the gate reads the best match alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np


class KeyIndex(ABC):
    """Top-1 inner-product search over fact keys, with add and remove by id."""

    kind: str = ""  # registry name, saved beside the index so that load() picks the class

    def __init__(self, dim: int):
        self.dim = dim

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Number of keys held."""

    @property
    def needs_training(self) -> bool:
        return False

    def train(self, keys: np.ndarray) -> None:
        """Fit whatever the index learns from data (coarse centroids, codebooks)."""

    @abstractmethod
    def add(self, keys: np.ndarray, ids: np.ndarray) -> None:
        """Add ``keys`` (n, dim) under ``ids`` (n,)."""

    @abstractmethod
    def remove(self, ids: np.ndarray) -> int:
        """Remove the given ids; returns how many were present."""

    @abstractmethod
    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best match of each query (m, dim): (scores (m,) float32, ids (m,) int64; -1 if none)."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the index to ``path`` (a single file)."""

    @classmethod
    @abstractmethod
    def load(cls, path: Path, dim: int) -> KeyIndex:
        """Read an index written by ``save``."""

    def memory_bytes(self) -> int:
        """Approximate bytes the index holds in (host or device) memory."""
        return 0


def as_queries(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected an (n, {dim}) array, got shape {x.shape}")
    return x


def as_ids(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
