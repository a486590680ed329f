"""ndb: a gated key-value fact database attached to a causal language model (NeuralDB).

Names are imported on first use, so that ``ndb`` commands which need no model start fast.
"""

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "ComputeConfig": "ndb.config",
    "ConfigError": "ndb.errors",
    "EditConfig": "ndb.config",
    "Fact": "ndb.facts",
    "FactError": "ndb.errors",
    "read_facts": "ndb.record_formats",
    "FactNotFoundError": "ndb.errors",
    "ModelMismatchError": "ndb.errors",
    "NeuralDB": "ndb.database",
    "NeuralDBConfig": "ndb.config",
    "NdbError": "ndb.errors",
    "LockedError": "ndb.errors",
    "StoreError": "ndb.errors",
    "anchor_tokenizer": "ndb.anchor",
    "attach": "ndb.database",
    "attached": "ndb.attachment",
    "load_model": "ndb.loading",
}

__all__ = [
    "ComputeConfig",
    "ConfigError",
    "EditConfig",
    "Fact",
    "FactError",
    "FactNotFoundError",
    "LockedError",
    "ModelMismatchError",
    "NdbError",
    "NeuralDB",
    "NeuralDBConfig",
    "StoreError",
    "anchor_tokenizer",
    "attach",
    "attached",
    "load_model",
    "read_facts",
]

if TYPE_CHECKING:
    from ndb.anchor import anchor_tokenizer
    from ndb.attachment import attached
    from ndb.config import ComputeConfig, EditConfig, NeuralDBConfig
    from ndb.database import NeuralDB, attach
    from ndb.errors import (
        ConfigError,
        FactError,
        FactNotFoundError,
        LockedError,
        ModelMismatchError,
        NdbError,
        StoreError,
    )
    from ndb.facts import Fact
    from ndb.loading import load_model
    from ndb.record_formats import read_facts


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ndb' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
