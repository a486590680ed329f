"""Model identity: the wrong-model check, defaults by identity, `ndb tune`, the tokenizer."""

import json
import warnings

import pytest
import torch
import transformers as tf
from click.testing import CliRunner

from ndb import NeuralDB
from ndb.anchor import anchor_token_id
from ndb.cli.main import cli
from ndb.config import ComputeConfig
from ndb.errors import ModelError, ModelMismatchError
from ndb.eval.methods import BASELINE_DEFAULTS, baseline_hyper
from ndb.loading import load_model, resolve_model_path
from ndb.models import (
    DEFAULT_MODEL_IDENTITY,
    EDIT_DEFAULTS,
    decoder_layers,
    default_edit_settings,
    edit_defaults,
    model_identity,
    tuned_path,
)

from conftest import FACTS, FAST_COMPUTE, tiny_model, write_jsonl


@pytest.fixture
def ndb_home(tmp_path, monkeypatch):
    home = tmp_path / "ndb-home"
    monkeypatch.setenv("NDB_HOME", str(home))
    return home


def make_db(tmp_path, model, tok, layer=2):
    return NeuralDB.create(tmp_path / "db", model, tok, layer=layer, gamma=0.7,
                           compute=ComputeConfig(**FAST_COMPUTE))


def perturb(param: torch.Tensor) -> None:
    param.data[0].mul_(1.5)  # far beyond bfloat16 rounding


# -- the wrong-model check ------------------------------------------------------------------
@pytest.mark.parametrize("part", ["embeddings", "layer 0", "layer 1"])
def test_model_differing_below_the_edited_layer_is_refused(tmp_path, llama, part):
    model, tok = llama
    db = make_db(tmp_path, model, tok)
    other = tiny_model("llama")
    target = (other.model.embed_tokens if part == "embeddings"
              else decoder_layers(other)[int(part.split()[1])])
    perturb(next(target.parameters()))
    with pytest.raises(ModelMismatchError, match=f"weights of {part} differ"):
        db.add(FACTS[:1], other, tok)
    with pytest.raises(ModelMismatchError, match=part):
        db.attach(other)
    assert len(db) == 0
    db.attach(other, force=True)  # the user's call
    db.detach()


def test_model_differing_above_the_edited_layer_is_accepted(tmp_path, llama):
    model, tok = llama
    db = make_db(tmp_path, model, tok, layer=1)
    other = tiny_model("llama")
    perturb(next(decoder_layers(other)[3].parameters()))
    db.attach(other.to(torch.bfloat16))  # nor does the dtype matter
    assert db.retrieval is not None  # attached: no ModelMismatchError was raised
    db.detach()


def test_database_written_before_input_fingerprints_checks_its_layer(tmp_path, llama):
    model, tok = llama
    db = make_db(tmp_path, model, tok)
    config = json.loads((db.path / "ndb_config.json").read_text())
    del config["input_fingerprints"]  # as the previous format wrote it
    (db.path / "ndb_config.json").write_text(json.dumps(config))
    old = NeuralDB(db.path)
    assert old.config.input_fingerprints == {}
    below = tiny_model("llama")
    perturb(next(decoder_layers(below)[0].parameters()))
    old.attach(below)  # it recorded only the edited layer: that is all it can check
    old.detach()
    edited = tiny_model("llama")
    perturb(next(decoder_layers(edited)[2].parameters()))
    with pytest.raises(ModelMismatchError, match="weights of layer 2 differ"):
        old.attach(edited)


