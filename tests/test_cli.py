import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from ndb import ComputeConfig, NeuralDB
from ndb.cli.main import _residuals_summary, cli

from conftest import FAST_COMPUTE, write_jsonl

FACTS = [
    {"subject": "Paris", "prompt": "{} is located in the country of", "target_new": "Japan",
     "target_true": "France", "id": "a"},
    {"subject": "Lionel Messi", "prompt": "{} plays the sport of", "target_new": "tennis",
     "id": "b"},
    {"subject": "Toyota", "prompt": "{} is headquartered in", "target_new": "Berlin", "id": "c"},
]


@pytest.fixture(scope="module")
def built_once(tmp_path_factory, tiny_model_dir):
    facts = write_jsonl(tmp_path_factory.mktemp("cli") / "facts.jsonl", FACTS)
    db = facts.parent / "db"
    result = run("build", str(facts), "-o", str(db), "--model", str(tiny_model_dir),
                 "--layer", "1", "--gamma", "0.8", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    return db


@pytest.fixture
def built(built_once, tmp_path):
    """A copy of one CLI-built database of FACTS, for each test to change as it likes."""
    db = tmp_path / "db"
    shutil.copytree(built_once, db)
    return db


def run(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_build_list_info_generate(built):
    listed = run("list", str(built), "--json")
    assert [json.loads(line)["subject"] for line in listed.stdout.splitlines()] == [
        "Paris", "Lionel Messi", "Toyota"]
    info = json.loads(run("info", str(built), "--json").stdout)
    assert info["facts"] == 3 and info["layer"] == 1 and info["gamma"] == 0.8
    assert info["calibration"].startswith("none")  # an exact index: nothing to calibrate
    assert info["compute"]["extra_steps"] == 75 and info["compute"]["residual_scope"] == "subject"
    assert info["residuals"] == ("one per subject (each edit in full, bound growing with the "
                                 "group), 25 steps and up to 75 more until the edits hold, "
                                 "KL weight 1 on 3 prompts")
    assert "residuals: one per subject" in run("info", str(built)).stdout
    gen = run("generate", str(built), "Paris is located in the country of", "--compare",
              "--json", "--max-new-tokens", "3")
    assert gen.exit_code == 0, gen.output
    out = json.loads(gen.stdout)
    assert set(out) == {"prompt", "edited", "unedited", "gate_hits"} and out["gate_hits"] > 0


def test_info_tells_the_paper_and_earlier_group_settings_apart():
    assert _residuals_summary(ComputeConfig.paper()) == (
        "one per fact, 25 steps, KL weight 0.0625 on 1 prompt")
    earlier = ComputeConfig(group_loss="mean", clamp_grows_with_group=False, extra_steps=0)
    assert _residuals_summary(earlier) == (
        "one per subject (edits averaged, one bound), 25 steps, KL weight 1 on 3 prompts")
    assert _residuals_summary(ComputeConfig.paper(residual_prefixes=2)) == (
        "one per fact, 25 steps, KL weight 0.0625 on 1 prompt, optimized in 2 of the 5 "
        "sampled prefixes")
    assert _residuals_summary(ComputeConfig(residual_prefixes=5)) == _residuals_summary(
        ComputeConfig())


def test_add_and_remove(built, tmp_path):
    more = write_jsonl(tmp_path / "more.jsonl", [
        {"subject": "Berlin", "prompt": "{} is the capital of", "target_new": "Spain"}])
    assert run("add", str(built), str(more)).exit_code == 0
    assert len(NeuralDB(built)) == 4
    result = run("remove", str(built), "0", "--subject", "Toyota")
    assert result.exit_code == 0, result.output
    assert sorted(NeuralDB(built).facts()) == [1, 3]


@pytest.mark.parametrize("args, message", [
    (("remove", "{db}", "42"), "no fact with id 42"),
    (("remove", "{db}", "--subject", "Nobody"), "no fact about subject 'Nobody'"),
    (("add", "{db}", "{bad}"), "line 1: 'prompt' must contain exactly one '{}'"),
    (("add", "{db}", "{dup}"), "key 'a' is already used"),
    (("add", "{db}", "{missing}"), "no such file"),
    (("build", "{good}", "-o", "{db}"), "already exists"),
    (("info", "{nodb}"), "not a fact database"),
])
def test_user_errors_are_one_line_and_change_nothing(built, tmp_path, args, message):
    paths = {
        "db": built, "nodb": tmp_path,
        "bad": write_jsonl(tmp_path / "bad.jsonl", [{**FACTS[0], "prompt": "no slot"}]),
        "dup": write_jsonl(tmp_path / "dup.jsonl", [{**FACTS[0], "subject": "Rome"}]),
        "missing": tmp_path / "missing.jsonl",
        "good": write_jsonl(tmp_path / "good.jsonl", FACTS),
    }
    before = snapshot(built)
    result = run(*(a.format(**paths) for a in args))
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert snapshot(built) == before


def test_wrong_model_is_refused(built, tmp_path):
    from conftest import tiny_model

    other = tmp_path / "other"
    tiny_model("llama", seed=3).save_pretrained(other)
    NeuralDB(built).config  # noqa: B018 - the database opens fine
    from ndb.loading import resolve_model_path

    tokdir = resolve_model_path(None)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((tokdir / name).read_bytes())
    before = snapshot(built)
    result = run("generate", str(built), "Paris is", "--model", str(other))
    assert result.exit_code != 0 and "does not match" in result.output
    more = write_jsonl(tmp_path / "more.jsonl", [{**FACTS[0], "id": "z"}])
    result = run("add", str(built), str(more), "--model", str(other))
    assert result.exit_code != 0 and "does not match" in result.output
    assert snapshot(built) == before


def test_build_resume_skips_what_is_there(built, tmp_path, tiny_model_dir):
    facts = write_jsonl(tmp_path / "all.jsonl", FACTS + [
        {"subject": "Oslo", "prompt": "{} is the capital of", "target_new": "Chile"}])
    result = run("build", str(facts), "-o", str(built), "--resume")
    assert result.exit_code == 0, result.output
    assert "(1 added)" in result.output and len(NeuralDB(built)) == 4


def test_build_batch_size_auto_resolves_to_a_number_and_builds(tmp_path, tiny_model_dir):
    facts = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    built, said = {}, {}
    for batch_size in ("auto", "32"):
        db = tmp_path / batch_size
        result = run("build", str(facts), "-o", str(db), "--model", str(tiny_model_dir),
                     "--layer", "1", "--gamma", "0.8", "--batch-size", batch_size)
        assert result.exit_code == 0, result.output
        built[batch_size], said[batch_size] = NeuralDB(db), result.stderr
    assert "batch size 32 (auto: the default off CUDA)" in said["auto"]
    auto, fixed = built["auto"], built["32"]
    assert len(auto) == 3 and auto.config.compute.batch_size == 32
    ids = np.array(sorted(auto.facts()))
    # the same build as an explicit 32 (across batch sizes, test_compute.py's short runs)
    assert np.array_equal(auto.store.read("residuals", ids), fixed.store.read("residuals", ids))


def test_eval_compares_methods_and_leaves_the_weights_alone(tmp_path, tiny_model_dir,
                                                            monkeypatch):
    monkeypatch.setenv("NDB_HOME", str(tmp_path / "home"))  # the unedited row's cache
    records = [{"case_id": i, "requested_rewrite": {
        "prompt": prompt, "subject": subject, "relation_id": "P0",
        "target_new": {"str": new}, "target_true": {"str": true}},
        "paraphrase_prompts": [f"Some words first. {prompt.format(subject)}"],
        "neighborhood_prompts": [prompt.format(other)]}
        for i, (subject, prompt, new, true, other) in enumerate([
            ("Paris", "{} is located in the country of", "Japan", "France", "Lyon"),
            ("Toyota", "{} is headquartered in", "Berlin", "Japan", "Honda")])]
    facts = tmp_path / "cf.json"
    facts.write_text(json.dumps(records))
    text = tmp_path / "generic.txt"
    text.write_text("\n".join(f"line {i} of some generic text about nothing" for i in range(300)))
    out, db = tmp_path / "eval.json", tmp_path / "db"
    built = run("build", str(facts), "-o", str(db), "--model", str(tiny_model_dir), "--layer",
                "1", "--gamma", "0.8")  # as the other CLI tests: a gate the tiny model passes
    assert built.exit_code == 0, built.output
    result = run("eval", str(facts), "--model", str(tiny_model_dir), "--db", str(db),
                 "--methods", "neuraldb,memit-1,alphaedit", "--stats-text", str(text),
                 "--stats-positions", "1000", "--memit-lambda", "500", "--fluency-cases", "0",
                 "--json", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report["rows"]) == ["pre-edited", "neuraldb", "memit-1", "alphaedit"]
    for row in report["rows"].values():
        assert {"efficacy", "generalization", "specificity"} <= set(row)
    assert report["edits_computed"] == 0  # the database built above is reused
    # a random tiny model is near uniform, so edits move probabilities by ~1e-6: the
    # direction is what can be checked
    rows = report["rows"]
    assert rows["neuraldb"]["efficacy_magnitude"] > rows["pre-edited"]["efficacy_magnitude"]
    assert "memit-1: C0 statistics" in result.output and "lambda 500" in result.output
    assert run("eval", str(facts), "--model", str(tiny_model_dir), "--methods",
               "rome").exit_code != 0
    # the unedited row is read back, not measured again, for the same model, facts, settings
    again = run("eval", str(facts), "--model", str(tiny_model_dir), "--db", str(db),
                "--fluency-cases", "0", "--json", str(out))
    assert "read from the cache" in again.output
    assert json.loads(out.read_text())["rows"]["pre-edited"] == rows["pre-edited"]
    fresh = run("eval", str(facts), "--model", str(tiny_model_dir), "--db", str(db),
                "--fluency-cases", "0", "--json", str(out), "--no-cache")
    assert "read from the cache" not in fresh.output and "teacher-forced" in fresh.output
    other = run("eval", str(facts), "--model", str(tiny_model_dir), "--db", str(db),
                "--fluency-cases", "0", "--no-chat")
    assert "read from the cache" not in other.output  # other settings: measured


def listed(db):
    result = run("list", str(db), "--json")
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_list_shows_ids_and_keys_apart_and_remove_takes_either(built, tmp_path):
    rome = write_jsonl(tmp_path / "rome.jsonl", [  # a key that looks like another fact's id
        {"subject": "Rome", "prompt": "{} is the capital of", "target_new": "Peru", "id": "1"}])
    assert run("add", str(built), str(rome)).exit_code == 0
    rows = {r["subject"]: r for r in listed(built)}
    assert (rows["Rome"]["id"], rows["Rome"]["key"]) == (3, "1")
    assert (rows["Paris"]["id"], rows["Paris"]["key"]) == (0, "a")
    assert "[key 1]" in run("list", str(built)).stdout
    assert run("remove", str(built), str(rows["Rome"]["id"])).exit_code == 0
    assert [r["subject"] for r in listed(built)] == ["Paris", "Lionel Messi", "Toyota"]
    assert run("remove", str(built), "--key", "b").exit_code == 0
    assert [r["key"] for r in listed(built)] == ["a", "c"]


def test_a_database_of_an_unnamed_model_asks_for_model_when_remove_needs_it(tmp_path, llama):
    model, tok = llama
    model.config.name_or_path = ""  # built from a model with no name or path to load it by
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=1, compute=ComputeConfig(
        **{**FAST_COMPUTE, "n_prefixes": 0}))
    paris = [{"subject": "Paris", "prompt": "{} is located in the country of",
              "target_new": "Japan"},
             {"subject": "Paris", "prompt": "{} has a sister city,", "target_new": "Tokyo"}]
    rng = np.random.default_rng(0)
    db.add_vectors(paris, rng.standard_normal((2, db.config.d_key)),
                   rng.standard_normal((2, db.config.d_value)))
    before = snapshot(db.path)
    result = run("remove", str(db.path), "0")  # its mate about Paris is re-edited: a model
    assert result.exit_code == 1 and "give --model" in result.output, result.output
    assert snapshot(db.path) == before


def test_remove_resolves_everything_before_removing(built):
    before = snapshot(built)
    for args, message in [
        (("99999999999999999999",), "no fact with id 99999999999999999999"),
        (("b",), "to remove by key: --key b"),
        (("0", "--key", "nope"), "no fact with key 'nope'"),
        (("0", "--key", "a", "7"), "no fact with id 7"),
    ]:
        result = run("remove", str(built), *args)
        assert result.exit_code != 0 and message in result.output
        assert "Traceback" not in result.output and len(result.output.splitlines()) == 1
    assert snapshot(built) == before


def test_adding_the_same_facts_again_skips_them(built, tmp_path):
    facts = write_jsonl(tmp_path / "facts.jsonl", FACTS + [
        {"subject": "Oslo", "prompt": "{} is the capital of", "target_new": "Chile"}] * 2)
    result = run("add", str(built), str(facts))
    assert result.exit_code == 0, result.output
    assert "added 1 facts (ids 3); skipped 3 already stored (ids 0-2); 4 in total" in result.output
    result = run("add", str(built), str(facts))
    assert "added 0 facts (ids none); skipped 4 already stored (ids 0-3)" in result.output
    assert len(NeuralDB(built)) == 4


def test_add_update_and_the_update_command_re_edit_under_the_same_id(built, tmp_path):
    moved = write_jsonl(tmp_path / "moved.jsonl", [{**FACTS[0], "target_new": "Chile"}])
    result = run("add", str(built), str(moved), "--update")
    assert result.exit_code == 0, result.output
    assert "updated 1 (ids 0)" in result.output
    assert NeuralDB(built).get("a").target_new == "Chile" and len(NeuralDB(built)) == 3
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [
        {**FACTS[1], "target_new": "golf"}, {**FACTS[2], "key": "zz"}])
    before = snapshot(built)
    result = run("update", str(built), str(unknown))
    assert result.exit_code != 0 and "no fact with key 'zz'" in result.output
    assert snapshot(built) == before
    golf = write_jsonl(tmp_path / "golf.jsonl", [{**FACTS[1], "target_new": "golf"}])
    result = run("update", str(built), str(golf))
    assert result.exit_code == 0 and "updated 1 (ids 1)" in result.output
    assert NeuralDB(built).get(1).target_new == "golf"


