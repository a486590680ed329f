import pytest
import torch
import tqdm.std

from ndb import compute, nethook
from ndb.anchor import anchor_token_id, encode_with_span
from ndb.compute import (
    ComputeConfig,
    FactBar,
    _Batch,
    _rows,
    _SuffixRunner,
    compute_keys,
    compute_residuals,
    context_prefixes,
    encode_prompt,
    suffix_chunks,
)
from ndb.facts import Fact
from ndb.models import ffn_dims, ffn_out_path, ffn_out_weight, get_module
from ndb.tokens import target_ids

from conftest import FACTS, FAMILY_CONFIGS, FAST_COMPUTE, tiny_model

PREFIXES = ["", "The weather was fine. ", "I said so. "]


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_family_table_finds_the_ffn_projection(family, tokenizer):
    model = tiny_model(family)
    assert ffn_dims(model, 2) == (96, 64)
    module = get_module(model, ffn_out_path(model, 2))
    x = torch.randn(3, 96)
    bias = module.bias if module.bias is not None else 0
    # W k (+ b) must be the module's output whatever the storage convention (Conv1D)
    torch.testing.assert_close(x @ ffn_out_weight(model, 2).T + bias, module(x))


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_suffix_runner_equals_full_forward(family, tokenizer):
    """The cached-prefix, upper-layers-only pass must compute what a full pass computes."""
    model = tiny_model(family)
    layer = 1
    rows, bare = _rows(tokenizer, FACTS, range(len(FACTS)), PREFIXES, ("{} is a",))
    batch = _Batch(rows, anchor_token_id(tokenizer))
    runner = _SuffixRunner(model, batch, layer, torch.tensor(bare))
    deltas = torch.randn(len(batch.rows), 64)
    fast = runner(deltas)

    def add_at_subject(out):
        out = out.clone()
        out[:, batch.p] += deltas
        return out

    with nethook.edit_output(get_module(model, ffn_out_path(model, layer)), add_at_subject):
        full = model.base_model(input_ids=batch.ids, attention_mask=batch.mask,
                                position_ids=batch.position_ids).last_hidden_state
    real = batch.mask[:, batch.p:].bool()
    torch.testing.assert_close(fast[real], full[:, batch.p:][real], atol=2e-4, rtol=1e-4)
    again = runner(deltas)  # the cache must be back to its prefix after each call
    torch.testing.assert_close(again, fast)


def test_keys_are_the_projection_input_at_the_subject(llama):
    model, tok = llama
    keys = compute_keys(model, tok, FACTS[:2], 2, [""])
    module = get_module(model, ffn_out_path(model, 2))
    for fact, key in zip(FACTS[:2], keys):
        text = fact.text
        start = fact.prompt.index("{}")
        ids, last = encode_with_span(tok, text, start + len(fact.subject))
        with nethook.capture_input(module) as box:
            model(input_ids=torch.tensor([ids]))
        torch.testing.assert_close(key, box["x"][0, last])


def test_key_progress_moves_per_batch(llama):
    """A progress callback hears the facts of every batch of keys, adding up to all."""
    model, tok = llama
    calls = []
    keys = compute_keys(model, tok, FACTS[:3], 2, [""], batch_size=2, progress=calls.append)
    assert calls == [2, 1] and len(keys) == 3


def test_keys_average_bare_and_prefixed_halves(llama):
    model, tok = llama
    each = torch.stack([compute_keys(model, tok, FACTS[:1], 2, [p])[0] for p in PREFIXES])
    mixed = compute_keys(model, tok, FACTS[:1], 2, PREFIXES)[0]
    torch.testing.assert_close(mixed, 0.5 * each[0] + 0.5 * each[1:].mean(0))


def test_prefixes_are_seeded(llama):
    model, tok = llama
    a = context_prefixes(model, tok, 3, 6, seed=1)
    assert a == context_prefixes(model, tok, 3, 6, seed=1)
    assert a != context_prefixes(model, tok, 3, 6, seed=2)
    assert a[0] == "" and all(p.endswith(". ") and "{" not in p for p in a[1:])


def test_batching_does_not_change_residuals(llama):
    model, tok = llama
    config = ComputeConfig(**{**FAST_COMPUTE, "batch_size": 4})
    together = compute_residuals(model, tok, FACTS, 2, PREFIXES, config)
    config.batch_size = 1
    alone = compute_residuals(model, tok, FACTS, 2, PREFIXES, config)
    torch.testing.assert_close(together, alone, atol=1e-3, rtol=1e-3)
    assert together.norm(dim=-1).min() > 0


