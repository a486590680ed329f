"""What a database is built with: ``EditConfig``, the choices a user makes (layer, gamma,
index, ...), with ``ComputeConfig``, how keys and residuals are computed, and
``NeuralDBConfig``, everything needed to reopen the database (those choices plus what the
model they were made for looks like), saved in the database's directory."""

from __future__ import annotations

import math
import numbers
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ndb import store
from ndb.anchor import anchor_token_id
from ndb.errors import ConfigError, ModelMismatchError, StoreError
from ndb.indexes import APPROXIMATE, check_kind
from ndb.models import (
    check_model_inputs,
    decoder_layers,
    default_edit_settings,
    embedding_params,
    ffn_dims,
    ffn_out_path,
    num_layers,
    params_fingerprint,
)

if typing.TYPE_CHECKING:  # reading a database (ndb list, ndb info) needs no torch
    from torch import nn

FORMAT_VERSION = 1


@dataclass
class ComputeConfig:
    """Hyper-parameters of key and residual computation: MEMIT's, unless marked "ndb". Why
    each ndb default won, and on what: the README ("Several facts about one subject" for the
    residuals, "Results" for the keys), from the result files named here."""

    n_prefixes: int = 5  # model-sampled context prefixes, beside the bare prompt
    # ndb: how many of those prefixes the residual is optimized in (None: all; keys use all):
    # 2 built 1.5-2.1x faster at 87.8 against 88.0 on the dev sets (sweep_method_both.md)
    residual_prefixes: int | None = None
    prefix_tokens: int = 10  # length of each sampled prefix
    steps: int = 25  # Adam steps every fact takes (unless its loss falls below stop_loss)
    # ndb: at most this many more steps for a group whose new objects are not yet the greedy
    # choice at every token of every one of its prompts (sweep_method_both.md)
    extra_steps: int = 75
    lr: float = 0.5
    # ndb: 1.0 (MEMIT: 0.0625 on "{} is a" alone); with the restatement probes of kl_prompts
    # any lighter, the cheapest way to the new object is to turn the subject into another
    # entity (same_subject.md)
    kl_weight: float = 1.0
    weight_decay: float = 0.5  # times ||delta|| / ||h||^2
    clamp: float = 0.75  # ||delta|| <= clamp * ||h||, h the residual stream at the subject
    # ndb: a residual shared by k facts may grow to clamp * sqrt(k) * ||h||; with group_loss
    # "sum" and the extra steps it won the dev sets together (sweep_method_both.md)
    clamp_grows_with_group: bool = True
    # ndb: "sum": each edit of a shared residual weighs against the KL term as a fact alone
    # does; "mean": k edits share one weight
    group_loss: str = "sum"
    stop_loss: float = 0.05  # a fact stops once its loss falls below this
    batch_size: int = 32  # facts optimized together
    # ndb: the bare-prompt key and the mean of the prefixed keys kept as two keys of the
    # fact, not averaged: higher recall at a higher gamma; a bare key that reads like a
    # function word is caught by the key guard (sweep.md, key_guard.md)
    split_keys: bool = True
    # "bfloat16": the FFNs from the edited layer up and the LM head under autocast (see
    # _precision); 1.36x faster on 32 dev facts (build_speed_bf16.md), but 87.0 against 88.0
    # on the dev sets (fewer chat answers on the groups dev set, sweep_method_both_bf16.md),
    # so float32 stays the default
    precision: str = "float32"
    # ndb: "subject" gives every fact about one subject one residual, optimized on the
    # prompts of all of them together; "fact" is the paper's one residual per fact
    # (same_subject.md)
    residual_scope: str = "subject"
    # prompts whose next-token distribution after the subject must not move (KL term):
    # ROME's "{} is a", and two that make the model still restate the subject as itself
    kl_prompts: tuple[str, ...] = (
        "{} is a",
        "{}. The name above is",
        "Tell me about {}. Sure! Here is what I know about",
    )

    def __post_init__(self) -> None:
        self.kl_prompts = tuple(self.kl_prompts)  # JSON gives a list
        if self.residual_prefixes is not None and not 0 <= self.residual_prefixes <= \
                self.n_prefixes:
            raise ValueError(f"residual_prefixes must be None or 0..n_prefixes "
                             f"({self.n_prefixes}), got {self.residual_prefixes!r}")
        if self.group_loss not in ("sum", "mean"):
            raise ValueError(f"group_loss must be 'sum' or 'mean', got {self.group_loss!r}")
        if self.residual_scope not in ("subject", "fact"):
            raise ValueError(f"residual_scope must be 'subject' or 'fact', got "
                             f"{self.residual_scope!r}")
        if not self.kl_prompts or any(p.count("{}") != 1 for p in self.kl_prompts):
            raise ValueError("kl_prompts must be prompts with exactly one '{}' each")

    @classmethod
    def paper(cls, **overrides) -> ComputeConfig:
        """The paper's residuals (MEMIT's): one per fact, with ROME's single KL prompt at
        MEMIT's weight; keys as ndb computes them. For comparison with ndb's defaults."""
        return cls(**{"residual_scope": "fact", "kl_prompts": ("{} is a",), "kl_weight": 0.0625,
                      "extra_steps": 0, **overrides})

    @property
    def keys_per_fact(self) -> int:
        return 2 if self.split_keys and self.n_prefixes > 0 else 1

    def to_dict(self) -> dict:
        return asdict(self)


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


def check_ranges(data: dict) -> None:
    """Refuse a stored config whose numbers are of the right type but impossible (the types
    are checked first)."""
    if "gamma" in data:
        check_gamma(data["gamma"])
    n_layers = data.get("num_layers", 0)
    for name, low, high in (("num_layers", 1, 1 << 16), ("layer", 0, n_layers - 1),
                            ("d_key", 1, 1 << 20), ("d_value", 1, 1 << 20)):
        if name in data and not low <= data[name] <= high:
            raise ValueError(f"config field {name} is {data[name]}, not in {low}..{high}")
    margin = data.get("guard_margin")
    if margin is not None and not 0 <= margin <= 2:
        raise ValueError(f"config field guard_margin is {margin!r}, not in [0, 2]")


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
    # how the last calibration tuned an approximate index (see ndb.calibration): its kind,
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
        from ndb.compute import context_prefixes  # the model's own text, sampled with torch

        check_model_inputs(model, tokenizer)
        if not isinstance(edit.compute, ComputeConfig):
            raise TypeError(f"compute must be a ComputeConfig, got {type(edit.compute).__name__}")
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
        check_model_inputs(model)
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
        check_ranges(data)
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


def read_database(path: Path) -> tuple[NeuralDBConfig, store.Store]:
    """The config and the store of the database at ``path``, its layout checked first: all
    that reading its facts needs, with no model and no torch (``ndb list``, ``ndb info``)."""
    store.check_layout(path)
    config = NeuralDBConfig.read(path)
    return config, store.Store(path, config.entry_shapes())
