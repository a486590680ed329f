"""The single-file format of the indexes written here: a JSON header, then sections in order.

Layout: 8-byte magic, 8-byte little-endian header length, the UTF-8 JSON header (kind, dim,
format version, backend fields), then sections: numpy arrays (``np.save`` format) and FAISS
indexes (FAISS's own serialization), streamed to and from the file without whole-file copies.
Writes go through ndb.store.atomic_path, so a crash mid-save leaves the previous file intact.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import faiss
import numpy as np

from ndb.store import atomic_path

MAGIC = b"NDBINDEX"
VERSION = 1


@contextmanager
def writer(path: Path, kind: str, dim: int, fields: dict[str, Any]) -> Iterator[IO[bytes]]:
    """Open ``path`` for writing, header written; sections follow in the ``with`` body."""
    path = Path(path)
    header = json.dumps({"kind": kind, "dim": dim, "version": VERSION, **fields}).encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + len(header).to_bytes(8, "little") + header)
        yield f


@contextmanager
def reader(path: Path, kind: str, dim: int) -> Iterator[tuple[IO[bytes], dict[str, Any]]]:
    """Open ``path``, check its header against ``kind`` and ``dim``; yields (file, header)."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{path} is not an ndb index file")
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        if header.get("version") != VERSION:
            raise ValueError(f"{path}: unsupported format version {header.get('version')}")
        if header["kind"] != kind:
            raise ValueError(f"{path} holds a {header['kind']!r} index, not {kind!r}")
        if header["dim"] != dim:
            raise ValueError(f"{path} holds keys of dimension {header['dim']}, expected {dim}")
        yield f, header


def write_array(f: IO[bytes], array: np.ndarray) -> None:
    np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def read_array(f: IO[bytes]) -> np.ndarray:
    return np.load(f, allow_pickle=False)


def write_faiss(f: IO[bytes], index: faiss.Index) -> None:
    faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))


def read_faiss(f: IO[bytes]) -> faiss.Index:
    return faiss.read_index(faiss.PyCallbackIOReader(f.read))
