"""A database directory from someone else is untrusted input: whatever it holds, ndb refuses
it with one clear StoreError and never reads, writes or deletes outside it."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc

import h5py
import numpy as np
import pytest

from ndb import ComputeConfig, NeuralDB
from ndb import store as st
from ndb.errors import StoreError

from conftest import FACTS, FAST_COMPUTE


def rows(n, seed=0, d=8):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)).astype(np.float16),
            rng.standard_normal((n, 4)).astype(np.float32),
            [json.dumps({"i": i, "seed": seed}) for i in range(n)])


@pytest.fixture
def db(tmp_path):
    """A database with three facts, and a directory beside it holding someone's files."""
    path = tmp_path / "db"
    st.create(path, {"format_version": 1})
    st.Store(path).append(*rows(3))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("mine")
    return path, outside


def only_segment(path):
    (name,) = st.Manifest.read(path).segments
    return path / st.SEGMENTS / name


def edit_manifest(path, **changes):
    """Change manifest fields; checksum records are dropped, as in an older manifest."""
    data = json.loads((path / st.MANIFEST).read_text())
    data.pop("checksums", None)
    data.update(changes)
    (path / st.MANIFEST).write_text(json.dumps(data))


def test_segments_symlink_is_refused_and_a_failed_remove_deletes_nothing(db):
    path, outside = db
    shutil.copy(only_segment(path), outside)
    (path / st.SEGMENTS).rename(path / "real-segments")
    (path / st.SEGMENTS).symlink_to(outside)
    with pytest.raises(StoreError, match="segments is a symbolic link"):
        st.Store(path).delete(np.array([999]))
    assert (outside / "precious.txt").read_text() == "mine"


def test_a_command_that_fails_removes_no_unreferenced_file(db):
    path, _ = db
    stray = path / st.SEGMENTS / "notes.txt"
    stray.write_text("not ndb's, but inside the database")
    with pytest.raises(KeyError):
        st.Store(path).delete(np.array([999]))
    assert stray.exists()  # cleanup happens after a commit, never on taking the lock


def test_lock_symlink_is_refused_and_its_target_untouched(db):
    path, outside = db
    (path / st.LOCK).unlink(missing_ok=True)
    (path / st.LOCK).symlink_to(outside / "precious.txt")
    store = st.Store(path)
    with pytest.raises(StoreError, match=r"\.lock cannot be opened \(it is a symbolic link\)"):
        store.append(*rows(1))
    assert (outside / "precious.txt").read_text() == "mine"
    assert len(st.Store(path).entries) == 3


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_segment_names_outside_the_directory_are_refused(db, where):
    path, outside = db
    stolen = outside / "seg-00000001-0000.h5"
    shutil.copy(only_segment(path), stolen)  # a readable segment, outside the database
    name = "../../outside/seg-00000001-0000.h5" if where == "relative" else str(stolen)
    edit_manifest(path, segments=[name])
    with pytest.raises(StoreError, match="is not a segment file name"):
        st.Store(path)
    assert stolen.exists()


def test_segment_file_that_is_a_symlink_is_refused(db):
    path, outside = db
    segment = only_segment(path)
    shutil.move(segment, outside / segment.name)
    segment.symlink_to(outside / segment.name)
    with pytest.raises(StoreError, match="symbolic link"):
        st.Store(path)


