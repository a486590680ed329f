import dataclasses

import numpy as np
import pytest
import torch

from ndb import nethook
from ndb.anchor import encode
from ndb.compute import compute_keys, encode_prompt
from ndb.eval.baselines.editors import WeightEditConfig, weight_scores
from ndb.eval.kvview import (
    describe,
    eval_prompts,
    gate_rates,
    gate_scores,
    plot_kv_view,
    score_rows,
    weight_score_view,
)
from ndb.models import ffn_out_path, get_module

from conftest import FACTS

LAYER = 2
PREFIX = "Hello there. "
# every fact gets a paraphrase that is its prompt behind a fixed prefix (keys are computed
# with the same prefix, so the subject position must be found exactly), and a neighbor
FACTS_EVAL = [
    dataclasses.replace(f, paraphrases=(PREFIX + f.text,),
                        extra={"neighborhood_prompts": [f.prompt.format("Someone else")]})
    for f in FACTS
]
GENERIC = ["The weather was fine and the children played outside until dark.",
           "A quiet evening, a book, and a cup of tea."]


@pytest.fixture
def bare_keys(llama):
    model, tok = llama
    return compute_keys(model, tok, FACTS_EVAL, LAYER, [""])


def test_own_prompt_matches_its_key_at_the_subject(llama, bare_keys):
    model, tok = llama
    prompts = eval_prompts(FACTS_EVAL, GENERIC)
    scores = gate_scores(model, tok, FACTS_EVAL, bare_keys, LAYER, prompts)
    rewrite = scores["rewrite"]
    np.testing.assert_allclose(rewrite["own"], 1.0, atol=1e-5)
    np.testing.assert_allclose(rewrite["own_top1"], 1.0, atol=1e-5)
    assert rewrite["best_is_own"].all()
    subject_last = [encode_prompt(tok, "", f.prompt, f.subject)[1] for f in FACTS_EVAL]
    assert rewrite["best_token"].tolist() == subject_last
    assert rewrite["fact"].tolist() == rewrite["best_fact"].tolist() == list(range(len(FACTS)))
    # one top-1 score per searched token: all but the anchor
    assert [len(t) for t in rewrite["top1"]] == [len(encode(tok, f.text)) - 1 for f in FACTS_EVAL]
    assert np.isnan(scores["generic"]["own"]).all()
    assert (scores["generic"]["fact"] == -1).all()
    assert (scores["generic"]["best"] < 0.999).all()


def test_paraphrase_position_and_own_key(llama):
    model, tok = llama
    keys = compute_keys(model, tok, FACTS_EVAL, LAYER, [PREFIX])
    prompts = {"paraphrase": eval_prompts(FACTS_EVAL)["paraphrase"]}
    scores = gate_scores(model, tok, FACTS_EVAL, keys, LAYER, prompts)
    np.testing.assert_allclose(scores["paraphrase"]["own"], 1.0, atol=1e-5)
    assert scores["paraphrase"]["best_is_own"].all()


def test_a_fact_with_two_keys_scores_its_best_key(llama, bare_keys):
    """Split keys (bare prompt, prefixed): the rewrite meets the first, the prefixed
    paraphrase the second; the fact index comes back, not the key's."""
    model, tok = llama
    split = compute_keys(model, tok, FACTS_EVAL, LAYER, ["", PREFIX], split=True)
    assert split.shape[:2] == (len(FACTS_EVAL), 2)
    prompts = eval_prompts(FACTS_EVAL)
    del prompts["neighborhood"]
    scores = gate_scores(model, tok, FACTS_EVAL, split, LAYER, prompts)
    for kind in ("rewrite", "paraphrase"):
        np.testing.assert_allclose(scores[kind]["own"], 1.0, atol=1e-5)
        np.testing.assert_allclose(scores[kind]["own_top1"], 1.0, atol=1e-5)
        assert scores[kind]["best_is_own"].all()
    with pytest.raises(ValueError, match="one key per fact"):
        weight_score_view(model, tok, FACTS_EVAL, LAYER, torch.eye(split.shape[-1]),
                          WeightEditConfig("memit", [LAYER]), keys=split)


def test_the_first_token_is_never_searched(llama, bare_keys):
    """A key equal to the anchor's (the same in every anchored input, the model being
    causal) would match position 0 of everything; the gate must never look there."""
    model, tok = llama
    rows = [encode(tok, t) for t in GENERIC]
    module = get_module(model, ffn_out_path(model, LAYER))
    sink = nethook.run_until(model, module, input_ids=torch.tensor([rows[0][:1]]))[0, 0]
    keys = torch.cat([bare_keys, sink[None]])
    both = score_rows(model, LAYER, rows, [None, None],
                      {"skip": (keys, True), "all": (keys, False)})
    np.testing.assert_allclose(both["all"]["best"], 1.0, atol=1e-5)
    assert (both["all"]["best_token"] == 0).all()
    assert (both["skip"]["best"] < 0.999).all()
    assert (both["skip"]["best_token"] > 0).all()
    generic = gate_scores(model, tok, [*FACTS_EVAL, FACTS_EVAL[0]], keys, LAYER,
                          {"generic": [(None, t) for t in GENERIC]})["generic"]
    np.testing.assert_allclose(generic["best"], both["skip"]["best"], atol=1e-6)


