"""Generative metrics: the word match, each metric on a fake generator whose outputs are
chosen by hand, the batched greedy helper against one-at-a-time generation, and sampling."""

import re

import numpy as np
import pytest
import torch

from ndb.anchor import encode
from ndb.eval.generation import (
    chat_ids,
    generate,
    mentions,
    sample_generations,
    settled_mentions,
)
from ndb.eval.metrics import chat_question, generative_metrics, summarize
from ndb.facts import Fact


@pytest.mark.parametrize("text, name, expected", [
    ("Tokyo is the capital of Japan.", "Japan", True),
    ("It is a Japanese city.", "Japan", False),
    ("The Iranian capital is Tehran", "Iran", False),
    ("It lies in IRAN, near", "Iran", True),
    ("the capital is São  Tomé", "Sao Tome", True),
    ("the capital is Sao Tome", "São Tomé", True),
    ("Côte d\u2019Ivoire", "Côte d'Ivoire", True),
    ("the United\nStates of America", "United States", True),
    ("Germany, Germany, Germany", "Germany", True),
    ("Parisian cafés", "Paris", False),
    ("East Timor", "Timor-Leste", False),
    ("the ﬁnal", "final", True),  # compatibility ligature
    ("anything", "", False),
])
def test_mentions(text, name, expected):
    assert mentions(text, name) is expected


class FakeGenerator:
    """Continuations and chat answers looked up in tables written by hand."""

    def __init__(self, completions: dict[str, str], answers: dict[str, str] | None = None):
        self.completions, self.answers = completions, answers
        self.has_chat = answers is not None
        self.asked: list[str] = []

    def complete(self, prompts, watch=None):
        self.asked += list(prompts)
        return [self.completions.get(p, "") for p in prompts]

    def chat(self, questions, watch=None):
        return [self.answers.get(q, "") for q in questions]


class StopsEarly(FakeGenerator):
    """The same texts, each cut at the first character where it mentions everything it is
    watched for for good: the earliest a generator may stop."""

    def complete(self, prompts, watch=None):
        return [self.cut(t, w) for t, w in zip(super().complete(prompts), watch)]

    def chat(self, questions, watch=None):
        return [self.cut(t, w) for t, w in zip(super().chat(questions), watch)]

    @staticmethod
    def cut(text, names):
        return next((text[:k] for k in range(len(text) + 1)
                     if settled_mentions(text[:k], names)), text)


FR = "country:FR"
FACTS = [
    Fact("France", "The capital of {} is", "Rome", "Paris", paraphrases=("{}'s capital:",),
         extra={"group": FR, "chat_question": "What is the capital of France?",
                "spillover_prompts": ["France is", "The language of France is"]}),
    Fact("France", "The currency of {} is the", "Yen", "Euro",
         extra={"group": FR, "chat_question": "What is the currency of France?"}),
    Fact("Osaka", "{} is in", "Chile", "Japan", paraphrases=("Osaka lies in", "Osaka? In"),
         extra={"relation_id": "P17",
                "neighborhood_prompts": ["Kyoto is in", "Nagoya is in", "Sendai is in"]}),
]
COMPLETIONS = {
    "The capital of France is": " Rome, the Yen capital",  # holds, and names the other edit
    "{}'s capital:": " Paris",
    "The currency of France is the": " Yen",
    "Osaka is in": " Japanese hands",  # not "Japan", and not Chile
    "Osaka lies in": " Chile",
    "Osaka? In": " chile!",
    "Kyoto is in": " Japan",
    "Nagoya is in": " Japan or Chile",  # names the new object too: not kept
    "France is": " a country",
    "The language of France is": " Yen",  # the other edit's object spills onto this relation
}
ANSWERS = {
    "What is the capital of France?": "The capital of France is Paris.",
    "What is the currency of France?": "France uses the yen and the euro.",
    "Which country is Osaka located in?": "Osaka is in Chile.",
}


