"""One id model: integer database ids, the user's own keys apart; no silent duplicates."""

import json

import numpy as np
import pytest

from ndb import Fact
from ndb.errors import FactError, FactNotFoundError
from ndb.facts import parse_record
from ndb.record_formats import read_facts

from conftest import FACTS

ROME = Fact("Rome", "{} is the capital of", "Peru", "Italy", key="it-capital")


# -- reading keys ------------------------------------------------------------------------
PARIS = {"subject": "Paris", "prompt": "{} is in", "target_new": "Japan"}


@pytest.mark.parametrize("fields, key", [
    ({"key": "fr-lang"}, "fr-lang"),
    ({"id": "fr-lang"}, "fr-lang"),  # files written before keys existed
    ({"id": 900000}, "900000"),
    ({"key": None, "id": 5}, None),  # 'ndb list --json' of a fact without a key
    ({"key": "k", "id": 5}, "k"),
    ({}, None),
])
def test_plain_records_take_key_then_id(fields, key):
    assert parse_record({**PARIS, **fields}, "r").key == key


def test_stored_records_of_older_databases_read_id_as_key():
    assert Fact.from_json({**PARIS, "id": "fr-lang"}).key == "fr-lang"
    assert Fact.from_json({**PARIS, "key": "k"}).key == "k"


def test_a_key_that_is_neither_string_nor_integer_is_refused():
    with pytest.raises(FactError, match="'key' must be a string or an integer"):
        parse_record({**PARIS, "key": ["a"]}, "r")


def test_demo_facts_carry_keys():
    from ndb.demo import DEMO_FACTS

    assert [f.key for f in read_facts(DEMO_FACTS)][:2] == ["demo-1", "demo-2"]


# -- the library -------------------------------------------------------------------------
def test_adding_what_is_stored_skips_it(db):
    before = db.facts()
    again = db.add(FACTS[:2] + [FACTS[0]])
    assert again == [] and again.skipped == [0, 1] and db.facts() == before
    fresh = db.add([ROME, ROME, FACTS[3]])  # a repeat within the input: added once
    assert fresh == [4] and fresh.skipped == [3] and len(db) == 5
    assert db.add([ROME]).skipped == [4] and len(db) == 5


def test_a_stored_key_with_another_edit_is_refused_unless_updating(db):
    db.add([ROME])
    version = db.store.manifest.version
    moved = Fact("Rome", "{} is the capital of", "Chile", key="it-capital")
    with pytest.raises(FactError, match="key 'it-capital' is already used by fact 4"):
        db.add([Fact("Oslo", "{} is in", "Peru"), moved])
    assert db.store.manifest.version == version  # nothing written, not even Oslo
    done = db.add([moved, Fact("Oslo", "{} is in", "Peru")], update=True)
    assert done == [5] and done.updated == [4] and db.get("it-capital").target_new == "Chile"
    with pytest.raises(FactError, match="given to two different facts"):
        db.add([ROME, moved], update=True)


def test_update_takes_an_id_or_a_key_and_never_confuses_them(db):
    db.add([Fact("Oslo", "{} is in", "Peru", key="0")])  # a key that looks like an id
    assert db.id_of("0") == 4
    db.update("0", Fact("Oslo", "{} is in", "Chile"))  # the fact keyed "0": id 4
    assert db.get(4) == Fact("Oslo", "{} is in", "Chile", key="0")  # the key stays
    db.update(0, Fact("Paris", "{} is located in the country of", "Spain"))  # id 0
    assert db.get(0).target_new == "Spain" and db.get("0").target_new == "Chile"
    with pytest.raises(FactNotFoundError, match="no fact with key 'nope'"):
        db.update("nope", ROME)
    with pytest.raises(FactError, match="key '0' is already used by fact 4"):
        db.update(1, Fact("Oslo", "{} is in", "Chile", key="0"))


def test_update_by_key_checks_every_key_first(db):
    db.add([ROME])
    version = db.store.manifest.version
    moved = Fact("Rome", "{} is the capital of", "Chile", key="it-capital")
    unknown, keyless = Fact("Oslo", "{} is in", "Peru", key="no"), Fact("Oslo", "{} is in", "Peru")
    for bad, message in ((unknown, "no fact with key 'no'"), (keyless, "has no key")):
        with pytest.raises((FactError, FactNotFoundError), match=message):
            db.update_by_key([moved, bad])
        assert db.store.manifest.version == version
    assert db.update_by_key([moved]).updated == [4] and db.get(4).target_new == "Chile"


def test_remove_by_id_or_key_resolves_all_first(db):
    db.add([ROME])
    with pytest.raises(FactNotFoundError, match="no fact with key 'nope' .*; nothing was removed"):
        db.remove(["it-capital", "nope"])
    db.add([Fact("Oslo", "{} is in", "Peru", key="i")])  # a key "it-capital" would start with
    with pytest.raises(TypeError, match=r"for one key: remove\(\['it-capital'\]\)"):
        db.remove("it-capital")  # not the keys "i", "t", ...
    assert db.remove([]) == [] and db.remove(["i"]) == [5]
    with pytest.raises(FactNotFoundError, match="no fact with id 99999999999999999999"):
        db.remove([0, 99999999999999999999])
    with pytest.raises(ValueError, match="fact ids are integers"):
        db.remove([1.0])
    assert len(db) == 5
    assert db.remove(["it-capital", 4]) == [4] and sorted(db.facts()) == [0, 1, 2, 3]


def test_databases_written_before_keys_still_read_and_match(db):
    """Their records say "id": it is the key, for lookups and duplicates alike."""
    keys, residuals = db.store.read("keys", [0]), db.store.read("residuals", [0])
    old = json.dumps({"subject": "Rome", "prompt": "{} is the capital of",
                      "target_new": "Peru", "id": "it-capital"})
    (stored,) = db.store.append(keys, residuals, [old], key_scores=np.zeros((1,)))
    db.refresh()
    assert db.id_of("it-capital") == stored
    assert db.add([ROME]).skipped == [stored]
