"""The PEFT-shaped public API: one-line attach, a config object for create, a bound model,
the database as a collection, what print(model) shows, the config file's name (and the old
one), and attaching that changes nothing of the user's model beyond its hooks."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import ndb
from ndb import EditConfig, Fact, NeuralDB
from ndb.config import ComputeConfig
from ndb.errors import ConfigError
from ndb.models import get_module

from conftest import FACTS, FAST_COMPUTE, tiny_model

EDITED = "Paris is located in the country of"


def logits(model, tok, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits[0, -1]


def test_attach_one_liner_is_db_attach(db, llama):
    model, tok = llama
    db.attach(model)
    edited = logits(model, tok, EDITED)
    db.detach()
    plain = logits(model, tok, EDITED)
    assert ndb.attach(model, db.path) is model
    (attached,) = ndb.attached(model)
    assert attached.path == db.path
    torch.testing.assert_close(logits(model, tok, EDITED), edited)
    attached.detach()
    assert ndb.attached(model) == []
    torch.testing.assert_close(logits(model, tok, EDITED), plain, rtol=0, atol=0)


def test_create_takes_an_edit_config(tmp_path, llama, exact_compute):
    model, tok = llama
    config = EditConfig(layer=2, gamma=0.9, seed=3, index="flat", compute=exact_compute)
    db = NeuralDB.create(tmp_path / "a", model, tok, config)
    same = NeuralDB.create(tmp_path / "b", model, tok, layer=2, gamma=0.9, seed=3, index="flat",
                           compute=exact_compute)
    assert db.config == same.config
    assert (db.config.layer, db.config.gamma, db.config.seed, db.config.index) == \
        (2, 0.9, 3, "flat")
    with pytest.raises(TypeError, match="not both"):
        NeuralDB.create(tmp_path / "c", model, tok, config, gamma=0.5)


@pytest.mark.parametrize("field, value", [("gamma", 1.5), ("index", "hnsw"), ("layer", "2"),
                                          ("seed", -1), ("key_dtype", "int8")])
def test_an_edit_config_is_checked_when_made(field, value):
    with pytest.raises(ConfigError, match=field.split("_")[0]):
        EditConfig(**{field: value})


def test_from_pretrained_binds_a_model_for_add_and_remove(db, llama):
    model, tok = llama
    with pytest.raises(ValueError, match="a model and tokenizer are needed"):
        NeuralDB.from_pretrained(db.path).add([Fact("Rome", "{} is in", "Peru")])
    bound = NeuralDB.from_pretrained(db.path, model, tok)
    (new_id,) = bound.add([Fact("Rome", "{} is in", "Peru")])
    assert bound.get(new_id).subject == "Rome"
    assert ndb.attached(model) == []  # bound, not attached
    bound.remove([new_id])
    assert len(bound) == len(FACTS)


def test_the_database_is_a_collection_of_facts(db):
    assert len(db) == len(FACTS)
    assert list(db) == FACTS
    assert all(fact in db for fact in FACTS)
    assert Fact("Paris", "{} is located in the country of", "Peru") not in db
    assert Fact(*FACTS[0].edit, key="other") not in db  # the same edit under another key
    assert "Paris" not in db


def test_each_query_says_what_it_takes_and_returns(db):
    ids = db.ids_of(FACTS)  # by edit
    assert [db.get(i) for i in ids] == FACTS and db.facts() == dict(zip(ids, FACTS))
    assert db.id_of(ids[2]) == ids[2] and db.ids_about("Toyota") == [ids[2]]
    assert db.ids_about("toyota") == []
    with pytest.raises(ndb.FactNotFoundError):
        db.id_of(max(ids) + 1)
    with pytest.raises(ndb.FactNotFoundError):
        db.ids_of([Fact("Paris", "{} is located in the country of", "Peru")])
    with pytest.raises(ValueError):
        db.id_of(True)


def test_print_model_shows_what_is_attached(db, llama):
    model, _ = llama
    projection = get_module(model, db.config.module)
    plain = repr(model)
    db.attach(model)
    assert repr(db) in repr(projection) and repr(db) in repr(model)
    db.detach()
    assert repr(model) == plain


def test_attach_changes_nothing_of_the_model_but_its_hooks(db, llama):
    model, _ = llama
    modules = {name: dict(vars(m)) for name, m in model.named_modules()}
    config = model.config.to_dict()
    db.attach(model)
    db.detach()
    assert {name: dict(vars(m)) for name, m in model.named_modules()} == modules
    assert model.config.to_dict() == config


def test_config_file_is_named_for_ndb_and_the_old_name_still_opens(db, llama, tmp_path):
    model, tok = llama
    assert (db.path / "ndb_config.json").is_file() and not (db.path / "config.json").exists()
    db.attach(model)
    edited = logits(model, tok, EDITED)
    db.detach()
    (db.path / "ndb_config.json").rename(db.path / "config.json")  # as written before
    old = NeuralDB.from_pretrained(db.path)
    assert old.config == db.config and len(old) == len(FACTS)
    old.set_gamma(0.85)
    assert json.loads((db.path / "config.json").read_text())["gamma"] == 0.85
    assert not (db.path / "ndb_config.json").exists()
    old.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "ndb_config.json").is_file()
    old.set_gamma(0.9)
    old.attach(model)
    torch.testing.assert_close(logits(model, tok, EDITED), edited)
    old.detach()


def test_set_gamma_reaches_the_attached_hook(db, llama):
    """The live hook gates with the new gamma at once, on the index kept for it (the guard
    keeps keys by gamma, so the index is rebuilt); the old gamma edits as before."""
    model, tok = llama
    db.attach(model)
    edited = logits(model, tok, EDITED)
    gamma = db.config.gamma
    db.set_gamma(0.99)
    assert db.retrieval.gamma == 0.99 and db.retrieval.index is db.index
    db.set_gamma(gamma)
    assert db.retrieval.gamma == gamma and db.retrieval.index is db.index
    torch.testing.assert_close(logits(model, tok, EDITED), edited)
    db.detach()


def test_one_model_in_two_threads(db, llama):
    """Each forward pass reads the tokens it may search from its own call: a second call
    that starts in another thread while the first is under way does not change them."""
    model, tok = llama
    ids = tok(EDITED, return_tensors="pt").input_ids
    db.attach(model)
    edited = model(input_ids=ids).logits[0, -1]
    first_started, second_started = threading.Event(), threading.Event()

    def interleave(_module, _args):
        if threading.current_thread().name == "first":
            first_started.set()
            assert second_started.wait(60)
        else:
            second_started.set()

    # registered after ndb's pre-hook, so it runs once each call has read its mask
    handle = model.base_model.register_forward_pre_hook(interleave)
    results = {}

    def first():
        results["first"] = model(input_ids=ids).logits[0, -1]

    def second():
        assert first_started.wait(60)
        # a batch whose every token is padding but the first: nothing may be searched
        mask = torch.zeros_like(ids)
        mask[0, 0] = 1
        model(input_ids=ids, attention_mask=mask)

    threads = [threading.Thread(target=first, name="first"),
               threading.Thread(target=second, name="second")]
    with torch.no_grad():
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    handle.remove()
    db.detach()
    torch.testing.assert_close(results["first"], edited)


def test_two_databases_on_two_models(tmp_path, llama, exact_compute):
    _, tok = llama
    models = [tiny_model("llama"), tiny_model("llama")]
    dbs = []
    for n, model in enumerate(models):
        db = NeuralDB.create(tmp_path / f"db{n}", model, tok, layer=2, gamma=0.9,
                             compute=exact_compute)
        db.add([FACTS[n]])
        dbs.append(db)
    for model, db in zip(models, dbs):
        ndb.attach(model, db)
    assert [ndb.attached(m) for m in models] == [[dbs[0]], [dbs[1]]]


def test_add_reports_progress_to_a_callback(tmp_path, llama):
    """The library tells a callback (done, total) within each batch, ending at the total,
    so that the CLI and a server can show one bar."""
    model, tok = llama
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=1,
                         compute=ComputeConfig(**{**FAST_COMPUTE, "batch_size": 2}))
    heard: list[tuple[float, int]] = []
    db.add(FACTS[:3], model, tok, progress=lambda done, total: heard.append((done, total)))
    assert {total for _, total in heard} == {3}
    assert len(heard) > 2 and heard[-1][0] == pytest.approx(3)
    assert all(a[0] <= b[0] for a, b in zip(heard, heard[1:]))  # it only moves forward
    assert len({done for done, _ in heard}) > 2 and max(done for done, _ in heard) <= 3


def test_create_add_and_remove_show_bars_unless_told_not_to(tmp_path, llama, capsys):
    """A library call that computes for seconds to minutes says so on stderr by default:
    create while it samples background text, add while it computes facts; progress=False
    keeps them quiet, and a call that computes nothing shows no bar."""
    model, tok = llama
    compute = ComputeConfig(**{**FAST_COMPUTE, "batch_size": 2})
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=1, compute=compute)
    assert "background text" in capsys.readouterr().err
    ids = db.add(FACTS[:2], model, tok)
    assert "edit" in capsys.readouterr().err
    db.remove(ids[:1])  # no fact shares its residual: nothing to compute
    assert capsys.readouterr().err == ""

    quiet = NeuralDB.create(tmp_path / "quiet", model, tok, layer=1, compute=compute,
                            progress=False)
    quiet.add(FACTS[:2], model, tok, progress=False)
    assert capsys.readouterr().err == ""


def test_what_a_fact_object_holds_is_checked_before_it_is_stored(db):
    """A Fact built in code is not a parsed record: an 'extra' that is not an object was
    stored, and every later read of the database failed on it."""
    before = dict(db.facts())
    for fact, problem in [
        (Fact("Anna", "{} is", "x", extra=[1]), "'extra' must be an object, got list"),
        (Fact("Anna", "{} is", "x", extra=None), "'extra' must be an object, got null"),
        (Fact("Anna", "{} is", "x", extra={"s": {1, 2}}), "'extra' holds what JSON cannot"),
        (Fact("Anna", "{} is", "x", key="a\nb"), "'key' must be one line"),
    ]:
        with pytest.raises(ndb.FactError, match=problem):
            db.add([fact])
    assert NeuralDB(db.path).facts() == before


def test_what_is_not_a_model_a_tokenizer_or_a_fact_is_a_type_error(db, llama, tmp_path):
    model, tok = llama
    for call in (lambda: db.attach(None), lambda: db.attach("smollm2-135m"),
                 lambda: db.attach(model, 5), lambda: db.add(FACTS[:1], "gpt2", tok),
                 lambda: NeuralDB.create(tmp_path / "new", None, tok),
                 lambda: NeuralDB.create(tmp_path / "new", model, tok, compute={"steps": 1}),
                 lambda: db.ids_of("Paris")):
        with pytest.raises(TypeError):
            call()
    assert not (tmp_path / "new").exists() and not ndb.attached(model)
    with pytest.raises(ConfigError, match="'bogus' is not a torch device"):
        db.attach(model, device="bogus")


def test_a_copy_is_refused_inside_the_database_and_where_it_cannot_be_made(db, tmp_path):
    files = sorted(p.relative_to(db.path) for p in db.path.rglob("*"))
    with pytest.raises(ConfigError, match="is inside the database"):
        db.save_pretrained(db.path / "copy")
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="not a writable directory"):
        db.save_pretrained(tmp_path / "afile" / "copy")
    assert sorted(p.relative_to(db.path) for p in db.path.rglob("*")) == files


def test_a_second_handle_counts_what_the_first_wrote(db, llama):
    model, tok = llama
    other = NeuralDB(db.path)
    (new_id,) = db.add([Fact("Anna", "{} lives in", "Oslo")], model, tok)
    assert len(other) == len(db) and new_id in other.ids
    db.remove([new_id], model, tok)
    assert len(other) == len(db) and new_id not in other.ids