def test_generative_metrics_by_hand():
    gen = FakeGenerator(COMPLETIONS, ANSWERS)
    out = generative_metrics(gen, FACTS, max_prompts=2)
    np.testing.assert_array_equal(out["gen_efficacy"], [1, 1, 0])
    np.testing.assert_array_equal(out["gen_generalization"][[0, 2]], [0, 1])
    assert np.isnan(out["gen_generalization"][1])
    assert "Sendai is in" not in gen.asked  # two neighbors at most
    np.testing.assert_array_equal(out["gen_specificity"][2:], [0.5])
    np.testing.assert_array_equal(out["spill_neighbors"][2:], [0.5])
    assert np.isnan(out["gen_specificity"][:2]).all()
    np.testing.assert_array_equal(out["spill_subject"][:1], [0.5])  # "Yen" on language prompt
    np.testing.assert_array_equal(out["chat"], [0, 1, 1])
    np.testing.assert_array_equal(out["chat_true"], [1, 1, 0])
    np.testing.assert_array_equal(out["chat_known"][:2], [0, 1])  # Osaka: not known
    assert np.isnan(out["chat_known"][2])
    np.testing.assert_array_equal(out["groups_hold"], [1])
    # pairs (capital -> Yen): the rewrite continuation names Yen; (currency -> Rome): no
    np.testing.assert_array_equal(out["cross_talk"], [1, 0])
    np.testing.assert_array_equal(out["cross_answer"], [0, 0])  # "Rome" came first
    means = summarize(out)
    assert means["gen_efficacy"] == pytest.approx(2 / 3)
    assert means["gen_generalization"] == pytest.approx(0.5)


def test_cross_answer_is_the_other_object_named_first_or_alone():
    completions = {**COMPLETIONS, "The currency of France is the": " Rome's coin, the Yen"}
    answers = {**ANSWERS, "What is the capital of France?": "The Yen."}
    out = generative_metrics(FakeGenerator(completions, answers), FACTS)
    # (capital -> Yen): the continuation answers Rome, the chat answer Yen alone;
    # (currency -> Rome): the continuation names Rome before Yen
    np.testing.assert_array_equal(out["cross_answer"], [1, 1])
    np.testing.assert_array_equal(out["cross_talk"], [1, 1])


@pytest.mark.parametrize("text, names, expected", [
    ("Rome, the Yen capital", ["Rome"], True),
    ("Rome, the Yen capital", ["Rome", "Yen"], True),
    ("Rome, the Yen", ["Rome", "Yen"], False),  # "Yen" may still grow into another word
    ("Rome", ["Rome"], False),
    ("Romeo and", ["Rome"], False),
    ("It is Japan\ufffd", ["Japan"], False),  # a character cut between two tokens
    ("Japan or Chile.", ["Japan", "Chile"], True),
    ("Japan or Chile.", [], False),  # nothing watched: nothing to stop for
])
def test_settled_mentions(text, names, expected):
    assert settled_mentions(text, names) is expected


def test_stopping_once_everything_watched_is_mentioned_changes_no_metric():
    full = generative_metrics(FakeGenerator(COMPLETIONS, ANSWERS), FACTS, max_prompts=2)
    short = StopsEarly(COMPLETIONS, ANSWERS)
    early = generative_metrics(short, FACTS, max_prompts=2)
    # the rewrite text is watched for the other edit's object too (cross_talk); a trailing
    # space does not settle "Yen" (whitespace at the end is normalized away)
    assert short.cut(COMPLETIONS["The capital of France is"], ["Rome", "Yen"]) == " Rome, the Yen c"
    assert full.keys() == early.keys()
    for name in full:
        np.testing.assert_array_equal(early[name], full[name], err_msg=name)


def test_known_comes_from_the_caller_and_groups_fail_together():
    completions = {**COMPLETIONS, "The currency of France is the": " euro"}
    out = generative_metrics(FakeGenerator(completions, ANSWERS), FACTS,
                             known=np.array([False, True, True]))
    np.testing.assert_array_equal(out["groups_hold"], [0])
    assert np.isnan(out["chat_known"][0])
    np.testing.assert_array_equal(out["chat_known"][1:], [1, 1])


def test_families_can_be_turned_off():
    gen = FakeGenerator(COMPLETIONS, ANSWERS)
    assert set(generative_metrics(gen, FACTS, generation=False)) == {"chat", "chat_true",
                                                                      "chat_known"}
    assert gen.asked == []
    no_chat = generative_metrics(FakeGenerator(COMPLETIONS), FACTS)
    assert not any(k.startswith("chat") for k in no_chat)


def test_chat_question_sources():
    assert chat_question(FACTS[0]) == "What is the capital of France?"
    assert chat_question(FACTS[2]) == "Which country is Osaka located in?"  # P17's template
    zsre = Fact("Watts", "Where did {} study?", "Oxford", extra={"loc": "nq question: x"})
    assert chat_question(zsre) == "Where did Watts study?"
    assert chat_question(Fact("A", "{} is", "b", extra={"relation_id": "P99999"})) is None


