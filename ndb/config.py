"""What a database is built with: ``EditConfig``, the choices a user makes (layer, gamma,
index, ...), and ``NeuralDBConfig``, everything needed to reopen the database (those choices
plus what the model they were made for looks like), saved in the database's directory."""

from __future__ import annotations

import math
import numbers
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from torch import nn

from ndb import store
from ndb.anchor import anchor_token_id
from ndb.compute import ComputeConfig, context_prefixes
from ndb.errors import ConfigError, ModelMismatchError, StoreError
from ndb.indexes import APPROXIMATE, check_kind
from ndb.models import (
    decoder_layers,
    default_edit_settings,
    embedding_params,
    ffn_dims,
    ffn_out_path,
    num_layers,
    params_fingerprint,
)

FORMAT_VERSION = 1


def _has_type(value: object, hint: object) -> bool:
    """Whether a value read from JSON fits a field's type (int is a float; bool is not
    an int)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if origin in (list, tuple):  # JSON gives a list for both, a config in memory either
        return isinstance(value, (list, tuple)) and all(_has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _has_type(k, args[0]) and _has_type(v, args[1]) for k, v in value.items())
    if hint is type(None):
        return value is None
    if hint is float:
        return _is_integer(value) or isinstance(value, float)
    if hint is int:
        return _is_integer(value)
    return isinstance(value, hint)


# ComputeConfig options that were measured, rejected and removed (chat context and chat KL
# rows, contrast term: benchmarks/results/sweep_method*.md); databases stored them off
REMOVED_OPTIONS = {"chat_context": False, "chat_kl": False, "contrast_weight": 0.0}


def check_types(cls: type, data: dict, where: str = "") -> None:
    """Refuse a stored config whose values do not have its dataclass's field types (a
    database directory is untrusted input: a string gamma must fail here, not deep inside a
    search)."""
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        hint = hints.get(name)
        if hint is not None and hint is not ComputeConfig and not _has_type(value, hint):
            raise ValueError(f"config field {where}{name} is {value!r}, not of type "
                             f"{getattr(hint, '__name__', hint)}")


def check_gamma(gamma: float) -> None:
    """The gate is a cosine threshold in [0, 1]: below 0 a key would pass for vectors
    pointing away from it, so nearly every token would be edited."""
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0 <= gamma <= 1:
        raise ConfigError(f"gamma must be a number in [0, 1] (a cosine threshold), "
                          f"got {gamma!r}")


def check_calibration(calibration: dict | None) -> None:
    """Refuse a stored index calibration whose settings an index could not search with."""
    if calibration is None:
        return
    expected = {"kind", "gamma", "n_keys", "probe_fraction", "coarse_margin"}
    if set(calibration) != expected:
        raise ValueError(f"config field index_calibration must have the fields "
                         f"{', '.join(sorted(expected))}")
    values = calibration["gamma"], calibration["probe_fraction"], calibration["coarse_margin"]
    gamma, fraction, margin = (v if _has_type(v, float) else math.nan for v in values)
    n_keys = calibration["n_keys"]
    if (calibration["kind"] not in APPROXIMATE or not 0 <= gamma <= 1
            or not 0 < fraction <= 1 or not (values[2] is None or 0 <= margin <= 2)
            or not _is_integer(n_keys) or not 1 <= n_keys <= 2 ** 62):
        raise ValueError(f"config field index_calibration is {calibration!r}, which no "
                         "approximate index can search with")


def _is_integer(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


@dataclass
class EditConfig:
    """How ``NeuralDB.create`` edits: like a PEFT config, built by the user and passed in.
    ``layer`` and ``gamma`` default to the values known for the model (see
    ndb.models.edit_defaults); everything is checked when the config is made."""

    layer: int | None = None
    gamma: float | None = None
    seed: int = 0
    index: str = "auto"  # a backend of ndb.indexes, or "auto" (by size and device)
    key_dtype: str = "float16"
    residual_dtype: str = "float32"
    compute: ComputeConfig | None = None  # None: ComputeConfig()

    def __post_init__(self) -> None:
        if self.gamma is not None:
            check_gamma(self.gamma)
        check_kind(self.index, auto=True)
        for name in ("key_dtype", "residual_dtype"):
            if getattr(self, name) not in ("float16", "float32"):
                raise ConfigError(f"{name} must be float16 or float32, "
                                  f"got {getattr(self, name)!r}")
        if self.layer is not None and not _is_integer(self.layer):
            raise ConfigError(f"layer must be an integer, got {self.layer!r}")
        if not _is_integer(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        self.compute = self.compute or ComputeConfig()


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


@dataclass
class NeuralDBConfig:
    model_name: str  # how to load the model again: an embedded name or a local directory
    model_type: str
    num_layers: int
    fingerprint: str  # of the edited layer's weights, see fingerprint above
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
    # how the last calibration tuned an approximate index (see KeySet.calibrate): its kind,
    # gamma and number of keys then, and the index's ``tuning()``; None before any
    index_calibration: dict[str, str | float | None] | None = None
    # fingerprints of the embeddings and of layers 0..layer, all that keys depend on (see
    # input_fingerprints above); empty in databases written before them, which
    # recorded the edited layer's fingerprint only
    input_fingerprints: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer, edit: EditConfig) -> NeuralDBConfig:
        """The config of a new database that edits ``model`` as ``edit`` says."""
        layer, gamma = edit.layer, edit.gamma
        if layer is None or gamma is None:  # defaults are looked up only when needed
            default_layer, default_gamma = default_edit_settings(model)
            layer = default_layer if layer is None else layer
            gamma = default_gamma if gamma is None else gamma
        layer = int(layer)
        module = ffn_out_path(model, layer)  # first: it refuses a layer the model lacks
        d_key, d_value = ffn_dims(model, layer)
        compute = edit.compute
        return cls(
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
                                      compute.prefix_tokens, edit.seed),
            seed=int(edit.seed),
            key_dtype=edit.key_dtype,
            residual_dtype=edit.residual_dtype,
            index=edit.index,
            compute=compute,
        )

    def entry_shapes(self) -> dict[str, tuple[int, ...]]:
        """The per-fact shape of each stored dataset, which every segment must have."""
        per_fact = self.compute.keys_per_fact
        scores = (per_fact,) if per_fact > 1 else ()
        return {"keys": (*scores, self.d_key), "residuals": (self.d_value,),
                "key_scores": scores}

    def check_model(self, model: nn.Module, where: object) -> None:
        """Refuse a model that differs from the one the database at ``where`` was built
        for (see ``mismatch``)."""
        problem = self.mismatch(model)
        if problem:
            built_for = repr(self.model_name) if self.model_name else "a model without a name"
            raise ModelMismatchError(f"{where} was built for {built_for}; this model does "
                                     f"not match: {problem}")

    def mismatch(self, model: nn.Module) -> str | None:
        """How ``model`` differs from the one this database was built for in what its keys
        depend on (the first difference found), or None."""
        if getattr(model.config, "model_type", None) != self.model_type:
            return f"model type {model.config.model_type!r} != {self.model_type!r}"
        if num_layers(model) != self.num_layers:
            return f"{num_layers(model)} layers != {self.num_layers}"
        if ffn_dims(model, self.layer) != (self.d_key, self.d_value):
            return f"FFN dims {ffn_dims(model, self.layer)} != {(self.d_key, self.d_value)}"
        if self.input_fingerprints:
            found = input_fingerprints(model, self.layer)
            differ = [part for part, saved in self.input_fingerprints.items()
                      if found.get(part) != saved]
            return f"the weights of {', '.join(differ)} differ" if differ else None
        if fingerprint(model, self.layer) != self.fingerprint:
            # written before input_fingerprints: only the edited layer was recorded
            return (f"the weights of layer {self.layer} differ (fingerprint "
                    f"{fingerprint(model, self.layer)} != {self.fingerprint})")
        return None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def read(cls, path: Path) -> NeuralDBConfig:
        """The config of the database at ``path``; one that does not parse is refused."""
        try:
            return cls.from_dict(store.read_config(path))
        except (ValueError, TypeError) as err:
            raise StoreError(f"{store.config_file(path)}: {err}") from None

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
        check_types(cls, data)
        check_calibration(data.get("index_calibration"))
        if not isinstance(data.get("compute", {}), dict):
            raise ValueError("config field compute is not a mapping of settings")
        check_types(ComputeConfig, data.get("compute", {}), "compute.")
        stored = dict(data.get("compute", {}))
        for name, off in REMOVED_OPTIONS.items():
            value = stored.pop(name, off)
            if value != off:
                warnings.warn(f"the database was built with compute.{name}="
                              f"{repr(value)[:40]}, an option ndb no longer has; facts added "
                              "or re-edited now are computed without it", stacklevel=2)
        # databases written before these settings existed edit as the paper does
        compute = {"residual_scope": "fact", "kl_prompts": ["{} is a"], "kl_weight": 0.0625,
                   "clamp_grows_with_group": False, "group_loss": "mean", "extra_steps": 0,
                   **stored}
        data["compute"] = ComputeConfig(**compute)
        return cls(**data)
