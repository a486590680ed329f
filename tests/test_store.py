import json
import subprocess
import sys

import numpy as np
import pytest

from ndb import store as st


def make(tmp_path, n_keys=4):
    path = tmp_path / "db"
    st.create(path, {"format_version": 1})
    return path, st.Store(path)


def rows(n, seed=0, d=8):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)).astype(np.float16),
            rng.standard_normal((n, 4)).astype(np.float32),
            [json.dumps({"i": i, "seed": seed}) for i in range(n)])


def test_append_delete_update_and_reopen(tmp_path):
    path, store = make(tmp_path)
    keys, res, facts = rows(5)
    ids = store.append(keys, res, facts)
    assert ids.tolist() == [0, 1, 2, 3, 4]
    store.delete(np.array([1, 3]))
    k2, r2, f2 = rows(1, seed=1)
    store.append(k2, r2, f2, ids=np.array([2]))  # update: same id, new entry
    reopened = st.Store(path)
    assert reopened.entries.ids.tolist() == [0, 2, 4]
    np.testing.assert_array_equal(reopened.read("residuals", np.array([2])), r2)
    np.testing.assert_array_equal(reopened.read("keys", np.array([4, 0])), keys[[4, 0]])
    assert reopened.manifest.next_id == 5
    assert store.append(*rows(1, 2)).tolist() == [5]  # ids are never reused


def test_changes_since_a_version(tmp_path):
    _, store = make(tmp_path)
    store.append(*rows(3))
    v = store.manifest.version
    store.delete(np.array([0]))
    store.append(*rows(1, 3), ids=np.array([1]))
    changed, deleted = store.read_entries_since(v)
    assert changed.tolist() == [1] and deleted.tolist() == [0]


def test_compaction_keeps_the_state(tmp_path):
    path, store = make(tmp_path)
    for i in range(5):
        store.append(*rows(2, i))
    store.delete(np.array([0, 5]))
    before = store.entries.ids.copy(), store.read("residuals")
    store.compact()
    assert len(store.manifest.segments) == 1
    assert len(list((path / st.SEGMENTS).iterdir())) == 1
    np.testing.assert_array_equal(store.entries.ids, before[0])
    np.testing.assert_array_equal(store.read("residuals"), before[1])
    assert store.manifest.compacted_through == store.manifest.version - 1


def test_unreferenced_files_are_ignored_then_cleaned(tmp_path):
    path, store = make(tmp_path)
    store.append(*rows(2))
    orphan = path / st.SEGMENTS / "seg-00000099.h5"
    orphan.write_bytes(b"half-written garbage")
    (path / ".manifest.json.123.tmp").write_text("{")
    reopened = st.Store(path)
    assert reopened.entries.ids.tolist() == [0, 1]
    reopened.append(*rows(1, 5))
    assert not orphan.exists() and not list(path.glob(".*.tmp"))


def test_corrupt_or_missing_manifest_is_a_clear_error(tmp_path):
    path, _ = make(tmp_path)
    (path / st.MANIFEST).write_text("{not json")
    with pytest.raises(st.StoreError, match="manifest.json is unreadable"):
        st.Store(path)
    with pytest.raises(st.StoreError, match="not a fact database"):
        st.Store(tmp_path)


def test_create_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("mine")
    with pytest.raises(st.StoreError, match="not empty"):
        st.create(tmp_path / "x", {})
    assert (tmp_path / "x" / "file").read_text() == "mine"


def test_second_writer_is_refused(tmp_path):
    path, store = make(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from ndb.store import Store\n"
         f"s = Store({str(path)!r})\n"
         "with s.writing():\n    print('locked', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(st.LockedError, match=f"pid {holder.pid}"):
            store.append(*rows(1))
    finally:
        holder.kill()
        holder.wait()
    store.append(*rows(1))  # the lock dies with its holder
    assert len(store.entries) == 1


def test_one_commit_adopts_the_segments_another_process_wrote(tmp_path):
    """A distributed build: each rank writes its segment (numbered from its rank) under the
    same version, unlocked; the lock holder commits them all in one manifest swap."""
    path, store = make(tmp_path)
    store.append(*rows(1))
    other = st.Store(path)  # another process's view: no lock
    with store.appending() as pending:
        theirs = st.Pending(other, first_segment=1)
        theirs.append(*rows(2, seed=1), ids=np.array([3, 4]))
        pending.append(*rows(2, seed=2), ids=np.array([1, 2]))
        assert st.Store(path).entries.ids.tolist() == [0]  # nothing adopted yet
        with pytest.raises(st.StoreError, match="another commit"):
            pending.adopt({**theirs.summary(), "version": theirs.version + 1})
        pending.adopt(theirs.summary())
    reopened = st.Store(path)
    assert reopened.entries.ids.tolist() == [0, 1, 2, 3, 4]
    assert reopened.manifest.next_id == 5 and reopened.manifest.version == 2
    assert sorted(reopened.manifest.segments)[-2:] == ["seg-00000002-0000.h5",
                                                        "seg-00000002-0001.h5"]
    np.testing.assert_array_equal(reopened.read("residuals", np.array([3, 4])),
                                  rows(2, seed=1)[1])
