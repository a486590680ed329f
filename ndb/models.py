"""The one table of where each model family keeps its FFN; a model's identity (a fingerprint
of its weights) and the edit defaults (layer, gamma) known for it. Loading a model by name
is ndb.loading's."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ndb.errors import ModelError

if TYPE_CHECKING:  # torch is imported where a model is at hand: reading a database needs none
    import torch
    from torch import nn


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its decoder layers and each layer's FFN output projection."""

    layers: str  # path from the top-level model to the list of decoder layers
    ffn_out: str  # path from a decoder layer to the FFN output projection (key in, value out)
    conv1d: bool = False  # GPT-2's Conv1D stores the weight transposed (in, out)


# model_type (config.model_type) -> family. The only architecture-specific knowledge in ndb.
FAMILIES: dict[str, Family] = {
    "llama": Family("model.layers", "mlp.down_proj"),
    "mistral": Family("model.layers", "mlp.down_proj"),
    "qwen2": Family("model.layers", "mlp.down_proj"),
    "qwen3": Family("model.layers", "mlp.down_proj"),
    "gemma": Family("model.layers", "mlp.down_proj"),
    "gemma2": Family("model.layers", "mlp.down_proj"),
    "phi3": Family("model.layers", "mlp.down_proj"),
    "olmo": Family("model.layers", "mlp.down_proj"),
    "phi": Family("model.layers", "mlp.fc2"),
    "gpt2": Family("transformer.h", "mlp.c_proj", conv1d=True),
    "gptj": Family("transformer.h", "mlp.fc_out"),
    "gpt_neox": Family("gpt_neox.layers", "mlp.dense_4h_to_h"),
}


def params_fingerprint(named_params: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Hash of parameters rounded to bfloat16, so that the same weights in float32 or
    bfloat16, on any device, hash the same."""
    import torch

    digest = hashlib.sha256()
    for name, param in sorted(named_params, key=lambda item: item[0]):
        digest.update(name.encode())
        rounded = param.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
        digest.update(rounded.numpy().tobytes())
    return digest.hexdigest()[:16]


def embedding_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every embedding table that feeds the decoder layers (tokens, and positions where the
    family has them), i.e. the embeddings outside the decoder layers."""
    from torch import nn

    layers = decoder_layers(model)
    inside = {id(p) for p in layers.parameters()}
    return [(f"{name}.{pname}", p)
            for name, module in model.named_modules() if isinstance(module, nn.Embedding)
            for pname, p in module.named_parameters() if id(p) not in inside]


def model_identity(model: nn.Module) -> str:
    """What the same weights share however they were loaded (embedded name, a local copy,
    another dtype): the architecture, its sizes and the embeddings' fingerprint."""
    config = model.config
    shape = (config.model_type, num_layers(model), *ffn_dims(model, 0))
    embeddings = params_fingerprint(embedding_params(model))
    return hashlib.sha256(repr((shape, embeddings)).encode()).hexdigest()[:16]


# Layer and gate chosen by a sweep on a dev set (benchmarks/sweep.py, results in
# benchmarks/results/sweep.md), by model_identity; other models start from the paper's
# proportions unless `ndb tune` found better ones (tuned_path).
DEFAULT_MODEL_IDENTITY = "2676d0564e939ee3"  # smollm2-135m, the embedded default
EDIT_DEFAULTS: dict[str, tuple[int, float]] = {DEFAULT_MODEL_IDENTITY: (6, 0.7)}
RULE_GAMMA = 0.65  # the gate for models nobody swept or tuned


@dataclass(frozen=True)
class EditDefaults:
    layer: int
    gamma: float
    source: str  # where they come from, said to the user


def tuned_path(identity: str) -> Path:
    """Where `ndb tune` keeps the (layer, gamma) it chose for a model."""
    return ndb_home() / "tuned" / f"{identity}.json"


def _read_tuned(path: Path, n_layers: int) -> tuple[int, float] | None:
    try:
        saved = json.loads(path.read_text())
        layer, gamma = saved["layer"], saved["gamma"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ModelError(f"{path}: unreadable tuned settings ({err}); run 'ndb tune' again "
                         f"or delete it") from None
    valid = (isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < n_layers
             and isinstance(gamma, (int, float)) and -1.0 <= gamma <= 1.0)
    if not valid:
        raise ModelError(f"{path}: layer {layer!r} / gamma {gamma!r} do not fit this model "
                         f"({n_layers} layers); run 'ndb tune' again or delete it")
    return layer, float(gamma)


def edit_defaults(model: nn.Module) -> EditDefaults:
    """(layer, gamma) for ``model`` and where they come from: tuned by `ndb tune`, else swept
    for the models in EDIT_DEFAULTS, else a quarter of the depth and gamma 0.65."""
    identity = model_identity(model)
    path = tuned_path(identity)
    tuned = _read_tuned(path, num_layers(model))
    if tuned is not None:
        return EditDefaults(*tuned, f"tuned by 'ndb tune', {path}")
    if identity in EDIT_DEFAULTS:
        return EditDefaults(*EDIT_DEFAULTS[identity], "swept for this model")
    return EditDefaults(max(1, round(0.25 * num_layers(model))), RULE_GAMMA,
                        "not tuned for this model: a quarter of its depth, gamma 0.65")


def default_edit_settings(model: nn.Module) -> tuple[int, float]:
    """(layer, gamma) for ``model``; see edit_defaults."""
    defaults = edit_defaults(model)
    return defaults.layer, defaults.gamma


def check_model_inputs(model: nn.Module, tokenizer=None) -> None:
    """Refuse, with a TypeError naming it, what is not a model or a tokenizer (before it
    fails as an AttributeError deep inside)."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a loaded torch model (nn.Module), got "
                        f"{type(model).__name__}; ndb.load_model loads one by name")
    if tokenizer is not None and not (callable(tokenizer) and hasattr(tokenizer, "decode")):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got "
                        f"{type(tokenizer).__name__}")


def family_of(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ModelError(f"model type {model_type!r} is not supported (known: {known})")
    return FAMILIES[model_type]


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_module(model, family_of(model).layers)


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def ffn_out_path(model: nn.Module, layer: int) -> str:
    """Path of ``layer``'s FFN output projection, e.g. ``model.layers.8.mlp.down_proj``."""
    family = family_of(model)
    n = num_layers(model)
    if not 0 <= layer < n:
        raise ModelError(f"layer {layer} is out of range: the model has {n} layers (0-{n - 1})")
    return f"{family.layers}.{layer}.{family.ffn_out}"


def ffn_out_weight(model: nn.Module, layer: int) -> torch.Tensor:
    """The projection's weight as (out, in) = (d2, d1), whatever the storage convention."""
    module = get_module(model, ffn_out_path(model, layer))
    return module.weight.T if family_of(model).conv1d else module.weight


def ffn_dims(model: nn.Module, layer: int) -> tuple[int, int]:
    """(d1, d2): key (intermediate) size and value (hidden) size of the edited projection."""
    d2, d1 = ffn_out_weight(model, layer).shape
    return int(d1), int(d2)


def ndb_home() -> Path:
    return Path(os.environ.get("NDB_HOME", Path.home() / ".cache" / "ndb"))
