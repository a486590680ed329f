"""The dev set the sweeps run on: as its script writes it, with chat questions and groups."""

import importlib.util
import json
from collections import defaultdict
from pathlib import Path

from ndb.eval.metrics import chat_question
from ndb.record_formats import read_facts

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT / "ndb" / "data" / "dev_counterfact.json"


def test_file_is_what_the_script_writes(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_dev_set",
                                                  ROOT / "benchmarks" / "make_dev_set.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", tmp_path / "dev.json")
    module.main()
    assert (tmp_path / "dev.json").read_text(encoding="utf-8") == DEV.read_text(encoding="utf-8")


def test_every_fact_has_a_chat_question_and_groups_are_clean():
    facts = read_facts(DEV)
    assert all(f.subject in chat_question(f) and chat_question(f).endswith("?") for f in facts)
    groups = defaultdict(list)
    for f in facts:
        if "group" in f.extra:
            groups[f.extra["group"]].append(f)
    assert len(groups) >= 4
    edited = {f.subject for f in facts}
    named_by_neighbors = {p for f in facts for p in f.extra.get("neighborhood_prompts", [])}
    for members in groups.values():
        assert 2 <= len(members) <= 4 and len({f.subject for f in members}) == 1
        assert len({f.extra["relation_id"] for f in members}) == len(members)
        subject = members[0].subject
        assert not any(subject in p for p in named_by_neighbors)
        for prompt in (p for f in members for p in f.extra["neighborhood_prompts"]):
            assert not any(s in prompt for s in edited), prompt  # a group's neighbors: unedited
    records = json.loads(DEV.read_text(encoding="utf-8"))
    assert len(records) == len(facts)
