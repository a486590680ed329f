"""The interface every key index implements, and the validation all backends share.

Keys are L2-normalized float rows, so inner product is cosine. Ids are non-negative int64 fact
ids chosen by the caller, unique within an index (adding a present id is an error: remove it
first). Only top-1 search is needed: the gate reads the best match alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the interface is read without torch (ndb list, ndb info)
    import torch

Progress = Callable[[int, int], None]  # told (done, total) as a long call goes on


class GpuUnavailableError(RuntimeError):
    """FAISS was built without GPU support, or sees no GPU."""


class KeyIndex(ABC):
    """Top-1 inner-product search over fact keys, with add and remove by id."""

    kind: str = ""  # registry name, saved beside the index so that load() picks the class
    # True when search_tensor searches on the index's own device and answers there, with no
    # host round trip: the hook then never waits for the device (see GatedRetrieval)
    searches_on_device: bool = False

    def __init__(self, dim: int):
        if int(dim) <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = int(dim)

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Number of keys held."""

    @property
    def needs_training(self) -> bool:
        return False

    def train(self, keys: np.ndarray) -> None:
        """Fit whatever the index learns from data (coarse centroids, codebooks)."""
        return None  # exact indexes learn nothing

    @abstractmethod
    def add(self, keys: np.ndarray, ids: np.ndarray) -> None:
        """Add ``keys`` (n, dim) under ``ids`` (n,)."""

    @abstractmethod
    def remove(self, ids: np.ndarray) -> int:
        """Remove the given ids; returns how many were present (absent ids are ignored)."""

    @abstractmethod
    def search(self, queries: np.ndarray, floor: float | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Best match of each query (m, dim): (scores (m,) float32, ids (m,) int64).

        A query with no match (empty index) gets score -inf and id -1. ``floor``: the caller
        ignores scores at or below it (the gate's gamma), so an approximate index may skip the
        work for a query whose best key it judges to be below it, and report no match; exact
        indexes ignore it.
        """

    def search_tensor(self, queries: torch.Tensor, floor: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``search`` for queries in a tensor (what the hook holds): (scores, ids) tensors,
        float32 and int64. Host backends answer on the CPU; a backend that searches on a
        device overrides this, answers on that device and sets ``searches_on_device``."""
        import torch

        scores, ids = self.search(queries.detach().float().cpu().numpy(), floor)
        return torch.from_numpy(scores), torch.from_numpy(ids)

    def calibrate(self, queries: np.ndarray, gamma: float, target: float = 0.999,
                  progress: Progress | None = None) -> dict[int, float]:
        """Tune approximate search until its gate decisions agree with exact search on
        ``target`` of ``queries``; returns what was tried ({setting: agreement}). Exact
        indexes have nothing to tune: {}. ``progress(done, total)`` is told how far the
        exact search that decisions are checked against has got."""
        return {}

    def tuning(self) -> dict:
        """What ``calibrate`` set, for ``tune`` to give a rebuilt index: {} here."""
        return {}

    def tune(self, settings: dict | None) -> None:
        """Search as ``tuning()`` said, without calibrating again (None: as uncalibrated)."""
        return None

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


def as_queries(x: np.ndarray, dim: int, what: str = "queries") -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, dim) array; ValueError on a wrong shape or dtype."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise ValueError(f"{what} must be a floating point array, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must be an (n, {dim}) array, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return x


def as_ids(ids: np.ndarray) -> np.ndarray:
    """``ids`` as a flat int64 array; ValueError unless integers."""
    ids = np.asarray(ids)
    if ids.size and ids.dtype.kind not in "iu":
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    return np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)


def as_new_entries(keys: np.ndarray, ids: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated (keys, ids) for ``add``: matching lengths, non-negative ids, no repeats."""
    keys = as_queries(keys, dim, "keys")
    ids = as_ids(ids)
    if len(ids) != len(keys):
        raise ValueError(f"got {len(keys)} keys but {len(ids)} ids")
    if len(ids) and ids.min() < 0:
        raise ValueError("ids must be non-negative (-1 means 'no match' in search results)")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids repeat within one add call")
    return keys, ids


def empty_result(m: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(m, -np.inf, np.float32), np.full(m, -1, np.int64)


class IdSet:
    """The ids an index holds, as a sorted int64 array (8 bytes per key, O(log n) lookups)."""

    def __init__(self, ids: np.ndarray | None = None):
        self.ids = np.unique(as_ids(ids)) if ids is not None else np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.ids, ids)
        return (pos < len(self.ids)) & (self.ids[np.minimum(pos, len(self.ids) - 1)] == ids)

    def check_absent(self, ids: np.ndarray) -> None:
        if len(self.ids) and self.contains(ids).any():
            present = ids[self.contains(ids)][:5].tolist()
            raise ValueError(f"ids already present (remove them first): {present}")

    def insert(self, ids: np.ndarray) -> None:
        ids = np.sort(ids)
        self.ids = np.insert(self.ids, np.searchsorted(self.ids, ids), ids)

    def discard(self, ids: np.ndarray) -> np.ndarray:
        """Drop the present ones among ``ids``; returns those (unique)."""
        ids = np.unique(ids)
        hit = self.contains(ids) if len(self.ids) else np.zeros(len(ids), bool)
        present = ids[hit]
        if len(present):
            self.ids = np.delete(self.ids, np.searchsorted(self.ids, present))
        return present

    def nbytes(self) -> int:
        return self.ids.nbytes