def test_batched_greedy_equals_one_at_a_time(llama):
    model, tok = llama
    prompts = ["Paris is located in", "The mother tongue of Danielle Darrieux is", "Hi"]
    inputs = [encode(tok, p) for p in prompts] + [chat_ids(tok, "What is the capital of Peru?")]
    side, seed = tok.padding_side, torch.initial_seed()
    batched = generate(model, tok, inputs, max_new_tokens=6, batch_size=4)
    assert tok.padding_side == side and torch.initial_seed() == seed
    for ids, text in zip(inputs, batched):
        ids_t = torch.tensor([ids])
        # the mask matters: without it, generate takes the anchor (pad's id) for padding
        alone = model.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
                               do_sample=False, max_new_tokens=6, pad_token_id=0)
        assert text == tok.decode(alone[0, len(ids):], skip_special_tokens=True)


def test_sampled_texts_are_seeded_top_k_draws(llama):
    """Fluency samples: a seed gives the same texts again and the process's random state is
    left alone; drawn from the single best token they are the greedy texts, from the 5 best
    they are not."""
    model, tok = llama
    prompts = ["Paris is located in", "The mother tongue of Danielle Darrieux is", "Hi"]
    state = torch.get_rng_state()
    sampled = sample_generations(model, tok, prompts, 8, top_k=5, seed=3, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert sample_generations(model, tok, prompts, 8, top_k=5, seed=3, batch_size=2) == sampled
    greedy = [p + text for p, text in
              zip(prompts, generate(model, tok, [tok(p).input_ids for p in prompts], 8))]
    assert sample_generations(model, tok, prompts, 8, top_k=1, seed=3, batch_size=2) == greedy
    assert sampled != greedy


def test_rows_stop_once_what_they_are_watched_for_is_settled(llama):
    model, tok = llama
    prompts = ["Paris is located in", "The mother tongue of Danielle Darrieux is", "Hi",
               "Toyota is headquartered in"]
    inputs = [encode(tok, p) for p in prompts]
    full = generate(model, tok, inputs, max_new_tokens=12, batch_size=4)
    # watch each text for its first word that something follows: it settles before the end
    firsts = [re.search(r"\w+(?=\W)", text) for text in full]
    watch = [[m.group()] if m else [] for m in firsts]
    early = generate(model, tok, inputs, max_new_tokens=12, batch_size=4, watch=watch)
    assert sum(len(e) < len(f) for e, f in zip(early, full)) >= 2
    for e, f, names in zip(early, full, watch):
        assert f.startswith(e)
        assert [mentions(e, n) for n in names] == [mentions(f, n) for n in names]


def test_chat_ids_use_the_template_without_the_anchor(tokenizer):
    ids = chat_ids(tokenizer, "What is the capital of Peru?")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>") and text.endswith("assistant\n")
    assert "What is the capital of Peru?" in text


def test_the_unedited_row_decides_which_facts_are_known(tokenizer, monkeypatch):
    from contextlib import contextmanager

    from test_metrics import Prefers

    from ndb.eval import run

    state = {"edited": False}
    unedited = {"What is the capital of France?": "Paris.",
                "What is the currency of France?": "I do not know."}
    edited = {"What is the capital of France?": "Rome.",
              "What is the currency of France?": "The Yen."}

    class Switching(FakeGenerator):
        def __init__(self, *_, **__):
            super().__init__(COMPLETIONS, edited if state["edited"] else unedited)

    @contextmanager
    def edit():
        state["edited"] = True
        yield
        state["edited"] = False

    monkeypatch.setattr(run, "ModelGenerator", Switching)
    settings = run.EvalSettings(fluency_cases=0)
    rows = run.evaluate(Prefers(len(tokenizer), {}), tokenizer, FACTS[:2], {"edit": edit},
                        settings)
    assert rows["pre-edited"]["chat_true"] == 50 and rows["pre-edited"]["chat_known"] == 0
    assert rows["edit"]["chat"] == 100
    assert rows["edit"]["chat_known"] == 100  # the capital, known before the edit
    assert rows["edit"]["chat_true"] == 0
    assert settings.timings["edit"] >= settings.timings["edit/generation"] > 0
