"""Turning facts into committed entries: the stored facts (read and checked) and their ids
and keys resolved, which input facts are new, repeated or updates, which stored facts must
be re-edited with them (those sharing a residual), and the batches of keys and residuals
computed and staged into one commit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import numpy as np
import torch

from ndb.attachment import unedited
from ndb.compute import FactBar, check_encodable, compute_keys, compute_residuals, pack_groups
from ndb.config import NeuralDBConfig
from ndb.errors import FactError, FactNotFoundError
from ndb.facts import Fact
from ndb.keyset import KeySet
from ndb.models import check_model_inputs
from ndb.store import Pending, Store


class AddResult(list):
    """What :meth:`NeuralDB.add` did. As a list: the ids of the facts it added, in input
    order. ``skipped``: the stored ids of input facts the database already held; ``updated``:
    the ids of stored facts re-edited (``update=True``)."""

    def __init__(self, added: Iterable[int] = (), skipped: Iterable[int] = (),
                 updated: Iterable[int] = ()):
        super().__init__(added)
        self.skipped = list(skipped)
        self.updated = list(updated)


def unique(facts: list[Fact]) -> list[Fact]:
    """``facts`` without repeats (same edit and key); a key naming two edits is refused."""
    by_key: dict[str, Fact] = {}
    seen: set[tuple] = set()
    kept = []
    for fact in facts:
        if fact.key is not None and by_key.setdefault(fact.key, fact).edit != fact.edit:
            raise FactError(f"key {fact.key!r} is given to two different facts "
                            f"({by_key[fact.key].text!r} and {fact.text!r})")
        if (fact.edit, fact.key) not in seen:
            seen.add((fact.edit, fact.key))
            kept.append(fact)
    return kept


def holds(stored: dict[int, Fact], fact: Fact) -> bool:
    """Whether a stored fact has this fact's edit (and its key, when it has one)."""
    return any(f.edit == fact.edit and fact.key in (None, f.key) for f in stored.values())


def sort_out(stored: dict[int, Fact], facts: list[Fact], update: bool, skip_existing: bool,
             where: object) -> tuple[list[Fact], list[tuple[int, Fact]], list[int]]:
    """Split unique ``facts`` into new ones, (stored id, fact) to re-edit, and the stored
    ids of those already held; refuses a stored key with another edit."""
    by_key = {f.key: i for i, f in stored.items() if f.key is not None}
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
                f"{where}; to re-edit it, add with update=True (ndb add --update)")
    return new, changed, skipped


