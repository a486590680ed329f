"""NeuralDB: a directory of edited facts that attaches to a model like an adapter.

    db = NeuralDB.create("capitals.ndb", model, tokenizer)
    ids = db.add(facts)                  # computes keys and residuals, commits to disk
    db.attach(model)                     # the model now answers with the new facts
    with db.disabled(): ...              # ... or, for a while, without them
    db.remove(ids[:2]); db.detach()

Every mutation is committed to disk before it returns (see ndb.store), and the weights of
the model are never changed.
"""

from __future__ import annotations

import json
import numbers
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ndb import store as store_mod
from ndb.anchor import anchor_token_id, fixed_first_ids
from ndb.compute import (
    ComputeConfig,
    background_keys,
    check_encodable,
    compute_keys,
    compute_residuals,
    context_prefixes,
    pack_groups,
)
from ndb.config import NeuralDBConfig
from ndb.errors import ConfigError, FactError, FactNotFoundError, ModelMismatchError, StoreError
from ndb.facts import Fact, as_facts
from ndb.hook import GatedRetrieval
from ndb.indexes import BACKENDS, KeyIndex, choose_index_kind, load_index, make_index
from ndb.models import (
    decoder_layers,
    default_edit_settings,
    embedding_params,
    ffn_dims,
    ffn_out_path,
    get_module,
    num_layers,
    params_fingerprint,
)
from ndb.output import check_writable
from ndb.residuals import DEFAULT_CACHE_BYTES, ResidualCache
from ndb.store import Store


def check_gamma(gamma: float) -> None:
    """The gate is a cosine threshold in [0, 1]: below 0 a key would pass for vectors
    pointing away from it, so nearly every token would be edited."""
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0 <= gamma <= 1:
        raise ConfigError(f"gamma must be a number in [0, 1] (a cosine threshold), "
                          f"got {gamma!r}")


def check_index_kind(kind: str) -> None:
    if kind != "auto" and kind not in BACKENDS:
        raise ConfigError(f"unknown index kind {kind!r} (known: auto, "
                          f"{', '.join(sorted(BACKENDS))})")


def check_creatable(path: str | Path) -> None:
    """A new database can be made at ``path``: nothing is there (or an empty directory),
    and the nearest existing folder is writable."""
    path = Path(path)
    if path.is_dir() and not any(path.iterdir()):
        return
    if path.exists():
        what = ("a fact database" if (path / store_mod.CONFIG).is_file()
                else "a directory that is not empty" if path.is_dir() else "a file")
        raise StoreError(f"{path} already exists and is {what}")
    check_writable(path, what="directory")


def fingerprint(model: nn.Module, layer: int) -> str:
    """Hash of one decoder layer's weights (see models.params_fingerprint)."""
    return params_fingerprint(decoder_layers(model)[layer].named_parameters())


def input_fingerprints(model: nn.Module, layer: int) -> dict[str, str]:
    """Fingerprints of everything a key at ``layer`` depends on: the embeddings and every
    decoder layer up to and including ``layer``."""
    parts = {"embeddings": params_fingerprint(embedding_params(model))}
    for i in range(layer + 1):
        parts[f"layer {i}"] = fingerprint(model, i)
    return parts


def model_name(model: nn.Module) -> str:
    """How to load the model again ('' when it has no name or path to load it by)."""
    return str(getattr(model.config, "name_or_path", None) or "")


class AddResult(list):
    """What :meth:`NeuralDB.add` did. As a list: the ids of the facts it added, in input
    order. ``skipped``: the stored ids of input facts the database already held; ``updated``:
    the ids of stored facts re-edited (``update=True``)."""

    def __init__(self, added: Iterable[int] = (), skipped: Iterable[int] = (),
                 updated: Iterable[int] = ()):
        super().__init__(added)
        self.skipped = list(skipped)
        self.updated = list(updated)


def _unique(facts: list[Fact]) -> list[Fact]:
    """``facts`` without repeats (same edit and key); a key naming two edits is refused."""
    by_key: dict[str, Fact] = {}
    seen: set[tuple] = set()
    unique = []
    for fact in facts:
        if fact.key is not None and by_key.setdefault(fact.key, fact).edit != fact.edit:
            raise FactError(f"key {fact.key!r} is given to two different facts "
                            f"({by_key[fact.key].text!r} and {fact.text!r})")
        if (fact.edit, fact.key) not in seen:
            seen.add((fact.edit, fact.key))
            unique.append(fact)
    return unique


