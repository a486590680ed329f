"""NeuralDBConfig: everything needed to reopen a database, saved as config.json beside it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ndb.compute import ComputeConfig

FORMAT_VERSION = 1


@dataclass
class NeuralDBConfig:
    model_name: str  # how to load the model again: an embedded name or a local directory
    model_type: str
    num_layers: int
    fingerprint: str  # of the edited layer's weights, see ndb.database.fingerprint
    layer: int
    module: str  # path of the edited FFN output projection
    d_key: int
    d_value: int
    gamma: float
    anchor_token_id: int
    prefixes: list[str]  # context prefixes keys and residuals were computed with
    seed: int = 0
    key_dtype: str = "float16"
    residual_dtype: str = "float32"
    index: str = "auto"
    # with several keys per fact, drop a key that generic text already reaches within this
    # margin of gamma (its best cosine with background.npy, the model's own text), keeping
    # at least one key per fact; None turns the guard off
    guard_margin: float | None = 0.05
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    # fingerprints of the embeddings and of layers 0..layer, all that keys depend on (see
    # ndb.database.input_fingerprints); empty in databases written before them, which
    # recorded the edited layer's fingerprint only
    input_fingerprints: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NeuralDBConfig:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"database format version {version} is not supported "
                             f"(this ndb reads version {FORMAT_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        data = dict(data)
        parts = data.get("input_fingerprints", {})
        if not (isinstance(parts, dict)
                and all(isinstance(v, str) for v in [*parts, *parts.values()])):
            raise ValueError("input_fingerprints must map part names to fingerprint strings")
        # databases written before these settings existed edit as the paper does
        compute = {"residual_scope": "fact", "kl_prompts": ["{} is a"], "kl_weight": 0.0625,
                   **data.get("compute", {})}
        data["compute"] = ComputeConfig(**compute)
        return cls(**data)

    @classmethod
    def read(cls, path: Path) -> NeuralDBConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
