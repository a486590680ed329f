import json
import warnings

import numpy as np
import pytest
import torch

from ndb import ComputeConfig, Fact, ModelMismatchError, NeuralDB
from ndb.errors import FactNotFoundError, StoreError

from conftest import FACTS, FAST_COMPUTE, tiny_model

# no sampled prefixes: a rewrite prompt then reproduces its stored key exactly (cosine ~1)
EXACT = ComputeConfig(**{**FAST_COMPUTE, "n_prefixes": 0})
EDITED = [f.text for f in FACTS]
UNRELATED = ["The weather was mild that spring and the", "She opened the door slowly"]


def logits(model, tok, texts, padding_side="right"):
    tok.padding_side = padding_side
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits, enc["attention_mask"].bool()


def test_edits_change_edited_prompts_only(db, llama):
    model, tok = llama
    before_edited, _ = logits(model, tok, EDITED[:1])
    before_other, _ = logits(model, tok, UNRELATED[:1])
    db.attach(model)
    after_edited, _ = logits(model, tok, EDITED[:1])
    after_other, _ = logits(model, tok, UNRELATED[:1])
    assert not torch.equal(before_edited, after_edited)
    assert torch.equal(before_other, after_other)  # bit for bit
    assert db.retrieval.stats.hits >= 1
    with db.disabled():
        assert torch.equal(logits(model, tok, EDITED[:1])[0], before_edited)
    db.detach()
    assert torch.equal(logits(model, tok, EDITED[:1])[0], before_edited)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_triggers_and_batching_changes_nothing(db, llama, side):
    model, tok = llama
    texts = [EDITED[1], UNRELATED[1], EDITED[0]]
    db.attach(model)
    batched, mask = logits(model, tok, texts, side)
    for i, text in enumerate(texts):
        alone, _ = logits(model, tok, [text])
        torch.testing.assert_close(batched[i][mask[i]], alone[0], atol=1e-4, rtol=1e-4)
    tok.padding_side = "right"


def test_first_position_is_never_searched(tmp_path, llama):
    """Without the anchor the subject is the first token, an attention sink: no search."""
    model, tok = llama
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=2, gamma=0.0, compute=EXACT)
    db.add(FACTS[:1])
    db.attach(model)
    raw = tok("Paris", add_special_tokens=False, return_tensors="pt")
    with pytest.warns(UserWarning, match="anchor token"):
        with torch.no_grad():
            model(**raw)
    assert db.retrieval.stats.searched == 0  # one token, and it is the first
    anchored = tok("Paris", return_tensors="pt")  # anchor + Paris: Paris is searched
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**anchored)
    assert db.retrieval.stats.searched == 1 and db.retrieval.stats.hits == 1


def test_generate_with_kv_cache_matches_full_recomputation(db, llama):
    model, tok = llama
    db.attach(model)
    enc = tok([EDITED[0]], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ids = enc["input_ids"]
    with torch.no_grad():
        for _ in range(6):  # no cache: every step recomputes (and re-searches) everything
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)


def test_remove_reverts_and_keeps_the_rest(db, llama):
    model, tok = llama
    plain = [logits(model, tok, [t])[0] for t in EDITED]
    db.attach(model)
    edited = [logits(model, tok, [t])[0] for t in EDITED]
    db.remove([0])
    assert torch.equal(logits(model, tok, [EDITED[0]])[0], plain[0])
    for i in range(1, len(EDITED)):
        assert torch.equal(logits(model, tok, [EDITED[i]])[0], edited[i])
    assert db.remove(db.ids_about("Toyota")) == [2]
    assert torch.equal(logits(model, tok, [EDITED[2]])[0], plain[2])
    with pytest.raises(FactNotFoundError, match="no fact with id 0"):
        db.remove([0, 1])
    assert sorted(db.facts()) == [1, 3]  # nothing removed by the failed call


def test_update_keeps_the_id(db, llama):
    model, tok = llama
    db.update(3, Fact("Lionel Messi", "{} plays the sport of", "golf", "soccer"))
    assert db.get(3).target_new == "golf" and len(db) == len(FACTS)


def test_reopen_and_copy_behave_the_same(db, llama, tmp_path):
    model, tok = llama
    db.attach(model)
    edited = logits(model, tok, EDITED)[0]
    db.detach()
    db.flush()
    db.add([Fact("Berlin", "{} is the capital of", "Spain", "Germany")])  # after the saved index
    reopened = NeuralDB.from_pretrained(db.path)
    saved = reopened.store.saved_index()
    assert saved["version"] < reopened.store.manifest.version  # needs catch-up
    assert reopened.index.ntotal == len(FACTS) + 1
    reopened.attach(model)
    torch.testing.assert_close(logits(model, tok, EDITED)[0], edited)
    reopened.detach()
    db.save_pretrained(tmp_path / "copy")
    copy = NeuralDB.from_pretrained(tmp_path / "copy")
    assert copy.facts() == db.facts() and len(copy.store.manifest.segments) == 1
    with pytest.raises(StoreError, match="already exists"):
        db.save_pretrained(tmp_path / "copy")


