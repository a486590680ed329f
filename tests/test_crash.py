"""kill -9 at any moment must leave every database readable, in its old or its new state."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

from ndb import NeuralDB
from ndb import store as st

from conftest import write_jsonl

WRITER = """
import json, sys, numpy as np
from ndb.store import Store
s = Store(sys.argv[1])
i = int(sys.argv[2])
print("ready", flush=True)
while True:
    # each entry's content is derived from its fact record, so a torn write would show
    s.append(np.full((3, 16), i, np.float16), np.full((3, 4), i, np.float32),
             [json.dumps({"n": i, "k": k}) for k in range(3)])
    if i % 4 == 3:
        s.delete(s.entries.ids[:2])
    i += 1
"""


def check_consistent(path):
    store = st.Store(path)
    if not len(store.entries):
        return 0
    facts = [json.loads(f) for f in store.read("facts")]
    keys, residuals = store.read("keys"), store.read("residuals")
    for fact, key, res in zip(facts, keys, residuals):
        assert np.all(key == fact["n"]) and np.all(res == fact["n"])
    store.close()
    return len(facts)


def test_store_survives_kill_9_at_random_moments(tmp_path):
    path = tmp_path / "db"
    st.create(path, {"format_version": 1})
    rng = random.Random(0)
    for attempt in range(25):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(attempt * 1000)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.random() * 0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        check_consistent(path)  # opens, and every entry is whole
    assert check_consistent(path) > 0
    store = st.Store(path)
    store.append(np.zeros((1, 16), np.float16), np.zeros((1, 4), np.float32),
                 [json.dumps({"n": 0})])  # and it can still be written
    assert not [p for p in path.rglob("*.tmp")]


def test_cli_add_and_remove_survive_kill_9(tmp_path, tiny_model_dir):
    """An add commits all its facts or none, whenever it is killed; the unreferenced
    segments a killed add leaves are removed by the next commit."""
    facts = [{"subject": f"Entity{i}", "prompt": "{} is located in", "target_new": f"Place{i}"}
             for i in range(40)]
    facts_file = write_jsonl(tmp_path / "facts.jsonl", facts)
    db_path = tmp_path / "db"
    segments = db_path / st.SEGMENTS
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ndb = [sys.executable, "-m", "ndb.cli"]
    subprocess.run([*ndb, "build", str(write_jsonl(tmp_path / "one.jsonl", facts[:1])), "-o",
                    str(db_path), "--model", str(tiny_model_dir), "--layer", "1"],
                   check=True, env=env, capture_output=True)
    rng = random.Random(1)
    orphans_seen = False
    for attempt in range(6):
        cmd = ([*ndb, "add", str(db_path), str(facts_file), "--batch-size", "1"]
               if attempt % 2 == 0 else
               [*ndb, "remove", str(db_path), *map(str, NeuralDB(db_path).ids[1:])])
        before = len(NeuralDB(db_path))
        written = set(os.listdir(segments))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if attempt % 2 == 0:  # let a batch be written, then kill somewhere after it
            while set(os.listdir(segments)) <= written and proc.poll() is None:
                time.sleep(0.05)
            time.sleep(rng.random() * 1.0)
        else:  # a removal is one commit: kill before, during or after it
            time.sleep(rng.random() * 6.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        db = NeuralDB(db_path)
        assert db.facts().keys() == set(db.ids.tolist())
        assert db.index.ntotal == len(db) * db.config.compute.keys_per_fact
        if attempt % 2 == 0:
            assert len(db) in (before, before + len(facts))  # all or nothing
            orphans_seen |= len(os.listdir(segments)) > len(db.store.manifest.segments)
        db.close()
        listed = subprocess.run([*ndb, "list", str(db_path)], env=env, capture_output=True,
                                text=True)
        assert listed.returncode == 0 and len(listed.stdout.splitlines()) == len(db)
    assert orphans_seen  # some add was killed after writing a batch, before its commit
    subprocess.run([*ndb, "remove", str(db_path), "0"], check=True, env=env,
                   capture_output=True)
    assert sorted(os.listdir(segments)) == sorted(st.Manifest.read(db_path).segments)
