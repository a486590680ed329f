"""The distributed build: `ndb build --workers 2` (two gloo processes on this CPU) against a
one-process build, and a rank that fails or is killed part-way."""

import os
import subprocess
import sys

import numpy as np
import pytest

from ndb import NeuralDB
from ndb import store as st

from conftest import write_jsonl

FACTS = [  # two about Paris: a group that must stay on one rank (one shared residual)
    {"subject": "Paris", "prompt": "{} is located in the country of", "target_new": "Japan",
     "key": "a"},
    {"subject": "Toyota", "prompt": "{} is headquartered in", "target_new": "Berlin", "key": "b"},
    {"subject": "Paris", "prompt": "The mayor of {} is", "target_new": "Bob", "key": "c"},
    {"subject": "Lionel Messi", "prompt": "{} plays the sport of", "target_new": "tennis",
     "key": "d"},
    {"subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is",
     "target_new": "English", "key": "e"},
]
# makes the rank named by NDB_TEST_FAILING_RANK fail while computing its shard: raise, or
# die at once as if killed (the launcher starts every rank as `python -m ndb.cli`)
FAILURE = """
import os
if os.environ.get("RANK") == os.environ.get("NDB_TEST_FAILING_RANK"):
    import ndb.edits

    def fail(*args, **kwargs):
        if os.environ["NDB_TEST_FAILURE"] == "kill":
            os._exit(9)
        raise ValueError("injected failure")

    ndb.edits.Writer.compute = fail
"""


def ndb_build(facts_file, db_path, model_dir, *extra, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ndb.cli", "build", str(facts_file), "-o",
                           str(db_path), "--model", str(model_dir), "--layer", "1", "--gamma",
                           "0.8", "--batch-size", "2", *extra],
                          env=env, capture_output=True, text=True, timeout=300)


def contents(path):
    db = NeuralDB(path)
    return db.ids, db.facts(), {name: db.store.read(name).astype(np.float32)
                                for name in ("keys", "residuals", "key_scores")}


def test_two_workers_build_what_one_process_builds(tmp_path, tiny_model_dir):
    facts = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    one = ndb_build(facts, tmp_path / "one", tiny_model_dir)
    assert one.returncode == 0, one.stderr
    two = ndb_build(facts, tmp_path / "two", tiny_model_dir, "--workers", "2")
    assert two.returncode == 0, two.stderr
    ids, stored, vectors = contents(tmp_path / "one")
    ids2, stored2, vectors2 = contents(tmp_path / "two")
    assert ids.tolist() == ids2.tolist() == [0, 1, 2, 3, 4]
    assert stored == stored2 and [stored[i].key for i in ids] == list("abcde")
    for name in vectors:
        np.testing.assert_allclose(vectors2[name], vectors[name], atol=1e-3, err_msg=name)
    # three batches ({Paris x2}, {Toyota, Messi}, {Darrieux}) dealt to two ranks: one
    # segment each, adopted by one commit
    assert sorted(os.listdir(tmp_path / "two" / st.SEGMENTS)) == [
        "seg-00000001-0000.h5", "seg-00000001-0001.h5"]
    assert st.Manifest.read(tmp_path / "two").version == 1


@pytest.mark.parametrize("failure", ["raise", "kill"])
def test_a_failing_rank_leaves_the_old_state(tmp_path, tiny_model_dir, failure):
    db_path = tmp_path / "db"
    first = ndb_build(write_jsonl(tmp_path / "one.jsonl", FACTS[:1]), db_path, tiny_model_dir)
    assert first.returncode == 0, first.stderr
    before = contents(db_path)
    manifest = (db_path / st.MANIFEST).read_bytes()
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAILURE)
    env = {"PYTHONPATH": str(tmp_path / "inject"), "NDB_TEST_FAILING_RANK": "1",
           "NDB_TEST_FAILURE": failure}
    result = ndb_build(write_jsonl(tmp_path / "all.jsonl", FACTS), db_path, tiny_model_dir,
                       "--resume", "--workers", "2", env=env)
    assert result.returncode != 0
    if failure == "raise":  # rank 0 learns of it, and says so in one line
        assert "Error: rank 1 failed (injected failure); nothing was committed" in result.stderr
    else:  # rank 0 finds its peer gone: no bug, no traceback
        assert "Traceback" not in result.stderr
    assert (db_path / st.MANIFEST).read_bytes() == manifest
    after = contents(db_path)
    assert after[0].tolist() == before[0].tolist() and after[1] == before[1]
    if failure == "raise":
        return
    # the orphaned segments go with the next commit, which finishes the build
    again = ndb_build(tmp_path / "all.jsonl", db_path, tiny_model_dir, "--resume",
                      "--workers", "2")
    assert again.returncode == 0, again.stderr
    assert len(NeuralDB(db_path)) == len(FACTS)
    manifest = st.Manifest.read(db_path)
    assert sorted(os.listdir(db_path / st.SEGMENTS)) == sorted(manifest.segments)


def test_workers_refuse_in_one_line_what_one_process_refuses(tmp_path, tiny_model_dir):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    result = ndb_build(write_jsonl(tmp_path / "f.jsonl", FACTS), tmp_path / "taken",
                       tiny_model_dir, "--workers", "2")
    assert result.returncode == 1
    assert "taken already exists" in result.stderr and "Traceback" not in result.stderr
