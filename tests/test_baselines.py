import pytest
import torch

from ndb import nethook
from ndb.anchor import encode
from ndb.compute import compute_keys
from ndb.eval.baselines.editors import (
    WeightEditConfig,
    applied,
    compute_deltas,
    layer_outputs,
    null_space_projector,
    weight_scores,
)
from ndb.eval.baselines.stats import key_second_moments
from ndb.models import ffn_out_path, ffn_out_weight, get_module

from conftest import FACTS

WORDS = "river cat prime sea mountain violin quantum bread forest engine silver poem".split()
# enough positions for a full-rank C0 on the tiny model (keys of dimension 96)
TEXTS = [f"The {a} met a {b} near the {c}, and nobody knew why." for a in WORDS[:6]
         for b in WORDS[6:] for c in ("hill", "town")]


@pytest.fixture
def moments(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("NDB_HOME", str(tmp_path))
    model, tok = llama
    return key_second_moments(model, tok, TEXTS, [1, 2], "test", n_positions=5000)


def test_second_moment_by_hand_and_cached(llama, moments, tmp_path):
    model, tok = llama
    module = get_module(model, ffn_out_path(model, 2))
    keys = []
    for text in TEXTS:
        with nethook.capture_input(module) as box:
            model(input_ids=torch.tensor([encode(tok, text)]))
        keys.append(box["x"][0].double())
    k = torch.cat(keys)
    torch.testing.assert_close(moments[2], k.T @ k / len(k), rtol=1e-6, atol=1e-8)
    assert len(list((tmp_path / "stats" / "test").iterdir())) == 2
    assert torch.linalg.matrix_rank(moments[2]) == 96
    again = key_second_moments(model, tok, TEXTS, [2], "test", n_positions=5000)
    assert torch.equal(again[2], moments[2])


def test_applied_restores_the_weights_bit_for_bit(llama):
    model, _ = llama
    before = ffn_out_weight(model, 2).clone()
    with applied(model, {2: torch.ones_like(before)}):
        assert torch.equal(ffn_out_weight(model, 2), before + 1)
    assert torch.equal(ffn_out_weight(model, 2), before)
    with pytest.raises(RuntimeError), applied(model, {2: torch.ones_like(before)}):
        raise RuntimeError("evaluation failed")
    assert torch.equal(ffn_out_weight(model, 2), before)  # restored on errors too


def test_memit_single_layer_writes_the_residuals(llama, moments):
    """With a negligible preservation term, (W + Delta) k_i = W k_i + r_i exactly."""
    model, tok = llama
    residuals = torch.randn(len(FACTS), 64)
    config = WeightEditConfig("memit", [2], mom2_weight=1e-9)
    deltas = compute_deltas(model, tok, FACTS, residuals, [""], moments, config)
    keys = compute_keys(model, tok, FACTS, 2, [""])
    torch.testing.assert_close(keys @ deltas[2].T, residuals, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_weight_scores_say_how_much_of_each_residual_a_key_retrieves(llama, moments, method):
    """Delta k = R w with w = K^T S k, whatever the method's S."""
    model, tok = llama
    residuals = torch.randn(len(FACTS), 64)
    config = WeightEditConfig(method, [2], null_threshold=1e-4)
    deltas = compute_deltas(model, tok, FACTS, residuals, [""], moments, config)
    keys = compute_keys(model, tok, FACTS, 2, [""])
    other = compute_keys(model, tok, FACTS, 2, ["", "Some text. "])  # keys of other inputs
    queries = torch.cat([keys, other])
    w = weight_scores(keys, queries, moments[2], config)
    torch.testing.assert_close(queries @ deltas[2].T, w @ residuals, atol=1e-3, rtol=1e-3)


def test_memit_spread_reaches_the_target_at_the_top_layer(llama, moments):
    model, tok = llama
    residuals = torch.randn(len(FACTS), 64) * 0.1
    config = WeightEditConfig("memit", [1, 2], mom2_weight=1e-9)
    before = layer_outputs(model, tok, FACTS, 2)
    deltas = compute_deltas(model, tok, FACTS, residuals, [""], moments, config)
    assert set(deltas) == {1, 2}
    with applied(model, deltas):
        after = layer_outputs(model, tok, FACTS, 2)
    torch.testing.assert_close(after - before, residuals, atol=2e-3, rtol=1e-2)


def test_alphaedit_leaves_preserved_keys_alone(llama, moments):
    model, tok = llama
    threshold = float(torch.linalg.eigvalsh(moments[2]).median())
    config = WeightEditConfig("alphaedit", [2], null_threshold=threshold, l2=1e-3)
    deltas = compute_deltas(model, tok, FACTS, torch.randn(len(FACTS), 64), [""], moments,
                            config)
    values, vectors = torch.linalg.eigh(moments[2])
    preserved = vectors[:, values >= threshold].float()
    assert preserved.shape[1] > 0
    assert (deltas[2] @ preserved).abs().max() < 1e-4 * deltas[2].abs().max()
    p = null_space_projector(moments[2], threshold)
    torch.testing.assert_close(p @ p, p)  # a projector


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown weight-editing method"):
        WeightEditConfig("rome", [1])
    with pytest.raises(ValueError, match="ascending"):
        WeightEditConfig("memit", [3, 1])


def test_tuned_hyper_parameters_apply_to_the_default_model_only(llama):
    from ndb.eval.methods import BASELINE_DEFAULTS, baseline_hyper, weight_edit_config
    from ndb.loading import DEFAULT_MODEL
    from ndb.models import DEFAULT_MODEL_IDENTITY

    model, _ = llama
    model.config.name_or_path = DEFAULT_MODEL  # the name alone is not the model's identity
    assert baseline_hyper(model) == {}  # a model nobody tuned keeps the published values
    assert weight_edit_config("memit", 3).mom2_weight == WeightEditConfig.mom2_weight
    tuned = weight_edit_config("alphaedit", 3, **BASELINE_DEFAULTS[DEFAULT_MODEL_IDENTITY])
    assert tuned.null_threshold == BASELINE_DEFAULTS[DEFAULT_MODEL_IDENTITY]["null_threshold"]
    assert tuned.layers == [0, 1, 2, 3]  # spread ends at the given layer
    assert weight_edit_config("memit-1", 3, mom2_weight=7.0).mom2_weight == 7.0


def test_an_eval_run_leaves_model_tokenizer_and_process_as_they_were(db, llama, tmp_path,
                                                                      monkeypatch):
    """Every method takes its edit back: after a whole evaluation (NeuralDB, MEMIT and
    AlphaEdit, with sampled fluency generations) the in-memory weights are bit-identical,
    nothing is left attached, and the tokenizer and torch's global random state are as they
    were."""
    import dataclasses

    import ndb
    from ndb.eval.methods import make_methods
    from ndb.eval.run import EvalSettings, evaluate

    monkeypatch.setenv("NDB_HOME", str(tmp_path / "home"))
    model, tok = llama
    text = tmp_path / "generic.txt"
    text.write_text("\n".join(TEXTS))
    facts = [dataclasses.replace(f, extra={"generation_prompts": [f.text]}) for f in FACTS]
    weights = {name: p.clone() for name, p in model.state_dict().items()}
    side, rng = tok.padding_side, torch.get_rng_state()
    methods = make_methods(["neuraldb", "memit-1", "alphaedit"], model, tok, facts, db, [text],
                           5000)
    settings = EvalSettings(fluency_cases=4, fluency_tokens=4, generation=False, chat=False)
    rows = evaluate(model, tok, facts, methods, settings)
    assert list(rows) == ["pre-edited", "neuraldb", "memit-1", "alphaedit"]
    after = model.state_dict()
    assert all(torch.equal(after[name], p) for name, p in weights.items())
    assert ndb.attached(model) == []
    assert tok.padding_side == side and torch.equal(torch.get_rng_state(), rng)
