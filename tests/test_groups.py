"""Facts about one subject share one residual (ComputeConfig.residual_scope="subject"):
adding, re-editing or removing one of them re-optimizes the others in the same commit, and
what remains is exactly what a database holding only the remaining facts would hold."""

import warnings

import numpy as np
import pytest
import torch

from ndb import ComputeConfig, Fact, NeuralDB
from ndb.cli.main import cli

from conftest import FAST_COMPUTE, write_jsonl

CAPITAL = Fact("France", "The capital of {} is", "Cairo", "Paris", key="fr-capital")
CURRENCY = Fact("France", "The currency of {} is the", "yen", "euro", key="fr-currency")
OTHER = Fact("Toyota", "{} is headquartered in", "Berlin", "Japan", key="toyota")
# one batch for everything, so that a group's residual never depends on how facts are batched
GROUPED = ComputeConfig(**{**FAST_COMPUTE, "batch_size": 8})


def residuals(db: NeuralDB) -> dict[str, np.ndarray]:
    ids = db.ids
    return {db.get(int(i)).key: r for i, r in zip(ids, db.store.read("residuals", ids))}


def fresh(path, llama, facts, compute=GROUPED) -> dict[str, np.ndarray]:
    model, tok = llama
    db = NeuralDB.create(path, model, tok, layer=2, compute=compute)
    db.add(facts, model, tok)
    return residuals(db)


def close(a, b) -> bool:
    return torch.allclose(torch.from_numpy(a), torch.from_numpy(b), atol=1e-4, rtol=1e-4)


def test_a_subject_s_facts_share_one_residual_and_others_are_untouched(tmp_path, llama):
    model, tok = llama
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=2, compute=GROUPED)
    db.add([CAPITAL, OTHER], model, tok)
    before = residuals(db)
    db.add([CURRENCY], model, tok)
    after = residuals(db)
    np.testing.assert_array_equal(after["fr-capital"], after["fr-currency"])
    assert not close(after["fr-capital"], before["fr-capital"])  # re-optimized with currency
    np.testing.assert_array_equal(after["toyota"], before["toyota"])  # not rewritten
    joint = fresh(tmp_path / "joint", llama, [CAPITAL, CURRENCY, OTHER])
    assert close(after["fr-capital"], joint["fr-capital"])


def test_remove_restores_the_remaining_facts_exactly(tmp_path, llama):
    model, tok = llama
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=2, compute=GROUPED)
    db.add([CAPITAL, CURRENCY, OTHER], model, tok)
    version = db.store.manifest.version
    db.remove([db.id_of("fr-currency")], model, tok)
    assert db.store.manifest.version == version + 1  # removal and re-edit: one commit
    alone = fresh(tmp_path / "alone", llama, [CAPITAL, OTHER])
    left = residuals(db)
    assert sorted(left) == ["fr-capital", "toyota"]
    assert close(left["fr-capital"], alone["fr-capital"])


def test_update_re_edits_the_group_and_keeps_ids(tmp_path, llama):
    model, tok = llama
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=2, compute=GROUPED)
    db.add([CAPITAL, CURRENCY, OTHER], model, tok)
    ids = {k: db.id_of(k) for k in ("fr-capital", "fr-currency", "toyota")}
    moved = Fact("France", "The capital of {} is", "Lima", "Paris", key="fr-capital")
    db.update("fr-capital", moved, model, tok)
    assert {k: db.id_of(k) for k in ids} == ids
    expected = fresh(tmp_path / "expected", llama, [moved, CURRENCY, OTHER])
    got = residuals(db)
    assert close(got["fr-capital"], expected["fr-capital"])
    assert close(got["fr-currency"], expected["fr-currency"])


