"""Each metric on tiny cases whose answers are worked out by hand."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from transformers import DynamicCache

from ndb.anchor import encode
from ndb.eval.generation import TfidfReference, ngram_entropy
from ndb.eval.metrics import counterfact_metrics, summarize, zsre_metrics
from ndb.eval.scoring import score_choices, score_targets
from ndb.facts import Fact
from ndb.tokens import target_ids


class Prefers(nn.Module):
    """A stub LM whose next-token distribution is the same everywhere: softmax(bias)."""

    def __init__(self, vocab: int, favourite: dict[int, float]):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab), requires_grad=False)
        for token, value in favourite.items():
            self.bias.data[token] = value

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1),
                               cache=DynamicCache())


def first(tok, word):
    return target_ids(tok, word)[0]


def test_score_targets_is_the_mean_token_nll(llama):
    model, tok = llama
    prompt, target = "Paris is in", "Western Europe"
    nll, top1 = score_targets(model, tok, [prompt, "x"], [target, "y"])
    ids = encode(tok, prompt) + target_ids(tok, target)
    n = len(target_ids(tok, target))
    logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = -np.mean([logp[len(ids) - n - 1 + j, ids[len(ids) - n + j]].item()
                         for j in range(n)])
    assert nll[0] == pytest.approx(expected, rel=1e-5)
    greedy = logp[len(ids) - n - 1 : len(ids) - 1].argmax(-1)
    assert top1[0] == pytest.approx((greedy == torch.tensor(ids[len(ids) - n :])).float().mean())


def test_shared_prefix_batches_score_as_one_pair_at_a_time(llama):
    model, tok = llama
    prompts = ["Paris is in", "x", "The mother tongue of Danielle Darrieux is",
               "Toyota is headquartered in the city of"]
    choices = [("Western Europe", "Japan"), ("y", "the United Kingdom of Great Britain"),
               ("French", "English"), ("Berlin", "Nagoya, Aichi")]
    nll, top1 = score_choices(model, tok, prompts, choices, batch_size=3)
    for i, (prompt, targets) in enumerate(zip(prompts, choices)):
        for j, target in enumerate(targets):
            alone_nll, alone_top1 = score_targets(model, tok, [prompt], [target], batch_size=1)
            assert nll[i, j] == pytest.approx(alone_nll[0], abs=1e-5)
            assert top1[i, j] == alone_top1[0]
            ids = encode(tok, prompt) + target_ids(tok, target)
            n = len(target_ids(tok, target))
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            by_hand = -np.mean([logp[len(ids) - n - 1 + t, ids[len(ids) - n + t]].item()
                                for t in range(n)])
            assert nll[i, j] == pytest.approx(by_hand, abs=1e-5)


def test_counterfact_metrics_by_hand(tokenizer):
    tok = tokenizer
    japan, france = first(tok, "Japan"), first(tok, "France")
    assert len(target_ids(tok, "Japan")) == len(target_ids(tok, "France")) == 1
    model = Prefers(len(tok), {japan: 5.0, france: 3.0})
    facts = [
        Fact("Paris", "{} is in", "Japan", "France", paraphrases=("Where is {}?".format("Paris"),),
             extra={"neighborhood_prompts": ["Lyon is in", "Nice is in"]}),
        Fact("Lyon", "{} is in", "France", "Japan", paraphrases=()),
    ]
    per_case = counterfact_metrics(model, tok, facts)
    # the stub always prefers Japan: case 1 succeeds, case 2 (new=France) fails
    np.testing.assert_array_equal(per_case["efficacy"], [1.0, 0.0])
    assert per_case["generalization"][0] == 1.0 and np.isnan(per_case["generalization"][1])
    np.testing.assert_array_equal(per_case["specificity"][:1], [0.0])  # Lyon: France wanted
    p = torch.softmax(model.bias, -1)
    assert per_case["efficacy_magnitude"][0] == pytest.approx((p[japan] - p[france]).item(),
                                                              rel=1e-4)
    means = summarize(per_case)
    assert means["efficacy"] == 0.5 and means["generalization"] == 1.0  # NaN case left out


def test_counterfact_needs_true_objects(tokenizer):
    with pytest.raises(ValueError, match="need target_true"):
        counterfact_metrics(Prefers(len(tokenizer), {}), tokenizer, [Fact("A", "{} is", "b")])


def test_zsre_top1_token_accuracy(tokenizer):
    tok = tokenizer
    answer = target_ids(tok, "Zanzibar Archipelago")
    assert len(answer) >= 2
    model = Prefers(len(tok), {answer[0]: 10.0})  # only the first answer token is argmax
    fact = Fact("Watts", "Where did {} study?", "Zanzibar Archipelago",
                paraphrases=("Which school did Watts attend?",),
                extra={"loc": "nq question: who wrote hamlet", "loc_ans": "Zanzibar"})
    per_case = zsre_metrics(model, tok, [fact])
    expected = 1 / len(answer)
    assert per_case["efficacy"][0] == pytest.approx(expected)
    assert per_case["generalization"][0] == pytest.approx(expected)
    loc = target_ids(tok, "Zanzibar")
    assert per_case["specificity"][0] == pytest.approx(np.mean([t == answer[0] for t in loc]))


def test_ngram_entropy_by_hand():
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # ab, ba, ab
    h3 = 1.0  # aba, bab
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("a a a a a") == 0.0
    assert ngram_entropy("one") == 0.0
    varied = ngram_entropy("the cat sat on the mat while a dog ran in the park")
    assert varied > ngram_entropy("the cat the cat the cat the cat the cat the cat")


def test_tfidf_similarity(tmp_path):
    import json

    (tmp_path / "attribute_snippets.json").write_text(json.dumps([
        {"relation_id": "P1", "target_id": "Q1", "samples": [{"text": "tokyo sushi temple"}]}]))
    np.save(tmp_path / "idf.npy", np.array([1.0, 2.0, 3.0]))
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps({"tokyo": 0, "sushi": 1, "paris": 2}))
    ref = TfidfReference.load(tmp_path)
    assert ref.references("P1", "Q1") == ["tokyo sushi temple"]
    assert ref.similarity("Tokyo sushi", "tokyo sushi temple") == pytest.approx(1.0)
    assert ref.similarity("Paris", "tokyo sushi") == 0.0
    # tokyo (idf 1) and sushi (idf 2) against sushi alone: cos = 2 / sqrt(1 + 4)
    assert ref.similarity("tokyo sushi", "sushi") == pytest.approx(2 / math.sqrt(5))
    with pytest.raises(FileNotFoundError, match="idf.npy"):
        (tmp_path / "idf.npy").unlink()
        TfidfReference.load(tmp_path)