def test_wrong_model_is_refused(db, llama):
    other = tiny_model("llama", seed=1)
    # every part keys depend on differs in a model of another seed, and each is named
    with pytest.raises(ModelMismatchError,
                       match="weights of embeddings, layer 0, layer 1, layer 2 differ"):
        db.attach(other)
    with pytest.raises(ModelMismatchError, match="model type"):
        db.attach(tiny_model("gpt2"))
    db.attach(other, force=True)  # explicit override
    db.detach()


def test_same_weights_in_bfloat16_have_the_same_fingerprint(db, llama):
    from ndb.config import fingerprint

    model, _ = llama
    assert fingerprint(model.to(torch.bfloat16), 2) == db.config.fingerprint
    model.to(torch.float32)


def test_duplicate_user_id_changes_nothing(db):
    first = Fact("Rome", "{} is in", "Peru", "Italy", key="r1")
    db.add([first])
    n = len(db)
    with pytest.raises(ValueError, match="key 'r1' is already used"):
        db.add([Fact("Oslo", "{} is in", "Peru", "Norway", key="r1")])
    assert len(db) == n


def test_small_residual_cache_still_answers_right(tmp_path, db, llama):
    model, tok = llama
    db.attach(model)
    expected = logits(model, tok, EDITED)[0]
    db.detach()
    small = NeuralDB.from_pretrained(db.path, cache_bytes=2 * 4 * db.config.d_value)
    small.attach(model)
    torch.testing.assert_close(logits(model, tok, EDITED)[0], expected)
    cache = small.retrieval.residuals
    assert cache.misses >= len(FACTS) and len(cache) <= 2


def test_empty_database_adds_nothing(tmp_path, llama):
    model, tok = llama
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=2, compute=EXACT)
    before = logits(model, tok, EDITED)[0]
    db.attach(model)
    assert torch.equal(logits(model, tok, EDITED)[0], before)
    assert db.retrieval.stats.calls == 0 and np.asarray(db.ids).size == 0


def test_two_keys_per_fact_map_back_to_one_fact(tmp_path, llama):
    model, tok = llama
    split = ComputeConfig(**FAST_COMPUTE, split_keys=True)  # bare and in-text keys
    assert split.keys_per_fact == 2
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=2, gamma=0.9, compute=split)
    ids = db.add(FACTS[:2])
    assert db.index.ntotal == 4
    db.attach(model)
    db.retrieval.record = True
    with torch.no_grad():
        model(**tok(FACTS[1].text, return_tensors="pt"))
    assert db.retrieval.stats.hits >= 1  # the bare-prompt key matches exactly
    db.remove([ids[1]])
    assert db.index.ntotal == 2
    reopened = NeuralDB.from_pretrained(db.path)
    assert reopened.index.ntotal == 2


def test_key_guard_drops_keys_that_generic_text_reaches(tmp_path, llama):
    from ndb.compute import compute_keys

    model, tok = llama
    split = ComputeConfig(**FAST_COMPUTE, split_keys=True)
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=2, gamma=0.9, compute=split)
    background = db.keys.background  # the model's own text
    assert background.shape[1] == 96 and len(background) > 100
    generic = compute_keys(model, tok, FACTS[:2], 2, db.config.prefixes, split=True)
    # pretend generic text reaches fact 0's bare key and both keys of fact 1
    db.keys._background = torch.nn.functional.normalize(
        torch.cat([generic[0, :1], generic[1]]), dim=-1).numpy()
    ids = db.add(FACTS[:3])
    kept = db.keys.guarded(db.store.read("key_scores", ids))
    assert kept.tolist()[0] == [False, True]  # the bare key goes, the in-text key stays
    assert kept[1].sum() == 1  # reached everywhere: the least reached key stays
    assert kept.tolist()[2] == [True, True]
    assert db.index.ntotal == 4
    db.config.guard_margin = None
    db.keys._index = None
    assert db.index.ntotal == 6


def approximate_db(path, llama) -> NeuralDB:
    """A database with just more keys than an exact index holds on CPU: ivf-pq4, trained,
    never calibrated (its keys and residuals are random, committed without the model)."""
    from ndb.indexes import CPU_EXACT_MAX_KEYS

    model, tok = llama
    db = NeuralDB.create(path, model, tok, layer=2, gamma=0.5, compute=EXACT)
    n = CPU_EXACT_MAX_KEYS + 200
    rng = np.random.default_rng(0)
    facts = [Fact(f"Town {i}", "{} lies in the country of", f"Land {i % 50}") for i in range(n)]
    db.add_vectors(facts, rng.standard_normal((n, db.config.d_key)),
                   rng.standard_normal((n, db.config.d_value)))
    return db


