"""A database attached to a model: the hook with its residual cache, which databases each
model has (``ndb.attached``), and how ``print(model)`` shows them. Attaching changes nothing
of the model but its hooks and the edited projection's ``extra_repr``; detaching removes
both. What is attached is recorded here, not on the user's model."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ndb.anchor import fixed_first_ids
from ndb.errors import ConfigError
from ndb.models import check_model_inputs, get_module
from ndb.residual_cache import ResidualCache
from ndb.retrieval import GatedRetrieval

if TYPE_CHECKING:
    from ndb.database import NeuralDB

# model -> its attachments, in the order they were made
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, list[Attachment]] = \
    weakref.WeakKeyDictionary()


class Attachment:
    """One database hooked into one model (refused if the model does not match)."""

    def __init__(self, db: NeuralDB, model: nn.Module, tokenizer, *, force: bool,
                 device: torch.device | str | None, cache_bytes: int):
        check_model_inputs(model, tokenizer)
        if not force:
            db.config.check_model(model, db.path)
        self.db, self.model = db, model
        self.projection = get_module(model, db.config.module)
        try:
            device = torch.device(device or next(model.parameters()).device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"{device!r} is not a torch device (e.g. cpu, cuda:0)") from None
        db.keys.move_to(device)
        self.residuals = ResidualCache(db.store, db.config.d_value, device, cache_bytes)
        anchor = db.config.anchor_token_id
        self.retrieval = GatedRetrieval(db.index, self.residuals, db.config.gamma, anchor,
                                        db.config.compute.keys_per_fact,
                                        fixed_first_ids(anchor, tokenizer, model))
        self.residuals.warm()
        self.retrieval.attach(model.base_model, self.projection)
        _ATTACHED.setdefault(model, []).append(self)
        if not isinstance(vars(self.projection).get("extra_repr"), _AttachedRepr):
            self.projection.extra_repr = _AttachedRepr(self.projection)

    def catch_up(self, changed: np.ndarray, deleted: np.ndarray) -> None:
        """After commits that wrote ``changed`` ids and deleted ``deleted`` ones (see
        Store.read_entries_since): search the new keys, forget the residuals that changed."""
        self.residuals.forget(np.concatenate([changed, deleted]))
        self.retrieval.index = self.db.keys.index

    def follow_gate(self) -> None:
        """After the database's gamma changed: gate with it, on the index kept for it."""
        self.retrieval.gamma = float(self.db.config.gamma)
        self.retrieval.index = self.db.index

    def detach(self) -> None:
        self.retrieval.detach()
        others = _ATTACHED.get(self.model, [])
        if self in others:
            others.remove(self)
        if not any(a.projection is self.projection for a in others):
            vars(self.projection).pop("extra_repr", None)


def attached(model: nn.Module) -> list[NeuralDB]:
    """The databases attached to ``model``, in the order they were attached."""
    return [a.db for a in _ATTACHED.get(model, [])]


class _AttachedRepr:
    """The edited projection's ``extra_repr`` while databases are attached, so that
    ``print(model)`` shows them there."""

    def __init__(self, projection: nn.Module):
        self.projection = projection

    def __call__(self) -> str:
        dbs = [a.db for attachments in _ATTACHED.values() for a in attachments
               if a.projection is self.projection]
        return ", ".join([type(self.projection).extra_repr(self.projection),
                          *(f"ndb={db!r}" for db in dbs)])


@contextmanager
def hooks_disabled(hooks: list[GatedRetrieval]) -> Iterator[None]:
    before = [h.enabled for h in hooks]
    for h in hooks:
        h.enabled = False
    try:
        yield
    finally:
        for h, state in zip(hooks, before):
            h.enabled = state


def unedited(model: nn.Module | None):
    """``model`` with every attached database off: keys and residuals must come from the
    unedited model, whatever is attached."""
    attachments = _ATTACHED.get(model, []) if model is not None else []
    return hooks_disabled([a.retrieval for a in attachments])