def as_fact_id(value: object) -> int:
    """A database id: an integer that fits the int64 ids of the store."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise FactError(f"fact ids are integers (the database's ids), got {value!r}; "
                        "a fact's own key is a string")
    if not np.iinfo(np.int64).min <= int(value) <= np.iinfo(np.int64).max:
        raise FactNotFoundError(f"no fact with id {value} (ids are 64-bit integers)")
    return int(value)


def id_of(stored: dict[int, Fact], id_or_key: int | str, where: object) -> int:
    """The id of the stored fact with this key (str) or database id (int, checked)."""
    if isinstance(id_or_key, str):
        found = next((i for i, f in stored.items() if f.key == id_or_key), None)
        if found is None:
            raise FactNotFoundError(f"no fact with key {id_or_key!r} in {where}")
        return found
    fact_id = as_fact_id(id_or_key)
    if fact_id not in stored:
        raise FactNotFoundError(f"no fact with id {fact_id} in {where}")
    return fact_id


def removable(stored: dict[int, Fact], ids_or_keys: Iterable[int | str], where: object
              ) -> list[int]:
    """The ids of the stored facts with these database ids (int) or keys (str), sorted and
    unique, once every one of them is found."""
    if isinstance(ids_or_keys, (str, bytes)):  # not a list of one-letter keys
        raise TypeError(f"remove takes a list of ids or keys; for one key: "
                        f"remove([{ids_or_keys!r}])")
    try:
        return sorted({id_of(stored, i, where) for i in ids_or_keys})
    except FactNotFoundError as err:
        raise FactNotFoundError(f"{err}; nothing was removed") from None


def ids_of_edits(stored: dict[int, Fact], facts: Iterable[Fact], where: object) -> list[int]:
    """Ids of stored facts with the same edits as ``facts``, in order."""
    facts = list(facts)
    wrong = sorted({type(f).__name__ for f in facts if not isinstance(f, Fact)})
    if wrong:
        raise TypeError(f"ids_of takes Fact objects, got {', '.join(wrong)}")
    by_edit = {f.edit: i for i, f in stored.items()}
    for fact in facts:
        if fact.edit not in by_edit:
            raise FactNotFoundError(f"{where} holds no edit {fact.text!r} -> "
                                    f"{fact.target_new!r}")
    return [by_edit[f.edit] for f in facts]


def rekeyed(stored: dict[int, Fact], fact_id: int, fact: Fact, where: object) -> Fact:
    """``fact`` as the new version of stored fact ``fact_id``: it keeps the stored key
    unless it brings its own, which no other stored fact may have."""
    stored_key = stored[fact_id].key
    if fact.key is None:
        return replace(fact, key=stored_key)
    if fact.key != stored_key and any(f.key == fact.key for f in stored.values()):
        raise FactError(f"key {fact.key!r} is already used by fact "
                        f"{id_of(stored, fact.key, where)} in {where}")
    return fact


def editing_model(facts: list[Fact], model, tokenizer, config: NeuralDBConfig) -> tuple:
    """(model, tokenizer) to edit ``facts`` with; refuses a missing one, and facts that do
    not fit them."""
    if model is None or tokenizer is None:
        raise ValueError("a model and tokenizer are needed: pass them, open the database "
                         "with from_pretrained(path, model, tokenizer), or attach first")
    check_model_inputs(model, tokenizer)
    check_encodable(facts, model, tokenizer, config.prefixes, config.compute)
    return model, tokenizer


def check_keyed(stored: dict[int, Fact], facts: list[Fact], where: object) -> None:
    """Every fact carries the key of a stored fact (an update names what it re-edits)."""
    for fact in facts:
        if fact.key is None:
            raise FactError(f"{fact.text!r} -> {fact.target_new!r} has no key: "
                            "an update names the stored fact by its key")
        id_of(stored, fact.key, where)


def mates(stored: dict[int, Fact], ids: Iterable[int], residual_scope: str) -> list[int]:
    """Stored facts (not in ``ids``) whose residual is shared with a fact in ``ids``: those
    about the same subject when residuals are per subject, else none."""
    if residual_scope != "subject":
        return []
    ids = set(ids)
    subjects = {stored[i].subject for i in ids if i in stored}
    return sorted(i for i, f in stored.items() if f.subject in subjects and i not in ids)


def plan(stored: dict[int, Fact], edits: list[tuple[int | None, Fact]], removed: Sequence[int],
         next_id: int, residual_scope: str) -> tuple[list[int], list[tuple[int, Fact]]]:
    """The ids ``edits`` (stored id to re-edit, or None for a new fact; the fact) get, and
    every (id, fact) to compute: the edits, then the stored facts that share a residual
    with an edited or removed one."""
    ids = []
    for fact_id, _ in edits:
        ids.append(next_id if fact_id is None else fact_id)
        next_id += fact_id is None
    touched = {*removed, *(i for i, _ in edits if i is not None)}
    subjects = {f.subject for _, f in edits} | {stored[i].subject for i in touched}
    shared = [(i, f) for i, f in stored.items() if i not in touched
              and f.subject in subjects and residual_scope == "subject"]
    return ids, [*zip(ids, (f for _, f in edits)), *shared]


# what `NeuralDB.add` and its kin report progress to: (facts computed so far, fractions
# within a batch included; facts to compute)
ProgressCallback = Callable[[float, int], object]


class Writer:
    """Computes and stages entries into one database's store."""

    def __init__(self, store: Store, config: NeuralDBConfig, keys: KeySet):
        self.store, self.config, self.keys = store, config, keys

    def write(self, stored: dict[int, Fact], changes: list[tuple[int | None, Fact]],
              removed: Sequence[int], model, tokenizer,
              progress: bool | ProgressCallback = False, commit_each_batch: bool = False
              ) -> list[int]:
        """Commit ``changes`` (stored id to re-edit, or None for a new fact; the fact) and
        the removal of ``removed``, with the stored facts that share their residuals;
        returns the ids of ``changes`` in order. Called under the writer lock."""
        ids, todo = plan(stored, changes, removed, self.store.manifest.next_id,
                         self.config.compute.residual_scope)
        if todo:
            self.config.check_model(model, self.store.path)
        with unedited(model):
            self.commit(todo, removed, model, tokenizer, progress, commit_each_batch)
        return ids

    def commit(self, todo: list[tuple[int, Fact]], removed: Sequence[int], model, tokenizer,
               progress: bool | ProgressCallback = False, commit_each_batch: bool = False
               ) -> None:
        """Compute ``todo`` (id, fact) and commit it with the removal of ``removed``: at
        once, or batch by batch with ``commit_each_batch``. ``progress``: True shows a bar
        that moves with every optimization step; a callable is told (done, total) then."""
        done = 0.0

        def advance(facts: float) -> None:
            nonlocal done
            done = min(done + facts, len(todo))
            bar.update(facts)
            if callable(progress):
                progress(done, len(todo))

        with FactBar(len(todo), "edit", disable=progress is not True or not todo) as bar, \
                self.store.appending() as pending:
            if len(removed):
                pending.delete(np.asarray(removed, np.int64))
            for part in self.batches(todo):
                keys, residuals = self.compute(part, model, tokenizer, advance)
                self.stage(pending, [f for _, f in part], keys, residuals,
                           np.array([i for i, _ in part], np.int64))
                if commit_each_batch:
                    self.store.commit_now(pending)

    def commit_vectors(self, facts: list[Fact], keys: torch.Tensor | np.ndarray,
                       residuals: torch.Tensor | np.ndarray) -> list[int]:
        """Commit new facts whose keys and residuals were computed already; returns ids."""
        keys, residuals = torch.as_tensor(keys).float(), torch.as_tensor(residuals).float()
        shapes = self.config.entry_shapes()
        expected = ((len(facts), *shapes["keys"]), (len(facts), *shapes["residuals"]))
        if (tuple(keys.shape), tuple(residuals.shape)) != expected:
            raise ValueError(f"expected keys and residuals of shapes {expected}, got "
                             f"{tuple(keys.shape)} and {tuple(residuals.shape)}")
        with self.store.appending() as pending:
            return self.stage(pending, facts, keys, residuals, None)

    def stage(self, pending: Pending, facts: list[Fact], keys: torch.Tensor,
              residuals: torch.Tensor, ids: np.ndarray | None) -> list[int]:
        """Write one batch into ``pending`` (committed when its block ends)."""
        keys = torch.nn.functional.normalize(keys.float(), dim=-1)
        written = pending.append(
            keys.numpy().astype(self.config.key_dtype),
            residuals.float().numpy().astype(self.config.residual_dtype),
            [json.dumps(f.to_json(), ensure_ascii=False) for f in facts],
            ids=ids,
            key_scores=self.keys.background_scores(keys).numpy(),
        )
        return [int(i) for i in written]

    def batches(self, todo: list[tuple[int, Fact]]) -> list[list[tuple[int, Fact]]]:
        """``todo`` in batches of whole groups (facts sharing a residual): the unit of
        computation, also of the shards of a distributed build."""
        labels = self._group_labels(todo)
        return [[todo[n] for n in batch]
                for batch in pack_groups(labels, max(self.config.compute.batch_size, 1))]

    def compute(self, part: list[tuple[int, Fact]], model, tokenizer,
                advance: Callable[[float], object] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and residuals of one batch (see :meth:`batches`)."""
        cfg = self.config
        facts = [f for _, f in part]
        keys = compute_keys(model, tokenizer, facts, cfg.layer, cfg.prefixes,
                            split=cfg.compute.keys_per_fact > 1)
        residuals = compute_residuals(model, tokenizer, facts, cfg.layer, cfg.prefixes,
                                      cfg.compute, progress=advance,
                                      groups=self._group_labels(part))
        return keys, residuals

    def _group_labels(self, todo: list[tuple[int, Fact]]) -> list:
        per_subject = self.config.compute.residual_scope == "subject"
        return [f.subject if per_subject else i for i, f in todo]