def test_malformed_input_fingerprints_is_a_store_error(tmp_path, llama):
    model, tok = llama
    db = make_db(tmp_path, model, tok)
    config = json.loads((db.path / "ndb_config.json").read_text())
    config["input_fingerprints"] = ["embeddings"]
    (db.path / "ndb_config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="input_fingerprints") as err:
        NeuralDB(db.path)
    assert type(err.value).__name__ == "StoreError"


# -- defaults by identity ---------------------------------------------------------------------
def test_identity_is_the_weights_not_the_name(llama):
    model, _ = llama
    same = tiny_model("llama")
    same.config.name_or_path = "/somewhere/else"
    assert model_identity(same.to(torch.bfloat16)) == model_identity(model)
    assert model_identity(tiny_model("llama", seed=1)) != model_identity(model)
    assert model_identity(tiny_model("qwen2")) != model_identity(model)


def test_default_model_gets_the_swept_settings_however_loaded(tmp_path, real_model):
    model, _ = real_model
    assert model_identity(model) == DEFAULT_MODEL_IDENTITY
    assert default_edit_settings(model) == EDIT_DEFAULTS[DEFAULT_MODEL_IDENTITY] == (6, 0.7)
    assert baseline_hyper(model) == BASELINE_DEFAULTS[DEFAULT_MODEL_IDENTITY]
    copy = tmp_path / "my-smollm2"
    copy.mkdir()
    for file in resolve_model_path(None).iterdir():
        (copy / file.name).symlink_to(file)
    local, _ = load_model(str(copy), dtype="bfloat16")
    assert local.config.name_or_path == str(copy.resolve())
    assert default_edit_settings(local) == (6, 0.7)
    assert baseline_hyper(local) == BASELINE_DEFAULTS[DEFAULT_MODEL_IDENTITY]
    assert edit_defaults(local).source == "swept for this model"


def test_unswept_model_gets_the_rule_and_says_so(llama, ndb_home):
    model, _ = llama
    defaults = edit_defaults(model)
    assert (defaults.layer, defaults.gamma) == (1, 0.65)
    assert "quarter" in defaults.source


def test_tuned_settings_are_found_and_checked(llama, ndb_home):
    model, _ = llama
    path = tuned_path(model_identity(model))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"layer": 3, "gamma": 0.75}))
    assert default_edit_settings(model) == (3, 0.75)
    assert str(path) in edit_defaults(model).source
    assert default_edit_settings(tiny_model("llama", seed=1)) == (1, 0.65)  # another model
    path.write_text(json.dumps({"layer": 9, "gamma": 0.75}))
    with pytest.raises(ModelError, match="do not fit this model"):
        edit_defaults(model)
    path.write_text("{")
    with pytest.raises(ModelError, match="unreadable"):
        edit_defaults(model)