def test_neighbors_naming_an_edited_subject_are_left_out():
    facts = [dataclasses.replace(FACTS_EVAL[0], extra={"neighborhood_prompts": [
        "Lyon is located in the country of", "Toyota is located in the country of",
        "Toyotaville is located in the country of"]}), FACTS_EVAL[2]]
    texts = [t for _, t in eval_prompts(facts)["neighborhood"]]
    assert texts == ["Lyon is located in the country of",
                     "Toyotaville is located in the country of",
                     FACTS_EVAL[2].prompt.format("Someone else")]


def test_gate_rates_and_summary():
    scores = {"fact": np.array([0, 1, -1]), "own_top1": np.array([0.9, np.nan, np.nan]),
              "best": np.array([0.9, 0.7, 0.5]),
              "top1": [np.array([0.9, 0.1]), np.array([0.7]), np.array([0.5, 0.2])]}
    assert gate_rates(scores, 0.65) == {"own_hit": 0.5, "any_gate": 2 / 3, "token_gate": 0.4}
    assert gate_rates(scores, 0.95) == {"own_hit": 0.0, "any_gate": 0.0, "token_gate": 0.0}
    s = describe([1.0, 2.0, np.nan, 3.0])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["q50"] == 2.0 and s["max"] == 3.0


@pytest.mark.parametrize("config", [
    WeightEditConfig("memit", [LAYER], mom2_weight=1e-6),
    # a threshold above every eigenvalue makes the null space everything: P = I
    WeightEditConfig("alphaedit", [LAYER], l2=1e-6, null_threshold=1e9),
])
def test_weight_view_retrieves_the_whole_own_residual(llama, bare_keys, config):
    """With a negligible preservation term, w = K^T (K K^T)^+ k_i = e_i at the subject."""
    model, tok = llama
    moment = torch.eye(bare_keys.shape[1])
    view = weight_score_view(model, tok, FACTS_EVAL, LAYER, moment, config, keys=bare_keys)
    n = len(FACTS_EVAL)
    assert set(view) == {"rewrite", "paraphrase", "neighborhood"}
    rewrite = view["rewrite"]
    assert rewrite["positive"].shape == rewrite["negative_max"].shape == (n,)
    np.testing.assert_allclose(rewrite["positive"], 1.0, atol=1e-3)
    np.testing.assert_allclose(rewrite["negative_max"], 0.0, atol=1e-3)
    assert rewrite["rank1"].all()
    assert rewrite["negative_sample"].shape == (n * (n - 1),)
    assert abs(rewrite["negative_mean"]) < 1e-3
    assert view["neighborhood"]["fact"].tolist() == list(range(n))
    # paraphrases put the subject behind a prefix: keys with that prefix must match there
    prefixed = compute_keys(model, tok, FACTS_EVAL, LAYER, [PREFIX])
    view = weight_score_view(model, tok, FACTS_EVAL, LAYER, moment, config, keys=prefixed)
    assert view["paraphrase"]["positive"].shape == (n,)
    np.testing.assert_allclose(view["paraphrase"]["positive"], 1.0, atol=1e-3)


def test_weight_view_neighbors_take_the_most_leaking_token(llama, bare_keys):
    """Per neighborhood prompt: the w of the token (anchor excluded) with the largest |w| of
    the neighbored fact, checked against weight_scores on each prompt alone. Fact 0's key is
    the anchor's, so that including the anchor would win that prompt."""
    model, tok = llama
    module = get_module(model, ffn_out_path(model, LAYER))
    sink = nethook.run_until(model, module, input_ids=torch.tensor([encode(tok, "")]))[0, 0]
    keys = torch.cat([sink[None], bare_keys[1:]])
    config = WeightEditConfig("memit", [LAYER], mom2_weight=1e-3)
    moment = torch.eye(keys.shape[1])
    view = weight_score_view(model, tok, FACTS_EVAL, LAYER, moment, config, keys=keys)
    for i, text in eval_prompts(FACTS_EVAL)["neighborhood"]:
        x = nethook.run_until(model, module, input_ids=torch.tensor([encode(tok, text)]))[0, 1:]
        w = weight_scores(keys, x, moment, config)
        expected = w[w[:, i].abs().argmax()]
        torch.testing.assert_close(torch.tensor(view["neighborhood"]["positive"][i]),
                                   expected[i], rtol=1e-4, atol=1e-6)
        others = torch.cat([expected[:i], expected[i + 1:]])
        torch.testing.assert_close(torch.tensor(view["neighborhood"]["negative_max"][i]),
                                   others.max(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="single-layer"):
        weight_score_view(model, tok, FACTS_EVAL, LAYER, moment,
                          WeightEditConfig("memit", [1, LAYER]), keys=keys)


def test_plot(llama, bare_keys, tmp_path):
    model, tok = llama
    gate = gate_scores(model, tok, FACTS_EVAL, bare_keys, LAYER, eval_prompts(FACTS_EVAL, GENERIC))
    config = WeightEditConfig("memit", [LAYER])
    view = weight_score_view(model, tok, FACTS_EVAL, LAYER, torch.eye(bare_keys.shape[1]), config,
                             keys=bare_keys)
    path = plot_kv_view({"one key": gate}, {"MEMIT": view}, 0.65, tmp_path / "view.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
