"""Exact search: FAISS IndexFlatIP (float32) or a float16 scalar-quantized flat index."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from ndb.indexes.base import KeyIndex, as_ids, as_queries


class FlatIndex(KeyIndex):
    """Exact inner product over float32 keys (IndexIDMap2 over IndexFlatIP)."""

    kind = "flat"

    def __init__(self, dim: int, index: faiss.Index | None = None):
        super().__init__(dim)
        self.index = index if index is not None else faiss.IndexIDMap2(self._inner(dim))

    @staticmethod
    def _inner(dim: int) -> faiss.Index:
        return faiss.IndexFlatIP(dim)

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def add(self, keys: np.ndarray, ids: np.ndarray) -> None:
        self.index.add_with_ids(as_queries(keys, self.dim), as_ids(ids))

    def remove(self, ids: np.ndarray) -> int:
        return int(self.index.remove_ids(as_ids(ids)))

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        queries = as_queries(queries, self.dim)
        if self.ntotal == 0:
            return np.full(len(queries), -np.inf, np.float32), np.full(len(queries), -1, np.int64)
        scores, ids = self.index.search(queries, 1)
        return scores[:, 0], ids[:, 0]

    def save(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, dim: int) -> FlatIndex:
        return cls(dim, faiss.read_index(str(path)))

    def memory_bytes(self) -> int:
        return self.ntotal * (self.dim * self._bytes_per_dim + 8)

    _bytes_per_dim = 4


class Fp16FlatIndex(FlatIndex):
    """Exact search over keys stored as float16 (half the memory of ``flat``)."""

    kind = "flat-fp16"
    _bytes_per_dim = 2

    @staticmethod
    def _inner(dim: int) -> faiss.Index:
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