def test_split_keys_are_the_two_halves_of_the_average(llama):
    model, tok = llama
    split = compute_keys(model, tok, FACTS[:2], 2, PREFIXES, split=True)
    assert split.shape == (2, 2, 96)
    torch.testing.assert_close(split.mean(1), compute_keys(model, tok, FACTS[:2], 2, PREFIXES))
    bare = compute_keys(model, tok, FACTS[:2], 2, [""])
    torch.testing.assert_close(split[:, 0], bare)


SAME_SUBJECT = [
    Fact("France", "The capital of {} is", "Cairo", "Paris"),
    Fact("France", "The currency of {} is the", "yen", "euro"),
    Fact("Toyota", "{} is headquartered in", "Berlin", "Japan"),
]


def test_a_group_shares_one_residual_optimized_on_all_its_prompts(llama):
    model, tok = llama
    config = ComputeConfig(**FAST_COMPUTE)
    joint = compute_residuals(model, tok, SAME_SUBJECT, 2, PREFIXES, config,
                              groups=["France", "France", "Toyota"])
    alone = compute_residuals(model, tok, SAME_SUBJECT, 2, PREFIXES, config)
    torch.testing.assert_close(joint[0], joint[1])
    assert not torch.allclose(joint[0], alone[0], atol=1e-3)
    assert not torch.allclose(joint[0], alone[1], atol=1e-3)
    # a group of one is the fact on its own, whatever shares its batch
    torch.testing.assert_close(joint[2], alone[2], atol=1e-3, rtol=1e-3)


def test_groups_do_not_depend_on_their_batch_mates(llama):
    model, tok = llama
    config = ComputeConfig(**FAST_COMPUTE)
    groups = ["France", "France", "Toyota"]
    together = compute_residuals(model, tok, SAME_SUBJECT, 2, PREFIXES, config, groups=groups)
    config.batch_size = 2  # the France group fills a batch, Toyota gets its own
    apart = compute_residuals(model, tok, SAME_SUBJECT, 2, PREFIXES, config, groups=groups)
    torch.testing.assert_close(together, apart, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="2 group labels for 3 facts"):  # none left unlabelled
        compute_residuals(model, tok, SAME_SUBJECT, 2, PREFIXES, config, groups=groups[:2])


def test_residual_prefixes_optimize_in_the_first_of_the_prefixes_only(llama):
    model, tok = llama
    fewer = compute_residuals(model, tok, FACTS, 2, PREFIXES,
                              ComputeConfig(**{**FAST_COMPUTE, "residual_prefixes": 1}))
    assert torch.equal(fewer, compute_residuals(model, tok, FACTS, 2, PREFIXES[:2],
                                                ComputeConfig(**FAST_COMPUTE)))
    everything = compute_residuals(model, tok, FACTS, 2, PREFIXES, ComputeConfig(**FAST_COMPUTE))
    assert not torch.equal(fewer, everything)
    with pytest.raises(ValueError, match="residual_prefixes"):
        ComputeConfig(n_prefixes=2, residual_prefixes=3)


def test_compute_config_refuses_unknown_scope_and_bad_kl_prompts():
    with pytest.raises(ValueError, match="residual_scope"):
        ComputeConfig(residual_scope="relation")
    with pytest.raises(ValueError, match="kl_prompts"):
        ComputeConfig(kl_prompts=("no placeholder",))


def test_suffix_chunks_cover_every_row_once_by_length():
    lengths = [10, 10, 3, 3, 3, 2, 5, 6, 7]
    chunks = suffix_chunks(lengths)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(lengths)))
    # least padded work in three chunks: 4*3 + 3*7 + 2*10 (one chunk: 9*10)
    assert [sorted(chunk) for chunk in chunks] == [[2, 3, 4, 5], [6, 7, 8], [0, 1]]
    assert suffix_chunks([4, 4, 4]) == [[0, 1, 2]]


def test_suffix_runner_keeps_rows(tokenizer):
    """After dropping rows (converged facts), the runner computes the remaining rows as
    before, whichever chunks they sat in."""
    model = tiny_model("llama")
    rows, bare = _rows(tokenizer, FACTS, range(len(FACTS)), PREFIXES, ("{} is a",))
    batch = _Batch(rows, anchor_token_id(tokenizer))
    runner = _SuffixRunner(model, batch, 1, torch.tensor(bare))
    assert len(runner.chunks) > 1  # the test must cross chunks
    deltas = torch.randn(len(batch.rows), 64)
    before = runner(deltas)
    kept = batch.select(torch.tensor([0, 2]))  # facts 0 and 2 go on
    runner.keep_rows(kept)
    after = runner(deltas[kept])
    real = batch.mask[:, batch.p:].bool()[:, : after.shape[1]]
    assert len(kept) < len(deltas) and real.sum() > 0
    torch.testing.assert_close(after[real], before[kept][:, : after.shape[1]][real],
                               atol=1e-5, rtol=1e-5)


