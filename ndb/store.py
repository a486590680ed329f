"""The on-disk format of a fact database, and how it changes without ever being half-written.

    DB/config.json        NeuralDBConfig (written once at creation; gamma may be changed)
    DB/manifest.json      which segment files make up the current state (atomically replaced)
    DB/segments/*.h5      immutable HDF5 segments: additions (ids, keys, residuals, facts, seq)
                          or deletions (ids, seq)
    DB/index/*.faiss      a cache of the key index at some manifest version (rebuildable)
    DB/.lock              held by the one process allowed to write

A change writes a new segment (temp file, fsync, rename), then a new manifest that lists
it (temp file, fsync, rename). A crash before the manifest's rename leaves the old state
plus an unreferenced file, removed by the next writer; after it, the new state.

Every entry carries a sequence number (the manifest version that wrote it); for each fact
id the entry with the highest sequence number wins, and a deletion entry removes it. So
an update is simply a new entry under the same id.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ndb.errors import LockedError, StoreError

CONFIG = "config.json"
MANIFEST = "manifest.json"
SEGMENTS = "segments"
INDEX = "index"
LOCK = ".lock"
DATASETS = ("keys", "residuals", "facts", "key_scores")  # per entry, in addition segments
COMPACT_SEGMENTS = 64  # merge all segments into one once there are more than this many


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; on success it is synced and
    renamed over ``path``, on failure removed, so ``path`` is always old or new, whole."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


@dataclass
class Manifest:
    version: int = 0  # bumped by every commit; also the sequence number of its entries
    next_id: int = 0
    segments: list[str] = field(default_factory=list)
    compacted_through: int = 0  # deletions up to this version were folded away by compaction

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            data = json.loads((path / MANIFEST).read_text())
            return cls(**data)
        except FileNotFoundError:
            raise StoreError(f"{path}: not a fact database (no {MANIFEST})") from None
        except (json.JSONDecodeError, TypeError) as err:
            raise StoreError(f"{path}/{MANIFEST} is unreadable: {err}") from None

    def write(self, path: Path) -> None:
        atomic_write_json(path / MANIFEST, self.__dict__)


@dataclass
class Entries:
    """Where each live fact id lives: parallel arrays sorted by id."""

    ids: np.ndarray  # int64
    segment: np.ndarray  # index into the segment list
    row: np.ndarray  # row within the segment
    seq: np.ndarray  # sequence number of the entry

    def __len__(self) -> int:
        return len(self.ids)

    def locate(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ``ids`` in this table; raises KeyError naming an absent id."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self.ids, ids)
        found = pos < len(self.ids)
        found[found] = self.ids[pos[found]] == ids[found]
        if not found.all():
            raise KeyError(int(ids[~found][0]))
        return pos


def _write_segment(path: Path, datasets: dict[str, np.ndarray], seq: int) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["seq"] = seq
        for name, data in datasets.items():
            f.create_dataset(name, data=data)


class Store:
    """Segments of one database directory: read any time, written under the lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._files: dict[str, h5py.File] = {}
        self._lock_fd: int | None = None
        self.refresh()

    # -- reading ---------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Re-read the manifest; returns whether the state changed."""
        manifest = Manifest.read(self.path)
        if getattr(self, "manifest", None) == manifest:
            return False
        self.manifest = manifest
        for name in list(self._files):
            if name not in manifest.segments:
                self._files.pop(name).close()
        self.entries = self._live_entries()
        return True

    def file(self, name: str) -> h5py.File:
        if name not in self._files:
            try:
                self._files[name] = h5py.File(self.path / SEGMENTS / name, "r", locking=False)
            except OSError as err:
                raise StoreError(f"{self.path}: segment {name} is unreadable ({err})") from None
        return self._files[name]

    def _live_entries(self) -> Entries:
        ids, seqs, segs, rows, alive = [], [], [], [], []
        for s, name in enumerate(self.manifest.segments):
            f = self.file(name)
            seg_ids = f["ids"][:]
            n = len(seg_ids)
            ids.append(seg_ids)
            seqs.append(f["seq"][:] if "seq" in f else np.full(n, f.attrs["seq"], np.int64))
            segs.append(np.full(n, s, np.int64))
            rows.append(np.arange(n, dtype=np.int64))
            alive.append(np.full(n, "keys" in f))
        if not ids:
            empty = np.zeros(0, np.int64)
            return Entries(empty, empty, empty, empty)
        ids, seqs = np.concatenate(ids), np.concatenate(seqs)
        segs, rows, alive = np.concatenate(segs), np.concatenate(rows), np.concatenate(alive)
        order = np.lexsort((seqs, ids))  # by id, then by sequence number
        ids, seqs, segs, rows, alive = (a[order] for a in (ids, seqs, segs, rows, alive))
        last = np.r_[ids[1:] != ids[:-1], True]  # the latest entry of each id wins
        keep = last & alive
        return Entries(ids[keep], segs[keep], rows[keep], seqs[keep])

    def read(self, name: str, ids: np.ndarray | None = None) -> np.ndarray:
        """Dataset ``name`` (keys, residuals, facts) for ``ids`` (all live ids if None)."""
        pos = np.arange(len(self.entries)) if ids is None else self.entries.locate(ids)
        segs, rows = self.entries.segment[pos], self.entries.row[pos]
        if not self.manifest.segments:
            raise StoreError(f"{self.path}: the database is empty")
        out = None
        for s in np.unique(segs):
            sel = np.nonzero(segs == s)[0]
            order = np.argsort(rows[sel])
            data = self.file(self.manifest.segments[s])[name][rows[sel][order]]
            if out is None:
                out = np.empty((len(pos), *data.shape[1:]), dtype=data.dtype)
            out[sel[order]] = data
        if out is None:  # no ids asked for: an empty array of the stored shape and type
            ds = self.file(self.manifest.segments[-1]).get(name)
            out = np.empty((0, *ds.shape[1:]), ds.dtype) if ds is not None else np.empty(0)
        return out

    def read_entries_since(self, version: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids written after ``version`` that are live now, ids deleted after it)."""
        changed = set()
        for name in self.manifest.segments:
            f = self.file(name)
            seqs = f["seq"][:] if "seq" in f else np.full(len(f["ids"]), f.attrs["seq"])
            changed.update(f["ids"][:][seqs > version].tolist())
        changed_ids = np.array(sorted(changed), dtype=np.int64)
        live = np.isin(changed_ids, self.entries.ids)
        return changed_ids[live], changed_ids[~live]

    # -- writing ---------------------------------------------------------------------------
    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the writer lock; the state is refreshed from disk on entry."""
        if self._lock_fd is not None:  # re-entrant within one process
            yield
            return
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(
                f"{self.path} is being written by another process (pid {holder}); "
                "try again when it has finished"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        try:
            self.refresh()
            self._remove_orphans()
            yield
        finally:
            self._lock_fd = None
            os.close(fd)  # closing releases the flock

    def _remove_orphans(self) -> None:
        referenced = set(self.manifest.segments)
        for p in (self.path / SEGMENTS).iterdir():
            if p.name not in referenced:
                p.unlink(missing_ok=True)
        for p in self.path.glob(".*.tmp"):
            p.unlink(missing_ok=True)

    def _commit(self, segment: dict[str, np.ndarray] | None, manifest: Manifest) -> None:
        if self._lock_fd is None:
            raise StoreError("internal error: commit without the writer lock")
        if segment is not None:
            name = f"seg-{manifest.version:08d}.h5"
            _write_segment(self.path / SEGMENTS / name, segment, manifest.version)
            manifest.segments = [*manifest.segments, name]
        manifest.write(self.path)
        self.refresh()

    def append(self, keys: np.ndarray, residuals: np.ndarray, facts: list[str],
               ids: np.ndarray | None = None, key_scores: np.ndarray | None = None
               ) -> np.ndarray:
        """Add entries (new ids, or new versions of existing ids); returns their ids.
        ``key_scores``: per key, its best cosine with generic text (see NeuralDB)."""
        with self.writing():
            m = self.manifest
            if ids is None:
                ids = np.arange(m.next_id, m.next_id + len(keys), dtype=np.int64)
            ids = np.asarray(ids, dtype=np.int64)
            new = Manifest(m.version + 1, max(m.next_id, int(ids.max(initial=-1)) + 1),
                           m.segments, m.compacted_through)
            self._commit({
                "ids": ids,
                "seq": np.full(len(ids), new.version, np.int64),
                "keys": keys,
                "residuals": residuals,
                "facts": np.array(facts, dtype=h5py.string_dtype()),
                "key_scores": (np.zeros(keys.shape[:-1], np.float16) if key_scores is None
                               else key_scores.astype(np.float16)),
            }, new)
            self._maybe_compact()
        return ids

    def delete(self, ids: np.ndarray) -> None:
        with self.writing():
            self.entries.locate(ids)  # every id must exist
            m = self.manifest
            new = Manifest(m.version + 1, m.next_id, m.segments, m.compacted_through)
            self._commit({"ids": np.asarray(ids, np.int64)}, new)
            self._maybe_compact()

    def _maybe_compact(self) -> None:
        if len(self.manifest.segments) > COMPACT_SEGMENTS:
            self.compact()

    def compact(self) -> None:
        """Rewrite the live entries into one segment (same ids and sequence numbers)."""
        with self.writing():
            m = self.manifest
            if not self.entries.ids.size:
                segment = None
            else:
                segment = {"ids": self.entries.ids, "seq": self.entries.seq}
                for name in DATASETS:
                    segment[name] = self.read(name)
                segment["facts"] = segment["facts"].astype(h5py.string_dtype())
            new = Manifest(m.version + 1, m.next_id, [], m.version)
            old = list(m.segments)
            self._commit(segment, new)
            for name in old:
                self._files.pop(name, None)
                (self.path / SEGMENTS / name).unlink(missing_ok=True)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def create(path: Path, config: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
    """Create an empty database directory (atomically: it appears whole or not at all),
    with ``arrays`` saved beside the config as NAME.npy."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise StoreError(f"{path} already exists and is not empty")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    (staging / SEGMENTS).mkdir()
    (staging / INDEX).mkdir()
    atomic_write_json(staging / CONFIG, config)
    for name, array in (arrays or {}).items():
        np.save(staging / f"{name}.npy", array)
    Manifest().write(staging)
    os.chmod(staging, 0o755)
    if path.exists():
        path.rmdir()
    os.replace(staging, path)
    fsync_dir(path.parent)
