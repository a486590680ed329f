import json
import os

import pytest

from ndb.errors import FactError
from ndb.facts import Fact, as_facts
from ndb.record_formats import parse_facts, read_facts

from conftest import write_jsonl

PLAIN = {"subject": "Paris", "prompt": "{} is the capital of", "target_new": "Italy",
         "target_true": "France", "id": "p1", "paraphrases": ["The city of {} is in"]}
COUNTERFACT = {
    "case_id": 7,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                          "relation_id": "P103", "target_new": {"str": "English", "id": "Q1860"},
                          "target_true": {"str": "French", "id": "Q150"}},
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux speaks"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
ZSRE = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
        "answers": ["Illinois Institute of Technology"], "alt": "University of Michigan",
        "rephrase": "What university did Watts Humphrey take part in?",
        "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving"}


def test_three_formats_parse(tmp_path):
    facts = read_facts(write_jsonl(tmp_path / "f.jsonl", [PLAIN, COUNTERFACT, ZSRE]))
    plain, cf, zsre = facts
    assert plain == Fact("Paris", "{} is the capital of", "Italy", "France", "p1",
                         ("The city of {} is in",))
    assert (cf.subject, cf.target_new, cf.target_true, cf.key) == (
        "Danielle Darrieux", "English", "French", "7")
    assert cf.extra["neighborhood_prompts"] == ["The mother tongue of Léon Blum is"]
    assert zsre.prompt == "What university did {} attend?"
    assert (zsre.target_new, zsre.target_true) == ("University of Michigan",
                                                    "Illinois Institute of Technology")
    assert zsre.paraphrases == ("What university did Watts Humphrey take part in?",)


def test_json_array_and_round_trip(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps([PLAIN]))
    (fact,) = read_facts(path)
    assert Fact.from_json(fact.to_json()) == fact


@pytest.mark.parametrize("record, problem", [
    ({**PLAIN, "prompt": "Paris is the capital of"}, "exactly one '{}'"),
    ({**PLAIN, "subject": " "}, "'subject' must be a non-empty string"),
    ({**PLAIN, "target_new": ""}, "'target_new' must be a non-empty string"),
    ({**PLAIN, "target_new": "France"}, "equals 'target_true'"),
    ({**PLAIN, "prompt": "{} is {the} capital of"}, "braces"),
    ({**PLAIN, "prompt": "{} is the capital of "}, "whitespace"),
    ({"subject": "x", "prompt": "{} is"}, "missing field target_new"),
    ({**ZSRE, "subject": "Nobody"}, "does not occur"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_records_name_file_line_and_problem(tmp_path, record, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [PLAIN | {"id": "ok"}, record])
    with pytest.raises(FactError) as err:
        read_facts(path)
    assert str(path) in str(err.value) and "line 2" in str(err.value)
    assert problem in str(err.value)


def test_unreadable_inputs(tmp_path):
    bad_json = tmp_path / "a.jsonl"
    bad_json.write_text('{"subject": "x",\n')
    with pytest.raises(FactError, match="line 1: not valid JSON"):
        read_facts(bad_json)
    latin = tmp_path / "b.jsonl"
    latin.write_bytes(json.dumps(PLAIN).replace("Paris", "Par\u00eds").encode("latin-1"))
    with pytest.raises(FactError, match="not UTF-8"):
        read_facts(latin)
    with pytest.raises(FactError, match="no such file"):
        read_facts(tmp_path / "missing.jsonl")
    empty = tmp_path / "c.jsonl"
    empty.write_text("\n")
    with pytest.raises(FactError, match="no facts"):
        read_facts(empty)
    fifo = tmp_path / "d.jsonl"
    os.mkfifo(fifo)  # opened, it would wait for a writer forever
    for path in (tmp_path, fifo):
        with pytest.raises(FactError, match="not a regular file"):
            read_facts(path)


@pytest.mark.parametrize("line, problem", [
    ('{"subject": "Oslo", "subject": "Lima", "prompt": "{} is in", "target_new": "Peru"}',
     "line 1: field 'subject' is given twice"),
    ('[{"subject": "Oslo", "prompt": "{} is in", "target_new": "Peru", "key": "a", "key": 1}]',
     "f.jsonl: field 'key' is given twice"),
    ('{"subject": "Oslo", "prompt": "{} is in", "target_new": "Peru", "key": 1' + "0" * 5000
     + "}", "not valid JSON .a number too long"),
])
def test_json_that_python_would_read_into_something_else_is_refused(line, problem):
    """JSON keeps the last of two equal fields, and Python refuses 4,301-digit integers
    with advice about its own settings: both name the record and the problem instead."""
    with pytest.raises(FactError, match=problem):
        parse_facts(line, "f.jsonl")


def test_a_key_naming_two_facts_is_refused_and_repeats_are_not():
    text = "\n".join(json.dumps(PLAIN) for _ in range(2))
    assert len(parse_facts(text, "f.jsonl")) == 2  # the database adds a repeat once
    other = {**PLAIN, "subject": "Rome"}
    with pytest.raises(FactError, match="key 'p1' names two different facts"):
        parse_facts(f"{json.dumps(PLAIN)}\n{json.dumps(other)}", "f.jsonl")


def test_stdin(monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(PLAIN) + "\n"))
    assert read_facts("-")[0].subject == "Paris"


def test_as_facts_accepts_objects_and_dicts():
    facts = as_facts([Fact("A", "{} is", "b"), PLAIN])
    assert [f.subject for f in facts] == ["A", "Paris"]
    with pytest.raises(FactError, match="fact 1"):
        as_facts([Fact("A", "no braces", "b")])
