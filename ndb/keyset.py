"""The keys of a database as the hook searches them: the key index's lifecycle (built,
saved beside the segments, loaded and caught up with later commits) and the key guard.

Index ids are ``fact_id * keys_per_fact + k``; the hook divides to get the fact back.
"""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import torch

from ndb import store as store_mod
from ndb.config import NeuralDBConfig
from ndb.errors import StoreError
from ndb.indexes import BACKENDS, KeyIndex, choose_index_kind, load_index, make_index
from ndb.store import Store


class KeySet:
    """The key index of one database, kept in step with its store."""

    def __init__(self, store: Store, config: NeuralDBConfig):
        self.store = store
        self.config = config
        self.device = "cpu"  # where the index searches: the attached model's device
        self._index: KeyIndex | None = None
        self._version = -1  # the manifest version the index reflects
        self._background: np.ndarray | None = None

    @property
    def index(self) -> KeyIndex:
        """The key index, loaded from its saved copy (brought up to date) or built."""
        if self._index is None:
            if self._load_saved():
                self._catch_up()
            else:
                self._build()
        return self._index

    def move_to(self, device: torch.device) -> None:
        """Search on ``device`` from now on (an accelerator gets an index that searches
        there)."""
        if device.type != self.device.split(":")[0]:
            self.device = str(device)
            self._index = None

    def sync(self) -> None:
        """Catch up with the store's manifest (after a commit by anyone)."""
        if self._index is None:
            return
        if self.store.manifest.compacted_through > self._version:
            self._build()
            return
        self._catch_up()
        if self.config.index == "auto" and self._kind() != self._index.kind:
            self._build()

    def forget_saved(self) -> None:
        """Drop the saved and in-memory index (which keys the guard keeps changed)."""
        (self.store.path / store_mod.INDEX / store_mod.INDEX_META).unlink(missing_ok=True)
        self._index = None

    def save(self) -> None:
        """Persist the index if it is newer than the saved copy, so that the next open
        needs no rebuild."""
        if self._index is None or self._version == self._saved_version():
            return
        directory = store_mod.real_directory(self.store.path / store_mod.INDEX)
        name = f"v{self._version:08d}.{self._index.kind}"
        with store_mod.atomic_path(directory / name) as tmp:
            self._index.save(tmp)
        store_mod.atomic_write_json(directory / store_mod.INDEX_META, {
            "version": self._version, "kind": self._index.kind, "file": name,
            **store_mod.file_digest(directory / name)})
        for old in directory.iterdir():
            if old.name not in (name, store_mod.INDEX_META) and not old.name.startswith(".") \
                    and not old.is_dir():
                old.unlink(missing_ok=True)  # a link is removed, never what it points to

    # -- the key guard -------------------------------------------------------------------
    @property
    def background(self) -> np.ndarray:
        """Keys of generic text (written at creation): what a fact key must not match."""
        if self._background is None:
            self._background = store_mod.load_background(self.store.path, self.config.d_key)
        return self._background

    def background_scores(self, keys: torch.Tensor) -> torch.Tensor:
        """Per key (unit vectors), its best cosine with generic text; -1 without any."""
        background = torch.from_numpy(self.background)
        if not len(background):
            return torch.full(keys.shape[:-1], -1.0)
        return (keys @ background.T).amax(-1)

    def guarded(self, scores: np.ndarray) -> np.ndarray:
        """(n, keys_per_fact) bool: the keys that generic text does not reach within the
        guard margin of gamma; a fact whose keys all do keeps its least reached one."""
        keep = scores < self.config.gamma - self.config.guard_margin
        none = ~keep.any(axis=1)
        keep[none, scores[none].argmin(axis=1)] = True
        return keep

    # -- building and catching up --------------------------------------------------------
    def _kind(self) -> str:
        kind = self.config.index
        n_keys = len(self.store.entries) * self.config.compute.keys_per_fact
        return choose_index_kind(n_keys, self.device) if kind == "auto" else kind

    def _entries(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index rows of facts ``ids``: their keys, one row per key the guard keeps."""
        keys = self.store.read("keys", ids).astype(np.float32).reshape(-1, self.config.d_key)
        index_ids = self.index_ids(ids)
        if self.config.compute.keys_per_fact > 1 and self.config.guard_margin is not None:
            keep = self.guarded(self.store.read("key_scores", ids)).reshape(-1)
            keys, index_ids = keys[keep], index_ids[keep]
        return keys, index_ids

    def index_ids(self, ids: np.ndarray) -> np.ndarray:
        per_fact = self.config.compute.keys_per_fact
        return (np.asarray(ids, np.int64)[:, None] * per_fact + np.arange(per_fact)).reshape(-1)

    def _build(self) -> None:
        index = make_index(self._kind(), self.config.d_key, device=self.device)
        if len(self.store.entries):
            keys, index_ids = self._entries(self.store.entries.ids)
            if index.needs_training:
                index.train(keys)
            index.add(keys, index_ids)
        self._index, self._version = index, self.store.manifest.version

    def _catch_up(self) -> None:
        changed, deleted = self.store.read_entries_since(self._version)
        self._index.remove(self.index_ids(np.concatenate([changed, deleted])))
        if len(changed):
            self._index.add(*self._entries(changed))
        self._version = self.store.manifest.version

    # -- the saved copy ------------------------------------------------------------------
    def _saved_meta(self) -> dict | None:
        """index.json if it describes a usable cache: a version this manifest can catch up
        from, and a plain file name of the form ``save`` writes (the directory may come
        from anyone); None otherwise."""
        try:
            meta_path = self.store.path / store_mod.INDEX / store_mod.INDEX_META
            meta = json.loads(store_mod.regular_file(meta_path).read_bytes())
            version, kind, name = meta["version"], meta["kind"], meta["file"]
        except (StoreError, ValueError, KeyError, TypeError):
            return None
        manifest = self.store.manifest
        usable = (type(version) is int and kind in BACKENDS and isinstance(name, str)
                  and re.fullmatch(rf"v[0-9]{{8,}}\.{re.escape(kind)}", name) is not None
                  and manifest.compacted_through <= version <= manifest.version)
        return meta if usable else None

    def _saved_version(self) -> int:
        meta = self._saved_meta()
        return -1 if meta is None else meta["version"]

    def _load_saved(self) -> bool:
        meta = self._saved_meta()
        if meta is None or meta["kind"] != self._kind():
            return False
        path = self.store.path / store_mod.INDEX / meta["file"]
        try:
            if "sha256" in meta:  # caches saved before checksums were recorded have none
                digest = store_mod.file_digest(path)
                if (digest["bytes"], digest["sha256"]) != (meta.get("bytes"), meta["sha256"]):
                    warnings.warn(f"{path} is corrupted (its checksum differs from the "
                                  "record); rebuilding the key index", stacklevel=4)
                    return False
            index = load_index(meta["kind"], store_mod.regular_file(path), self.config.d_key,
                               device=self.device)
        except (FileNotFoundError, StoreError, ValueError, KeyError, RuntimeError):
            return False
        self._index, self._version = index, meta["version"]
        return True
