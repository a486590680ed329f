"""The user-facing behaviour on the real default model (SmolLM2-135M-Instruct)."""

import pytest
import torch

from ndb import NeuralDB, read_facts
from ndb.completion import complete
from ndb.demo import DEMO_FACTS
from ndb.eval.scoring import score_targets

pytestmark = pytest.mark.real

UNRELATED = ["The Great Wall of China is one of the most famous",
             "In mathematics, a prime number is"]


@pytest.fixture(scope="module")
def edited(real_model, tmp_path_factory):
    model, tok = real_model
    facts = [f for i, f in enumerate(read_facts(DEMO_FACTS)) if i % 3 == 0]  # 7 relations
    db = NeuralDB.create(tmp_path_factory.mktemp("real") / "db", model, tok)
    ids = db.add(facts)
    yield model, tok, db, facts, ids
    db.close()


def logits(model, tok, text):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def prefers_new(model, tok, prompts, facts):
    new, _ = score_targets(model, tok, prompts, [f.target_new for f in facts])
    true, _ = score_targets(model, tok, prompts, [f.target_true for f in facts])
    return new < true


def test_edits_hold_and_unrelated_text_is_untouched(edited):
    model, tok, db, facts, _ = edited
    plain = {t: logits(model, tok, t) for t in UNRELATED}
    assert not prefers_new(model, tok, [f.text for f in facts], facts).any()
    db.attach(model, tok)
    try:
        assert prefers_new(model, tok, [f.text for f in facts], facts).all()
        pairs = [(p, f) for f in facts for p in f.paraphrases]
        para = prefers_new(model, tok, [p for p, _ in pairs], [f for _, f in pairs])
        assert para.mean() >= 0.5
        for text, before in plain.items():
            assert torch.equal(logits(model, tok, text), before)
        answer = complete(model, tok, facts[0].text, 4)
        assert facts[0].target_new in answer
    finally:
        db.detach()


def test_removed_facts_revert_bit_for_bit(edited):
    model, tok, db, facts, ids = edited
    plain = logits(model, tok, facts[0].text)
    db.attach(model, tok)
    try:
        db.remove([ids[0]])
        assert torch.equal(logits(model, tok, facts[0].text), plain)
        assert prefers_new(model, tok, [f.text for f in facts[1:]], facts[1:]).all()
    finally:
        db.detach()
