"""The on-disk format of a fact database, and how it changes without ever being half-written.

A database directory consists of exactly these (``copy_database`` copies them, and a
directory from someone else is read through ``check_layout``'s rules):

    DB/ndb_config.json    NeuralDBConfig (written once at creation; gamma may be changed);
                          databases written before it was named so have DB/config.json
    DB/background.npy     keys of generic text, for the key guard (written once at creation)
    DB/manifest.json      which segment files make up the current state, with each one's
                          row count, size and sha256 (atomically replaced)
    DB/segments/*.h5      immutable HDF5 segments: additions (ids, keys, residuals, facts,
                          key_scores, seq) or deletions (ids, seq)
    DB/index/index.json   which cached key index file is current, its manifest version and
                          sha256; DB/index/v*.KIND is that file (rebuildable at any time)
    DB/.lock              held by the one process allowed to write

A change writes its new segments (temp file, fsync, rename), unreferenced, then one new
manifest that lists them all (temp file, fsync, rename). A crash before the manifest's
rename leaves the old state plus unreferenced files, removed by the next commit; after it,
the new state.

Every entry carries a sequence number (the manifest version that wrote it); for each fact
id the entry with the highest sequence number wins, and a deletion entry removes it. So
an update is simply a new entry under the same id.

A directory may come from anyone, so nothing read from it is trusted: file names in the
manifest and index.json must be plain names of the form written here, the directories
and files read must be real ones (no symbolic links), a segment's datasets are checked
against the manifest and the file's size before anything large is read, and a segment
whose sha256 differs from the manifest's record is refused.

Before any work (minutes of it), ``check_creatable`` and ``check_writable`` refuse a path
that could not be written once the work is done.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import h5py
import numpy as np

from ndb.errors import ConfigError, LockedError, StoreError

CONFIG = "ndb_config.json"
LEGACY_CONFIG = "config.json"  # its name before: too easily taken for a model's config.json
BACKGROUND = "background.npy"
MANIFEST = "manifest.json"
SEGMENTS = "segments"
INDEX = "index"
INDEX_META = "index.json"
LOCK = ".lock"
FILES = (CONFIG, LEGACY_CONFIG, BACKGROUND, MANIFEST)  # plain files; one config, BACKGROUND
# optional
DIRECTORIES = (SEGMENTS, INDEX)
DATASETS = ("keys", "residuals", "facts", "key_scores")  # per entry, in addition segments
COMPACT_SEGMENTS = 64  # merge all segments into one once there are more than this many
SEGMENT_NAME = re.compile(r"seg-[0-9]{8,}(-[0-9]{4})?\.h5")
MAX_RECORD_BYTES = 1 << 20  # one fact record (JSON); real ones are a few hundred bytes
MAX_CONFIG_BYTES = 1 << 24  # the config (JSON); real ones are a few kilobytes
SEGMENT_GONE_RETRIES = 8  # a reader racing compactions re-reads the manifest this often


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
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp's private 0600 would outlive the rename
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


def file_digest(path: Path) -> dict[str, int | str]:
    """Size and sha256 of the regular file at ``path`` (a link is refused, not followed)."""
    try:  # non-blocking, or a FIFO in place of a file would hang the open
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ENOENT:
            raise  # the caller tells a missing file from a refused one
        raise StoreError(f"{path} cannot be read ({_why(err)}); refusing it") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise StoreError(f"{path} is not a regular file; refusing to read it")
        digest = hashlib.sha256()
        size = 0
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _why(err: OSError) -> str:
    return "it is a symbolic link" if err.errno == errno.ELOOP else err.strerror or str(err)


def _file_kind(mode: int) -> str:
    for is_kind, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                          (stat.S_ISREG, "a regular file")):
        if is_kind(mode):
            return kind
    return "a special file"


def _require(path: Path, is_kind, kind: str) -> Path:
    """``path`` itself (links not followed) must be of ``kind``: a database's own parts
    must not lead ndb outside its directory."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise StoreError(f"{path} is missing") from None
    if not is_kind(mode):
        raise StoreError(f"{path} is {_file_kind(mode)}, not {kind}; refusing to use it")
    return path


