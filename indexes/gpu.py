"""Exact search on a GPU with FAISS (GpuIndexFlatIP); needs the optional faiss-gpu build.

Install with ``pip install ndb[gpu]`` (faiss-gpu-cu12, which replaces faiss-cpu's module). FAISS
is imported and checked at construction, so the rest of ndb works without it. GPU flat indexes
hold keys in insertion order with no id map of their own: row -> id is kept here (on the host
for add and remove, and a copy on the GPU for search_tensor), and remove rebuilds the device
index from the kept rows (O(n) on the device, streamed in chunks). ``search_tensor`` hands
FAISS the query tensor where it lies (faiss.contrib.torch_utils) and answers on the GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ndb.indexes import fileio
from ndb.indexes.base import (
    GpuUnavailableError,
    IdSet,
    KeyIndex,
    as_ids,
    as_new_entries,
    as_queries,
    empty_result,
)

_CHUNK = 65536


def _gpu_faiss(device: int):
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        raise GpuUnavailableError(
            "the installed faiss has no GPU support: pip install faiss-gpu-cu12 "
            "(in place of faiss-cpu), or use the 'torch' index on CUDA")
    count = faiss.get_num_gpus()
    if not 0 <= device < count:
        raise GpuUnavailableError(f"faiss sees {count} GPU(s); GPU {device} is not one of them")
    # lets GPU indexes search torch tensors in place (numpy calls are unchanged)
    import faiss.contrib.torch_utils  # noqa: F401
    return faiss


def _device_number(device: int | str) -> int:
    if isinstance(device, int):
        return device
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise ValueError(f"device must be a GPU number or 'cuda[:N]', got {device!r}")


class GpuFlatIndex(KeyIndex):
    """Exact top-1 inner product on GPU ``device``; keys stored as float16 unless
    ``float16=False`` (scores are computed in float32 either way)."""

    kind = "gpu-flat"
    searches_on_device = True

    def __init__(self, dim: int, *, device: int | str = 0, float16: bool = True):
        super().__init__(dim)
        self.gpu = _device_number(device)
        self.float16 = float16
        self._faiss = _gpu_faiss(self.gpu)
        self._resources = self._faiss.StandardGpuResources()
        self.index = self._new_index()
        self._row_ids = np.empty(0, np.int64)
        self._device_row_ids: torch.Tensor | None = None  # made on first search_tensor
        self._ids = IdSet()

    def _new_index(self):
        config = self._faiss.GpuIndexFlatConfig()
        config.device = self.gpu
        config.useFloat16 = self.float16
        return self._faiss.GpuIndexFlatIP(self._resources, self.dim, config)

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def add(self, keys: np.ndarray, ids: np.ndarray) -> None:
        keys, ids = as_new_entries(keys, ids, self.dim)
        self._ids.check_absent(ids)
        self.index.add(keys)
        self._row_ids = np.concatenate([self._row_ids, ids])
        self._device_row_ids = None
        self._ids.insert(ids)

    def remove(self, ids: np.ndarray) -> int:
        present = self._ids.discard(as_ids(ids))
        if not len(present):
            return 0
        keep = ~np.isin(self._row_ids, present)
        old, self.index = self.index, self._new_index()
        for start in range(0, len(keep), _CHUNK):
            part = keep[start:start + _CHUNK]
            if part.any():
                self.index.add(old.reconstruct_n(start, len(part))[part])
        old.reset()
        self._row_ids = self._row_ids[keep]
        self._device_row_ids = None
        return len(present)

    def search(self, queries: np.ndarray, floor: float | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        queries = as_queries(queries, self.dim)
        if self.ntotal == 0:
            return empty_result(len(queries))
        scores, rows = self.index.search(queries, 1)
        scores, rows = scores[:, 0], rows[:, 0]
        ids = np.where(rows >= 0, self._row_ids[np.maximum(rows, 0)], -1)
        return scores, ids

    @torch.no_grad()
    def search_tensor(self, queries: torch.Tensor, floor: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-1 of each row of ``queries`` (m, dim), searched and answered on this GPU."""
        device = torch.device("cuda", self.gpu)
        queries = queries.detach().to(device, torch.float32).contiguous()
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            shape = tuple(queries.shape)
            raise ValueError(f"queries must be an (n, {self.dim}) tensor, got shape {shape}")
        if self.ntotal == 0:
            return (torch.full((len(queries),), -torch.inf, device=device),
                    torch.full((len(queries),), -1, dtype=torch.int64, device=device))
        if self._device_row_ids is None:
            self._device_row_ids = torch.from_numpy(self._row_ids).to(device)
        scores, rows = self.index.search(queries, 1)
        rows = rows[:, 0]
        ids = torch.where(rows >= 0, self._device_row_ids[rows.clamp_min(0)], -1)
        return scores[:, 0], ids

    def save(self, path: Path) -> None:
        dtype = np.float16 if self.float16 else np.float32
        keys = np.empty((self.ntotal, self.dim), dtype)
        for start in range(0, self.ntotal, _CHUNK):
            count = min(_CHUNK, self.ntotal - start)
            keys[start:start + count] = self.index.reconstruct_n(start, count)
        with fileio.writer(path, self.kind, self.dim, {"float16": self.float16}) as f:
            fileio.write_array(f, self._row_ids)
            fileio.write_array(f, keys)

    @classmethod
    def load(cls, path: Path, dim: int, device: int | str = 0) -> GpuFlatIndex:
        with fileio.reader(path, cls.kind, dim) as (f, header):
            ids = fileio.read_array(f)
            keys = fileio.read_array(f)
        index = cls(dim, device=device, float16=header["float16"])
        for start in range(0, len(ids), _CHUNK):
            index.add(keys[start:start + _CHUNK], ids[start:start + _CHUNK])
        return index

    def memory_bytes(self) -> int:
        per_key = self.dim * (2 if self.float16 else 4) + 8
        return self.ntotal * per_key + self._ids.nbytes()
