"""NeuralDB: a directory of edited facts that attaches to a model like an adapter.

    db = NeuralDB.create("capitals.ndb", model, tokenizer)
    ids = db.add(facts)                  # computes keys and residuals, commits to disk
    db.attach(model)                     # the model now answers with the new facts
    with db.disabled(): ...              # ... or, for a while, without them
    db.remove(ids[:2]); db.detach()

Every mutation is committed to disk before it returns (see ndb.store), and the weights of
the model are never changed. The parts: ndb.store owns the directory's files, ndb.keyset
the key index and the guard (ndb.calibration tunes an approximate one), ndb.edits turns
facts into entries, ndb.attachment puts the database into a model's forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ndb import edits
from ndb import facts as facts_mod
from ndb import store as store_mod
from ndb.attachment import Attachment, hooks_disabled
from ndb.compute import background_keys
from ndb.config import EditConfig, NeuralDBConfig, read_database
from ndb.edits import AddResult, ProgressCallback
from ndb.facts import Fact, as_facts
from ndb.indexes import KeyIndex
from ndb.keyset import KeySet
from ndb.residual_cache import DEFAULT_CACHE_BYTES
from ndb.retrieval import GatedRetrieval


class NeuralDB:
    """A fact database in a directory; see the module docstring. ``len(db)``, ``iter(db)``
    (the facts) and ``fact in db`` (an edit it holds) work as on a collection."""

    def __init__(self, path: str | Path, model: nn.Module | None = None, tokenizer=None, *,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.path = Path(path)
        self.config, self.store = read_database(self.path)
        self.keys = KeySet(self.store, self.config)
        self._writer = edits.Writer(self.store, self.config, self.keys)
        self._cache_bytes = cache_bytes
        self._synced_version = self.store.manifest.version
        self._facts: dict[int, Fact] | None = None
        self._model, self._tokenizer = model, tokenizer
        self._attachment: Attachment | None = None

    # -- creation and persistence ----------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, model: nn.Module, tokenizer,
               config: EditConfig | None = None, *, progress: bool = True,
               **settings: Any) -> NeuralDB:
        """An empty database for ``model``; facts are added with :meth:`add`. ``config``
        (or its fields as keywords: ``layer=6, gamma=0.7``) says how it edits. ``progress``:
        a bar while it samples the text its keys are compared with (seconds to minutes)."""
        store_mod.check_creatable(path)  # before minutes of computation, not after
        if config is not None and settings:
            raise TypeError("pass either an EditConfig or its fields as keywords, not both")
        saved = NeuralDBConfig.for_model(model, tokenizer, config or EditConfig(**settings))
        background = background_keys(model, tokenizer, saved.layer, saved.seed, progress=progress)
        store_mod.create(Path(path), saved.to_dict(), background.numpy().astype(np.float16))
        return cls.from_pretrained(path, model, tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | Path, model: nn.Module | None = None, tokenizer=None,
                        **kwargs: Any) -> NeuralDB:
        """Open the database at ``path``; a ``model`` (and tokenizer) given here is the one
        :meth:`add` and :meth:`remove` use when none is passed to them (it is checked
        against the database then, and is not attached)."""
        return cls(path, model, tokenizer, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        """Write a compact copy of this database to ``path`` (which must not exist yet):
        every file a database consists of (see ndb.store), its segments merged into one."""
        if Path(path).resolve() != self.path.resolve():
            store_mod.copy_database(self.store, Path(path))  # checks the path first
        self.flush()

    def flush(self) -> None:
        """Persist the key index, so that the next open needs no rebuild."""
        self.keys.save()

    def close(self) -> None:
        self.detach()
        self.store.close()

    # -- facts ---------------------------------------------------------------------------
    def __len__(self) -> int:
        self.refresh()  # another writer may have committed since
        return len(self.store.entries)

    def __iter__(self) -> Iterator[Fact]:
        return iter(list(self.facts().values()))

    def __contains__(self, fact: object) -> bool:
        """Whether a stored fact has this fact's edit (and its key, when it has one)."""
        return isinstance(fact, Fact) and edits.holds(self.facts(), fact)

    @property
    def ids(self) -> np.ndarray:
        self.refresh()
        return self.store.entries.ids.copy()

    def facts(self) -> dict[int, Fact]:
        """All facts by id (read once, then kept up to date)."""
        self.refresh()
        if self._facts is None:
            self._facts = facts_mod.read_stored(self.store)
        return self._facts

    def get(self, id_or_key: int | str) -> Fact:
        """The fact with this database id (int) or key (str)."""
        return self.facts()[self.id_of(id_or_key)]

    def id_of(self, id_or_key: int | str) -> int:
        """The database id of the fact with this key (str) or database id (int, checked)."""
        return edits.id_of(self.facts(), id_or_key, self.path)

    def ids_of(self, facts: Iterable[Fact]) -> list[int]:
        """Ids of stored facts with the same edit (subject, prompt, new object), in order."""
        return edits.ids_of_edits(self.facts(), facts, self.path)

    def ids_about(self, subject: str) -> list[int]:
        """Ids of the facts about ``subject`` (exact match)."""
        return [i for i, f in self.facts().items() if f.subject == subject]

    def mates(self, ids: Iterable[int]) -> list[int]:
        """Stored facts (not in ``ids``) whose residual is shared with a fact in ``ids``.
        Removing or re-editing ``ids`` re-optimizes theirs, which needs the model."""
        return edits.mates(self.facts(), ids, self.config.compute.residual_scope)

    # -- mutation ------------------------------------------------------------------------
    def add(self, facts: Iterable[Fact | dict], model: nn.Module | None = None, tokenizer=None,
            *, update: bool = False, skip_existing: bool = False,
            progress: bool | ProgressCallback = True, commit_each_batch: bool = False
            ) -> AddResult:
        """Compute keys and residuals of ``facts`` and commit them all at once at the end
        (with ``commit_each_batch``, batch by batch: ``ndb build --resume`` finishes them);
        returns the new ids, in input order, with the ids ``skipped`` and ``updated``.

        A fact the database holds (same subject, prompt and new object, and the same key, or
        no key) is skipped, and so is a repeat. A fact whose key is stored with another edit
        is refused, unless ``update``: then it is re-edited under its id. ``skip_existing``
        skips a keyed fact whose edit is stored under another key (or none) too. Stored
        facts sharing a residual with new ones (``ComputeConfig.residual_scope``) are
        re-edited with them. ``progress``: True, a bar; False, none; a callable gets ``(facts
        done, facts to do)`` after every optimization step.
        """
        facts = edits.unique(as_facts(facts))
        model, tokenizer = self._model_for(facts, model, tokenizer)
        with self.store.writing():
            new, changed, skipped = edits.sort_out(self.facts(), facts, update, skip_existing,
                                                   self.path)
            ids = self._write([*changed, *((None, f) for f in new)], (), model, tokenizer,
                              progress=progress, commit_each_batch=commit_each_batch)
        return AddResult(ids[len(changed):], skipped, ids[: len(changed)])

    def update(self, id_or_key: int | str, fact: Fact | dict, model: nn.Module | None = None,
               tokenizer=None, *, progress: bool | ProgressCallback = True) -> int:
        """Re-edit the fact with this database id (int) or key (str) as ``fact``; its id
        stays the same, and so does its key unless ``fact`` brings another. Returns the id."""
        (fact,) = as_facts([fact])
        model, tokenizer = self._model_for([fact], model, tokenizer)
        with self.store.writing():
            fact_id = self.id_of(id_or_key)
            fact = edits.rekeyed(self.facts(), fact_id, fact, self.path)
            self._write([(fact_id, fact)], (), model, tokenizer, progress=progress)
        return fact_id

    def update_by_key(self, facts: Iterable[Fact | dict], model: nn.Module | None = None,
                      tokenizer=None, *, progress: bool | ProgressCallback = True) -> AddResult:
        """Re-edit stored facts from ``facts``, each of which carries the key of a stored
        fact (checked for all before anything changes); identical ones are skipped."""
        facts = edits.unique(as_facts(facts))
        with self.store.writing():
            edits.check_keyed(self.facts(), facts, self.path)
            return self.add(facts, model, tokenizer, update=True, progress=progress)

    def remove(self, ids: Iterable[int | str], model: nn.Module | None = None, tokenizer=None,
               *, progress: bool | ProgressCallback = True) -> list[int]:
        """Remove the facts with these ids (int) or keys (str), all or none; returns their
        ids. Facts sharing a residual with a removed one (:meth:`mates`) are re-edited
        without it in the same commit, with the model (given, bound or attached)."""
        if not isinstance(ids, (str, bytes)) and not (ids := list(ids)):
            return []
        with self.store.writing():
            ids = edits.removable(self.facts(), ids, self.path)
            if self.mates(ids):
                model, tokenizer = self._model_for([], model, tokenizer)
            self._write([], ids, model, tokenizer, progress=progress)
        return ids

    def set_gamma(self, gamma: float) -> None:
        self.keys.set_gamma(gamma)
        if self._attachment is not None:
            self._attachment.follow_gate()

    def add_vectors(self, facts: Iterable[Fact | dict], keys: torch.Tensor | np.ndarray,
                    residuals: torch.Tensor | np.ndarray) -> list[int]:
        """Commit facts whose keys and residuals were computed already (for experiments
        that reuse vectors, e.g. growing databases of 100 to 10k facts); returns ids."""
        written = self._writer.commit_vectors(as_facts(facts), keys, residuals)
        self.refresh()
        return written

    def calibrate(self, model: nn.Module | None = None, tokenizer=None, *,
                  progress: bool = False) -> dict[int, float]:
        """Tune an approximate key index (ivf kinds) on texts about stored subjects (see
        ndb.calibration.calibrate); add, update and remove do it when due."""
        model, tokenizer = self._model_for([], model, tokenizer)
        with self.store.writing():
            self.refresh()
            return self.keys.calibrate(model, tokenizer, list(self.facts().values()), progress)

    def _write(self, changes: list[tuple[int | None, Fact]], removed: list[int], model,
               tokenizer, **options: Any) -> list[int]:
        ids = self._writer.write(self.facts(), changes, removed, model, tokenizer, **options)
        self.refresh()
        self.keys.calibrate_if_due(model, tokenizer, lambda: list(self.facts().values()),
                                   progress=options.get("progress") is True)
        return ids

    def _model_for(self, facts: list[Fact], model, tokenizer):
        """The model to edit with (given, bound or attached), once ``facts`` fit it."""
        return edits.editing_model(facts, model if model is not None else self._model,
                                   tokenizer if tokenizer is not None else self._tokenizer,
                                   self.config)

    # -- keeping the in-memory view in step with the disk ----------------------------------
    def refresh(self) -> None:
        """Catch up with changes committed to the directory (by this or another process)."""
        self.store.refresh()
        version = self.store.manifest.version
        if version == self._synced_version:
            return
        self.keys.sync()
        if self._attachment is not None or self._facts is not None:
            since = self.store.read_entries_since(self._synced_version)  # (changed, deleted)
            if self._attachment is not None:
                self._attachment.catch_up(*since)
            if self._facts is not None:  # a mutation reads its own entries, not every fact
                self._facts = facts_mod.caught_up(self.store, self._facts,
                                                  self._synced_version, *since)
        self._synced_version = version

    @property
    def index(self) -> KeyIndex:
        """The key index, up to date with the directory."""
        self.refresh()
        return self.keys.index

    # -- attaching to a model ------------------------------------------------------------
    def attach(self, model: nn.Module, tokenizer=None, *, force: bool = False,
               device: torch.device | str | None = None) -> nn.Module:
        """Hook this database into ``model`` (refused if the model does not match)."""
        if self._attachment is not None:
            raise RuntimeError(f"{self.path} is already attached; detach() it first")
        self._attachment = Attachment(self, model, tokenizer or self._tokenizer, force=force,
                                      device=device, cache_bytes=self._cache_bytes)
        self._model, self._tokenizer = model, tokenizer or self._tokenizer
        return model

    def detach(self) -> None:
        if self._attachment is not None:
            self._attachment.detach()
            self._attachment = None

    @property
    def retrieval(self) -> GatedRetrieval | None:
        """The live hook while attached (gate statistics, recording of scores)."""
        return self._attachment.retrieval if self._attachment else None

    def disabled(self) -> AbstractContextManager[None]:
        """Run the attached model without this database for a while."""
        return hooks_disabled([self.retrieval] if self.retrieval else [])

    def __repr__(self) -> str:
        return (f"NeuralDB({str(self.path)!r}, facts={len(self)}, layer={self.config.layer}, "
                f"gamma={self.config.gamma})")


def attach(model: nn.Module, db: NeuralDB | str | Path, tokenizer=None, **kwargs: Any
           ) -> nn.Module:
    """Attach a database (or the one at a path) to ``model``, like a PEFT adapter; returns
    the model. ``ndb.attached(model)`` lists what is attached, to detach it later."""
    db = db if isinstance(db, NeuralDB) else NeuralDB.from_pretrained(db)
    return db.attach(model, tokenizer, **kwargs)