def test_residual_progress_moves_within_a_batch(llama):
    """A progress callback hears from every optimization step, and the shares it gets add up
    to the number of facts (so that a bar ends full and has an ETA after one step)."""
    model, tok = llama
    calls: list[float] = []
    config = ComputeConfig(**{**FAST_COMPUTE, "steps": 4, "stop_loss": 0.0, "batch_size": 2})
    compute_residuals(model, tok, FACTS[:3], 1, PREFIXES, config, progress=calls.append)
    assert len(calls) == 2 * 4  # two batches, four steps each
    assert max(calls) <= 2 and sum(calls) == pytest.approx(3)


def test_fact_bar_never_runs_past_its_total():
    bar = FactBar(3, "facts")
    for _ in range(75):  # 25 steps of three facts: fractions that do not add up exactly
        bar.update(3 / 25 / 3 * 3)
    bar.update(0.5)
    assert bar.n == pytest.approx(3) and bar.n <= 3
    bar.close()


def test_fact_bar_redraws_its_clock_on_steps_that_complete_nothing(monkeypatch, capsys):
    now = [100.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])  # the clock every tqdm reads
    bar = FactBar(4, "edit")
    bar.update(1.25)
    capsys.readouterr()
    now[0] += 0.5
    bar.update(0)  # an extra step within a second of the last drawing: nothing drawn
    assert capsys.readouterr().err == ""
    now[0] += 64.5
    bar.update(0)
    drawn = capsys.readouterr().err
    assert "01:05" in drawn and "1/4" in drawn and bar.n == 1.25
    bar.close()


def test_a_group_s_norm_bound_grows_with_the_square_root_of_its_size(llama):
    model, tok = llama
    groups = ["France", "France", "Toyota"]
    # a bound so small that every residual ends on it
    tight = {**FAST_COMPUTE, "clamp": 1e-3, "lr": 1.0, "weight_decay": 0.0}
    grown, fixed = (compute_residuals(model, tok, SAME_SUBJECT, 2, PREFIXES,
                                      ComputeConfig(**tight, clamp_grows_with_group=grows),
                                      groups=groups) for grows in (True, False))
    ratio = grown.norm(dim=-1) / fixed.norm(dim=-1)
    torch.testing.assert_close(ratio, torch.tensor([2**0.5, 2**0.5, 1.0]), rtol=1e-3, atol=1e-3)


