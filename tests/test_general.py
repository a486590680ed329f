"""General-ability evaluation through lm-eval, on a tiny random model and the local data."""

from __future__ import annotations

import json
import os
import re

import pytest

pytest.importorskip("lm_eval", reason="needs the optional extra ndb[eval] (lm-eval)")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ndb.anchor import anchor_token_id, anchor_tokenizer  # noqa: E402
from ndb.eval.general import (  # noqa: E402
    DEFAULT_TASKS,
    KNOWN_TASKS,
    GeneralEvalError,
    general_ability,
    task_configs,
)

from conftest import SHARED_DATA  # noqa: E402

DATA = SHARED_DATA
pytestmark = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"the local benchmark data ({DATA}) is not on this machine"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ndb.loading import resolve_model_path

    return anchor_tokenizer(AutoTokenizer.from_pretrained(resolve_model_path(None)))


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context), tokenized the way lm-eval does: whole text, then split."""
    whole = tokenizer(context + continuation).input_ids
    n_ctx = len(tokenizer(context).input_ids)
    logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))


def test_arc_easy_matches_a_hand_computation(model, tokenizer):
    n = 10
    docs = [json.loads(line) for line in (DATA / "arc_easy.jsonl").open()][:n]
    acc = acc_norm = 0
    for doc in docs:
        context = doc["query"] + "\nAnswer:"  # lm-eval's "Question: {{question}}\nAnswer:"
        lls = [loglikelihood(model, tokenizer, context, " " + c) for c in doc["choices"]]
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]
        acc += max(range(len(lls)), key=lls.__getitem__) == doc["gold"]
        acc_norm += max(range(len(lls)), key=normed.__getitem__) == doc["gold"]

    result = general_ability(model, tokenizer, DATA, tasks=["arc_easy"], limit=n)["arc_easy"]
    assert result["n"] == n
    assert result["acc"] == pytest.approx(acc / n)
    assert result["acc_norm"] == pytest.approx(acc_norm / n)


def test_default_tasks_report_valid_scores(model, tokenizer):
    limit = 2
    results = general_ability(model, tokenizer, DATA, limit=limit)
    assert set(results) == set(DEFAULT_TASKS)
    for task in DEFAULT_TASKS:
        scores = results[task]
        assert scores["acc"] * scores["n"] == pytest.approx(round(scores["acc"] * scores["n"])), \
            task  # a share of the questions answered right
        assert scores["n"] == (57 * limit if task == "mmlu" else limit), task
    arc = results["arc_easy"]
    assert arc["acc_norm"] * arc["n"] == pytest.approx(round(arc["acc_norm"] * arc["n"]))
    assert results["lambada"]["perplexity"] > 1.0
    assert results["mmlu"]["subtasks"] == 57
    settings = results["wsc273"]["settings"]
    assert settings["add_bos_token"] is True
    assert settings["anchor_token_id"] == anchor_token_id(tokenizer)
    assert settings["limit"] == limit


def test_every_sequence_reaching_the_model_starts_with_the_anchor(model, tokenizer):
    first_tokens = []

    def record(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        first_tokens.extend(ids[:, 0].tolist())

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        general_ability(model, tokenizer, DATA, tasks=["wsc273", "lambada"], limit=3)
    finally:
        handle.remove()
    assert len(first_tokens) == 3 * 2 + 3  # two contexts per WSC doc, one request per LAMBADA
    assert set(first_tokens) == {anchor_token_id(tokenizer)}


def test_unknown_task_names_it_and_the_known_ones(model, tokenizer):
    with pytest.raises(ValueError, match="hellaswag") as err:
        general_ability(model, tokenizer, DATA, tasks=["arc_easy", "hellaswag"])
    assert all(name in str(err.value) for name in KNOWN_TASKS)


def test_missing_data_file_names_the_path(model, tokenizer, tmp_path):
    with pytest.raises(GeneralEvalError, match=re.escape(str(tmp_path / "winograd_wsc.jsonl"))):
        general_ability(model, tokenizer, tmp_path, tasks=["wsc273"])
    with pytest.raises(GeneralEvalError, match=re.escape(str(tmp_path / "mmlu" / "test"))):
        task_configs(tmp_path, ["mmlu"])