def _as_fact_id(value: Any) -> int:
    """A database id: an integer that fits the int64 ids of the store."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"fact ids are integers (the database's ids), got {value!r}; "
                         "a fact's own key is a string")
    if not np.iinfo(np.int64).min <= int(value) <= np.iinfo(np.int64).max:
        raise FactNotFoundError(f"no fact with id {value} (ids are 64-bit integers)")
    return int(value)


class NeuralDB:
    """A fact database in a directory; see the module docstring."""

    def __init__(self, path: str | Path, *, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.path = Path(path)
        store_mod.check_layout(self.path)
        try:
            self.config = NeuralDBConfig.read(self.path / store_mod.CONFIG)
        except (ValueError, TypeError) as err:
            raise StoreError(f"{self.path}/{store_mod.CONFIG}: {err}") from None
        self.store = Store(self.path, self._entry_shapes())
        self._cache_bytes = cache_bytes
        self._index: KeyIndex | None = None
        self._index_version = -1
        self._device = "cpu"  # where the index searches: the attached model's device
        self._background: np.ndarray | None = None
        self._synced_version = self.store.manifest.version
        self._facts: dict[int, Fact] | None = None
        self._model: nn.Module | None = None
        self._tokenizer = None
        self._retrieval: GatedRetrieval | None = None
        self._residuals: ResidualCache | None = None

    # -- creation and persistence ----------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        model: nn.Module,
        tokenizer,
        *,
        layer: int | None = None,
        gamma: float | None = None,
        seed: int = 0,
        compute: ComputeConfig | None = None,
        index: str = "auto",
        key_dtype: str = "float16",
        residual_dtype: str = "float32",
    ) -> NeuralDB:
        """An empty database for ``model``; facts are added with :meth:`add`."""
        check_creatable(path)  # before minutes of computation, not after
        if gamma is not None:
            check_gamma(gamma)
        check_index_kind(index)
        if layer is None or gamma is None:  # defaults are looked up only when needed
            default_layer, default_gamma = default_edit_settings(model)
            layer = default_layer if layer is None else layer
            gamma = default_gamma if gamma is None else gamma
        for name, dtype in (("key_dtype", key_dtype), ("residual_dtype", residual_dtype)):
            if dtype not in ("float16", "float32"):
                raise ConfigError(f"{name} must be float16 or float32, got {dtype!r}")
        if layer is not None and (isinstance(layer, bool)
                                  or not isinstance(layer, numbers.Integral)):
            raise ConfigError(f"layer must be an integer, got {layer!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        default_layer, default_gamma = default_edit_settings(model)
        layer = default_layer if layer is None else int(layer)
        gamma = default_gamma if gamma is None else gamma
        seed = int(seed)
        module = ffn_out_path(model, layer)
        d_key, d_value = ffn_dims(model, layer)
        compute = compute or ComputeConfig()
        config = NeuralDBConfig(
            model_name=model_name(model),
            model_type=model.config.model_type,
            num_layers=num_layers(model),
            fingerprint=fingerprint(model, layer),
            input_fingerprints=input_fingerprints(model, layer),
            layer=layer,
            module=module,
            d_key=d_key,
            d_value=d_value,
            gamma=float(gamma),
            anchor_token_id=anchor_token_id(tokenizer),
            prefixes=context_prefixes(model, tokenizer, compute.n_prefixes,
                                      compute.prefix_tokens, seed),
            seed=seed,
            key_dtype=key_dtype,
            residual_dtype=residual_dtype,
            index=index,
            compute=compute,
        )
        background = background_keys(model, tokenizer, layer, seed).numpy().astype(np.float16)
        store_mod.create(Path(path), config.to_dict(), background)
        db = cls(path)
        db._tokenizer = tokenizer
        db._model = model
        return db

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> NeuralDB:
        return cls(path, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        """Write a compact copy of this database to ``path`` (which must not exist yet):
        every file a database consists of (see ndb.store), its segments merged into one."""
        path = Path(path)
        self.flush()
        if path.resolve() == self.path.resolve():
            return
        self.refresh()
        store_mod.copy_database(self.store, path)

    def flush(self) -> None:
        """Persist the key index, so that the next open needs no rebuild."""
        if self._index is not None and self._index_version != self._saved_index_version():
            self._save_index()

    def close(self) -> None:
        self.detach()
        self.store.close()

    # -- facts ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.store.entries)

    @property
    def ids(self) -> np.ndarray:
        return self.store.entries.ids.copy()

    def facts(self) -> dict[int, Fact]:
        """All facts by id (read once, then kept up to date)."""
        self.refresh()
        if self._facts is None:
            records = self.store.read("facts") if len(self) else []
            self._facts = {int(i): Fact.from_json(json.loads(r))
                           for i, r in zip(self.store.entries.ids, records)}
        return self._facts

    def get(self, id_or_key: int | str) -> Fact:
        """The fact with this database id (int) or key (str)."""
        return self.facts()[self.resolve(id_or_key)]

    def resolve(self, id_or_key: int | str) -> int:
        """The database id of the fact with this database id (int) or key (str)."""
        if isinstance(id_or_key, str):
            return self.id_of(id_or_key)
        fact_id = _as_fact_id(id_or_key)
        if fact_id not in self.facts():
            raise FactNotFoundError(f"no fact with id {fact_id} in {self.path}")
        return fact_id

    def id_of(self, key: str) -> int:
        """The database id of the fact whose key is ``key``."""
        try:
            return self._ids_by_key()[key]
        except KeyError:
            raise FactNotFoundError(f"no fact with key {key!r} in {self.path}") from None

    def _ids_by_key(self) -> dict[str, int]:
        return {f.key: i for i, f in self.facts().items() if f.key is not None}

    def lookup(self, facts: Iterable[Fact]) -> list[int]:
        """Ids of facts stored with the same subject, prompt and new object, in order."""
        by_edit = {f.edit: i for i, f in self.facts().items()}
        ids = []
        for fact in facts:
            if fact.edit not in by_edit:
                raise FactNotFoundError(f"{self.path} holds no edit {fact.text!r} -> "
                                        f"{fact.target_new!r}")
            ids.append(by_edit[fact.edit])
        return ids

    def find(self, subject: str) -> list[int]:
        """Ids of the facts about ``subject`` (exact match)."""
        return [i for i, f in self.facts().items() if f.subject == subject]

    # -- mutation ------------------------------------------------------------------------
    def add(
        self,
        facts: Iterable[Fact | dict],
        model: nn.Module | None = None,
        tokenizer=None,
        *,
        update: bool = False,
        skip_existing: bool = False,
        progress: bool = False,
        commit_each_batch: bool = False,
    ) -> AddResult:
        """Compute keys and residuals of ``facts`` and commit them; returns an
        :class:`AddResult`: the new ids (a list, in input order), and the ids of the facts
        skipped or updated.

        A fact the database already holds (same subject, prompt and new object, and the
        same key; a fact without a key matches a stored fact whatever its key) is skipped,
        and so is a repeat within ``facts``. A fact whose key is stored with another edit is
        refused, unless ``update``: then it is re-edited under its id. With
        ``skip_existing`` a keyed fact whose edit is stored under another key (or none) is
        skipped too. Nothing is written when a fact is refused.

        Everything is committed at once at the end, so an add that fails or is interrupted
        commits nothing. With ``commit_each_batch`` each batch (``compute.batch_size``
        facts) is committed as soon as it is computed, so an interrupted add keeps what was
        done and, with ``skip_existing``, re-running it resumes it (``ndb build --resume``).
        Stored facts about the subjects of ``facts`` are re-edited along with them when
        residuals are per subject (``ComputeConfig.residual_scope``).
        """
        facts = _unique(as_facts(facts))
        model, tokenizer = self._require_model(model, tokenizer)
        check_encodable(facts, model, tokenizer, self.config.prefixes,
                        self.config.compute.kl_prompts)
        with self.store.writing():
            self.refresh()
            new, changed, skipped = self._sort_out(facts, update, skip_existing)
            edits = [*changed, *((None, f) for f in new)]
            ids = self._write(edits, (), model, tokenizer, progress, commit_each_batch)
        return AddResult(ids[len(changed):], skipped, ids[: len(changed)])

    def _sort_out(self, facts: list[Fact], update: bool, skip_existing: bool
                  ) -> tuple[list[Fact], list[tuple[int, Fact]], list[int]]:
        """Split unique ``facts`` into new ones, (stored id, fact) to re-edit, and the
        stored ids of those already held; refuses a stored key with another edit."""
        stored, by_key = self.facts(), self._ids_by_key()
        by_edit: dict[tuple, int] = {}
        for fact_id, fact in stored.items():
            by_edit.setdefault(fact.edit, fact_id)
        new, changed, skipped = [], [], []
        for fact in facts:
            fact_id = by_key.get(fact.key) if fact.key is not None else None
            if fact_id is None:
                if (fact.key is None or skip_existing) and fact.edit in by_edit:
                    skipped.append(by_edit[fact.edit])
                else:
                    new.append(fact)
            elif stored[fact_id] == fact or (not update and stored[fact_id].edit == fact.edit):
                skipped.append(fact_id)
            elif update:
                changed.append((fact_id, fact))
            else:
                raise FactError(
                    f"key {fact.key!r} is already used by fact {fact_id} "
                    f"({stored[fact_id].text!r} -> {stored[fact_id].target_new!r}) in "
                    f"{self.path}; to re-edit it, add with update=True (ndb add --update)")
        return new, changed, skipped

    def update(self, id_or_key: int | str, fact: Fact | dict, model: nn.Module | None = None,
               tokenizer=None) -> int:
        """Re-edit the fact with this database id (int) or key (str) as ``fact``; its id
        stays the same, and so does its key unless ``fact`` brings another. Returns the id."""
        (fact,) = as_facts([fact])
        model, tokenizer = self._require_model(model, tokenizer)
        check_encodable([fact], model, tokenizer, self.config.prefixes,
                        self.config.compute.kl_prompts)
        with self.store.writing():
            self.refresh()
            fact_id = self.resolve(id_or_key)
            stored_key = self.facts()[fact_id].key
            if fact.key is None:
                fact = replace(fact, key=stored_key)
            elif fact.key != stored_key and fact.key in self._ids_by_key():
                raise FactError(f"key {fact.key!r} is already used by fact "
                                f"{self.id_of(fact.key)} in {self.path}")
            self._write([(fact_id, fact)], (), model, tokenizer, False, False)
        return fact_id

    def update_by_key(self, facts: Iterable[Fact | dict], model: nn.Module | None = None,
                      tokenizer=None, *, progress: bool = False) -> AddResult:
        """Re-edit stored facts from ``facts``, each of which carries the key of a stored
        fact (checked for all before anything changes); identical ones are skipped."""
        facts = _unique(as_facts(facts))
        with self.store.writing():
            self.refresh()
            for fact in facts:
                if fact.key is None:
                    raise FactError(f"{fact.text!r} -> {fact.target_new!r} has no key: "
                                    "an update names the stored fact by its key")
                self.id_of(fact.key)
            return self.add(facts, model, tokenizer, update=True, progress=progress)

    def mates(self, ids: Iterable[int]) -> list[int]:
        """Stored facts (not in ``ids``) whose residual is shared with a fact in ``ids``:
        those about the same subject when residuals are per subject, else none. Removing
        or re-editing ``ids`` re-optimizes theirs, which needs the model."""
        if self.config.compute.residual_scope != "subject":
            return []
        stored, ids = self.facts(), set(ids)
        subjects = {stored[i].subject for i in ids if i in stored}
        return sorted(i for i, f in stored.items() if f.subject in subjects and i not in ids)

    def remove(self, ids: Iterable[int], model: nn.Module | None = None, tokenizer=None,
               *, progress: bool = False) -> None:
        """Remove the facts with these database ids (all of them, or none if one is absent).
        Facts sharing a residual with a removed one (see :meth:`mates`) are re-edited
        without it in the same commit; that needs the model (given, or attached)."""
        ids = np.unique(np.array([_as_fact_id(i) for i in ids], dtype=np.int64))
        if len(ids) == 0:
            return
        with self.store.writing():
            self.refresh()
            try:
                self.store.entries.locate(ids)
            except KeyError as err:
                raise FactNotFoundError(
                    f"no fact with id {err.args[0]} in {self.path}; nothing was removed"
                ) from None
            if self.mates(ids.tolist()):
                model, tokenizer = self._require_model(model, tokenizer)
            self._write([], ids.tolist(), model, tokenizer, progress, False)

    def remove_keys(self, keys: Iterable[str]) -> list[int]:
        """Remove the facts with these keys (all of them, or none if one is unknown)."""
        ids = [self.id_of(key) for key in keys]
        self.remove(ids)
        return ids

    def remove_subject(self, subject: str) -> list[int]:
        ids = self.find(subject)
        if not ids:
            raise FactNotFoundError(f"no fact about subject {subject!r} in {self.path}")
        self.remove(ids)
        return ids

    def set_gamma(self, gamma: float) -> None:
        check_gamma(gamma)
        guarded = self.config.compute.keys_per_fact > 1 and self.config.guard_margin is not None
        with self.store.writing():
            if guarded:  # which keys the guard keeps depends on gamma: index anew
                (self.path / store_mod.INDEX / store_mod.INDEX_META).unlink(missing_ok=True)
                self._index = None
            self.config.gamma = float(gamma)
            store_mod.atomic_write_json(self.path / store_mod.CONFIG, self.config.to_dict())
        if self._retrieval is not None:
            self._retrieval.gamma = float(gamma)
            self._retrieval.index = self.index

    def add_vectors(self, facts: Iterable[Fact | dict], keys: torch.Tensor | np.ndarray,
                    residuals: torch.Tensor | np.ndarray) -> list[int]:
        """Commit facts whose keys and residuals were computed already (for experiments
        that reuse vectors, e.g. growing databases of 100 to 10k facts); returns ids."""
        facts = as_facts(facts)
        keys, residuals = torch.as_tensor(keys).float(), torch.as_tensor(residuals).float()
        per_fact = self.config.compute.keys_per_fact
        key_shape = ((len(facts), per_fact, self.config.d_key) if per_fact > 1
                     else (len(facts), self.config.d_key))
        expected = (key_shape, (len(facts), self.config.d_value))
        if (tuple(keys.shape), tuple(residuals.shape)) != expected:
            raise ValueError(f"expected keys and residuals of shapes {expected}, got "
                             f"{tuple(keys.shape)} and {tuple(residuals.shape)}")
        with self.store.appending() as pending:
            written = self._stage(pending, facts, keys, residuals, None)
        self.refresh()
        return written

    @property
    def background(self) -> np.ndarray:
        """Keys of generic text (written at creation): what a fact key must not match."""
        if self._background is None:
            self._background = store_mod.load_background(self.path, self.config.d_key)
        return self._background

    def _entry_shapes(self) -> dict[str, tuple[int, ...]]:
        """The per-fact shape of each stored dataset, which every segment must have."""
        per_fact = self.config.compute.keys_per_fact
        scores = (per_fact,) if per_fact > 1 else ()
        return {"keys": (*scores, self.config.d_key), "residuals": (self.config.d_value,),
                "key_scores": scores}

    def _stage(self, pending: store_mod.Pending, facts: list[Fact], keys: torch.Tensor,
               residuals: torch.Tensor, ids: np.ndarray | None) -> list[int]:
        """Write one batch into ``pending`` (committed when its block ends)."""
        keys = torch.nn.functional.normalize(keys.float(), dim=-1)
        background = torch.from_numpy(self.background)
        scores = ((keys @ background.T).amax(-1) if len(background)
                  else torch.full(keys.shape[:-1], -1.0))
        written = pending.append(
            keys.numpy().astype(self.config.key_dtype),
            residuals.float().numpy().astype(self.config.residual_dtype),
            [json.dumps(f.to_json(), ensure_ascii=False) for f in facts],
            ids=ids,
            key_scores=scores.numpy(),
        )
        return [int(i) for i in written]

    def _write(self, edits: list[tuple[int | None, Fact]], removed: Sequence[int], model,
               tokenizer, progress: bool, commit_each_batch: bool) -> list[int]:
        """Commit ``edits`` ((stored id to re-edit, or None for a new fact; the fact)) and the
        removal of ``removed``, re-editing the stored facts that share a residual with any of
        them (:meth:`mates`); returns the ids of ``edits`` in order."""
        stored = self.facts()
        touched = {*removed, *(i for i, _ in edits if i is not None)}
        subjects = {f.subject for _, f in edits} | {stored[i].subject for i in touched}
        mates = [(i, f) for i, f in stored.items() if i not in touched and f.subject in subjects
                 and self.config.compute.residual_scope == "subject"]
        next_id = self.store.manifest.next_id
        ids = []
        for fact_id, _ in edits:
            ids.append(next_id if fact_id is None else fact_id)
            next_id += fact_id is None
        todo = [*zip(ids, (f for _, f in edits)), *mates]
        if todo:
            self._check_model(model)
        with tqdm(total=len(todo), desc="edit", unit="fact", disable=not progress) as bar, \
                self._all_hooks_disabled(model), self.store.appending() as pending:
            if len(removed):
                pending.delete(np.asarray(removed, np.int64))
            for part, keys, residuals in self._computed_batches(todo, model, tokenizer):
                self._stage(pending, [f for _, f in part], keys, residuals,
                            np.array([i for i, _ in part], np.int64))
                bar.update(len(part))
                if commit_each_batch:
                    self.store.commit_now(pending)
        self.refresh()
        return ids

    def _computed_batches(self, todo: list[tuple[int, Fact]], model, tokenizer
                          ) -> Iterator[tuple[list[tuple[int, Fact]], torch.Tensor, torch.Tensor]]:
        """(id and fact, keys, residuals) of each batch of whole groups (facts sharing a
        residual), computed as it is asked for."""
        cfg = self.config
        per_subject = cfg.compute.residual_scope == "subject"
        labels = [f.subject if per_subject else n for n, (_, f) in enumerate(todo)]
        for batch in pack_groups(labels, max(cfg.compute.batch_size, 1)):
            part = [todo[n] for n in batch]
            facts = [f for _, f in part]
            keys = compute_keys(model, tokenizer, facts, cfg.layer, cfg.prefixes,
                                split=cfg.compute.keys_per_fact > 1)
            residuals = compute_residuals(model, tokenizer, facts, cfg.layer, cfg.prefixes,
                                          cfg.compute, groups=[labels[n] for n in batch])
            yield part, keys, residuals

    # -- keeping the in-memory view in step with the disk ----------------------------------
    def refresh(self) -> None:
        """Catch up with changes committed to the directory (by this or another process)."""
        self.store.refresh()
        version = self.store.manifest.version
        if version == self._synced_version:
            return
        if self._residuals is not None:
            changed, deleted = self.store.read_entries_since(self._synced_version)
            self._residuals.forget(np.concatenate([changed, deleted]))
        if self._index is not None:
            if self.store.manifest.compacted_through > self._index_version:
                self._build_index()
            else:
                self._catch_up_index()
                if self.config.index == "auto" and self._index_kind() != self._index.kind:
                    self._build_index()
        if self._retrieval is not None:
            self._retrieval.index = self._index
        self._facts = None
        self._synced_version = version

    def _index_kind(self) -> str:
        kind = self.config.index
        n_keys = len(self) * self.config.compute.keys_per_fact
        return choose_index_kind(n_keys, self._device) if kind == "auto" else kind

    def _saved_index_meta(self) -> dict | None:
        """index.json if it describes a usable cache: a version this manifest can catch up
        from, and a plain file name of the form _save_index writes (the directory may come
        from anyone); None otherwise."""
        try:
            meta_path = self.path / store_mod.INDEX / store_mod.INDEX_META
            meta = json.loads(store_mod.regular_file(meta_path).read_bytes())
            version, kind, name = meta["version"], meta["kind"], meta["file"]
        except (StoreError, ValueError, KeyError, TypeError):
            return None
        usable = (type(version) is int and kind in BACKENDS and isinstance(name, str)
                  and re.fullmatch(rf"v[0-9]{{8,}}\.{re.escape(kind)}", name) is not None
                  and self.store.manifest.compacted_through <= version
                  <= self.store.manifest.version)
        return meta if usable else None

    def _saved_index_version(self) -> int:
        meta = self._saved_index_meta()
        return -1 if meta is None else meta["version"]

    def _load_saved_index(self) -> bool:
        meta = self._saved_index_meta()
        if meta is None or meta["kind"] != self._index_kind():
            return False
        path = self.path / store_mod.INDEX / meta["file"]
        try:
            if "sha256" in meta:  # caches saved before checksums were recorded have none
                digest = store_mod.file_digest(path)
                if (digest["bytes"], digest["sha256"]) != (meta.get("bytes"), meta["sha256"]):
                    warnings.warn(f"{path} is corrupted (its checksum differs from the "
                                  "record); rebuilding the key index", stacklevel=3)
                    return False
            index = load_index(meta["kind"], store_mod.regular_file(path), self.config.d_key,
                               device=self._device)
        except (FileNotFoundError, StoreError, ValueError, KeyError, RuntimeError):
            return False
        self._index, self._index_version = index, meta["version"]
        return True

    def _index_entries(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index rows of facts ``ids``: their keys, one row per key, under index ids
        ``fact_id * keys_per_fact + k`` (the hook divides to get the fact back)."""
        keys = self.store.read("keys", ids).astype(np.float32).reshape(-1, self.config.d_key)
        index_ids = self._index_ids(ids)
        if self.config.compute.keys_per_fact > 1 and self.config.guard_margin is not None:
            keep = self.guarded_keys(self.store.read("key_scores", ids)).reshape(-1)
            keys, index_ids = keys[keep], index_ids[keep]
        return keys, index_ids

    def guarded_keys(self, scores: np.ndarray) -> np.ndarray:
        """(n, keys_per_fact) bool: the keys that generic text does not reach within the
        guard margin of gamma; a fact whose keys all do keeps its least reached one."""
        keep = scores < self.config.gamma - self.config.guard_margin
        none = ~keep.any(axis=1)
        keep[none, scores[none].argmin(axis=1)] = True
        return keep

    def _index_ids(self, ids: np.ndarray) -> np.ndarray:
        per_fact = self.config.compute.keys_per_fact
        return (np.asarray(ids, np.int64)[:, None] * per_fact + np.arange(per_fact)).reshape(-1)

    def _build_index(self) -> None:
        index = make_index(self._index_kind(), self.config.d_key, device=self._device)
        if len(self):
            keys, index_ids = self._index_entries(self.store.entries.ids)
            if index.needs_training:
                index.train(keys)
            index.add(keys, index_ids)
        self._index, self._index_version = index, self.store.manifest.version

    def _save_index(self) -> None:
        directory = store_mod.real_directory(self.path / store_mod.INDEX)
        name = f"v{self._index_version:08d}.{self._index.kind}"
        with store_mod.atomic_path(directory / name) as tmp:
            self._index.save(tmp)
        store_mod.atomic_write_json(directory / store_mod.INDEX_META, {
            "version": self._index_version, "kind": self._index.kind, "file": name,
            **store_mod.file_digest(directory / name)})
        for old in directory.iterdir():
            if old.name not in (name, store_mod.INDEX_META) and not old.name.startswith(".") \
                    and not old.is_dir():
                old.unlink(missing_ok=True)  # a link is removed, never what it points to

    @property
    def index(self) -> KeyIndex:
        """The key index, loaded from its saved copy (brought up to date) or built."""
        if self._index is None:
            self.refresh()
            if self._load_saved_index():
                self._catch_up_index()
            else:
                self._build_index()
        return self._index

    def _catch_up_index(self) -> None:
        changed, deleted = self.store.read_entries_since(self._index_version)
        self._index.remove(self._index_ids(np.concatenate([changed, deleted])))
        if len(changed):
            self._index.add(*self._index_entries(changed))
        self._index_version = self.store.manifest.version

    # -- attaching to a model ------------------------------------------------------------
    def _check_model(self, model: nn.Module) -> None:
        cfg = self.config
        problems = []
        if getattr(model.config, "model_type", None) != cfg.model_type:
            problems.append(f"model type {model.config.model_type!r} != {cfg.model_type!r}")
        elif num_layers(model) != cfg.num_layers:
            problems.append(f"{num_layers(model)} layers != {cfg.num_layers}")
        elif ffn_dims(model, cfg.layer) != (cfg.d_key, cfg.d_value):
            problems.append(f"FFN dims {ffn_dims(model, cfg.layer)} != "
                            f"{(cfg.d_key, cfg.d_value)}")
        elif cfg.input_fingerprints:
            found = input_fingerprints(model, cfg.layer)
            differ = [part for part, saved in cfg.input_fingerprints.items()
                      if found.get(part) != saved]
            if differ:
                problems.append(f"the weights of {', '.join(differ)} differ")
        elif fingerprint(model, cfg.layer) != cfg.fingerprint:
            # written before input_fingerprints: only the edited layer was recorded
            problems.append(f"the weights of layer {cfg.layer} differ (fingerprint "
                            f"{fingerprint(model, cfg.layer)} != {cfg.fingerprint})")
        if problems:
            built_for = repr(cfg.model_name) if cfg.model_name else "a model without a name"
            raise ModelMismatchError(
                f"{self.path} was built for {built_for}; this model does not "
                f"match: {problems[0]}")

    def _require_model(self, model, tokenizer):
        model = model if model is not None else self._model
        tokenizer = tokenizer if tokenizer is not None else self._tokenizer
        if model is None or tokenizer is None:
            raise ValueError("a model and tokenizer are needed: pass them, or attach(model, "
                             "tokenizer) first")
        return model, tokenizer

    def attach(self, model: nn.Module, tokenizer=None, *, force: bool = False,
               device: torch.device | str | None = None) -> nn.Module:
        """Hook this database into ``model`` (refused if the model does not match)."""
        if self._retrieval is not None:
            raise RuntimeError(f"{self.path} is already attached; detach() it first")
        if not force:
            self._check_model(model)
        projection = get_module(model, self.config.module)
        device = torch.device(device or next(model.parameters()).device)
        if device.type != self._device.split(":")[0]:
            self._device = str(device)  # an accelerator gets an index that searches there
            self._index = None
        self._residuals = ResidualCache(self.store, self.config.d_value, device,
                                        self._cache_bytes)
        anchor = self.config.anchor_token_id
        self._retrieval = GatedRetrieval(
            self.index, self._residuals, self.config.gamma, anchor,
            self.config.compute.keys_per_fact,
            fixed_first_ids(anchor, tokenizer or self._tokenizer, model))
        self._residuals.warm()
        self._retrieval.attach(model.base_model, projection)
        self._model = model
        if tokenizer is not None:
            self._tokenizer = tokenizer
        attached = getattr(model, "_ndb_attached", [])
        model._ndb_attached = [*attached, self]
        return model

    def detach(self) -> None:
        if self._retrieval is None:
            return
        self._retrieval.detach()
        self._retrieval = None
        if self._model is not None:
            self._model._ndb_attached = [d for d in getattr(self._model, "_ndb_attached", [])
                                         if d is not self]

    @property
    def retrieval(self) -> GatedRetrieval | None:
        """The live hook while attached (gate statistics, recording of scores)."""
        return self._retrieval

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the attached model without this database for a while."""
        if self._retrieval is None:
            yield
            return
        before = self._retrieval.enabled
        self._retrieval.enabled = False
        try:
            yield
        finally:
            self._retrieval.enabled = before

    @staticmethod
    @contextmanager
    def _all_hooks_disabled(model: nn.Module) -> Iterator[None]:
        """Keys and residuals must come from the unedited model, whatever is attached."""
        hooks = [db._retrieval for db in getattr(model, "_ndb_attached", []) if db._retrieval]
        before = [h.enabled for h in hooks]
        for h in hooks:
            h.enabled = False
        try:
            yield
        finally:
            for h, state in zip(hooks, before):
                h.enabled = state

    def __repr__(self) -> str:
        return (f"NeuralDB({str(self.path)!r}, facts={len(self)}, layer={self.config.layer}, "
                f"gamma={self.config.gamma})")
