"""Reliability figures: kill -9 at random moments, malformed input, two writers, hostile
database directories and a full disk, each counted (trials, passed, failed and the failing
cases by name).

Every command runs through the ``ndb`` command line on a tiny random model saved as a local
Hugging Face directory: kill trials in real subprocesses (``python -m ndb.cli``), checks and
refusals in-process through click's runner (the same entry point, stderr apart).

    python benchmarks/reliability.py                     # about 10-15 minutes on 2 cores
    python benchmarks/reliability.py --kill-trials 12 --malformed 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
sys.path.insert(0, str(TESTS))  # the tables and constructions of the tests are reused

import test_errors  # noqa: E402
import test_hostile  # noqa: E402

from ndb import NeuralDB  # noqa: E402
from ndb import store as st  # noqa: E402
from ndb.cli.main import cli  # noqa: E402

from conftest import tiny_model  # noqa: E402

NDB = [sys.executable, "-m", "ndb.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
KILL_KINDS = ("add", "remove-mate", "remove-lone", "update", "build-resume", "compaction")
LOCKED = "is being written by another process"
PROGRESS_BAR = re.compile(r"\d+/\d+ \[")  # tqdm's "3/5 [00:01<00:02, ...]"

# A child that adds one fact per commit with random vectors (no model needed), so that the
# store passes COMPACT_SEGMENTS and compacts; it says when a compaction starts.
COMPACTOR = """
import json, sys, numpy as np
from ndb import NeuralDB
from ndb import store as st
compact = st.Store.compact
def announced(self, *args, **kwargs):
    print("compacting", flush=True)
    return compact(self, *args, **kwargs)
st.Store.compact = announced
db = NeuralDB.from_pretrained(sys.argv[1])
facts = json.loads(sys.argv[2])
per_fact = db.config.compute.keys_per_fact
rng = np.random.default_rng(len(db))
print("ready", flush=True)
for fact in facts:
    shape = (1, per_fact, db.config.d_key) if per_fact > 1 else (1, db.config.d_key)
    db.add_vectors([fact], rng.standard_normal(shape), rng.standard_normal((1, db.config.d_value)))
"""


class Tally:
    """Per category: trials, passes, and the failing cases by name (with why)."""

    def __init__(self) -> None:
        self.categories: dict[str, dict] = {}
        self.on_record: Callable[[], None] = lambda: None

    def record(self, category: str, case: str, problem: str | None, **extra) -> None:
        row = self.categories.setdefault(category, {"trials": 0, "passed": 0, "failed": 0,
                                                    "failures": []})
        row["trials"] += 1
        if problem is None:
            row["passed"] += 1
        else:
            row["failed"] += 1
            row["failures"].append({"case": case, "problem": problem})
        for name, value in extra.items():  # counters, e.g. how many kills landed mid-write
            row.setdefault(name, {}).setdefault(str(value), 0)
            row[name][str(value)] += 1
        self.on_record()

    def skip(self, category: str, reason: str) -> None:
        self.categories[category] = {"trials": 0, "passed": 0, "failed": 0, "failures": [],
                                     "skipped": reason}


# -- the command line --------------------------------------------------------------------

def invoke(*args: str):
    """One ndb command in this process: its click result (stderr kept apart)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(cli, [str(a) for a in args])
    result.warned = [str(w.message) for w in caught]
    return result


def listed(db: Path) -> list[dict]:
    result = invoke("list", db, "--json")
    if result.exit_code != 0:
        raise RuntimeError(f"ndb list failed: {result.stderr.strip() or result.exception!r}")
    return [json.loads(line) for line in result.stdout.splitlines()]


def hashes(path: Path) -> dict[str, str]:
    return {str(k): v for k, v in test_errors.hashes(path).items()}