def test_group_loss_sum_weighs_each_edit_as_a_fact_alone(llama):
    model, tok = llama
    fact = SAME_SUBJECT[0]
    # no early stop and no bound in reach, so that only the loss's weights differ
    base = {**FAST_COMPUTE, "stop_loss": 0.0, "clamp": 100.0, "clamp_grows_with_group": False}

    def twice(**overrides) -> torch.Tensor:  # the same edit twice in one group
        return compute_residuals(model, tok, [fact, fact], 2, PREFIXES,
                                 ComputeConfig(**base, **overrides), groups=[0, 0])[0]

    def alone(**overrides) -> torch.Tensor:
        return compute_residuals(model, tok, [fact], 2, PREFIXES,
                                 ComputeConfig(**base, **overrides))[0]

    # "mean": two copies weigh as one; "sum": as one whose KL and decay weigh half
    # (Adam does not see the loss's scale)
    torch.testing.assert_close(twice(group_loss="mean"), alone(), atol=1e-4, rtol=1e-4)
    half = {"kl_weight": 0.5, "weight_decay": 0.25}
    torch.testing.assert_close(twice(group_loss="sum"), alone(**half), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(twice(group_loss="sum"), alone(), atol=1e-3)


def test_residuals_leave_a_trainable_model_untouched(llama):
    """A user's model whose weights require grad: same residuals, no .grad written."""
    model, tok = llama
    config = ComputeConfig(**FAST_COMPUTE)
    frozen = compute_residuals(model, tok, FACTS[:2], 2, PREFIXES, config)
    model.requires_grad_(True)
    try:
        trainable = compute_residuals(model, tok, FACTS[:2], 2, PREFIXES, config)
        assert all(p.grad is None for p in model.parameters())
        assert all(p.requires_grad for p in model.parameters())
    finally:
        model.requires_grad_(False)
    torch.testing.assert_close(trainable, frozen)


def _greedy_holds(model, tok, fact: Fact, layer: int, residual: torch.Tensor) -> bool:
    """Whether, with ``residual`` added at the subject's last token, every token of the new
    object is the greedy choice after the fact's prompt, in every context of PREFIXES."""
    target = target_ids(tok, fact.target_new)
    for prefix in PREFIXES:
        ids, subject = encode_prompt(tok, prefix, fact.prompt, fact.subject)

        def add(out, at=subject):
            out = out.clone()
            out[:, at] += residual
            return out

        with nethook.edit_output(get_module(model, ffn_out_path(model, layer)), add):
            logits = model(input_ids=torch.tensor([ids + target[:-1]])).logits[0]
        if logits[len(ids) - 1:].argmax(-1).tolist() != target:
            return False
    return True


def test_extra_steps_run_until_the_new_object_holds_and_no_longer(llama, monkeypatch):
    """After ``steps``, a fact keeps optimizing while its object is not every token's greedy
    choice on its prompts, and stops at the first step where it is, within extra_steps."""
    model, tok = llama
    # the subject right before the object: a residual at layer 2 of a random model can
    # make it the greedy choice there
    fact = Fact("Paris", "We flew to {}", "Japan", "France")
    checks = []
    real_holds = compute._holds
    monkeypatch.setattr(compute, "_holds", lambda *a: checks.append(real_holds(*a)) or checks[-1])
    base = {**FAST_COMPUTE, "steps": 1, "lr": 0.05, "stop_loss": 0.0, "weight_decay": 0.0}

    compute_residuals(model, tok, [fact], 2, PREFIXES, ComputeConfig(**{**base, "extra_steps": 0}))
    assert [bool(c) for c in checks] == [False]  # checked once, at the last step: not yet

    checks.clear()
    config = ComputeConfig(**{**base, "clamp": 100.0, "extra_steps": 300})
    advanced = []
    held = compute_residuals(model, tok, [fact], 2, PREFIXES, config, advanced.append)[0]
    assert len(checks) < 301 and not bool(checks[0]) and bool(checks[-1])
    # progress after every step (a bar's clock moves), the fact completed once, at the end
    assert len(advanced) == len(checks) and advanced[:-1] == [0.0] * (len(checks) - 1)
    assert advanced[-1] == pytest.approx(1)
    assert not any(bool(c) for c in checks[:-1])  # it stopped at the first step that held
    assert _greedy_holds(model, tok, fact, 2, held)
    assert not _greedy_holds(model, tok, fact, 2, 0.5 * held)

    checks.clear()  # a bound it cannot hold within: all the extra steps, then it stops
    config = ComputeConfig(**{**base, "clamp": 1e-4, "extra_steps": 5})
    bounded = compute_residuals(model, tok, [fact], 2, PREFIXES, config)[0]
    assert [bool(c) for c in checks] == [False] * 6
    assert not _greedy_holds(model, tok, fact, 2, bounded)


def test_bfloat16_runs_the_ffns_and_head_in_bfloat16_and_attention_in_float32(llama):
    """precision="bfloat16": the FFNs from the edited layer up and the LM head compute in
    bfloat16, attention in float32 (its CPU backward is slow in bfloat16); the residuals
    stay near float32's, and the model is left without hooks or autocast."""
    model, tok = llama
    layer = 1
    seen: dict[str, set] = {"ffn": set(), "attention": set(), "head": set()}
    watched = {"ffn": get_module(model, ffn_out_path(model, 2)),
               "attention": model.model.layers[2].self_attn.q_proj,
               "head": model.get_output_embeddings()}
    hooks = [m.register_forward_hook(lambda _m, _a, out, name=name: seen[name].add(out.dtype))
             for name, m in watched.items()]
    config = ComputeConfig(**{**FAST_COMPUTE, "precision": "bfloat16"})
    try:
        low = compute_residuals(model, tok, FACTS[:2], layer, PREFIXES, config)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {"ffn": {torch.bfloat16}, "attention": {torch.float32},
                    "head": {torch.bfloat16}}
    full = compute_residuals(model, tok, FACTS[:2], layer, PREFIXES,
                             ComputeConfig(**FAST_COMPUTE))
    assert low.dtype == torch.float32
    assert float((low - full).norm() / full.norm()) < 0.1
    assert not torch.is_autocast_enabled("cpu")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