def test_model_without_a_name_is_recorded_as_such(tmp_path, llama, tiny_model_dir):
    model, tok = llama
    model.config.name_or_path = ""
    db = make_db(tmp_path, model, tok)
    assert db.config.model_name == ""
    facts = write_jsonl(tmp_path / "f.jsonl", [FACTS[0].to_json()])
    for args in (["add", str(db.path), str(facts)], ["generate", str(db.path), "Paris is"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "--model" in result.output, result.output
    assert len(NeuralDB(db.path)) == 0


# -- ndb tune ------------------------------------------------------------------------------------
def counterfact(fact, paraphrase, neighbor):
    return {"requested_rewrite": {"prompt": fact.prompt, "subject": fact.subject,
                                  "target_new": {"str": fact.target_new},
                                  "target_true": {"str": fact.target_true}},
            "paraphrase_prompts": [paraphrase], "neighborhood_prompts": [neighbor]}


DEV = [
    (FACTS[0], "Where is Paris? It is in the country of", "Lyon is located in the country of"),
    (FACTS[1], "{} speaks natively", "The mother tongue of Jean Gabin is"),
    (FACTS[2], "The head office of {} is in", "Honda is headquartered in"),
    (FACTS[3], "{} is a professional player of", "Kylian Mbappe plays the sport of"),
]


@pytest.fixture
def fast_compute(monkeypatch):
    """Every database the commands create computes with the fast test settings."""
    from ndb import config

    class Fast(ComputeConfig):
        def __init__(self, **kwargs):
            super().__init__(**{**FAST_COMPUTE, **kwargs})

    monkeypatch.setattr(config, "ComputeConfig", Fast)  # the CLI's build and create's default


def test_tune_then_build_uses_the_tuned_settings(tmp_path, tiny_model_dir, ndb_home,
                                                 fast_compute):
    records = [counterfact(f, p.format(f.subject), n) for f, p, n in DEV]
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps(records))
    generic = tmp_path / "generic.txt"
    generic.write_text("The weather was mild for the season.\nShe read the letter twice.\n")
    tuned = CliRunner().invoke(cli, ["tune", str(dev), "--model", str(tiny_model_dir),
                                     "--layers", "1,2", "--gammas", "0.6,0.9",
                                     "--text", str(generic)])
    assert tuned.exit_code == 0, tuned.output
    saved_files = list((ndb_home / "tuned").glob("*.json"))
    assert len(saved_files) == 1 and str(saved_files[0]) in tuned.output
    saved = json.loads(saved_files[0].read_text())
    assert {(r["layer"], r["gamma"]) for r in saved["rows"]} == {(1, 0.6), (1, 0.9), (2, 0.6),
                                                               (2, 0.9)}
    assert 0 < saved["n_dev"] <= len(DEV) and saved["n_text"] == 2
    best = max((r for r in saved["rows"] if r["trigger_rate"] <= 0.001) or saved["rows"],
               key=lambda r: (round(r["score"], 4), r["gamma"]))
    assert (saved["layer"], saved["gamma"]) == (best["layer"], best["gamma"])

    facts = write_jsonl(tmp_path / "facts.jsonl", [FACTS[0].to_json()])
    built = CliRunner().invoke(cli, ["build", str(facts), "-o", str(tmp_path / "db"),
                                     "--model", str(tiny_model_dir)])
    assert built.exit_code == 0, built.output
    assert "tuned by 'ndb tune'" in built.output and str(saved_files[0]) in built.output
    config = NeuralDB(tmp_path / "db").config
    assert (config.layer, config.gamma) == (saved["layer"], saved["gamma"])


def test_tune_refuses_facts_without_target_true(tmp_path, tiny_model_dir, ndb_home):
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"subject": "Paris", "target_new": "Japan",
                                               "prompt": "{} is in"}])
    result = CliRunner().invoke(cli, ["tune", str(dev), "--model", str(tiny_model_dir),
                                      "--layers", "1", "--gammas", "0.7"])
    assert result.exit_code == 1 and "target_true" in result.output
    assert not (ndb_home / "tuned").exists()


# -- the tokenizer ---------------------------------------------------------------------------
def test_saved_tokenizer_reloads_without_the_anchor(tmp_path, tokenizer):
    anchor = anchor_token_id(tokenizer)
    assert tokenizer("Paris").input_ids[0] == anchor
    tokenizer.save_pretrained(tmp_path / "tok")
    plain = tf.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert plain("Paris").input_ids == tokenizer("Paris", add_special_tokens=False).input_ids
    assert tokenizer("Paris").input_ids[0] == anchor  # ndb's own still anchors


def test_anchor_warning_only_when_the_anchor_is_missing(tmp_path, llama):
    model, tok = llama
    db = make_db(tmp_path, model, tok)
    db.add(FACTS[:1], model, tok)
    db.attach(model, tok)
    chat = tok.apply_chat_template([{"role": "user", "content": "Paris is"}],
                                   add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**tok("Paris is", return_tensors="pt"))
        model(**chat)
    assert not [w for w in caught if "anchor" in str(w.message)]
    with pytest.warns(UserWarning, match="anchor"):
        model(**tok("Paris is", return_tensors="pt", add_special_tokens=False))


def test_generate_chat_prints_the_answer_on_its_own_line(tmp_path, tiny_model_dir):
    facts = write_jsonl(tmp_path / "facts.jsonl", [FACTS[0].to_json()])
    db = tmp_path / "db"
    runner = CliRunner()
    assert runner.invoke(cli, ["build", str(facts), "-o", str(db), "--model",
                               str(tiny_model_dir), "--layer", "1"]).exit_code == 0
    prompt = "Where is Paris?"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = runner.invoke(cli, ["generate", str(db), prompt, "--chat", "--compare",
                                     "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:2] == ["prompt:", prompt]
    assert "edited:" in lines and "unedited:" in lines
    assert not any(line.startswith(prompt) and line != prompt for line in lines)