def one_line_refusal(result, message: str = "", progress: bool = False) -> str | None:
    """None when the result is a one-line refusal saying ``message``; else what is wrong.
    ``progress``: the command got as far as computing, so progress bar lines may come first."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if progress:
        lines = [line for line in lines if not PROGRESS_BAR.search(line)]
    if result.exit_code == 0:
        return "it succeeded"
    if not isinstance(result.exception, SystemExit) or "Traceback" in result.output:
        return f"it crashed: {result.exception!r}"[:300]
    if len(lines) != 1 or not lines[0].startswith("Error: ") or message not in lines[0]:
        return f"not a one-line refusal saying {message!r}: {result.stderr.strip()!r}"[:300]
    return None


class Facts:
    """Fresh, distinct facts with keys; subjects may be shared to make residual groups."""

    RELATIONS = ("{} is located in", "{} was founded in", "The language of {} is")

    def __init__(self) -> None:
        self.n = 0

    def make(self, subject: str | None = None, relation: int = 0) -> dict:
        self.n += 1
        return {"subject": subject or f"Entity{self.n}", "prompt": self.RELATIONS[relation],
                "target_new": f"Place{self.n}", "key": f"k{self.n}"}

    def group(self) -> list[dict]:
        subject = f"Group{self.n + 1}"
        return [self.make(subject, r) for r in range(2)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_model_dir(path: Path) -> Path:
    import transformers as tf

    from ndb.anchor import anchor_tokenizer
    from ndb.loading import resolve_model_path

    tiny_model("llama").save_pretrained(path)
    anchor_tokenizer(tf.AutoTokenizer.from_pretrained(resolve_model_path(None))
                     ).save_pretrained(path)
    return path


def build(db: Path, records: list[dict], model_dir: Path, work: Path, *extra: str) -> None:
    facts = write_jsonl(work / f"{db.name}-seed.jsonl", records)
    result = invoke("build", facts, "-o", db, "--model", model_dir, "--layer", "1",
                    "--batch-size", "1", *extra)
    if result.exit_code != 0:
        raise RuntimeError(f"building {db}: {result.stderr.strip() or result.exception!r}")


# -- kill -9 -------------------------------------------------------------------------------

def signature(rows: list[dict], old_ids: set[int]) -> list[str]:
    """A fact set to compare: ids kept for facts the old state held, new facts by content."""
    return sorted(json.dumps({**r, "id": r.get("id") if r.get("id") in old_ids else None},
                             sort_keys=True) for r in rows)


def listing(path: Path) -> set[tuple[str, int]]:
    return {(str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*")
            if p.is_file()}


def check_after_kill(db: Path, allowed: list[list[dict]], old_ids: set[int],
                     facts: Facts, work: Path) -> tuple[str | None, int | None]:
    """The database opens, holds one of the allowed fact sets exactly, its keys and
    residuals are readable and finite, and the next write (an add of one fact) succeeds.
    Returns (problem, index of the state found)."""
    try:
        rows = listed(db)
    except Exception as err:  # noqa: BLE001 (a failure to report, whatever it is)
        return f"does not open: {err}", None
    found = signature(rows, old_ids)
    states = [signature(s, old_ids) for s in allowed]
    if found not in states:
        return f"fact set is neither old nor new ({len(rows)} facts)", None
    try:
        ndb = NeuralDB.from_pretrained(db)
        keys, residuals = ndb.store.read("keys"), ndb.store.read("residuals")
        ndb.close()
    except Exception as err:  # noqa: BLE001
        return f"keys or residuals unreadable: {err}", None
    if len(keys) != len(rows) or not np.isfinite(residuals).all() or \
            not np.isfinite(keys.astype(np.float32)).all():
        return "keys or residuals missing or not finite", None
    after = invoke("add", db, write_jsonl(work / "next.jsonl", [facts.make()]))
    if after.exit_code != 0 or len(listed(db)) != len(rows) + 1:
        return f"the next add fails: {after.stderr.strip()[-200:]}", None
    return None, states.index(found)


def kill_trial(kind: str, trial: int, dbs: dict[str, Path], facts: Facts, work: Path,
               durations: dict[str, float], rng: random.Random, tally: Tally) -> None:
    db = dbs["compact" if kind == "compaction" else "build" if kind == "build-resume"
             else "main"]
    command, allowed = plan(kind, db, facts, work)
    old_ids = {r["id"] for r in allowed[0]}
    before = listing(db)
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=ENV, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if kind == "compaction" and trial % 2:  # half of them aimed at a compaction
        for line in proc.stdout:
            if line.strip() == "compacting":
                break
        time.sleep(rng.uniform(0, 0.3))
    else:  # the model load takes most of the start: aim past it, sometimes past the end
        expected = durations.get(kind, 6.0)
        time.sleep(rng.uniform(0.35, 1.05) * expected)
    running = proc.poll() is None
    touched = listing(db) != before
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    if not running:
        durations[kind] = time.perf_counter() - start  # it finished: a better estimate
    problem, state = check_after_kill(db, allowed, old_ids, facts, work)
    moment = ("after it ended" if not running else
              "mid-command, after writing to the database" if touched else
              "mid-command, before writing to the database")
    ended = None if state is None else ("old" if state == 0 else
                                        "new" if state == len(allowed) - 1 else "between")
    tally.record(f"kill -9: {kind}", f"trial {trial}", problem, killed=moment,
                 state_after=ended)


def plan(kind: str, db: Path, facts: Facts, work: Path) -> tuple[list[str], list[list[dict]]]:
    """The command to kill, and the fact sets it may leave: the old one first, the new last
    (with states between for commands that commit batch by batch)."""
    rows = ensure_candidates(kind, db, facts, work)
    by_subject: dict[str, list[dict]] = {}
    for row in rows:
        by_subject.setdefault(row["subject"], []).append(row)
    if kind == "add":
        new = [*facts.group(), facts.make()]
        facts_file = write_jsonl(work / "add.jsonl", new)
        return ([*NDB, "add", str(db), str(facts_file), "--batch-size", "1"],
                [rows, rows + new])
    if kind in ("remove-mate", "remove-lone"):
        size = 2 if kind == "remove-mate" else 1
        victim = next(g for g in by_subject.values() if len(g) == size)[0]
        return ([*NDB, "remove", str(db), str(victim["id"])],
                [rows, [r for r in rows if r["id"] != victim["id"]]])
    if kind == "update":
        target = rows[-1]
        changed = {**target, "target_new": f"Updated{facts.n}"}
        facts.n += 1
        fields = {k: v for k, v in changed.items() if k != "id"}
        facts_file = write_jsonl(work / "update.jsonl", [fields])
        return ([*NDB, "update", str(db), str(facts_file)],
                [rows, [changed if r["id"] == target["id"] else r for r in rows]])
    if kind == "build-resume":
        new = [facts.make() for _ in range(3)]
        facts_file = write_jsonl(work / "build.jsonl", [strip_id(r) for r in rows] + new)
        return ([*NDB, "build", str(facts_file), "-o", str(db), "--resume",
                 "--batch-size", "1"], prefixes(rows, new))
    if kind == "compaction":
        new = [facts.make() for _ in range(70)]
        return ([sys.executable, "-c", COMPACTOR, str(db), json.dumps(new)],
                prefixes(rows, new))
    raise ValueError(kind)


def strip_id(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "id"}


def prefixes(rows: list[dict], new: list[dict]) -> list[list[dict]]:
    """Fact sets of a command committing ``new`` one by one: old, ..., new."""
    return [rows + new[:k] for k in range(len(new) + 1)]


def ensure_candidates(kind: str, db: Path, facts: Facts, work: Path) -> list[dict]:
    """Make sure the database holds what the trial needs (a two-fact subject to remove one
    of, a lone fact); returns its listing."""
    rows = listed(db)
    sizes = [sum(r["subject"] == s for r in rows) for s in {r["subject"] for r in rows}]
    need = {"remove-mate": 2, "remove-lone": 1}.get(kind)
    if need and need not in sizes:
        extra = facts.group() if need == 2 else [facts.make()]
        result = invoke("add", db, write_jsonl(work / "setup.jsonl", extra))
        if result.exit_code != 0:
            raise RuntimeError(f"setting up {kind}: {result.stderr.strip()}")
        rows = listed(db)
    return rows


def run_kills(n: int, work: Path, model_dir: Path, facts: Facts, rng: random.Random,
              tally: Tally, bar: tqdm) -> None:
    dbs = {name: work / f"{name}.ndb" for name in ("main", "build", "compact")}
    for db in dbs.values():
        build(db, [facts.make()] + facts.group(), model_dir, work)
    durations: dict[str, float] = {}
    for trial in range(n):
        kind = KILL_KINDS[trial % len(KILL_KINDS)]
        bar.set_postfix_str(f"kill -9 {kind}")
        kill_trial(kind, trial, dbs, facts, work, durations, rng, tally)
        bar.update()


# -- malformed input -------------------------------------------------------------------------

def malformed_cases() -> Iterator[tuple[str, Callable[[Path, Path, Path], list[str]], str]]:
    """(name, arguments given the database, a scratch directory and the model, message)."""
    for i, (record, message) in enumerate(test_errors.BAD_FACTS):
        def facts_args(db, tmp, model_dir, record=record):
            return ["add", db, test_errors.write_bad_facts(tmp / "bad.jsonl", record)]
        yield f"bad facts {i}: {message}", facts_args, message
    for i, (args, message) in enumerate(test_errors.BAD_ARGUMENTS):
        def argument_args(db, tmp, model_dir, args=args):
            return [a.format(**scratch_paths(db, tmp, model_dir)) for a in args]
        yield f"bad arguments {i}: {' '.join(args[:2])}: {message}", argument_args, message


def scratch_paths(db: Path, tmp: Path, model_dir: Path) -> dict[str, Path]:
    """The placeholders of test_errors.BAD_ARGUMENTS."""
    paths = {"db": db, "new": tmp / "new", "file": tmp / "file.txt", "model": model_dir,
             "facts": write_jsonl(tmp / "facts.jsonl", [test_errors.COUNTERFACT]),
             "plain": write_jsonl(tmp / "plain.jsonl", [{**test_errors.PLAIN,
                                                         "target_true": None}]),
             "weightless": tmp / "weightless"}
    paths["file"].write_text("not a directory")
    paths["weightless"].mkdir(exist_ok=True)
    shutil.copy(model_dir / "config.json", paths["weightless"] / "config.json")
    return paths


def run_malformed(limit: int | None, work: Path, model_dir: Path, tally: Tally,
                  bar: tqdm) -> None:
    db = work / "errors.ndb"  # as test_errors builds it: the table's messages name its settings
    facts = write_jsonl(work / "cf.jsonl", [test_errors.COUNTERFACT])
    result = invoke("build", facts, "-o", db, "--model", model_dir, "--layer", "1",
                    "--gamma", "0.8")
    assert result.exit_code == 0, result.stderr
    for name, arguments, message in list(malformed_cases())[:limit]:
        bar.set_postfix_str("malformed input")
        tmp = Path(tempfile.mkdtemp(dir=work))
        before = hashes(db)
        result = invoke(*arguments(db, tmp, model_dir))
        problem = one_line_refusal(result, message)
        if problem is None and hashes(db) != before:
            problem = "the database changed"
        if problem is None and (tmp / "new").exists():
            problem = "a path that must stay absent was created"
        tally.record("malformed input", name, problem)
        shutil.rmtree(tmp)
        bar.update()


# -- two writers -----------------------------------------------------------------------------

def run_writers(n: int, work: Path, model_dir: Path, facts: Facts, tally: Tally,
                bar: tqdm) -> None:
    db = work / "writers.ndb"
    build(db, [facts.make()], model_dir, work)
    for trial in range(n):
        bar.set_postfix_str("two writers")
        old = listed(db)
        batches = [[facts.make() for _ in range(3)] for _ in range(2)]
        files = [write_jsonl(work / f"writer{w}.jsonl", b) for w, b in enumerate(batches)]
        procs = [subprocess.Popen([*NDB, "add", str(db), str(f)], env=ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for f in files]
        errors = [p.communicate()[1] for p in procs]
        ok = [p.returncode == 0 for p in procs]
        refused = [not good and LOCKED in err and "Traceback" not in err
                   and len([x for x in err.splitlines() if x.startswith("Error:")]) == 1
                   for good, err in zip(ok, errors)]
        expected = old + [r for b, good in zip(batches, ok) if good for r in b]
        old_ids = {r["id"] for r in old}
        problem = None
        if not all(good or bad for good, bad in zip(ok, refused)):
            problem = "a writer failed otherwise than refused as locked: " + \
                      " | ".join(e.strip().splitlines()[-1] for e in errors if e.strip())
        elif signature(listed(db), old_ids) != signature(expected, old_ids):
            problem = "the fact set is not the old one plus the successful writer's facts"
        outcome = "both succeeded, one after the other" if all(ok) else \
            "one succeeded, one refused as locked" if any(ok) else "both refused"
        tally.record("two writers", f"trial {trial}", problem, outcome=outcome)
        bar.update()


# -- hostile directories ---------------------------------------------------------------------

def hostile_cases() -> dict[str, Callable[[Path, Path], tuple[list[str], str]]]:
    """name -> make(db, outside): breaks the database, returns (the command, what its one
    line must say). ``outside`` is a sentinel directory beside the database."""
    th = test_hostile

    def segments_symlink(db, outside):
        shutil.copy(th.only_segment(db), outside)
        (db / st.SEGMENTS).rename(db / "real-segments")
        (db / st.SEGMENTS).symlink_to(outside)
        return ["remove", db, "0"], "segments is a symbolic link"

    def lock_symlink(db, outside):
        (db / st.LOCK).unlink(missing_ok=True)
        (db / st.LOCK).symlink_to(outside / "precious.txt")
        return ["remove", db, "0"], "cannot be opened (it is a symbolic link)"

    def segment_name(name):
        def make(db, outside):
            stolen = outside / th.only_segment(db).name
            shutil.copy(th.only_segment(db), stolen)
            th.edit_manifest(db, segments=[name(stolen)])
            return ["list", db], "is not a segment file name"
        return make

    def segment_symlink(db, outside):
        segment = th.only_segment(db)
        shutil.move(segment, outside / segment.name)
        segment.symlink_to(outside / segment.name)
        return ["list", db], "symbolic link"

    def truncated(db, outside):
        segment = th.only_segment(db)
        segment.write_bytes(segment.read_bytes()[: segment.stat().st_size // 2])
        return ["list", db], "is corrupted"

    def bit_flip(db, outside):
        import h5py

        segment = th.only_segment(db)
        with h5py.File(segment, "r") as f:
            at = f["residuals"].id.get_offset()
        data = bytearray(segment.read_bytes())
        data[at + 5] ^= 0x10
        segment.write_bytes(bytes(data))
        return ["list", db], "is corrupted"

    def counts(db, outside):
        th.write_crafted(db, stored_segment(db), record_rows=5)
        return ["list", db], "holds 3 entries, the manifest records 5"

    def counts_between_datasets(db, outside):
        segment = stored_segment(db)
        keys = segment["keys"][0]
        segment["keys"] = (np.concatenate([keys, keys[:1]]), {})
        th.write_crafted(db, segment)
        return ["list", db], "keys has 4 rows, ids has 3"

    def gzip_bomb(db, outside):
        bomb = stored_segment(db)
        n, width = 3, bomb["residuals"][0].shape[1]
        bomb["residuals"] = (None, {"shape": (n, width), "dtype": np.float32,
                                    "chunks": (1, width), "compression": "gzip"})
        th.write_crafted(db, bomb)
        return ["generate", db, "Paris is", "--max-new-tokens", "1"], \
            "stored compressed or chunked"

    def fifo(db, outside):
        segment = th.only_segment(db)
        segment.unlink()
        os.mkfifo(segment)
        return ["list", db], "not a regular file"

    def huge_records(db, outside):
        segment = th.plain_segment()
        import h5py

        segment["facts"] = (np.array(["x" * (2 << 20)] * 3, dtype=h5py.string_dtype()), {})
        th.write_crafted(db, segment)
        return ["list", db], "fact records are larger"

    return {"segments/ is a symlink outside": segments_symlink,
            ".lock is a symlink outside": lock_symlink,
            "segment named ../ outside": segment_name(
                lambda p: f"../../{p.parent.name}/{p.name}"),
            "segment named by an absolute path": segment_name(str),
            "segment file is a symlink outside": segment_symlink,
            "truncated segment": truncated,
            "bit flip in a segment": bit_flip,
            "manifest row count disagrees": counts,
            "datasets' row counts disagree": counts_between_datasets,
            "gzip-compressed residuals (a bomb's storage)": gzip_bomb,
            "segment is a FIFO": fifo,
            "fact records larger than the file": huge_records}


def stored_segment(db: Path) -> dict:
    """The database's only segment as test_hostile.write_crafted takes it (3 entries, the
    shapes this database expects), to be altered."""
    import h5py

    segment = {}
    with h5py.File(test_hostile.only_segment(db), "r") as f:
        for name, ds in f.items():
            text = h5py.check_string_dtype(ds.dtype) is not None
            segment[name] = (ds[()].astype(h5py.string_dtype()) if text else ds[()], {})
    return segment


class Exploit:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def run_hostile(limit: int | None, work: Path, model_dir: Path, facts: Facts, tally: Tally,
                bar: tqdm) -> None:
    pristine = work / "hostile-pristine.ndb"
    build(pristine, [facts.make() for _ in range(3)], model_dir, work, "--batch-size", "3")
    cases = list(hostile_cases().items())[:limit]
    for name, make in cases:
        bar.set_postfix_str("hostile directories")
        with hostile_copy(pristine, work) as (db, outside):
            args, message = make(db, outside)
            sentinel = hashes(outside)
            result = invoke(*args)
            problem = one_line_refusal(result, message)
            if problem is None and hashes(outside) != sentinel:
                problem = "a file outside the database changed"
            tally.record("hostile directory", name, problem)
        bar.update()
    for name, check in (("corrupted index cache", corrupted_index),
                        ("index cache is a pickle", pickled_index))[:limit]:
        with hostile_copy(pristine, work) as (db, outside):
            sentinel = hashes(outside)
            problem = check(db, outside, model_dir)
            if problem is None and hashes(outside) != sentinel:
                problem = "a file outside the database changed"
            tally.record("hostile directory", name, problem)
        bar.update()


@contextlib.contextmanager
def hostile_copy(pristine: Path, work: Path) -> Iterator[tuple[Path, Path]]:
    place = Path(tempfile.mkdtemp(dir=work))
    db, outside = place / "db", place / "outside"
    shutil.copytree(pristine, db, symlinks=True)
    outside.mkdir()
    (outside / "precious.txt").write_text("mine")
    try:
        yield db, outside
    finally:
        shutil.rmtree(place)


def index_file(db: Path) -> Path:
    """Save the key index cache (the command line builds it in memory) and name its file."""
    ndb = NeuralDB.from_pretrained(db)
    ndb.index  # noqa: B018 (built, then saved by flush)
    ndb.flush()
    ndb.close()
    meta = json.loads((db / st.INDEX / st.INDEX_META).read_text())
    return db / st.INDEX / meta["file"]


def corrupted_index(db: Path, outside: Path, model_dir: Path) -> str | None:
    """A corrupted index cache is rebuilt from the segments, with a warning."""
    path = index_file(db)
    before = listed(db)
    data = bytearray(path.read_bytes())
    for at in range(len(data) - 64, len(data), 4):
        data[at] ^= 0x40
    path.write_bytes(bytes(data))
    result = invoke("generate", db, "Paris is", "--max-new-tokens", "1")
    if result.exit_code != 0:
        return f"refused instead of rebuilt: {result.stderr.strip()[-200:]}"
    if not any("corrupted" in w for w in result.warned):
        return f"no warning that the index was corrupted (warned: {result.warned})"
    return None if listed(db) == before else "the fact set changed"


def pickled_index(db: Path, outside: Path, model_dir: Path) -> str | None:
    """An index cache replaced by a pickle that would create a file: nothing may run it."""
    path = index_file(db)
    marker = outside / "code-ran"
    path.write_bytes(pickle.dumps(Exploit(marker)))
    meta_path = db / st.INDEX / st.INDEX_META
    meta = json.loads(meta_path.read_text())
    meta.pop("sha256", None), meta.pop("bytes", None)  # no checksum to catch it
    meta_path.write_text(json.dumps(meta))
    result = invoke("generate", db, "Paris is", "--max-new-tokens", "1")
    if marker.exists():
        return "code in the database directory was executed"
    if result.exit_code != 0 and one_line_refusal(result) is not None:
        return f"neither rebuilt nor refused in one line: {result.stderr.strip()[-200:]}"
    return None


# -- disk full -------------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[None]:
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True, capture_output=True, text=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)  # ndb may hold files open


def run_disk_full(n: int, work: Path, model_dir: Path, facts: Facts, tally: Tally,
                  bar: tqdm) -> None:
    pristine = work / "disk-pristine.ndb"
    build(pristine, [facts.make()], model_dir, work)
    size = sum(p.stat().st_size for p in pristine.rglob("*") if p.is_file())
    mount = work / "tmpfs"
    try:
        with tmpfs(mount, size + (4 << 20)):
            pass
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        reason = getattr(err, "stderr", None) or str(err)
        tally.skip("disk full", f"cannot mount a tmpfs here: {reason.strip()}")
        bar.update(n)
        return
    for trial in range(n):
        bar.set_postfix_str("disk full")
        free = 4096 * (4 ** trial)  # 4 KiB, 16 KiB, ...: full at different moments
        with tmpfs(mount, size + (4 << 20)):
            db = mount / "db"
            shutil.copytree(pristine, db)
            filler = mount / "filler"
            room = shutil.disk_usage(mount).free - free
            with filler.open("wb") as out:
                out.truncate(0)
                out.write(b"\0" * max(room, 0))
            before = hashes(db)
            new = [facts.make() for _ in range(3)]
            result = invoke("add", db, write_jsonl(work / "full.jsonl", new), "--batch-size", "1")
            if result.exit_code == 0:
                problem, outcome = None, "fitted"
            else:
                outcome = "refused"
                problem = one_line_refusal(result, "the disk is full", progress=True)
                if problem is None and hashes(db) != before:
                    problem = "the database changed"
            filler.unlink()
            if problem is None:
                after = invoke("add", db, write_jsonl(work / "full.jsonl", [facts.make()]))
                if after.exit_code != 0:
                    problem = f"the next add fails once space is freed: {after.stderr.strip()}"
            tally.record("disk full", f"{free // 1024} KiB free", problem, outcome=outcome)
        bar.update()


# -- report ----------------------------------------------------------------------------------

def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}


def markdown(report: dict) -> str:
    lines = ["# Reliability", "", f"`{report['command']}`", "",
             f"{report['machine']['platform']}, {report['machine']['cpus']} CPUs, "
             f"Python {report['machine']['python']}, torch {report['machine']['torch']}; "
             f"{report['seconds']:.0f} s" + ("" if report["finished"] else
                                              " (interrupted: the counts so far)"), "",
             "| category | trials | passed | failed | notes |", "|---|---:|---:|---:|---|"]
    for name, row in report["categories"].items():
        notes = "; ".join(f"{key}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
                          for key, counts in row.items() if isinstance(counts, dict))
        if "skipped" in row:
            notes = f"skipped: {row['skipped']}"
        lines.append(f"| {name} | {row['trials']} | {row['passed']} | {row['failed']} | "
                     f"{notes} |")
    totals = report["totals"]
    lines += [f"| **all** | {totals['trials']} | {totals['passed']} | {totals['failed']} | |",
              ""]
    failures = [(name, f) for name, row in report["categories"].items()
                for f in row["failures"]]
    lines += ["Failures:", ""] + [f"- {name}, {f['case']}: {f['problem']}"
                                  for name, f in failures] if failures else ["No failures."]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    tally, facts = Tally(), Facts()
    start = time.perf_counter()
    n_malformed = min(args.malformed, len(test_errors.BAD_FACTS) +
                      len(test_errors.BAD_ARGUMENTS))
    n_hostile = min(args.hostile, len(hostile_cases())) + min(args.hostile, 2)
    total = args.kill_trials + n_malformed + args.writers + n_hostile + args.disk_full
    with tempfile.TemporaryDirectory(dir=args.work) as tmp, \
            tqdm(total=total, unit="trial") as bar:
        tqdm._instances.discard(bar)  # a refusal closes the command's bars, not this one
        work = Path(tmp)
        # saved after every trial: an interrupted run still reports what it counted
        tally.on_record = lambda: save(args, tally, time.perf_counter() - start, False)
        model_dir = make_model_dir(work / "tiny-llama")
        for category in (lambda: run_malformed(n_malformed, work, model_dir, tally, bar),
                         lambda: run_hostile(args.hostile, work, model_dir, facts, tally, bar),
                         lambda: run_writers(args.writers, work, model_dir, facts, tally, bar),
                         lambda: run_disk_full(args.disk_full, work, model_dir, facts, tally,
                                               bar),
                         lambda: run_kills(args.kill_trials, work, model_dir, facts, rng,
                                           tally, bar)):
            category()
    return save(args, tally, time.perf_counter() - start, True)


def save(args: argparse.Namespace, tally: Tally, seconds: float, finished: bool) -> dict:
    rows = tally.categories.values()
    report = {"command": " ".join(["python", *sys.argv]), "machine": machine(),
              "seconds": seconds, "finished": finished, "seed": args.seed,
              "totals": {k: sum(r[k] for r in rows) for k in ("trials", "passed", "failed")},
              "categories": tally.categories}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    return report


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kill-trials", type=int, default=108,
                    help="kill -9 trials, spread over the kinds in turn")
    ap.add_argument("--malformed", type=int, default=1000,
                    help="at most this many rows of test_errors' tables (default: all)")
    ap.add_argument("--hostile", type=int, default=1000,
                    help="at most this many hostile directories of each kind (default: all)")
    ap.add_argument("--writers", type=int, default=6, help="two-writer trials")
    ap.add_argument("--disk-full", type=int, default=5, help="disk-full trials")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory's parent")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "reliability",
                    help="writes OUT.json and OUT.md")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    report = run(parse(argv))
    print(markdown(report))
    sys.exit(1 if report["totals"]["failed"] else 0)


if __name__ == "__main__":
    main()