def test_truncated_segment_is_refused(db):
    path, _ = db
    segment = only_segment(path)
    segment.write_bytes(segment.read_bytes()[: segment.stat().st_size // 2])
    with pytest.raises(StoreError, match=f"segment {segment.name} is corrupted"):
        st.Store(path)
    edit_manifest(path)  # as written before checksums: still refused
    with pytest.raises(StoreError, match=f"segment {segment.name}"):
        st.Store(path)


def test_bit_flip_in_a_segment_is_refused(db):
    path, _ = db
    segment = only_segment(path)
    residuals_at = h5py.File(segment, "r")["residuals"].id.get_offset()
    data = bytearray(segment.read_bytes())
    data[residuals_at + 5] ^= 0x10
    segment.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"segment {segment.name} is corrupted"):
        st.Store(path)


def write_crafted(path, datasets, record_rows=None):
    """Replace the database's segment with one holding ``datasets``. With ``record_rows``
    the manifest records that row count and the file's true checksum; without, it records
    nothing (as manifests written before checksums): the structural checks alone must
    refuse a bad segment."""
    segment = only_segment(path)
    segment.unlink()
    with h5py.File(segment, "w") as f:
        f.attrs["seq"] = 1
        for name, (data, options) in datasets.items():
            f.create_dataset(name, data=data, **options)
    data = json.loads((path / st.MANIFEST).read_text())
    data.pop("checksums", None)
    if record_rows is not None:
        content = segment.read_bytes()
        data["checksums"] = {segment.name: {"rows": record_rows, "bytes": len(content),
                                            "sha256": hashlib.sha256(content).hexdigest()}}
    (path / st.MANIFEST).write_text(json.dumps(data))


def plain_segment(n=3, residuals=None):
    keys, res, facts = rows(n)
    return {"ids": (np.arange(n), {}), "seq": (np.ones(n, np.int64), {}),
            "keys": (keys, {}), "residuals": (res if residuals is None else residuals, {}),
            "facts": (np.array(facts, dtype=h5py.string_dtype()), {}),
            "key_scores": (np.zeros(n, np.float16), {})}


def test_counts_that_do_not_match_are_refused(db):
    path, _ = db
    write_crafted(path, plain_segment(), record_rows=5)
    with pytest.raises(StoreError, match="holds 3 entries, the manifest records 5"):
        st.Store(path)
    segment = plain_segment()
    segment["keys"] = (rows(4)[0], {})
    write_crafted(path, segment)
    with pytest.raises(StoreError, match="keys has 4 rows, ids has 3"):
        st.Store(path)


def test_nan_residuals_are_refused_on_read_and_on_write(db):
    path, _ = db
    residuals = rows(3)[1]
    residuals[1, 2] = np.nan
    write_crafted(path, plain_segment(residuals=residuals))
    store = st.Store(path)
    with pytest.raises(StoreError, match="holds non-finite residuals"):
        store.read("residuals")
    keys, res, facts = rows(2)
    res[0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        store.append(keys, res, facts)


def test_compression_bomb_is_refused_cheaply(db):
    path, _ = db
    n, width = 1024, 1 << 18  # gzip-compressed residuals declaring 1 GiB, in a 40 KB file
    bomb = plain_segment(n)
    bomb["residuals"] = (None, {"shape": (n, width), "dtype": np.float32,
                                "chunks": (1, width), "compression": "gzip"})
    write_crafted(path, bomb)
    assert only_segment(path).stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(StoreError, match="residuals is stored compressed or chunked"):
            st.Store(path).read("residuals")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_fact_records_larger_than_the_file_are_refused(db):
    path, _ = db
    segment = plain_segment()
    segment["facts"] = (np.array(["x" * (2 << 20)] * 3, dtype=h5py.string_dtype()), {})
    write_crafted(path, segment)
    with pytest.raises(StoreError, match="fact records are larger"):
        st.Store(path)


def test_manifests_without_checksums_still_open(db):
    """Databases written before checksums were recorded: old segment names, no records."""
    path, _ = db
    segment = only_segment(path)
    segment.rename(path / st.SEGMENTS / "seg-00000001.h5")
    data = json.loads((path / st.MANIFEST).read_text())
    del data["checksums"]
    data["segments"] = ["seg-00000001.h5"]
    (path / st.MANIFEST).write_text(json.dumps(data))
    store = st.Store(path)
    np.testing.assert_array_equal(store.read("residuals"), rows(3)[1])
    store.append(*rows(1, 1))
    assert len(st.Store(path).entries) == 4


# reads the database until the stop file appears; says how often it read it whole
READER = """
import os, sys, numpy as np
from ndb.store import Store
reads = 0
while not os.path.exists(sys.argv[2]):
    s = Store(sys.argv[1])
    assert len(s.read("residuals")) == len(s.entries) == 6
    s.close()
    reads += 1
    if reads == 1:
        open(sys.argv[3], "w").close()
print("ok", reads, flush=True)
"""


def test_readers_never_fail_while_a_writer_compacts(tmp_path):
    path, stop, reading = tmp_path / "db", tmp_path / "stop", tmp_path / "reading"
    st.create(path, {"format_version": 1})
    writer = st.Store(path)
    for seed in range(3):
        writer.append(*rows(2, seed))
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path), str(stop),
                               str(reading)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # a fixed number of compactions, all while the reader reads, however fast either runs
    deadline = time.monotonic() + 120
    while not reading.exists() and reader.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for _ in range(30):
        writer.compact()
    stop.touch()
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err.strip().splitlines()[-1]
    word, reads = out.split()
    assert word == "ok" and int(reads) > 1


@pytest.fixture
def saved(tmp_path, llama):
    """A database of four facts with random vectors, its key index cache saved."""
    model, tok = llama
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=1, index="flat",
                         compute=ComputeConfig(**{**FAST_COMPUTE, "n_prefixes": 0}))
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((len(FACTS), db.config.d_key)).astype(np.float32)
    db.add_vectors(FACTS, keys, rng.standard_normal((len(FACTS), db.config.d_value)))
    db.index  # noqa: B018 (built here, then saved)
    db.flush()
    meta = json.loads((db.path / st.INDEX / st.INDEX_META).read_text())
    return db.path, db.path / st.INDEX / meta["file"], keys