def test_approximate_index_calibrated_when_due(tmp_path, llama, monkeypatch):
    """Past what an exact index holds on CPU a database searches with ivf-pq4, which an add
    with the model calibrates (nprobe and the gate skip, on its keys of texts about stored
    subjects) and which keeps that tuning in its config: a rebuilt index searches with it."""
    from click.testing import CliRunner

    from ndb import calibration
    from ndb.cli.main import cli

    model, tok = llama
    db = approximate_db(tmp_path / "db", llama)
    n = len(db)
    uncalibrated = db.index.tuning()
    assert db.index.kind == "ivf-pq4" and db.config.index_calibration is None
    assert db.keys.calibration_due()  # add_vectors has no model to calibrate with
    calls = []  # the queries computed for calibrating
    queries = calibration.token_queries
    monkeypatch.setattr(calibration, "token_queries",
                        lambda *args, **kw: calls.append(q := queries(*args, **kw)) or q)

    db.add(FACTS[:1], model, tok)
    done = db.config.index_calibration
    assert len(calls) == 1 and len(calls[0]) > 256  # every token of 2 texts per sampled fact
    assert done["kind"] == "ivf-pq4" and done["n_keys"] == n + 1 and done["gamma"] == 0.5
    assert done == NeuralDB(db.path).config.index_calibration  # committed to the config
    assert not db.keys.calibration_due()
    tuned = db.index.tuning()
    assert tuned == {k: done[k] for k in ("probe_fraction", "coarse_margin")} != uncalibrated

    db.add(FACTS[1:2], model, tok)  # one more key: no new calibration
    assert len(calls) == 1 and db.config.index_calibration == done

    db.flush()
    for saved_index in (True, False):  # loaded, then rebuilt from the segments
        if not saved_index:
            db.store.forget_saved_index()
        reopened = NeuralDB(db.path)
        assert reopened.index.tuning() == tuned
        assert reopened.index.nprobe == db.index.nprobe

    info = CliRunner().invoke(cli, ["info", str(db.path), "--json"])
    assert json.loads(info.output)["calibration"].startswith(f"ivf-pq4 at {n + 1} keys")

    db.set_gamma(0.6)  # tuned for another gamma: searched as uncalibrated until calibrated
    assert db.keys.calibration_due() and db.index.tuning() == uncalibrated
    assert NeuralDB(db.path).index.tuning() == uncalibrated


def test_calibrate_command(tmp_path, llama, tiny_model_dir):
    """'ndb calibrate' tunes an approximate index and says how; an exact one has nothing."""
    from click.testing import CliRunner

    from ndb.cli.main import cli

    db = approximate_db(tmp_path / "db", llama)
    model = ["--model", str(tiny_model_dir)]
    result = CliRunner().invoke(cli, ["calibrate", str(db.path), *model])
    assert result.exit_code == 0, result.output
    done = NeuralDB(db.path).config.index_calibration
    assert done["kind"] == "ivf-pq4" and done["n_keys"] == len(db)
    assert f"calibrated: ivf-pq4 at {len(db)} keys, gamma 0.5: probes" in result.output
    other = tmp_path / "other-model"  # same shapes, other weights: its keys would mislead
    tiny_model("llama", seed=1).save_pretrained(other)
    llama[1].save_pretrained(other)
    before = (db.path / "ndb_config.json").read_bytes()
    result = CliRunner().invoke(cli, ["calibrate", str(db.path), "--model", str(other)])
    assert result.exit_code == 1 and "does not match" in result.output
    assert (db.path / "ndb_config.json").read_bytes() == before
    small = NeuralDB.create(tmp_path / "small", *llama, layer=2, gamma=0.5, compute=EXACT)
    result = CliRunner().invoke(cli, ["calibrate", str(small.path), *model])
    assert result.exit_code == 0 and "searches exactly (an IVF kind until" in result.output
    assert NeuralDB(small.path).config.index_calibration is None


def test_failed_calibration_warns_and_keeps_the_write(tmp_path, llama, monkeypatch):
    from ndb import calibration

    model, tok = llama
    db = approximate_db(tmp_path / "db", llama)

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(calibration, "token_queries", fail)  # inside the calibration
    with pytest.warns(UserWarning, match="not calibrated .RuntimeError: out of memory"):
        (fact_id,) = db.add(FACTS[:1], model, tok)
    assert NeuralDB(db.path).get(fact_id) == FACTS[0]
    assert db.config.index_calibration is None and db.keys.calibration_due()


@pytest.mark.parametrize("bad", [{"probe_fraction": 0.0}, {"probe_fraction": None},
                                 {"n_keys": 10 ** 400}, {"n_keys": 0}, {"gamma": "0.7"},
                                 {"coarse_margin": -0.1}, {"kind": "torch"}, {"extra": 1}])
def test_hostile_index_calibration_is_refused(db, bad):
    """A config is untrusted: a tuning no approximate index can search with is refused in one
    line when the database opens, not at a search."""
    from ndb.store import CONFIG

    config = json.loads((db.path / CONFIG).read_text())
    config["index_calibration"] = {"kind": "ivf-pq4", "gamma": 0.9, "n_keys": 10000,
                                   "probe_fraction": 0.1, "coarse_margin": 0.6, **bad}
    (db.path / CONFIG).write_text(json.dumps(config))
    with pytest.raises(StoreError, match="index_calibration"):
        NeuralDB(db.path)
