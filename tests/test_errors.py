"""Bad input and bad arguments: one line on stderr, nothing changed; bugs keep tracebacks."""

import errno
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ndb import NeuralDB
from ndb.cli.main import cli
from ndb.errors import ConfigError, FactError, StoreError
from ndb.facts import MAX_PROMPTS, MAX_TEXT_CHARS, Fact

from conftest import FAST_COMPUTE, write_jsonl

PLAIN = {"subject": "Paris", "prompt": "{} is located in the country of",
         "target_new": "Japan", "target_true": "France"}
COUNTERFACT = {"case_id": 1, "requested_rewrite": {
    "prompt": "{} is located in the country of", "subject": "Paris", "relation_id": "P17",
    "target_new": {"str": "Japan", "id": "Q17"}, "target_true": {"str": "France"}},
    "paraphrase_prompts": ["The city of Paris is in"],
    "neighborhood_prompts": ["Lyon is located in the country of"],
    "attribute_prompts": ["Tokyo is located in the country of"],
    "generation_prompts": ["Paris is a city in"]}
ZSRE = {"subject": "Paris", "src": "Which country is Paris in?", "alt": "Japan",
        "answers": ["France"], "rephrase": "Paris lies in which country?",
        "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}


def _cf(**rewrite):
    return {**COUNTERFACT, "requested_rewrite": {**COUNTERFACT["requested_rewrite"], **rewrite}}


# (facts file records or raw text, what the one line must say)
BAD_FACTS = [
    ({**PLAIN, "subject": {"name": "Paris"}}, "'subject' must be a string, got dict"),
    ({**PLAIN, "subject": 7}, "'subject' must be a string, got int"),
    ({**PLAIN, "subject": None}, "'subject' must be a string, got null"),
    ({**PLAIN, "prompt": ["{} is in"]}, "'prompt' must be a string, got list"),
    ({**PLAIN, "target_new": 3.5}, "'target_new' must be a string, got float"),
    ({**PLAIN, "target_true": {"str": "France"}}, "'target_true' must be a string, got dict"),
    ({**PLAIN, "id": {"k": 1}}, "'id' must be a string or an integer, got dict"),
    ({**PLAIN, "id": [1]}, "'id' must be a string or an integer, got list"),
    ({**PLAIN, "id": True}, "'id' must be a string or an integer, got bool"),
    ({**PLAIN, "paraphrases": {"a": "b"}}, "'paraphrases' must be a list of strings, got dict"),
    ({**PLAIN, "paraphrases": ["ok", 3]}, "'paraphrases[1]' must be a string, got int"),
    ({**PLAIN, "paraphrases": [None]}, "'paraphrases[0]' must be a string, got null"),
    ({**PLAIN, "paraphrases": ["Paris is in"] * (MAX_PROMPTS + 1)},
     f"'paraphrases' has {MAX_PROMPTS + 1} entries; the limit is {MAX_PROMPTS}"),
    ({**PLAIN, "subject": "Par\x00is"}, "'subject' contains a control character U+0000 at "
                                        "position 3"),
    ({**PLAIN, "subject": "Par\ud800is"}, "'subject' contains a lone surrogate (not valid "
                                          "Unicode) U+D800"),
    ({**PLAIN, "target_new": "Ja\x1bpan"}, "'target_new' contains a control character U+001B"),
    ({**PLAIN, "prompt": "{} is in" + "x" * 1_000_000}, "'prompt' has 1,000,008 characters; "
                                                        "the limit is 1,000"),
    ({**PLAIN, "subject": "P" * (MAX_TEXT_CHARS + 1)}, "'subject' has 1,001 characters"),
    ({**PLAIN, "prompt": "{} is\x7f in"}, "'prompt' contains a control character U+007F"),
    ({**PLAIN, "prompt": "no slot"}, "exactly one '{}'"),
    ({"subject": "Paris", "prompt": "{} is"}, "missing field target_new"),
    ([1, 2], "expected a JSON object, got list"),
    ('{"subject": NaN, "prompt": "{} is", "target_new": "x"}', "'subject' must be a string, "
                                                               "got float"),
    ('{"subject": "Paris",', "line 1: not valid JSON"),
    ("", "no facts found"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (b'{"subject": "Par\xffis"}', "not UTF-8 text"),
    ({**COUNTERFACT, "requested_rewrite": "Paris -> Japan"},
     "'requested_rewrite' must be an object, got str"),
    (_cf(target_new={"id": "Q17"}), "missing field str"),
    (_cf(target_new={"str": 5}), "'target_new.str' must be a string, got int"),
    (_cf(relation_id=17), "'relation_id' must be a string, got int"),
    ({**COUNTERFACT, "case_id": {"n": 1}}, "'case_id' must be a string or an integer"),
    ({**COUNTERFACT, "paraphrase_prompts": "The city of Paris is in"},
     "'paraphrase_prompts' must be a list of strings, got str"),
    ({**COUNTERFACT, "neighborhood_prompts": {"Lyon": "is in"}},
     "'neighborhood_prompts' must be a list of strings, got dict"),
    ({**COUNTERFACT, "neighborhood_prompts": [1]}, "'neighborhood_prompts[0]' must be a string"),
    ({**COUNTERFACT, "generation_prompts": [None]}, "'generation_prompts[0]' must be a string"),
    ({**COUNTERFACT, "attribute_prompts": "Tokyo"}, "'attribute_prompts' must be a list"),
    ({**ZSRE, "answers": []}, "'answers' must be a non-empty list"),
    ({**ZSRE, "answers": "France"}, "'answers' must be a list of strings, got str"),
    ({**ZSRE, "answers": [""]}, "'answers[0]' must be a non-empty string"),
    ({**ZSRE, "answers": [1]}, "'answers[0]' must be a string, got int"),
    ({**ZSRE, "alt": 5}, "'alt' must be a string, got int"),
    ({**ZSRE, "alt": ""}, "'alt' must be a non-empty string"),
    ({**ZSRE, "src": 5}, "'src' must be a string, got int"),
    ({**ZSRE, "rephrase": ["a"]}, "'rephrase' must be a string, got list"),
    ({**ZSRE, "loc": {"q": 1}}, "'loc' must be a string, got dict"),
    ({k: v for k, v in ZSRE.items() if k not in ("alt", "answers")}, "missing field alt"),
]

# (arguments; {db} the database, {facts} a good facts file, {new} a path that must stay
# absent, {file} an existing plain file; what the one line must say)
BAD_ARGUMENTS = [
    (("build", "{facts}", "-o", "{new}", "--gamma", "-0.5"), "--gamma"),
    (("build", "{facts}", "-o", "{new}", "--gamma", "1.5"), "--gamma"),
    (("build", "{facts}", "-o", "{new}", "--gamma", "nan"), "--gamma"),
    (("build", "{facts}", "-o", "{new}", "--layer", "-1"), "--layer"),
    (("build", "{facts}", "-o", "{new}", "--layer", "99", "--model", "{model}"),
     "layer 99 is out of range"),
    (("build", "{facts}", "-o", "{new}", "--seed", "-1"), "--seed"),
    (("build", "{facts}", "-o", "{new}", "--batch-size", "0"), "--batch-size"),
    (("build", "{facts}", "-o", "{new}", "--device", "bogus"), "'bogus' is not a torch device"),
    (("build", "{facts}", "-o", "{new}", "--index", "nosuch"), "unknown index kind 'nosuch'"),
    (("build", "{facts}", "-o", "{new}", "--precision", "float8"), "--precision"),
    (("build", "{facts}", "-o", "{new}", "--residual-prefixes", "-1"), "--residual-prefixes"),
    (("build", "{facts}", "-o", "{new}", "--residual-prefixes", "6"),
     "residual_prefixes must be None or 0..n_prefixes (5), got 6"),
    (("build", "{facts}", "-o", "{file}/db"), "is not a writable directory"),
    # where access() says yes (to root) and nothing can be made
    (("build", "{facts}", "-o", "/proc/ndb-test-db"), "/proc is not a writable directory"),
    (("build", "{facts}", "-o", "{db}"), "already exists"),
    (("build", "{facts}", "-o", "{db}", "--resume", "--layer", "2", "--gamma", "0.5"),
     "--layer 2 (the database has 1); --gamma 0.5 (the database has 0.8)"),
    (("add", "{db}", "{facts}", "--device", "bogus"), "'bogus' is not a torch device"),
    (("add", "{db}", "{new}"), "no such file"),
    (("remove", "{db}", "0", "--device", "bogus"), "'bogus' is not a torch device"),
    (("generate", "{db}", "Paris is", "--max-new-tokens", "0"), "--max-new-tokens"),
    (("generate", "{db}", "Paris\x00 is"), "'PROMPT' contains a control character U+0000"),
    (("generate", "{db}", "Paris is", "--device", "bogus"), "'bogus' is not a torch device"),
    (("eval", "{facts}", "--db", "{file}"), "already exists and is a file"),
    (("eval", "{facts}", "--json", "{file}/out.json"), "is not a writable directory"),
    (("eval", "{facts}", "--methods", "memit"), "need generic text"),
    (("eval", "{facts}", "--methods", "memit", "--stats-text", "{new}"), "no such file"),
    (("eval", "{plain}"), "fact 1 has no target_true"),
    (("eval", "{facts}", "--general", "{new}"), "no such directory"),
    (("eval", "{facts}", "--consistency-dir", "{new}"), "consistency needs ROME's"),
    (("info", "{new}"), "not a fact database"),
    (("build", "{facts}", "-o", "{new}", "--model", "{weightless}"), "cannot load model"),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("errors")
    facts = write_jsonl(tmp / "facts.jsonl", [COUNTERFACT])
    db = tmp / "db"
    result = CliRunner().invoke(cli, ["build", str(facts), "-o", str(db), "--model",
                                      str(tiny_model_dir), "--layer", "1", "--gamma", "0.8"])
    assert result.exit_code == 0, result.output
    return db


def hashes(path):
    return {p.relative_to(path): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def assert_one_line_refusal(result, message, progress=False):
    """``progress``: the command got as far as computing, so a progress bar came first."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    lines = result.stderr.splitlines()
    if progress:
        # a bar's rate reads "fact/s", or "s/fact" when a fact takes over a second
        lines = [line for line in lines
                 if line.strip() and "fact/s]" not in line and "s/fact]" not in line]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output


def write_bad_facts(path: Path, record) -> Path:
    """A facts file whose second record is ``record`` (bytes or str: the whole file)."""
    if isinstance(record, bytes):
        path.write_bytes(record)
    elif isinstance(record, str):
        path.write_text(record)
    else:
        path.write_text(json.dumps(PLAIN) + "\n" + json.dumps(record) + "\n")
    return path


@pytest.mark.parametrize("record, message", BAD_FACTS)
def test_bad_facts_are_refused_in_one_line_and_change_nothing(built, tmp_path, record, message):
    path = write_bad_facts(tmp_path / "bad.jsonl", record)
    before = hashes(built)
    result = CliRunner().invoke(cli, ["add", str(built), str(path)])
    assert_one_line_refusal(result, message)
    assert hashes(built) == before


@pytest.mark.parametrize("args, message", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_in_one_line_and_change_nothing(built, tmp_path,
                                                                  tiny_model_dir, args,
                                                                  message):
    paths = {"db": built, "new": tmp_path / "new", "file": tmp_path / "file.txt",
             "model": tiny_model_dir,
             "facts": write_jsonl(tmp_path / "facts.jsonl", [COUNTERFACT]),
             "plain": write_jsonl(tmp_path / "plain.jsonl", [{**PLAIN, "target_true": None}])}
    paths["file"].write_text("not a directory")
    paths["weightless"] = tmp_path / "weightless"  # a model directory with no weights
    paths["weightless"].mkdir()
    (paths["weightless"] / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    before = hashes(built)
    result = CliRunner().invoke(cli, [a.format(**paths) for a in args])
    assert_one_line_refusal(result, message)
    assert hashes(built) == before and not paths["new"].exists()


def test_the_tables_are_big_enough():
    assert len(BAD_FACTS) + len(BAD_ARGUMENTS) >= 40


@pytest.mark.parametrize("error", [RuntimeError("a bug"), ValueError("a bug"),
                                   OSError(errno.ENOENT, "a bug"), KeyError("a bug")])
def test_an_unexpected_exception_keeps_its_traceback(built, monkeypatch, error):
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr("ndb.cli.main.read_database", broken)  # what 'ndb info' opens with
    result = CliRunner().invoke(cli, ["info", str(built)])
    assert result.exit_code != 0
    assert result.exception is error  # not turned into a one-line user error
    assert "Error: a bug" not in result.output


def test_a_bug_prints_a_traceback_from_the_real_command(built, tmp_path, monkeypatch):
    import subprocess
    import sys

    script = ("import ndb.cli.main as m; m.read_database = lambda *a, **k: 1 / 0; m.main()")
    proc = subprocess.run([sys.executable, "-c", script, "info", str(built)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr


def test_disk_full_is_one_line_and_keeps_the_old_state(built, tmp_path, monkeypatch):
    from ndb import store

    def full(*args):
        raise OSError(errno.ENOSPC, "Unable to synchronously create file (file write failed:"
                      "\n errno = 28, error message = 'No space left on device')")

    before = hashes(built)
    monkeypatch.setattr(store.Store, "write_segment", full)
    more = write_jsonl(tmp_path / "more.jsonl", [{**PLAIN, "subject": "Rome"}])
    result = CliRunner().invoke(cli, ["add", str(built), str(more)])
    assert_one_line_refusal(result, "the disk is full", progress=True)
    assert "keeps its last committed state" in result.stderr
    monkeypatch.undo()
    assert len(NeuralDB(built)) == 1 and hashes(built) == before


def test_cuda_without_cuda_is_refused_before_loading_the_model(built, tmp_path, monkeypatch):
    import ndb.loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ndb.loading, "load_model", lambda *a, **k: pytest.fail("loaded"))
    facts = write_jsonl(tmp_path / "facts.jsonl", [COUNTERFACT])
    for args in (["build", str(facts), "-o", str(tmp_path / "db"), "--device", "cuda"],
                 ["generate", str(built), "Paris is", "--device", "cuda:0"],
                 ["add", str(built), str(facts), "--device", "cuda"]):
        result = CliRunner().invoke(cli, args)
        assert_one_line_refusal(result, "has no cuda device")


def test_a_device_index_beyond_the_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = CliRunner().invoke(cli, ["build", "x.jsonl", "-o", "db", "--device", "cuda:3"])
    assert_one_line_refusal(result, "there are only 1 cuda device(s)")


def test_resume_with_the_stored_settings_or_none_given_is_accepted(built, tmp_path,
                                                                   tiny_model_dir):
    facts = write_jsonl(tmp_path / "facts.jsonl", [COUNTERFACT])
    for extra in ([], ["--layer", "1", "--gamma", "0.8", "--model", str(tiny_model_dir),
                       "--seed", "0", "--index", "auto", "--batch-size", "7"]):
        result = CliRunner().invoke(cli, ["build", str(facts), "-o", str(built), "--resume",
                                          *extra])
        assert result.exit_code == 0, result.output
        assert "(0 added)" in result.output


def test_resume_names_a_changed_model_seed_index_and_precision(built, tmp_path):
    other = tmp_path / "other-model"
    other.mkdir()
    facts = write_jsonl(tmp_path / "facts.jsonl", [COUNTERFACT])
    result = CliRunner().invoke(cli, [
        "build", str(facts), "-o", str(built), "--resume", "--model", str(other), "--seed",
        "3", "--index", "flat", "--precision", "bfloat16", "--residual-prefixes", "2"])
    assert_one_line_refusal(result, "which --resume keeps")
    for option in ("--model", "--seed 3", "--index flat", "--precision bfloat16",
                   "--residual-prefixes 2 (the database has None)"):
        assert option in result.stderr


def test_create_on_an_existing_path_fails_before_computing(tmp_path, llama, monkeypatch):
    import ndb.compute
    import ndb.config
    import ndb.database

    model, tok = llama

    def no_computation(*args, **kwargs):
        pytest.fail("computed before checking the path")

    monkeypatch.setattr(ndb.compute, "context_prefixes", no_computation)  # for_model's
    monkeypatch.setattr(ndb.database, "background_keys", no_computation)
    monkeypatch.setattr(ndb.config, "default_edit_settings", no_computation)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "something").write_text("x")
    with pytest.raises(StoreError, match="already exists"):
        NeuralDB.create(tmp_path / "taken", model, tok)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="already exists and is a file"):
        NeuralDB.create(tmp_path / "file", model, tok)
    with pytest.raises(ConfigError, match="not a writable directory"):
        NeuralDB.create(tmp_path / "file" / "db", model, tok)
    for gamma in (-0.5, 1.5, math.nan, "0.7"):
        with pytest.raises(ConfigError, match=r"gamma must be a number in \[0, 1\]"):
            NeuralDB.create(tmp_path / "new", model, tok, gamma=gamma)
    assert not (tmp_path / "new").exists()


def test_set_gamma_is_checked(tmp_path, llama):
    from ndb.config import ComputeConfig

    model, tok = llama
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=1,
                         compute=ComputeConfig(**FAST_COMPUTE))
    config = (tmp_path / "db" / "ndb_config.json").read_bytes()
    for gamma in (-0.1, 1.01, math.inf, None):
        with pytest.raises(ConfigError, match="gamma"):
            db.set_gamma(gamma)
    assert (tmp_path / "db" / "ndb_config.json").read_bytes() == config
    db.set_gamma(0.0)
    assert db.config.gamma == 0.0


def test_library_facts_are_validated_like_files(llama, tmp_path):
    from ndb.config import ComputeConfig

    model, tok = llama
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=1,
                         compute=ComputeConfig(**FAST_COMPUTE))
    bad = [Fact("Par\x00is", "{} is in", "Japan"),
           Fact("Paris", "{} is in", "Japan", paraphrases="Paris is in"),
           Fact("Paris", "{} is in", "Japan", key=["x"])]
    for fact in bad:
        with pytest.raises(FactError, match="fact 1: "):
            db.add([fact], model, tok)
    assert len(db) == 0


def test_a_fact_longer_than_the_context_is_refused_before_computing(llama, tmp_path,
                                                                      monkeypatch):
    import ndb.edits
    from ndb.config import ComputeConfig

    model, tok = llama
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=1,
                         compute=ComputeConfig(**FAST_COMPUTE))
    monkeypatch.setattr(model.config, "max_position_embeddings", 32)
    monkeypatch.setattr(ndb.edits, "compute_keys",
                        lambda *a, **k: pytest.fail("computed before validation"))
    fine = Fact("Paris", "{} is in", "Japan")
    long = Fact("Paris", "{} is in " + "the city of " * 20 + "the country of", "Japan")
    with pytest.raises(FactError, match="fact 2 .*the model reads at most 32"):
        db.add([fine, long], model, tok)
    assert len(db) == 0


def test_eval_json_is_strict_with_reasons(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("NDB_HOME", str(tmp_path / "home"))  # measured here, not cached
    no_neighbors = {k: v for k, v in COUNTERFACT.items() if k != "neighborhood_prompts"}
    facts = write_jsonl(tmp_path / "cf.jsonl", [no_neighbors])
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(cli, ["eval", str(facts), "--model", str(tiny_model_dir),
                                      "--fluency-cases", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    for row in report["rows"].values():
        assert row["specificity"] is None and row["specificity_magnitude"] is None
        assert row["notes"]["specificity"] == "no neighborhood prompts in the facts"
        assert isinstance(row["efficacy"], float)


def test_strict_json_helper():
    from ndb.output import dumps_strict

    text = dumps_strict({"a": math.nan, "b": [math.inf, 1.5], "c": torch.tensor(1.0).item(),
                         "d": __import__("numpy").float32("nan")})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": 1.0, "d": None}
