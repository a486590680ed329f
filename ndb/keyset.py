"""The keys of a database as the hook searches them: the key index's lifecycle (built,
saved beside the segments, loaded and caught up with later commits, and when it searches
approximately calibrated by ndb.calibration) and the key guard.

Index ids are ``fact_id * keys_per_fact + k``; the hook divides to get the fact back.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from ndb import store as store_mod
from ndb.config import NeuralDBConfig, check_gamma
from ndb.errors import StoreError
from ndb.facts import Fact
from ndb.indexes import APPROXIMATE, KeyIndex, choose_index_kind, load_index, make_index
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

    def set_gamma(self, gamma: float) -> None:
        """Change the gate (committed to the config), and with it which keys the guard
        keeps: the saved and in-memory index are dropped then. A calibration made for the
        old gamma is no longer applied (the next write with the model calibrates again)."""
        check_gamma(gamma)
        with self.store.writing():
            if self.config.compute.keys_per_fact > 1 and self.config.guard_margin is not None:
                self.store.forget_saved_index()
                self._index = None
            self.config.gamma = float(gamma)
            store_mod.write_config(self.store.path, self.config.to_dict())
            if self._index is not None:
                self._tune(self._index)  # calibrated for another gamma: uncalibrated until due

    def save(self) -> None:
        """Persist the index if it is newer than the saved copy, so that the next open
        needs no rebuild."""
        saved = self.store.saved_index()
        if self._index is not None and (saved is None or saved["version"] != self._version):
            self.store.save_index(self._version, self._index.kind, self._index.save)

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

    # -- calibrating approximate search ---------------------------------------------------
    @property
    def approximate(self) -> bool:
        """Whether the index searches approximately: a kind that does, trained (an IVF
        searches exactly until it has enough keys to train on)."""
        return self._kind() in APPROXIMATE and not self.index.needs_training

    def calibration_due(self) -> bool:
        """Whether the index searches approximately and was last calibrated for another kind,
        another gamma or a number of keys 2x away (an IVF retrains at 4x), or never."""
        kind, done = self._kind(), self.config.index_calibration
        if kind not in APPROXIMATE:
            return False
        stale = (done is None or done["kind"] != kind or done["gamma"] != self.config.gamma
                 or not done["n_keys"] / 2 <= self.n_keys() <= 2 * done["n_keys"])
        return stale and not self.index.needs_training  # the index is loaded only then

    def calibrate(self, model, tokenizer, facts: list[Fact], progress: bool = False
                  ) -> dict[int, float]:
        """Tune the approximate index on the model's keys (ndb.calibration.calibrate);
        {} for an exact index, with nothing to tune."""
        from ndb.calibration import calibrate  # only an approximate index needs it

        return calibrate(self, model, tokenizer, facts, progress)

    def calibrate_if_due(self, model, tokenizer, facts: Callable[[], list[Fact]],
                         progress: bool) -> None:
        """Calibrate after a committed write, if due, on ``facts()``; a failure is a warning,
        not the write's failure (the index searches as it did before)."""
        if model is None or tokenizer is None or not self.calibration_due():
            return
        try:
            self.calibrate(model, tokenizer, facts(), progress)
        except Exception as err:  # reported, and the next write tries again
            warnings.warn(f"{self.store.path}: the key index was not calibrated "
                          f"({type(err).__name__}: {err}); the next write with the model, "
                          "or calibrate(), tries again", stacklevel=4)

    def _tune(self, index: KeyIndex) -> None:
        """Give ``index`` the recorded tuning if it was calibrated as it searches now (kind
        and gamma), else the uncalibrated settings."""
        done = self.config.index_calibration
        matches = done is not None and (done["kind"], done["gamma"]) == (index.kind,
                                                                          self.config.gamma)
        index.tune(done if matches else None)

    # -- building and catching up --------------------------------------------------------
    def n_keys(self) -> int:
        return len(self.store.entries) * self.config.compute.keys_per_fact

    def _kind(self) -> str:
        kind = self.config.index
        return choose_index_kind(self.n_keys(), self.device) if kind == "auto" else kind

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
        self._tune(index)
        self._index, self._version = index, self.store.manifest.version

    def _catch_up(self) -> None:
        changed, deleted = self.store.read_entries_since(self._version)
        self._index.remove(self.index_ids(np.concatenate([changed, deleted])))
        if len(changed):
            self._index.add(*self._entries(changed))
        self._version = self.store.manifest.version

    def _load_saved(self) -> bool:
        meta = self.store.saved_index()
        if meta is None or meta["kind"] != self._kind():
            return False
        path = self.store.saved_index_file(meta)
        if path is None:
            return False
        try:
            index = load_index(meta["kind"], path, self.config.d_key, device=self.device)
        except (FileNotFoundError, StoreError, ValueError, KeyError, RuntimeError):
            return False
        self._tune(index)
        self._index, self._version = index, meta["version"]
        return True

