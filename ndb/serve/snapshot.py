"""One database version as the server's hook reads it, and the per-thread pin that says
which version a forward pass sees.

A request must see one database version from its first token to its last, while a job
commits new facts beside it. So the hook never reads the live database: every commit
publishes an immutable :class:`Snapshot` (its own key index and residual table), each batch
of requests pins the snapshot current when it starts, and the hook (an ordinary
:class:`ndb.retrieval.GatedRetrieval`) searches whatever the calling thread pinned. A thread
that pinned nothing (the job worker computing residuals) sees no facts at all.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ndb.anchor import fixed_first_ids
from ndb.database import NeuralDB
from ndb.facts import Fact
from ndb.indexes import KeyIndex
from ndb.keyset import KeySet
from ndb.models import get_module
from ndb.retrieval import GatedRetrieval, searchable_positions


@dataclass(frozen=True)
class Snapshot:
    """The facts of one committed database version; never changed once published."""

    version: int
    facts: dict[int, Fact]
    index: KeyIndex | None  # None: the unedited model
    residuals: torch.Tensor  # (facts, d_value), row i is the residual of fact ids[i]
    rows: np.ndarray  # fact id -> row of ``residuals`` (-1: no such fact)

    @classmethod
    def of(cls, db: NeuralDB, device: torch.device) -> Snapshot:
        """The database's current committed state, copied out of it."""
        ids = db.ids  # as last committed
        keys = KeySet(db.store, db.config)  # a fresh index that no later commit updates
        keys.move_to(device)
        residuals = (db.store.read("residuals", ids).astype(np.float32) if len(ids)
                     else np.zeros((0, db.config.d_value), np.float32))
        rows = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, np.int64)
        rows[ids] = np.arange(len(ids))
        return cls(db.store.manifest.version, dict(db.facts()), keys.index,
                   torch.from_numpy(residuals).to(device), rows)

    @classmethod
    def unedited(cls, d_value: int, device: torch.device) -> Snapshot:
        return cls(-1, {}, None, torch.zeros(0, d_value, device=device), np.zeros(0, np.int64))


class Pin:
    """What the forward passes of one batch see: a snapshot, and which facts fired in
    which row of the batch."""

    def __init__(self, snapshot: Snapshot, rows: int, gamma: float, keys_per_fact: int):
        self.snapshot = snapshot
        self.fired: list[set[int]] = [set() for _ in range(rows)]
        self.hits = 0  # tokens that passed the gate
        self._gamma, self._keys_per_fact = gamma, keys_per_fact
        self._searchable = np.zeros(0, bool)  # per token of the call, flattened
        self._token_rows = np.zeros(0, np.int64)  # the batch row of each token

    def expect(self, input_length: int, attention_mask: torch.Tensor, past_length: int) -> None:
        """Before a forward pass: the tokens the hook will search (as it decides them), so
        that each search result can be told to its row."""
        searchable = searchable_positions(len(self.fired), input_length, attention_mask,
                                          past_length)
        self._searchable = searchable.reshape(-1).cpu().numpy()
        self._token_rows = np.repeat(np.arange(len(self.fired)), input_length)

    def record(self, scores: torch.Tensor, ids: torch.Tensor) -> None:
        """One search's results: a host index searched the searchable tokens only, a device
        index every token of the call (the hook masks the others, and so does this)."""
        scores, ids = scores.cpu().numpy(), ids.cpu().numpy()
        hit = scores > self._gamma  # the hook's gate
        if len(scores) == len(self._searchable):
            hit &= self._searchable
            rows = self._token_rows
        elif len(scores) == int(self._searchable.sum()):
            rows = self._token_rows[self._searchable]
        else:  # searched other tokens than expected: tell every row, never lose a fact
            rows = None
        self.hits += int(hit.sum())
        facts = ids[hit] // self._keys_per_fact
        if rows is None:
            for fired in self.fired:
                fired.update(int(f) for f in facts)
            return
        for row, fact in zip(rows[hit], facts):
            self.fired[row].add(int(fact))


class _Pins(threading.local):
    pin: Pin | None = None


class PinnedIndex:
    """The key index the hook searches: that of the calling thread's pinned snapshot."""

    def __init__(self, pins: _Pins):
        self._pins = pins

    @property
    def ntotal(self) -> int:
        pin = self._pins.pin
        return 0 if pin is None or pin.snapshot.index is None else pin.snapshot.index.ntotal

    def search_tensor(self, queries: torch.Tensor, floor: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        pin = self._pins.pin
        scores, ids = pin.snapshot.index.search_tensor(queries, floor=floor)
        pin.record(scores, ids)
        return scores, ids

    def __getattr__(self, name: str):
        return getattr(self._pins.pin.snapshot.index, name)


class PinnedResiduals:
    """The residuals the hook adds: those of the calling thread's pinned snapshot."""

    def __init__(self, pins: _Pins):
        self._pins = pins

    def lookup(self, ids: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
        """As ``ResidualCache.lookup``: rows not ``wanted`` hold anything (the hook masks
        them), and their ids may be anything."""
        snapshot = self._pins.pin.snapshot
        rows = torch.from_numpy(snapshot.rows).to(ids.device)
        rows = rows[ids.clamp(0, len(rows) - 1)].clamp(min=0)
        return snapshot.residuals[rows.to(snapshot.residuals.device)]


class ServingHook:
    """The database's hook in the served model, reading pinned snapshots. The database
    object itself stays unattached: its commits never touch what a request reads."""

    def __init__(self, db: NeuralDB, model: nn.Module, tokenizer):
        db.config.check_model(model, db.path)
        self.config = db.config
        self._pins = _Pins()
        self.retrieval = GatedRetrieval(
            PinnedIndex(self._pins), PinnedResiduals(self._pins), db.config.gamma,
            db.config.anchor_token_id, db.config.compute.keys_per_fact,
            fixed_first_ids(db.config.anchor_token_id, tokenizer, model))
        self.retrieval.attach(model.base_model, get_module(model, db.config.module))

    @contextmanager
    def pinned(self, snapshot: Snapshot, rows: int) -> Iterator[Pin]:
        """Forward passes of this thread see ``snapshot`` while inside."""
        pin = Pin(snapshot, rows, self.config.gamma, self.config.compute.keys_per_fact)
        self._pins.pin = pin
        try:
            yield pin
        finally:
            self._pins.pin = None

    def detach(self) -> None:
        self.retrieval.detach()
