"""Shared fixtures: tiny random models of each supported family, and the real default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf

from ndb.anchor import anchor_tokenizer
from ndb.facts import Fact

ROOT = Path(__file__).resolve().parents[1]
# the project's shared data sits in ../shared beside the repository; a worktree of it may be
# a level or two further down, so the nearest ancestor that has it is taken
SHARED_DATA = next((parent / "shared" / "data" / "general" for parent in ROOT.parents
                    if (parent / "shared" / "data" / "general").is_dir()),
                   ROOT.parent / "shared" / "data" / "general")

TINY = dict(vocab_size=49152, num_hidden_layers=4)
FAMILY_CONFIGS = {
    "llama": lambda: tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                     num_key_value_heads=2, **TINY),
    "mistral": lambda: tf.MistralConfig(hidden_size=64, intermediate_size=96,
                                        num_attention_heads=4, num_key_value_heads=2, **TINY),
    "qwen2": lambda: tf.Qwen2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                    num_key_value_heads=2, **TINY),
    "gpt2": lambda: tf.GPT2Config(vocab_size=49152, n_embd=64, n_layer=4, n_head=4, n_inner=96,
                                  bos_token_id=0, eos_token_id=0),
    "gptj": lambda: tf.GPTJConfig(vocab_size=49152, n_embd=64, n_layer=4, n_head=4, n_inner=96,
                                  rotary_dim=8, bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=96,
                                         num_attention_heads=4, bos_token_id=0, eos_token_id=0,
                                         **TINY),
    "phi": lambda: tf.PhiConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                **TINY),
}

FACTS = [
    Fact("Paris", "{} is located in the country of", "Japan", "France"),
    Fact("Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
    Fact("Toyota", "{} is headquartered in", "Berlin", "Japan"),
    Fact("Lionel Messi", "{} plays the sport of", "tennis", "soccer"),
]


def tiny_model(family: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(FAMILY_CONFIGS[family]())
    model.eval().requires_grad_(False)
    model.config.name_or_path = f"tiny-{family}"
    return model


@pytest.fixture(scope="session")
def tokenizer():
    from ndb.loading import resolve_model_path

    return anchor_tokenizer(tf.AutoTokenizer.from_pretrained(resolve_model_path(None)))


@pytest.fixture
def llama(tokenizer):
    return tiny_model("llama"), tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny model saved as a local Hugging Face directory, for CLI tests."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def real_model():
    from ndb.loading import load_model

    return load_model()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# A few steps and no extra ones: a tiny random model never makes its objects greedy, so every
# fact would take all the extra steps, and over a hundred Adam steps the float noise between
# batch compositions grows past the tolerances of the tests that compare residuals across
# batches (extra steps have their own test, test_compute.py)
FAST_COMPUTE = dict(n_prefixes=2, prefix_tokens=5, steps=4, extra_steps=0, batch_size=4)


@pytest.fixture
def exact_compute():
    """No sampled prefixes: a rewrite prompt then reproduces its stored key exactly."""
    from ndb import ComputeConfig

    return ComputeConfig(**{**FAST_COMPUTE, "n_prefixes": 0})


@pytest.fixture
def db(tmp_path, llama, exact_compute):
    """The four FACTS, edited at layer 2 with a strict gate."""
    from ndb import NeuralDB

    model, tok = llama
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=2, gamma=0.9, compute=exact_compute)
    db.add(FACTS)
    return db
