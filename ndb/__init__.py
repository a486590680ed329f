"""ndb: a gated key-value fact database attached to a causal language model (NeuralDB)."""

from ndb.anchor import anchor_tokenizer
from ndb.compute import ComputeConfig
from ndb.config import NeuralDBConfig
from ndb.database import FactNotFoundError, ModelMismatchError, NeuralDB
from ndb.facts import Fact, FactError, read_facts
from ndb.models import load_model
from ndb.store import LockedError, StoreError

__all__ = [
    "ComputeConfig",
    "Fact",
    "FactError",
    "FactNotFoundError",
    "LockedError",
    "ModelMismatchError",
    "NeuralDB",
    "NeuralDBConfig",
    "StoreError",
    "anchor_tokenizer",
    "load_model",
    "read_facts",
]