def regular_file(path: Path) -> Path:
    return _require(path, stat.S_ISREG, "a regular file")


def real_directory(path: Path) -> Path:
    return _require(path, stat.S_ISDIR, "a directory")


def config_file(path: Path) -> Path:
    """The database's config file: under its name, or under the name it had before."""
    path = Path(path)
    legacy = path / LEGACY_CONFIG
    return legacy if not os.path.lexists(path / CONFIG) and os.path.lexists(legacy) \
        else path / CONFIG


def is_database(path: Path) -> bool:
    return config_file(path).is_file() and (Path(path) / MANIFEST).is_file()


def check_writable(path: str | Path, what: str = "file") -> None:
    """Refuse, before any work, a ``path`` that could not be written when the work is done:
    a directory where a file is meant, or a location whose nearest existing folder is not
    a writable directory."""
    path = Path(path)
    if what == "file" and path.is_dir():
        raise ConfigError(f"{path} is a directory, not a file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {path}: {folder} is not a writable directory")
    try:  # access() says yes to root, and on /proc or a read-only mount: try for real
        os.rmdir(tempfile.mkdtemp(prefix=".ndb-probe-", dir=folder))
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {folder} is not a writable directory "
                          f"({err.strerror})") from None


def check_creatable(path: str | Path) -> None:
    """A new database can be made at ``path``: nothing is there (or an empty directory),
    and the nearest existing folder is writable."""
    path = Path(path)
    if path.is_dir() and not any(path.iterdir()):
        return
    if path.exists():
        what = ("a fact database" if is_database(path)
                else "a directory that is not empty" if path.is_dir() else "a file")
        raise StoreError(f"{path} already exists and is {what}")
    check_writable(path, what="directory")


def read_config(path: Path) -> dict:
    """The config a database was created with (checked by NeuralDBConfig, not here)."""
    file = regular_file(config_file(path))
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise StoreError(f"{file} holds {file.stat().st_size:,} bytes, more than a config "
                         f"ever does ({MAX_CONFIG_BYTES:,}); refusing to read it")
    return _json_object(file)


def _json_object(file: Path) -> dict:
    """The JSON object in ``file``, or a StoreError saying why it is not one."""
    try:
        data = json.loads(file.read_bytes())
    except RecursionError:
        raise StoreError(f"{file} is unreadable: JSON nested too deeply") from None
    except ValueError as err:  # also a number of more digits than Python reads
        what = err.msg if isinstance(err, json.JSONDecodeError) else "a number too long"
        raise StoreError(f"{file} is unreadable: not valid JSON ({what})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{file} is invalid: it holds {type(data).__name__}, not an object")
    return data


def write_config(path: Path, config: dict) -> None:
    """Replace the config (atomically), under whichever name the database uses."""
    atomic_write_json(config_file(path), config)


def check_layout(path: Path) -> None:
    """Refuse a database directory whose parts are missing, links, or of the wrong kind."""
    path = Path(path)
    for file in (config_file(path), path / MANIFEST):
        if not os.path.lexists(file):
            raise StoreError(f"{path}: not a fact database (no {file.name})")
    for name in FILES:
        if os.path.lexists(path / name):
            regular_file(path / name)
    for name in DIRECTORIES:
        real_directory(path / name)


