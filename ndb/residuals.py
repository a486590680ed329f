"""Residual vectors on hand: a bounded cache in front of the HDF5 store.

Only tokens that pass the gate need a residual, so a database far larger than memory can
be attached: residuals are read from disk on the first hit and kept while there is room
(least recently used ones make way). When every residual fits, all are loaded at once.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from ndb.store import Store

DEFAULT_CACHE_BYTES = 1 << 30


class ResidualCache:
    """Maps fact ids to residual rows of a preallocated tensor on the hook's device."""

    def __init__(self, store: Store, dim: int, device: torch.device | str = "cpu",
                 capacity_bytes: int = DEFAULT_CACHE_BYTES):
        self.store = store
        self.dim = dim
        self.device = torch.device(device)
        self.capacity = max(1, capacity_bytes // (4 * dim))
        self._slots: OrderedDict[int, int] = OrderedDict()  # id -> row of _buffer, LRU order
        self._free: list[int] = []
        self._buffer = torch.empty(0, dim, device=self.device)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._slots)

    def _grow(self, needed: int) -> None:
        size = min(self.capacity, max(needed, 2 * len(self._buffer), 1024))
        if size <= len(self._buffer):
            return
        extra = torch.empty(size - len(self._buffer), self.dim, device=self.device)
        self._free.extend(range(len(self._buffer), size))
        self._buffer = torch.cat([self._buffer, extra])

    def _slot_for(self, fact_id: int) -> int:
        if not self._free:
            self._grow(len(self._buffer) + 1)
        if not self._free:  # full: evict the least recently used residual
            _, slot = self._slots.popitem(last=False)
            self._free.append(slot)
        slot = self._free.pop()
        self._slots[fact_id] = slot
        return slot

    def load(self, ids: np.ndarray) -> None:
        """Read residuals of ``ids`` from the store into the cache."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        ids = ids[[int(i) not in self._slots for i in ids]] if len(self._slots) else ids
        if len(ids) == 0:
            return
        ids = ids[: self.capacity]
        data = torch.from_numpy(self.store.read("residuals", ids).astype(np.float32))
        self._grow(len(self._slots) + len(ids))
        slots = torch.tensor([self._slot_for(int(i)) for i in ids], device=self.device)
        self._buffer[slots] = data.to(self.device)

    def warm(self) -> None:
        """Load everything when it fits (the common case), so no hit ever reads the disk."""
        if 0 < len(self.store.entries) <= self.capacity:
            self.load(self.store.entries.ids)

    def get(self, ids: np.ndarray) -> torch.Tensor:
        """Residuals (m, dim) for fact ids (m,), in order; ids may repeat."""
        ids = np.asarray(ids, dtype=np.int64)
        keys = ids.tolist()
        distinct = set(keys)
        if len(distinct) > self.capacity:  # more than fits: read through, cache nothing
            self.misses += len(distinct)
            data = self.store.read("residuals", ids).astype(np.float32)
            return torch.from_numpy(data).to(self.device)
        present = [i for i in distinct if i in self._slots]
        for i in present:  # most recent first, so loading the rest cannot evict them
            self._slots.move_to_end(i)
        self.hits += len(present)
        self.misses += len(distinct) - len(present)
        if len(present) < len(distinct):
            self.load(np.array([i for i in distinct if i not in self._slots], dtype=np.int64))
        slots = torch.tensor([self._slots[i] for i in keys], device=self.device)
        return self._buffer[slots]

    def forget(self, ids: np.ndarray) -> None:
        """Drop ids whose residual changed or was removed."""
        for i in np.asarray(ids, dtype=np.int64).tolist():
            slot = self._slots.pop(i, None)
            if slot is not None:
                self._free.append(slot)

    def memory_bytes(self) -> int:
        return self._buffer.numel() * self._buffer.element_size()
