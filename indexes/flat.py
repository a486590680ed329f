"""Exact search: FAISS IndexFlatIP (float32) or a float16 scalar-quantized flat index."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from ndb.indexes import fileio
from ndb.indexes.base import IdSet, KeyIndex, as_ids, as_new_entries, as_queries, empty_result


class FlatIndex(KeyIndex):
    """Exact inner product over float32 keys (IndexIDMap2 over IndexFlatIP)."""

    kind = "flat"
    key_dtype = np.dtype(np.float32)  # how the inner index stores a key

    def __init__(self, dim: int, index: faiss.Index | None = None):
        super().__init__(dim)
        self.index = index if index is not None else faiss.IndexIDMap2(self._inner(self.dim))
        self._ids = IdSet(faiss.vector_to_array(self.index.id_map) if index is not None else None)

    @staticmethod
    def _inner(dim: int) -> faiss.Index:
        return faiss.IndexFlatIP(dim)

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def add(self, keys: np.ndarray, ids: np.ndarray) -> None:
        keys, ids = as_new_entries(keys, ids, self.dim)
        self._ids.check_absent(ids)
        self.index.add_with_ids(keys, ids)
        self._ids.insert(ids)

    def remove(self, ids: np.ndarray) -> int:
        present = self._ids.discard(as_ids(ids))
        if len(present):
            self.index.remove_ids(present)
        return len(present)

    def search(self, queries: np.ndarray, floor: float | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        queries = as_queries(queries, self.dim)
        if self.ntotal == 0:
            return empty_result(len(queries))
        scores, ids = self.index.search(queries, 1)
        return scores[:, 0], ids[:, 0]

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """All (keys as stored, in ``key_dtype``; ids), in insertion order after removals."""
        inner = faiss.downcast_index(self.index.index)
        codes = faiss.vector_to_array(inner.codes)
        keys = codes.view(self.key_dtype).reshape(self.ntotal, self.dim)
        return keys, faiss.vector_to_array(self.index.id_map)

    def save(self, path: Path) -> None:
        with fileio.writer(path, self.kind, self.dim, {}) as f:
            fileio.write_faiss(f, self.index)

    @classmethod
    def load(cls, path: Path, dim: int) -> FlatIndex:
        with fileio.reader(path, cls.kind, dim) as (f, _):
            return cls(dim, fileio.read_faiss(f))

    def memory_bytes(self) -> int:
        # stored key, plus the id twice (IndexIDMap2's id list and reverse map, and our IdSet)
        return self.ntotal * (self.dim * self.key_dtype.itemsize + 8 + 8) + self._ids.nbytes()


class Fp16FlatIndex(FlatIndex):
    """Exact search over keys stored as float16 (half the memory of ``flat``)."""

    kind = "flat-fp16"
    key_dtype = np.dtype(np.float16)

    @staticmethod
    def _inner(dim: int) -> faiss.Index:
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