def top_hits(path, keys):
    """Each key's best match in the index of the database at ``path``: (ids, scores)."""
    queries = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    scores, ids = NeuralDB.from_pretrained(path).index.search(queries)
    return ids.tolist(), scores


@pytest.mark.parametrize("record", [
    "not json", "[1, 2]", json.dumps({"subject": "Paris"}),
    json.dumps({"subject": 5, "prompt": "{} is in", "target_new": "Japan"}),
    json.dumps({"subject": "Paris", "prompt": "{} is in", "target_new": "Japan",
                "paraphrases": {"a": 1}}),
])
def test_a_stored_record_that_is_not_a_fact_is_refused_in_one_line(saved, record):
    path, _, _ = saved
    db = NeuralDB.from_pretrained(path)
    shapes = db.config.entry_shapes()
    db.store.append(np.zeros((1, *shapes["keys"]), np.float16),
                    np.zeros((1, *shapes["residuals"]), np.float32), [record], ids=np.array([2]))
    with pytest.raises(StoreError, match="stored fact 2"):
        NeuralDB.from_pretrained(path).facts()


def test_corrupted_index_cache_is_rebuilt_with_a_warning(saved):
    path, index_file, keys = saved
    data = bytearray(index_file.read_bytes())
    for at in range(len(data) - 64, len(data), 4):  # inside the stored keys
        data[at] ^= 0x40
    index_file.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupted"):
        ids, scores = top_hits(path, keys)
    assert ids == list(range(len(FACTS)))
    np.testing.assert_allclose(scores, 1.0, atol=1e-3)


def test_index_cache_named_outside_the_directory_is_not_read(saved, tmp_path):
    path, index_file, keys = saved
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = NeuralDB.from_pretrained(path).index
    other.remove(np.arange(2))  # another index: only facts 2 and 3
    other.save(elsewhere / index_file.name)
    meta = json.loads((path / st.INDEX / st.INDEX_META).read_text())
    meta["file"] = f"../../elsewhere/{index_file.name}"
    meta.pop("sha256", None), meta.pop("bytes", None)  # no checksum to catch it
    (path / st.INDEX / st.INDEX_META).write_text(json.dumps(meta))
    ids, _ = top_hits(path, keys)
    assert ids == list(range(len(FACTS)))  # rebuilt from the segments


