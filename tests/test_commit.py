"""A copy keeps everything a database consists of; a command that fails commits nothing."""

import numpy as np
import pytest
from click.testing import CliRunner

import ndb.edits
import ndb.facts
from ndb import ComputeConfig, NeuralDB
from ndb import store as st
from ndb.cli.main import cli

from conftest import FACTS, FAST_COMPUTE, write_jsonl


def test_a_copy_keeps_every_file_and_guards_new_keys_as_the_original(tmp_path, llama):
    model, tok = llama
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=1,
                         compute=ComputeConfig(**FAST_COMPUTE))
    assert db.config.compute.keys_per_fact == 2 and len(db.keys.background)
    rng = np.random.default_rng(0)

    def vectors(n, start):
        """Two keys per fact: a key generic text reaches (a background key itself), and a
        random one, which the key guard keeps alone."""
        random_keys = rng.standard_normal((n, db.config.d_key))
        keys = np.stack([db.keys.background[start : start + n], random_keys], axis=1)
        return keys, rng.standard_normal((n, db.config.d_value))

    db.add_vectors(FACTS[:1], *vectors(1, 0))
    db.save_pretrained(tmp_path / "copy")
    copy = NeuralDB.from_pretrained(tmp_path / "copy")
    names = sorted(str(p.relative_to(copy.path)) for p in copy.path.rglob("*"))
    segment = f"{st.SEGMENTS}/{copy.store.manifest.segments[0]}"
    assert names == sorted([st.CONFIG, "background.npy", st.MANIFEST, st.INDEX, st.SEGMENTS,
                            segment, st.LOCK])
    np.testing.assert_array_equal(copy.keys.background, db.keys.background)
    keys, residuals = vectors(2, 1)
    for database in (db, copy):
        database.add_vectors(FACTS[1:3], keys, residuals)
    scores = [database.store.read("key_scores") for database in (db, copy)]
    np.testing.assert_array_equal(scores[0], scores[1])
    kept = copy.keys.guarded(scores[1].astype(np.float32))
    assert kept.tolist() == [[False, True]] * 3
    assert copy.index.ntotal == db.index.ntotal == 3


@pytest.fixture
def failing_second_batch(monkeypatch):
    """compute_residuals fails on its second call (an out-of-memory on the second batch)."""
    real = ndb.edits.compute_residuals
    calls = []

    def compute_residuals(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(ndb.edits, "compute_residuals", compute_residuals)
    return calls


def test_an_add_that_fails_commits_nothing(tmp_path, llama, failing_second_batch):
    model, tok = llama
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=1,
                         compute=ComputeConfig(**{**FAST_COMPUTE, "batch_size": 1}))
    version = db.store.manifest.version
    with pytest.raises(RuntimeError, match="out of memory"):
        db.add(FACTS[:3], model, tok)
    assert st.Manifest.read(db.path).version == version
    assert len(NeuralDB.from_pretrained(db.path)) == 0
    assert not list((db.path / st.SEGMENTS).iterdir())  # the first batch's segment went too
    failing_second_batch.clear()
    with pytest.raises(RuntimeError, match="out of memory"):
        db.add(FACTS[:3], model, tok, commit_each_batch=True)
    assert len(NeuralDB.from_pretrained(db.path)) == 1  # batch by batch: the first stays


def test_a_failed_build_says_what_was_committed_and_resume_finishes(
        tmp_path, tiny_model_dir, failing_second_batch):
    facts = write_jsonl(tmp_path / "facts.jsonl", [f.to_json() for f in FACTS[:3]])
    db = tmp_path / "db"
    args = ["build", str(facts), "-o", str(db), "--model", str(tiny_model_dir), "--layer", "1",
            "--batch-size", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert f"1 facts were committed to {db} before the failure" in result.output
    assert "--resume' continues" in result.output
    failing_second_batch.append(1)  # from now on it works
    result = CliRunner().invoke(cli, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert len(NeuralDB.from_pretrained(db)) == 3


def test_the_facts_catch_up_by_reading_only_what_a_commit_wrote(tmp_path, llama, monkeypatch):
    """After a commit the database reads only the entries written since, not every fact
    again (a remove after an add took 1.8 s at 100k facts when it did), and its facts are
    what a fresh open reads; after a compaction that folded away deletions it has not seen,
    it reads them all again."""
    model, tok = llama
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=1,
                         compute=ComputeConfig(**FAST_COMPUTE))
    rng = np.random.default_rng(0)
    shape = (db.config.compute.keys_per_fact, db.config.d_key)

    def add(facts):
        keys = rng.standard_normal((len(facts), *shape)).reshape(len(facts), -1, shape[1])
        return db.add_vectors(facts, keys.squeeze(1) if shape[0] == 1 else keys,
                              rng.standard_normal((len(facts), db.config.d_value)))

    read = []  # how many records each read parsed
    real = ndb.facts.read_stored
    monkeypatch.setattr(ndb.facts, "read_stored", lambda store, ids=None: read.append(
        len(store.entries) if ids is None else len(ids)) or real(store, ids))

    def check(parsed):
        facts = db.facts()
        assert read == parsed
        assert facts == NeuralDB.from_pretrained(db.path).facts()
        read.clear()

    ids = add(FACTS[:3])
    check([3])
    add(FACTS[3:4])
    check([1])
    db.remove(ids[:1])
    check([0])
    db.store.compact()  # folds away deletions this handle has seen: nothing to read
    check([0])
    other = NeuralDB.from_pretrained(db.path)
    other.remove(ids[1:2])
    other.store.compact()  # folds away a deletion this handle has not seen
    read.clear()
    check([2])