def load_background(path: Path, dim: int) -> np.ndarray:
    """DB/background.npy as float32 (n, dim), checked before it is read in full; an empty
    array when the database has none."""
    file = Path(path) / BACKGROUND
    if not os.path.lexists(file):
        return np.zeros((0, dim), np.float32)
    try:
        array = np.load(regular_file(file), mmap_mode="r", allow_pickle=False)
    except ValueError as err:  # a header that does not match the file's size, or pickles
        raise StoreError(f"{file} is unreadable: {err}") from None
    if array.ndim != 2 or array.shape[1] != dim or array.dtype not in (np.float16, np.float32):
        raise StoreError(f"{file} holds {array.dtype} {array.shape}, not keys of dimension {dim}")
    array = np.array(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise StoreError(f"{file} holds non-finite values")
    return array


@dataclass
class Manifest:
    version: int = 0  # bumped by every commit; also the sequence number of its entries
    next_id: int = 0
    segments: list[str] = field(default_factory=list)
    compacted_through: int = 0  # deletions up to this version were folded away by compaction
    # segment name -> {"rows", "bytes", "sha256"}; manifests written before checksums were
    # recorded have none, and their segments are checked for structure only
    checksums: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Manifest:
        file = Path(path) / MANIFEST
        if not os.path.lexists(file):
            raise StoreError(f"{path}: not a fact database (no {MANIFEST})")
        data = _json_object(regular_file(file))
        known = {f.name for f in fields(cls)}
        if not set(data) <= known:
            raise StoreError(f"{file} is invalid: its fields are {sorted(data)}, a manifest's "
                             f"are {sorted(known)}")
        manifest = cls(**data)
        problem = manifest._problem()
        if problem:
            raise StoreError(f"{file} is invalid: {problem}")
        return manifest

    def _problem(self) -> str | None:
        counters = (self.version, self.next_id, self.compacted_through)
        if not all(type(v) is int and 0 <= v < 1 << 62 for v in counters):
            return "version, next_id and compacted_through must be integers in 0..2^62"
        if not isinstance(self.segments, list) or not isinstance(self.checksums, dict):
            return "segments must be a list and checksums a mapping"
        for name in self.segments:
            if not isinstance(name, str) or not SEGMENT_NAME.fullmatch(name):
                return f"{name!r} is not a segment file name (seg-NNNNNNNN.h5)"
        if len(set(self.segments)) != len(self.segments):
            return "a segment is listed twice"
        for name, record in self.checksums.items():
            if name not in self.segments or not _valid_checksum(record):
                return f"the checksum record of {name!r} is malformed"
        return None

    def write(self, path: Path) -> None:
        atomic_write_json(path / MANIFEST, self.__dict__)


def _valid_checksum(record: object) -> bool:
    return (isinstance(record, dict) and set(record) == {"rows", "bytes", "sha256"}
            and all(type(record[k]) is int and record[k] >= 0 for k in ("rows", "bytes"))
            and isinstance(record["sha256"], str)
            and re.fullmatch(r"[0-9a-f]{64}", record["sha256"]) is not None)


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


class SegmentGoneError(StoreError):
    """A segment named by the manifest is not there (a writer compacted it away since)."""


# the datasets a segment may hold, with their element types
DTYPES = {"ids": ("int64",), "seq": ("int64",), "keys": ("float16", "float32"),
          "residuals": ("float16", "float32"), "key_scores": ("float16", "float32")}


def _check_segment(f: h5py.File, where: str, file_size: int, rows: int | None,
                   shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a segment that is not what this module writes before any of its data is read:
    known datasets of known types, one row per entry, the expected trailing shapes, and
    contiguous storage inside the file (no filters, so nothing decompresses: a dataset
    never holds more than the file does)."""
    names = set(f.keys())
    unknown = names - {*DTYPES, "facts"}
    if unknown or "ids" not in names or names & set(DATASETS) not in (set(), set(DATASETS)):
        raise StoreError(f"{where} holds datasets {sorted(names)}, not a segment's")
    n = None
    for name in sorted(names):
        if not isinstance(f.get(name, getlink=True), h5py.HardLink):
            raise StoreError(f"{where}: {name} is a link to elsewhere")
        ds = f[name]
        if not isinstance(ds, h5py.Dataset) or ds.ndim == 0:
            raise StoreError(f"{where}: {name} is not an array")
        n = ds.shape[0] if n is None else n
        if ds.shape[0] != n:
            raise StoreError(f"{where}: {name} has {ds.shape[0]} rows, ids has {n}")
        _check_dtype(ds, name, where)
        _check_storage(f, ds, name, where, file_size)
        expected = shapes.get(name)
        if expected is not None and ds.shape[1:] != expected:
            raise StoreError(f"{where}: {name} has shape {ds.shape[1:]} per entry, "
                             f"expected {expected}")
    if rows is not None and n != rows:
        raise StoreError(f"{where} holds {n} entries, the manifest records {rows}")
    if "keys" in names and f["key_scores"].shape != f["keys"].shape[:-1]:
        raise StoreError(f"{where}: key_scores do not match the keys' shape")
    if "seq" not in names and not isinstance(f.attrs.get("seq"), (int, np.integer)):
        raise StoreError(f"{where} has no sequence number")


def _check_dtype(ds: h5py.Dataset, name: str, where: str) -> None:
    if name == "facts":
        info = h5py.check_string_dtype(ds.dtype)
        ok = ds.ndim == 1 and info is not None and info.length is None
    else:
        ndim_ok = ds.ndim == 1 if name in ("ids", "seq") else ds.ndim > 1 or name == "key_scores"
        ok = ds.dtype.name in DTYPES[name] and ndim_ok
    if not ok:
        raise StoreError(f"{where}: {name} has type {ds.dtype} {ds.shape}, not a segment's")


def _check_storage(f: h5py.File, ds: h5py.Dataset, name: str, where: str,
                   file_size: int) -> None:
    plist = ds.id.get_create_plist()
    if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters():
        raise StoreError(f"{where}: {name} is stored compressed or chunked, which ndb never "
                         "writes; refusing to read it")
    if ds.size == 0:
        return
    offset, stored = ds.id.get_offset(), ds.id.get_storage_size()
    width = None if name == "facts" else ds.dtype.itemsize * ds.size
    if offset is None or offset + stored > file_size or width not in (None, stored):
        raise StoreError(f"{where}: {name} declares more data than the file holds")
    if name == "facts":
        _check_record_sizes(f, ds, where, offset, file_size)


def _check_record_sizes(f: h5py.File, ds: h5py.Dataset, where: str, offset: int,
                        file_size: int) -> None:
    """String records live in the file's heap; their lengths are read from the dataset's
    own descriptors (length, heap address, index) so that a record claiming more than the
    file holds is refused before h5py allocates it."""
    addr_size = f.id.get_create_plist().get_sizes()[0]
    descriptor = np.dtype([("length", "<u4"), ("where", f"V{addr_size + 4}")])
    wanted = descriptor.itemsize * ds.size
    raw = os.pread(f.id.get_vfd_handle(), wanted, offset)  # the open file: no race
    lengths = np.frombuffer(raw, descriptor)["length"] if len(raw) == wanted else None
    if lengths is None or lengths.max() > MAX_RECORD_BYTES or \
            int(lengths.sum(dtype=np.int64)) > file_size:
        raise StoreError(f"{where}: fact records are larger than the file or than "
                         f"{MAX_RECORD_BYTES} bytes each")


class Store:
    """Segments of one database directory: read any time, written under the lock.

    ``shapes``: the per-entry shape each dataset must have (e.g. keys (2, d_key)); when
    not given, the first segment read sets them and every other must agree.
    """

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]] | None = None):
        self.path = Path(path)
        check_layout(self.path)
        self.shapes = dict(shapes or {})
        self._files: dict[str, h5py.File] = {}
        self._lock_fd: int | None = None
        self.manifest: Manifest | None = None
        self.refresh()

    # -- reading ---------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Re-read the manifest; returns whether the state changed. A segment that went
        away since the manifest was read means a writer compacted: read it again."""
        for _ in range(SEGMENT_GONE_RETRIES):
            manifest = Manifest.read(self.path)
            if manifest == self.manifest:
                return False
            try:
                entries = self._live_entries(manifest)
            except SegmentGoneError:
                if Manifest.read(self.path) == manifest:
                    raise  # not a race: the directory lacks a segment its manifest names
                continue
            self.manifest, self.entries = manifest, entries
            for name in list(self._files):
                if name not in manifest.segments:
                    self._files.pop(name).close()
            return True
        raise StoreError(f"{self.path} changed {SEGMENT_GONE_RETRIES} times while it was "
                         "being read; try again")

    def file(self, name: str, manifest: Manifest | None = None) -> h5py.File:
        """Segment ``name``, opened and checked (structure, then checksum) on first use."""
        if name not in self._files:
            self._files[name] = self._open_segment(name, manifest or self.manifest)
        return self._files[name]

    def _open_segment(self, name: str, manifest: Manifest) -> h5py.File:
        path = self.path / SEGMENTS / name
        where = f"{self.path}: segment {name}"
        record = manifest.checksums.get(name)
        try:  # a segment from before checksums were recorded is checked for structure only
            actual = (file_digest(path) if record is not None
                      else {"bytes": os.lstat(regular_file(path)).st_size})
        except (FileNotFoundError, StoreError):
            if not os.path.lexists(path):
                raise SegmentGoneError(f"{where} is missing") from None
            raise
        if record is not None and (actual["bytes"], actual["sha256"]) != (
                record["bytes"], record["sha256"]):
            raise StoreError(f"{where} is corrupted (its checksum differs from the "
                             "manifest's record)")
        try:
            f = h5py.File(path, "r", locking=False)
        except OSError as err:
            if not os.path.lexists(path):
                raise SegmentGoneError(f"{where} is missing") from None
            raise StoreError(f"{where} is unreadable ({err})") from None
        try:
            _check_segment(f, where, actual["bytes"], record and record["rows"], self.shapes)
        except BaseException:
            f.close()
            raise
        if "keys" in f:  # the first segment read sets the shapes the others must have
            for ds_name in ("keys", "residuals", "key_scores"):
                self.shapes.setdefault(ds_name, f[ds_name].shape[1:])
        return f

    def _live_entries(self, manifest: Manifest) -> Entries:
        ids, seqs, segs, rows, alive = [], [], [], [], []
        for s, name in enumerate(manifest.segments):
            f = self.file(name, manifest)
            seg_ids = f["ids"][:]
            n = len(seg_ids)
            ids.append(seg_ids)
            seqs.append(_seqs(f))
            segs.append(np.full(n, s, np.int64))
            rows.append(np.arange(n, dtype=np.int64))
            alive.append(np.full(n, "keys" in f))
        if not ids:
            empty = np.zeros(0, np.int64)
            return Entries(empty, empty, empty, empty)
        ids, seqs = np.concatenate(ids), np.concatenate(seqs)
        # else the next new fact would overwrite a stored one
        if len(ids) and (ids.max() >= manifest.next_id or ids.min() < 0):
            raise StoreError(f"{self.path / MANIFEST} is invalid: next_id {manifest.next_id} "
                             f"is not above every stored id ({ids.min()}..{ids.max()})")
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
            if data.dtype.kind == "f" and not np.isfinite(data).all():
                raise StoreError(f"{self.path}: segment {self.manifest.segments[s]} holds "
                                 f"non-finite {name}")
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
            changed.update(f["ids"][:][_seqs(f) > version].tolist())
        changed_ids = np.array(sorted(changed), dtype=np.int64)
        live = np.isin(changed_ids, self.entries.ids)
        return changed_ids[live], changed_ids[~live]

    # -- writing ---------------------------------------------------------------------------
    @contextmanager
    def writing(self, holder: str = "") -> Iterator[None]:
        """Hold the writer lock; the state is refreshed from disk on entry. ``holder`` says
        who holds it, for the message another writer gets (e.g. a server that keeps it)."""
        if self._lock_fd is not None:  # re-entrant within one process
            yield
            return
        fd = self._open_lock()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, what = _lock_holder(os.pread(fd, 512, 0))
            os.close(fd)
            if what:
                raise LockedError(f"{self.path} is held by process {pid}: {what}") from None
            raise LockedError(
                f"{self.path} is being written by another process (pid {pid or 'unknown'}); "
                "try again when it has finished"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, " ".join([str(os.getpid()), *holder.split()]).encode(), 0)
        self._lock_fd = fd
        try:
            self.refresh()
            yield
        finally:
            self._lock_fd = None
            os.close(fd)  # closing releases the flock

    def _open_lock(self) -> int:
        path = self.path / LOCK
        try:  # never through a link: the pid written below would land in its target
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as err:
            raise StoreError(f"{path} cannot be opened ({_why(err)}); refusing to write "
                             f"{self.path}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StoreError(f"{path} is not a regular file; refusing to write {self.path}")
        return fd

    @contextmanager
    def appending(self) -> Iterator[Pending]:
        """Under the lock, a Pending whose segments are all committed by one manifest
        swap when the block ends, or none of them if it raises."""
        with self.writing():
            pending = Pending(self)
            try:
                yield pending
            except BaseException:
                pending.discard()
                raise
            if pending.written:
                self._commit(pending)
                self._maybe_compact()

    def commit_now(self, pending: Pending) -> None:
        """Commit what ``pending`` holds so far (inside ``appending``), and go on with it
        empty: for long writes that keep their progress (``ndb build --resume``)."""
        if pending.written:
            self._commit(pending)
            pending.__init__(self)

    def _commit(self, pending: Pending, *, compacted: bool = False) -> None:
        if self._lock_fd is None:
            raise StoreError("internal error: commit without the writer lock")
        m = self.manifest
        kept = [] if compacted else m.segments
        checksums = {name: m.checksums[name] for name in kept if name in m.checksums}
        Manifest(pending.version, pending.next_id, [*kept, *pending.written],
                 m.version if compacted else m.compacted_through,
                 {**checksums, **pending.written}).write(self.path)
        self.refresh()
        self._remove_unreferenced()

    def _remove_unreferenced(self) -> None:
        """Remove segments no manifest names (compacted away, or left by a writer that was
        killed) and temporary files. Only right after a commit: a command that fails
        before committing removes nothing."""
        referenced = set(self.manifest.segments)
        _remove_files(real_directory(self.path / SEGMENTS), referenced.__contains__)
        _remove_files(self.path, lambda name: not (name.startswith(".") and name.endswith(".tmp")))

    def write_segment(self, name: str, datasets: dict[str, np.ndarray], seq: int
                      ) -> dict[str, int | str]:
        """Write segment ``name`` (unreferenced until a commit); returns its checksum record."""
        path = real_directory(self.path / SEGMENTS) / name
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["seq"] = seq
            for ds_name, data in datasets.items():
                f.create_dataset(ds_name, data=data)
        return {"rows": len(datasets["ids"]), **file_digest(path)}

    def append(self, keys: np.ndarray, residuals: np.ndarray, facts: list[str],
               ids: np.ndarray | None = None, key_scores: np.ndarray | None = None
               ) -> np.ndarray:
        """Add entries in one commit (see Pending.append); returns their ids."""
        with self.appending() as pending:
            return pending.append(keys, residuals, facts, ids, key_scores)

    def delete(self, ids: np.ndarray) -> None:
        with self.appending() as pending:
            pending.delete(ids)

    def _maybe_compact(self) -> None:
        if len(self.manifest.segments) > COMPACT_SEGMENTS:
            self.compact()

    def compact(self, source: Store | None = None) -> None:
        """Rewrite the live entries into one segment (same ids and sequence numbers); with
        ``source``, the live entries of that store (how a copy is made)."""
        source = source or self
        with self.writing():
            pending = Pending(self)
            if len(source.entries):
                segment = {"ids": source.entries.ids, "seq": source.entries.seq}
                for name in DATASETS:
                    segment[name] = source.read(name)
                segment["facts"] = segment["facts"].astype(h5py.string_dtype())
                pending.add_segment(segment)
            self._commit(pending, compacted=True)

    # -- the key index cache: rebuildable, so a cache that is not right is no cache --------
    def saved_index(self) -> dict | None:
        """index.json if it describes a usable cache: a version this manifest can catch up
        from, and a plain file name of the form ``save_index`` writes (the directory may
        come from anyone), whose size and sha256 match the record; None otherwise."""
        try:
            meta = json.loads(regular_file(self.path / INDEX / INDEX_META).read_bytes())
            version, kind, name = meta["version"], meta["kind"], meta["file"]
        except (StoreError, ValueError, KeyError, TypeError, RecursionError):
            return None
        usable = (type(version) is int and isinstance(kind, str) and isinstance(name, str)
                  and re.fullmatch(r"[a-z0-9-]+", kind) is not None
                  and re.fullmatch(rf"v[0-9]{{8,}}\.{re.escape(kind)}", name) is not None
                  and self.manifest.compacted_through <= version <= self.manifest.version)
        return meta if usable else None

    def saved_index_file(self, meta: dict) -> Path | None:
        """The cache file ``meta`` names, if it is whole (caches saved before checksums
        were recorded have none to check)."""
        path = self.path / INDEX / meta["file"]
        try:
            if "sha256" not in meta:
                return regular_file(path)
            digest = file_digest(path)
        except (FileNotFoundError, StoreError):
            return None
        if (digest["bytes"], digest["sha256"]) != (meta.get("bytes"), meta["sha256"]):
            warnings.warn(f"{path} is corrupted (its checksum differs from the record); "
                          "rebuilding the key index", stacklevel=5)
            return None
        return path

    def save_index(self, version: int, kind: str, write: Callable[[Path], None]) -> None:
        """Save the key index of manifest ``version`` (``write(path)`` writes it) as the
        cache, and remove the caches it replaces."""
        directory = real_directory(self.path / INDEX)
        name = f"v{version:08d}.{kind}"
        with atomic_path(directory / name) as tmp:
            write(tmp)
        atomic_write_json(directory / INDEX_META, {"version": version, "kind": kind,
                                                   "file": name, **file_digest(directory / name)})
        _remove_files(directory, lambda old: old in (name, INDEX_META) or old.startswith("."))

    def forget_saved_index(self) -> None:
        (self.path / INDEX / INDEX_META).unlink(missing_ok=True)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _remove_files(directory: Path, keep: Callable[[str], bool]) -> None:
    """Remove the files of ``directory`` whose names ``keep`` refuses (a link is removed,
    never what it points to; directories stay)."""
    for path in directory.iterdir():
        if not keep(path.name) and not path.is_dir():
            path.unlink(missing_ok=True)


def _seqs(f: h5py.File) -> np.ndarray:
    """The sequence number of each entry of segment ``f`` (older segments hold one for all)."""
    return f["seq"][:] if "seq" in f else np.full(len(f["ids"]), f.attrs["seq"], np.int64)


def _lock_holder(content: bytes) -> tuple[str, str, str]:
    """(pid, " ", who) from a lock file, printable: the directory may come from anyone."""
    text = "".join(c for c in content.decode(errors="replace") if c.isprintable())
    return text.strip().partition(" ")


class Pending:
    """The segments of one commit in the making: each is written as it comes, unreferenced,
    and the manifest swap that adopts them all happens at the end (Store.appending), so a
    failure or a kill part-way leaves the old state and, at worst, orphans."""

    def __init__(self, store: Store, first_segment: int = 0):
        self.store = store
        self.version = store.manifest.version + 1  # also the entries' sequence number
        self.next_id = store.manifest.next_id
        # segments are numbered from here: the processes of a distributed build write the
        # segments of one commit side by side, each from its own number
        self.first_segment = first_segment
        self.written: dict[str, dict] = {}  # segment name -> checksum record

    def append(self, keys: np.ndarray, residuals: np.ndarray, facts: list[str],
               ids: np.ndarray | None = None, key_scores: np.ndarray | None = None
               ) -> np.ndarray:
        """Add entries (new ids, or new versions of existing ids); returns their ids.
        ``key_scores``: per key, its best cosine with generic text (see NeuralDB)."""
        for name, data in (("keys", keys), ("residuals", residuals)):
            if not np.isfinite(data).all():
                raise ValueError(f"{name} hold non-finite values; nothing was stored")
        if ids is None:
            ids = np.arange(self.next_id, self.next_id + len(keys), dtype=np.int64)
        ids = np.asarray(ids, dtype=np.int64)
        self.next_id = max(self.next_id, int(ids.max(initial=-1)) + 1)
        self.add_segment({
            "ids": ids,
            "seq": np.full(len(ids), self.version, np.int64),
            "keys": keys,
            "residuals": residuals,
            "facts": np.array(facts, dtype=h5py.string_dtype()),
            "key_scores": (np.zeros(keys.shape[:-1], np.float16) if key_scores is None
                           else key_scores.astype(np.float16)),
        })
        return ids

    def delete(self, ids: np.ndarray) -> None:
        """Remove entries (every id must be live)."""
        ids = np.asarray(ids, np.int64)
        self.store.entries.locate(ids)
        self.add_segment({"ids": ids, "seq": np.full(len(ids), self.version, np.int64)})

    def add_segment(self, datasets: dict[str, np.ndarray]) -> None:
        name = f"seg-{self.version:08d}-{self.first_segment + len(self.written):04d}.h5"
        self.written[name] = self.store.write_segment(name, datasets, self.version)

    def summary(self) -> dict:
        """What another process needs to :meth:`adopt` these segments (plain data)."""
        return {"version": self.version, "next_id": self.next_id, "written": self.written}

    def adopt(self, summary: dict) -> None:
        """Commit, along with this one's, the segments another process wrote for this same
        commit under other segment numbers (``summary``: its Pending's :meth:`summary`)."""
        if summary["version"] != self.version or set(summary["written"]) & set(self.written):
            raise StoreError("internal error: adopting the segments of another commit")
        self.written.update(summary["written"])
        self.next_id = max(self.next_id, summary["next_id"])

    def discard(self) -> None:
        for name in self.written:
            (self.store.path / SEGMENTS / name).unlink(missing_ok=True)
        self.written.clear()


@contextmanager
def _new_directory(path: Path) -> Iterator[Path]:
    """A staging directory beside ``path`` that becomes ``path`` (an absent or empty
    directory) when the block ends, so the database appears whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        for name in DIRECTORIES:
            (staging / name).mkdir()
        yield staging
        os.chmod(staging, 0o755)
        if path.exists():
            path.rmdir()
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def create(path: Path, config: dict, background: np.ndarray | None = None) -> None:
    """Create an empty database directory (atomically: it appears whole or not at all);
    ``background``: keys of generic text for the key guard."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise StoreError(f"{path} already exists and is not empty")
    with _new_directory(path) as staging:
        atomic_write_json(staging / CONFIG, config)
        if background is not None:
            with atomic_path(staging / BACKGROUND) as tmp, open(tmp, "wb") as f:
                np.save(f, background, allow_pickle=False)
        Manifest().write(staging)


def check_copy_target(source: Path, path: Path) -> None:
    """Refuse a path a copy of the database at ``source`` cannot be made at: one that
    exists, lies inside the database, or cannot be written."""
    if os.path.lexists(path):
        raise StoreError(f"{path} already exists")
    if Path(source).resolve() in Path(path).resolve().parents:
        raise ConfigError(f"{path} is inside the database {source}; save the copy elsewhere")
    check_writable(path, what="directory")


def copy_database(source: Store, path: Path) -> None:
    """Copy the database of ``source`` to ``path`` (which must not exist), compacted: every
    file listed at the top of this module but the lock and the index cache, which is
    rebuilt on first use (a copy's one segment invalidates it anyway)."""
    path = Path(path)
    check_copy_target(source.path, path)
    source.refresh()  # what was committed last, by any writer
    with _new_directory(path) as staging:
        atomic_write_bytes(staging / CONFIG, regular_file(config_file(source.path)).read_bytes())
        if os.path.lexists(source.path / BACKGROUND):
            atomic_write_bytes(staging / BACKGROUND,
                               regular_file(source.path / BACKGROUND).read_bytes())
        # the copy's versions continue the source's, so its sequence numbers stay ordered
        Manifest(source.manifest.version, source.manifest.next_id).write(staging)
        copy = Store(staging, source.shapes)
        try:
            copy.compact(source)
        finally:
            copy.close()