def test_segment_that_is_a_fifo_is_refused_without_hanging(db):
    path, _ = db
    segment = only_segment(path)
    segment.unlink()
    os.mkfifo(segment)
    with pytest.raises(StoreError, match="not a regular file"):
        st.Store(path)


def test_an_oversized_config_is_refused_before_it_is_read(tmp_path, llama, exact_compute):
    from ndb.store import CONFIG, MAX_CONFIG_BYTES

    model, tok = llama
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=2, compute=exact_compute)
    with open(db.path / CONFIG, "r+b") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)  # sparse: no disk used
    with pytest.raises(StoreError, match="more than a config"):
        NeuralDB.from_pretrained(db.path)


@pytest.mark.parametrize("change", [
    {"gamma": "high"}, {"layer": 1.5}, {"layer": True}, {"prefixes": 5}, {"prefixes": [1]},
    {"guard_margin": "x"}, {"compute": {"steps": "many"}}, {"compute": {"kl_prompts": 3}},
    {"compute": {"split_keys": "yes"}}, {"compute": []},
])
def test_a_config_value_of_the_wrong_type_is_refused_in_one_line(saved, change):
    path, _, _ = saved
    file = st.config_file(path)
    data = json.loads(file.read_text())
    key, value = next(iter(change.items()))
    if key == "compute" and isinstance(value, dict):
        value = {**data["compute"], **value}
    file.write_text(json.dumps({**data, key: value}))
    with pytest.raises(StoreError, match=key if key != "compute" else "compute"):
        NeuralDB.from_pretrained(path)


@pytest.mark.parametrize("change, message", [
    ({"gamma": float("nan")}, "gamma must be a number in"),
    ({"gamma": 1e999}, "gamma must be a number in"),
    ({"layer": -1}, "layer is -1, not in"),
    ({"num_layers": 0}, "num_layers is 0, not in"),
    ({"d_key": 10**12}, "d_key is 1000000000000, not in"),
    ({"guard_margin": -0.5}, "guard_margin is -0.5, not in"),
])
def test_a_config_value_out_of_range_is_refused_in_one_line(saved, change, message):
    path, _, _ = saved
    file = st.config_file(path)
    file.write_text(json.dumps({**json.loads(file.read_text()), **change}))  # NaN as JSON does
    with pytest.raises(StoreError, match=message) as refused:
        NeuralDB.from_pretrained(path)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("text, message", [
    ('{"format_version": 1, "seed": 1' + "0" * 5000 + "}", "not valid JSON .a number too long"),
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply|not an object"),
    ("[1, 2]", "holds list, not an object"),
])
def test_a_config_that_is_not_a_json_object_is_refused_in_one_line(saved, text, message):
    path, _, _ = saved
    st.config_file(path).write_text(text)
    with pytest.raises(StoreError, match=message):
        NeuralDB.from_pretrained(path)


@pytest.mark.parametrize("content, message", [
    ("[]", "holds list, not an object"),
    ('{"version": 1, "next_id": 3, "evil": 1}', "its fields are"),
    ('{"version": 1, "next_id": ' + "9" * 5000 + "}", "a number too long"),
    ('{"version": 1, "next_id": ' + str(2**70) + "}", "integers in 0..2.62"),
])
def test_a_malformed_manifest_is_refused_in_one_line(db, content, message):
    path, _ = db
    (path / st.MANIFEST).write_text(content)
    with pytest.raises(StoreError, match=message):
        st.Store(path)


def test_a_manifest_whose_next_id_would_overwrite_a_stored_fact_is_refused(db):
    """An add takes next_id for its new fact: below a stored id it would replace that fact."""
    path, _ = db
    edit_manifest(path, next_id=1)
    with pytest.raises(StoreError, match="next_id 1 is not above every stored id .0..2."):
        st.Store(path)
