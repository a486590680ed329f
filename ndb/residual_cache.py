"""Residual vectors on hand: a bounded cache in front of the HDF5 store.

Only tokens that pass the gate need a residual, so a database far larger than memory can
be attached: residuals are read from disk on first use and kept while there is room (the
least recently used make way). When every residual fits, all are loaded at attach time.
Lookups are vectorized (id -> slot arrays), with no Python loop over tokens.

While every stored residual is in the cache, the hook's lookups are a gather on the cache's
device through an id -> slot table kept there, so that a forward pass on an accelerator never
waits for the host; otherwise the ids that fired go through the host-side slot arrays.
"""

from __future__ import annotations

import numpy as np
import torch

from ndb.store import Store

DEFAULT_CACHE_BYTES = 1 << 30


class ResidualCache:
    """Fact id -> row of a preallocated (capacity, dim) tensor on the hook's device."""

    def __init__(self, store: Store, dim: int, device: torch.device | str = "cpu",
                 capacity_bytes: int = DEFAULT_CACHE_BYTES):
        self.store = store
        self.dim = dim
        self.device = torch.device(device)
        self.capacity = max(1, capacity_bytes // (4 * dim))
        self._slot_of = np.full(0, -1, np.int64)  # fact id -> slot, -1 if not cached
        self._id_of = np.full(0, -1, np.int64)  # slot -> fact id, -1 if free
        self._last_use = np.zeros(0, np.int64)  # slot -> tick of its last use
        self._tick = 0
        self._buffer = torch.empty(0, dim, device=self.device)
        self._device_slots: torch.Tensor | None = None  # id -> slot, while all are cached
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return int((self._id_of >= 0).sum())

    def memory_bytes(self) -> int:
        return self._buffer.numel() * self._buffer.element_size()

    def warm(self) -> None:
        """Load everything when it fits (the common case), so no hit ever reads the disk."""
        if 0 < len(self.store.entries) <= self.capacity:
            self.get(self.store.entries.ids)
            self._device_slots = torch.tensor(self._slot_of, device=self.device)

    def lookup(self, ids: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
        """Residuals (m, dim) for fact ids (m,) where ``wanted`` (m,) is true, on the cache's
        device; the other rows hold anything (the caller masks them), and their ids may be
        anything (-1 included)."""
        if self._device_slots is None:
            self.warm()  # after a change, when everything fits: back to device lookups
        if self._device_slots is not None:
            ids = ids.to(self.device).clamp(0, len(self._device_slots) - 1)
            return self._buffer[self._device_slots[ids]]
        rows = wanted.nonzero().squeeze(1)
        out = torch.zeros(len(ids), self.dim, device=self.device)
        out[rows.to(self.device)] = self.get(ids[rows].cpu().numpy())
        return out

    def get(self, ids: np.ndarray) -> torch.Tensor:
        """Residuals (m, dim) for fact ids (m,), in order; ids may repeat."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return self._buffer[:0]
        self._cover_ids(int(ids.max()) + 1)
        slots = self._slot_of[ids]
        wanted = np.unique(ids)
        missing = np.unique(ids[slots < 0])
        self.misses += len(missing)
        self.hits += len(wanted) - len(missing)
        if len(wanted) > self.capacity:  # more than fits at once: read through
            data = self.store.read("residuals", ids).astype(np.float32)
            return torch.from_numpy(data).to(self.device)
        self._tick += 1
        self._last_use[slots[slots >= 0]] = self._tick  # protected from eviction below
        if len(missing):
            self._load(missing)
            slots = self._slot_of[ids]
        return self._buffer[torch.from_numpy(slots).to(self.device)]

    def forget(self, ids: np.ndarray) -> None:
        """Drop ids whose residual changed or was removed."""
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[ids < len(self._slot_of)]
        self._device_slots = None
        slots = self._slot_of[ids]
        slots = slots[slots >= 0]
        self._id_of[slots] = -1
        self._slot_of[ids] = -1

    def _cover_ids(self, n: int) -> None:
        if n > len(self._slot_of):
            grown = np.full(max(n, 2 * len(self._slot_of)), -1, np.int64)
            grown[: len(self._slot_of)] = self._slot_of
            self._slot_of = grown

    def _free_slots(self, needed: int) -> np.ndarray:
        free = np.nonzero(self._id_of < 0)[0]
        if len(free) < needed and len(self._buffer) < self.capacity:
            size = min(self.capacity, max(len(self._buffer) + needed, 2 * len(self._buffer)))
            extra = size - len(self._buffer)
            self._buffer = torch.cat([self._buffer,
                                      torch.empty(extra, self.dim, device=self.device)])
            self._id_of = np.concatenate([self._id_of, np.full(extra, -1, np.int64)])
            self._last_use = np.concatenate([self._last_use, np.zeros(extra, np.int64)])
            free = np.nonzero(self._id_of < 0)[0]
        if len(free) < needed:  # evict the least recently used, never this call's own
            used = np.nonzero((self._id_of >= 0) & (self._last_use < self._tick))[0]
            victims = used[np.argsort(self._last_use[used])[: needed - len(free)]]
            self._slot_of[self._id_of[victims]] = -1
            self._id_of[victims] = -1
            free = np.concatenate([free, victims])
        return free[:needed]

    def _load(self, ids: np.ndarray) -> None:
        slots = self._free_slots(len(ids))
        data = torch.from_numpy(self.store.read("residuals", ids).astype(np.float32))
        self._buffer[torch.from_numpy(slots).to(self.device)] = data.to(self.device)
        self._id_of[slots] = ids
        self._slot_of[ids] = slots
        self._last_use[slots] = self._tick