def test_list_json_feeds_build_and_add_losslessly(built, tmp_path, tiny_model_dir):
    counterfact = write_jsonl(tmp_path / "cf.jsonl", [{
        "case_id": 900000, "requested_rewrite": {
            "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
            "relation_id": "P103", "target_new": {"str": "English"},
            "target_true": {"str": "French"}},
        "paraphrase_prompts": ["Danielle Darrieux speaks"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"]}])
    assert run("add", str(built), str(counterfact)).exit_code == 0
    original = listed(built)
    assert original[-1]["key"] == "900000" and original[-1]["extra"]["relation_id"] == "P103"
    text = "".join(json.dumps(r) + "\n" for r in original)
    copy = tmp_path / "copy"
    result = run("build", "-", "-o", str(copy), "--model", str(tiny_model_dir), "--layer", "1",
                 input=text)
    assert result.exit_code == 0, result.output
    assert listed(copy) == original
    part = tmp_path / "part"
    first = write_jsonl(tmp_path / "first.jsonl", FACTS[:1])
    assert run("build", str(first), "-o", str(part), "--model", str(tiny_model_dir),
               "--layer", "1").exit_code == 0
    result = run("add", str(part), "-", input=text)
    assert result.exit_code == 0 and "skipped 1 already stored (ids 0)" in result.output
    assert listed(part) == original


def test_eval_reports_generative_metrics(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("NDB_HOME", str(tmp_path / "home"))  # measured here, not cached
    records = [{"case_id": i, "requested_rewrite": {
        "prompt": prompt, "subject": subject, "relation_id": relation,
        "target_new": {"str": new}, "target_true": {"str": true}},
        "paraphrase_prompts": [f"Some words first. {prompt.format(subject)}"],
        "neighborhood_prompts": [prompt.format(other)], "group": "country:FR",
        "spillover_prompts": [f"{subject} is"]}
        for i, (subject, prompt, relation, new, true, other) in enumerate([
            ("France", "The capital of {} is", "P36", "Rome", "Paris", "Peru"),
            ("France", "The currency of {} is the", "P38", "Yen", "Euro", "Spain")])]
    facts = tmp_path / "cf.json"
    facts.write_text(json.dumps(records))
    out, db = tmp_path / "eval.json", tmp_path / "db"
    built = run("build", str(facts), "-o", str(db), "--model", str(tiny_model_dir), "--layer",
                "1", "--gamma", "0.8")
    assert built.exit_code == 0, built.output
    args = ["eval", str(facts), "--model", str(tiny_model_dir), "--db", str(db),
            "--fluency-cases", "0", "--json", str(out)]
    result = run(*args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    generative = {"gen_efficacy", "gen_generalization", "gen_specificity", "chat", "chat_known",
                  "chat_true", "groups_hold", "cross_talk", "spill_subject", "spill_neighbors"}
    for name in ("pre-edited", "neuraldb"):
        assert generative <= set(rows[name])
        # chat_known is NaN where the random model knows no fact; the rest are defined
        assert all(0 <= rows[name][k] <= 100 for k in generative - {"chat_known"})
    assert "| G.Eff. |" in result.output and "| Cross |" in result.output
    assert "pre-edited: " in result.output and "generation " in result.output  # stage times
    quiet = run(*args, "--no-generation", "--no-chat")
    assert quiet.exit_code == 0, quiet.output
    rows = json.loads(out.read_text())["rows"]
    assert not generative & set(rows["neuraldb"]) and "efficacy" in rows["neuraldb"]


def test_eval_batch_size_sets_scoring_and_generation_alike(tmp_path, tiny_model_dir,
                                                            monkeypatch):
    import ndb.eval.run

    seen = []
    monkeypatch.setattr(ndb.eval.run, "evaluate",
                        lambda model, tok, facts, methods, settings, *a, **k: seen.append(
                            settings) or {"pre-edited": {}})
    facts = write_jsonl(tmp_path / "facts.jsonl", FACTS[:1])
    db = tmp_path / "db"
    assert run("build", str(facts), "-o", str(db), "--model", str(tiny_model_dir),
               "--layer", "1").exit_code == 0
    for extra in ([], ["--batch-size", "5"]):
        result = run("eval", str(facts), "--model", str(tiny_model_dir), "--db", str(db),
                     "--no-cache", *extra)
        assert result.exit_code == 0, result.output
    default, given = seen
    assert (default.batch_size, default.gen_batch_size, default.fluency_batch_size) == (32, 64, 100)
    assert (given.batch_size, given.gen_batch_size, given.fluency_batch_size) == (5, 5, 5)


def test_eval_help_explains_every_metric():
    from ndb.eval.legend import GENERATIVE, TEACHER_FORCED

    text = run("eval", "--help").output
    for name in (*TEACHER_FORCED, *GENERATIVE):
        assert f"{name}: " in text


def test_root_help_names_lazy_commands_as_they_do_without_loading_them():
    """'ndb -h' describes the research and model commands from OneLineUsageErrors.LAZY_HELP,
    loading none of them (nor torch); what it says is what each command's help says."""
    import subprocess
    import sys

    import click

    from ndb.cli.main import OneLineUsageErrors

    ctx = click.Context(cli)
    for name in OneLineUsageErrors.LAZY:
        command = cli.get_command(ctx, name)
        for limit in (20, 45, 80, 200):
            described = click.Command(name, help=OneLineUsageErrors.LAZY_HELP[name])
            assert described.get_short_help_str(limit) == command.get_short_help_str(limit)
    script = ("import sys; from click.testing import CliRunner; from ndb.cli.main import cli; "
              "result = CliRunner().invoke(cli, ['-h']); assert result.exit_code == 0; "
              "assert 'tune' in result.output and 'serve' in result.output; "
              "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('ndb.cli.')))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["['ndb.cli.main']"]