def test_removing_a_fact_with_mates_needs_the_model(tmp_path, llama):
    model, tok = llama
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=2, compute=GROUPED)
    db.add([CAPITAL, CURRENCY, OTHER], model, tok)
    reopened = NeuralDB.from_pretrained(db.path)
    with pytest.raises(ValueError, match="model"):
        reopened.remove([reopened.id_of("fr-currency")])
    assert len(reopened) == 3
    reopened.remove([reopened.id_of("toyota")])  # no mates: no model needed
    assert len(reopened) == 2


def test_the_paper_s_per_fact_residuals_stay_independent(tmp_path, llama):
    paper = ComputeConfig(**{**GROUPED.to_dict(), "residual_scope": "fact"})
    both = fresh(tmp_path / "both", llama, [CAPITAL, CURRENCY], compute=paper)
    alone = fresh(tmp_path / "alone", llama, [CAPITAL], compute=paper)
    assert not close(both["fr-capital"], both["fr-currency"])
    assert close(both["fr-capital"], alone["fr-capital"])


def test_cli_remove_re_edits_the_remaining_facts(tmp_path, tiny_model_dir, runner=None):
    from click.testing import CliRunner

    facts = write_jsonl(tmp_path / "f.jsonl", [
        {"subject": "France", "prompt": "The capital of {} is", "target_new": "Cairo",
         "key": "fr-capital"},
        {"subject": "France", "prompt": "The currency of {} is the", "target_new": "yen",
         "key": "fr-currency"}])
    db_path = tmp_path / "db"
    run = CliRunner().invoke
    built = run(cli, ["build", str(facts), "-o", str(db_path), "--model", str(tiny_model_dir),
                      "--layer", "1"])
    assert built.exit_code == 0, built.output
    removed = run(cli, ["remove", str(db_path), "--key", "fr-currency"])
    assert removed.exit_code == 0, removed.output
    assert "re-editing 1 remaining facts" in removed.output
    assert [f.key for f in NeuralDB.from_pretrained(db_path).facts().values()] == ["fr-capital"]


def test_a_database_keeps_the_compute_settings_it_was_written_with(tmp_path, llama):
    from ndb.config import NeuralDBConfig
    model, tok = llama
    grown = ComputeConfig(**{**GROUPED.to_dict(), "clamp_grows_with_group": True})
    db = NeuralDB.create(tmp_path / "db", model, tok, layer=2, compute=grown)
    data = db.config.to_dict()
    assert data["compute"]["clamp_grows_with_group"] is True
    # written before the group bound existed: a subject-scope database keeps the fixed bound
    del data["compute"]["clamp_grows_with_group"]
    older = NeuralDBConfig.from_dict(data).compute
    assert older.residual_scope == "subject" and older.clamp_grows_with_group is False
    # written before extra steps existed: every fact took its 25 steps, no more
    stored = {**data, "compute": {**data["compute"], "extra_steps": 40}}
    assert NeuralDBConfig.from_dict(stored).compute.extra_steps == 40
    del stored["compute"]["extra_steps"]
    assert NeuralDBConfig.from_dict(stored).compute.extra_steps == 0
    # written before residual scopes existed: the paper's residuals
    oldest = NeuralDBConfig.from_dict({**data, "compute": {}}).compute
    assert (oldest.residual_scope, oldest.kl_weight) == ("fact", 0.0625)


def test_options_since_removed_read_back_and_warn_only_when_they_were_on(tmp_path, llama):
    from ndb.config import NeuralDBConfig
    model, tok = llama
    data = NeuralDB.create(tmp_path / "db", model, tok, layer=2, compute=GROUPED).config.to_dict()
    # what every database between their introduction and their removal stored: all off
    off = {"chat_context": False, "chat_kl": False, "contrast_weight": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read = NeuralDBConfig.from_dict({**data, "compute": {**data["compute"], **off}})
    assert read.compute == GROUPED
    with pytest.warns(UserWarning, match="compute.chat_kl=True, an option ndb no longer has"):
        read = NeuralDBConfig.from_dict({**data, "compute": {**data["compute"], **off,
                                                             "chat_kl": True}})
    assert read.compute == GROUPED
