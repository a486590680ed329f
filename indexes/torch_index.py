"""Exact search with torch: keys in one tensor on any device, search = matmul + max.

For accelerators: on CUDA, :meth:`TorchIndex.search_tensor` takes the query tensor where the
model left it and returns device tensors, with no host round trip. Storage grows by doubling
(amortized O(1) adds); remove fills the holes with the last rows (O(removed), order is not
kept). The top-1 is picked with a matmul in the storage dtype on accelerators (float32 on CPU,
where half-precision matmul is slow), then its score is recomputed in float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ndb.indexes import fileio
from ndb.indexes.base import IdSet, KeyIndex, as_ids, as_new_entries, as_queries

DTYPES = {"float16": torch.float16, "float32": torch.float32}
_SCORE_BYTES = 256 << 20  # cap on one (queries x key chunk) score block


class TorchIndex(KeyIndex):
    """Exact top-1 inner product over a (n, dim) tensor on ``device``: float16 by default on
    accelerators, float32 on CPU."""

    kind = "torch"
    searches_on_device = True

    def __init__(self, dim: int, *, device: str | torch.device = "cpu", dtype: str | None = None):
        super().__init__(dim)
        self.device = _check_device(device)
        # float32 on CPU: half-precision keys would be converted chunk by chunk at every search
        dtype = dtype or ("float32" if self.device.type == "cpu" else "float16")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self._n = 0
        self._keys = torch.empty((0, self.dim), dtype=DTYPES[dtype], device=self.device)
        self._row_ids = torch.empty(0, dtype=torch.int64, device=self.device)
        self._host_ids = np.empty(0, np.int64)  # the same row -> id map, for remove
        self._ids = IdSet()

    @property
    def ntotal(self) -> int:
        return self._n

    def _reserve(self, n: int) -> None:
        capacity = len(self._keys)
        if n <= capacity:
            return
        capacity = max(n, 2 * capacity, 1024)
        keys = torch.empty((capacity, self.dim), dtype=self._keys.dtype, device=self.device)
        keys[:self._n] = self._keys[:self._n]
        row_ids = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        row_ids[:self._n] = self._row_ids[:self._n]
        host_ids = np.full(capacity, -1, np.int64)
        host_ids[:self._n] = self._host_ids[:self._n]
        self._keys, self._row_ids, self._host_ids = keys, row_ids, host_ids

    def add(self, keys: np.ndarray, ids: np.ndarray) -> None:
        keys, ids = as_new_entries(keys, ids, self.dim)
        self._ids.check_absent(ids)
        n, b = self._n, len(ids)
        self._reserve(n + b)
        self._keys[n:n + b] = torch.from_numpy(keys).to(self.device, self._keys.dtype)
        self._row_ids[n:n + b] = torch.from_numpy(ids).to(self.device)
        self._host_ids[n:n + b] = ids
        self._ids.insert(ids)
        self._n = n + b

    def remove(self, ids: np.ndarray) -> int:
        present = self._ids.discard(as_ids(ids))
        k = len(present)
        if not k:
            return 0
        n = self._n
        gone = np.isin(self._host_ids[:n], present)
        holes = np.flatnonzero(gone[:n - k])  # removed rows that the tail must fill
        fillers = n - k + np.flatnonzero(~gone[n - k:n])
        if len(holes):
            src = torch.from_numpy(fillers).to(self.device)
            dst = torch.from_numpy(holes).to(self.device)
            self._keys[dst] = self._keys[src]
            self._row_ids[dst] = self._row_ids[src]
            self._host_ids[holes] = self._host_ids[fillers]
        self._row_ids[n - k:n] = -1
        self._host_ids[n - k:n] = -1
        self._n = n - k
        return k

    @torch.no_grad()
    def search_tensor(self, queries: torch.Tensor, floor: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-1 of each row of ``queries`` (m, dim): (float32 scores, int64 ids) on the
        index's device; -inf / -1 when the index is empty."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            shape = tuple(queries.shape)
            raise ValueError(f"queries must be an (n, {self.dim}) tensor, got shape {shape}")
        if not queries.is_floating_point():
            raise ValueError(f"queries must be floating point, got {queries.dtype}")
        q32 = queries.to(self.device, torch.float32)
        m = len(q32)
        if self._n == 0:
            return (torch.full((m,), -torch.inf, device=self.device),
                    torch.full((m,), -1, dtype=torch.int64, device=self.device))
        on_cpu = self.device.type == "cpu"
        q = q32 if on_cpu else q32.to(self._keys.dtype)
        chunk = max(1024, _SCORE_BYTES // (4 * max(m, 1)))
        best = torch.full((m,), -torch.inf, device=self.device)
        rows = torch.zeros(m, dtype=torch.int64, device=self.device)
        for start in range(0, self._n, chunk):
            block = self._keys[start:min(start + chunk, self._n)]
            # a caller's autocast (a model run in bfloat16) would pick the top-1 in its dtype
            with torch.autocast(self.device.type, enabled=False):
                scores = q @ (block.float() if on_cpu else block).T
            top, arg = scores.max(dim=1)
            better = top.float() > best
            best = torch.where(better, top.float(), best)
            rows = torch.where(better, arg + start, rows)
        exact = (q32 * self._keys[rows].float()).sum(dim=1)
        return exact, self._row_ids[rows]

    def search(self, queries: np.ndarray | torch.Tensor, floor: float | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(queries, torch.Tensor):
            queries = torch.from_numpy(as_queries(queries, self.dim))
        scores, ids = self.search_tensor(queries)
        return scores.cpu().numpy(), ids.cpu().numpy()

    def save(self, path: Path) -> None:
        with fileio.writer(path, self.kind, self.dim, {"dtype": self.dtype}) as f:
            fileio.write_array(f, self._host_ids[:self._n])
            fileio.write_array(f, self._keys[:self._n].cpu().numpy())

    @classmethod
    def load(cls, path: Path, dim: int, device: str | torch.device = "cpu") -> TorchIndex:
        with fileio.reader(path, cls.kind, dim) as (f, header):
            ids = fileio.read_array(f)
            keys = fileio.read_array(f)
        index = cls(dim, device=device, dtype=header["dtype"])
        index._reserve(len(ids))
        index._keys[:len(ids)] = torch.from_numpy(keys).to(index.device)
        index._row_ids[:len(ids)] = torch.from_numpy(ids).to(index.device)
        index._host_ids[:len(ids)] = ids
        index._ids = IdSet(ids)
        index._n = len(ids)
        return index

    def memory_bytes(self) -> int:
        capacity = len(self._keys)
        return capacity * (self.dim * self._keys.element_size() + 16) + self._ids.nbytes()


def _check_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but torch sees no CUDA device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps requested but it is not available")
    return device
