"""The key-value view of editing (paper Figure 2), for NeuralDB and the weight editors.

NeuralDB: every searchable token of a prompt (all but its sequence's first) has an FFN key at
the edited layer; the gate passes when its top-1 cosine with the stored fact keys exceeds
gamma. How these cosines spread on the facts' own prompts (rewrite, paraphrase) against
prompts that must not trigger (neighborhood, generic text) is what gamma has to separate, so
this view doubles as the tool for choosing gamma.

MEMIT and AlphaEdit on one layer: the update Delta = R K^T S adds R w to the layer's output for
a query key k, with w = K^T S k (``ndb.eval.baselines.editors.weight_scores``). The entry of w for
the prompt's own fact is the positive score (ideally 1: the whole residual), the others are
negatives (ideally 0).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ndb import nethook
from ndb.anchor import encode, encode_with_span
from ndb.compute import compute_keys, encode_prompt
from ndb.eval.baselines.editors import WeightEditConfig, weight_scores
from ndb.facts import Fact
from ndb.models import ffn_out_path, get_module
from ndb.tokens import pad_rows

KINDS = ("rewrite", "paraphrase", "neighborhood", "generic")
GAMMAS = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))

Prompt = tuple[int | None, str]  # (index of the prompt's own fact, or None; text)


def eval_prompts(facts: Sequence[Fact], generic: Sequence[str] = ()) -> dict[str, list[Prompt]]:
    """The prompts of each kind, with the index of the fact each belongs to.

    A neighborhood prompt belongs to the fact whose neighbor it is. Neighborhood prompts that
    name a subject edited in the same set are left out: they should trigger that fact.
    """
    subjects = sorted({f.subject for f in facts}, key=len, reverse=True)
    edited = re.compile("|".join(rf"(?<!\w){re.escape(s)}(?!\w)" for s in subjects))
    return {
        "rewrite": [(i, f.text) for i, f in enumerate(facts)],
        "paraphrase": [(i, p) for i, f in enumerate(facts) for p in f.paraphrases],
        "neighborhood": [(i, p) for i, f in enumerate(facts)
                         for p in f.extra.get("neighborhood_prompts", ()) if not edited.search(p)],
        "generic": [(None, t) for t in generic],
    }


def token_key_batches(
    model, layer: int, rows: Sequence[Sequence[int]], batch_size: int = 32,
    desc: str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches of (row indices, keys (B, T, d1) float32 on the CPU, attention mask (B, T) bool).

    Rows are right-padded, so column 0 is every row's first token, and batched by length;
    the model runs only up to the edited projection.
    """
    module = get_module(model, ffn_out_path(model, layer))
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    bar = tqdm(total=len(rows), desc=desc, unit="prompt", disable=desc is None)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad_rows([rows[i] for i in idx], 0)
        with torch.no_grad():
            x = nethook.run_until(model, module, input_ids=ids.to(device),
                                  attention_mask=mask.to(device), use_cache=False)
        bar.update(len(idx))
        yield torch.tensor(idx), x.float().cpu(), mask.bool()
    bar.close()


def score_rows(
    model,
    layer: int,
    rows: Sequence[Sequence[int]],
    own: Sequence[int | None],
    keys: Mapping[str, tuple[torch.Tensor, bool]],
    batch_size: int = 32,
    desc: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Gate scores of token-id ``rows`` against one or more sets of fact keys.

    ``keys`` maps a name to (fact keys, skip_first): whether a row's first token is left
    unsearched. Keys are (n, d1), or (n, k, d1) for k keys per fact (``compute_keys`` with
    ``split``), a fact then scoring the max over its keys. One forward pass serves every set.
    Per set, arrays over rows: ``own`` max cosine with the row's own fact; ``best`` max
    top-1 cosine; ``best_token`` where that is and ``best_fact`` the top-1 fact there (-1 if
    none); ``best_is_own`` whether that is the own fact; ``own_top1`` max top-1 cosine over
    tokens whose top-1 fact is the own fact; ``top1`` a list of each row's per-token top-1
    cosines. NaN where undefined (no own fact, nothing searchable).
    """
    m = len(rows)
    normed = {name: (F.normalize(k.float().reshape(len(k), -1, k.shape[-1]), dim=-1), skip)
              for name, (k, skip) in keys.items()}
    out: dict[str, dict[str, Any]] = {
        name: {"own": np.full(m, np.nan), "best": np.full(m, np.nan),
               "best_token": np.full(m, -1), "best_fact": np.full(m, -1),
               "best_is_own": np.zeros(m, dtype=bool),
               "own_top1": np.full(m, np.nan), "top1": [np.zeros(0)] * m}
        for name in keys
    }
    own_ids = torch.tensor([-1 if o is None else o for o in own])
    for idx, x, mask in token_key_batches(model, layer, rows, batch_size, desc):
        x = F.normalize(x, dim=-1)
        o = own_ids[idx]
        for name, (fact_keys, skip_first) in normed.items():
            searchable = mask.clone()
            if skip_first:
                searchable[:, 0] = False
            # (B, T, n): a fact's cosine is its best key's, as the gate sees it
            sims = torch.einsum("btd,nkd->btnk", x, fact_keys).amax(-1)
            top1, top_id = sims.max(-1)
            top1 = top1.masked_fill(~searchable, -torch.inf)
            best, token = top1.max(1)
            own_cos = sims.gather(2, o.clamp(min=0)[:, None, None].expand(-1, sims.shape[1], 1))
            own_cos = own_cos.squeeze(2).masked_fill(~searchable, -torch.inf).max(1).values
            own_top1 = top1.masked_fill(top_id != o[:, None], -torch.inf).max(1).values
            res = out[name]
            found = torch.isfinite(best)
            res["best"][idx] = torch.where(found, best, torch.nan).numpy()
            res["best_token"][idx] = torch.where(found, token, -1).numpy()
            at_best = top_id.gather(1, token[:, None])[:, 0]
            res["best_fact"][idx] = torch.where(found, at_best, -1).numpy()
            res["best_is_own"][idx] = (found & (at_best == o)).numpy()
            res["own"][idx] = torch.where((o >= 0) & found, own_cos, torch.nan).numpy()
            res["own_top1"][idx] = torch.where(torch.isfinite(own_top1), own_top1,
                                               torch.nan).numpy()
            for b, i in enumerate(idx.tolist()):
                res["top1"][i] = top1[b][searchable[b]].numpy()
    return out


def gate_scores(
    model,
    tokenizer,
    facts: Sequence[Fact],
    keys: torch.Tensor,
    layer: int,
    prompts_by_kind: Mapping[str, Sequence[Prompt]],
    max_tokens: int = 256,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """NeuralDB's gate scores per prompt kind (see ``score_rows`` for the fields, plus
    ``fact``, the own fact's index or -1).

    ``keys`` are the facts' keys as ``compute_keys`` returns them, (n, d1) or (n, k, d1)
    (normalized here, as the database stores them). Prompts are anchored as ndb encodes every
    input, cut to ``max_tokens``, and their first token (the anchor) is never searched.
    """
    if len(keys) != len(facts):
        raise ValueError(f"{len(keys)} keys for {len(facts)} facts")
    out = {}
    for kind, prompts in prompts_by_kind.items():
        if not prompts:
            continue
        rows = [encode(tokenizer, text)[:max_tokens] for _, text in prompts]
        own = [i for i, _ in prompts]
        desc = f"gate scores: {kind}" if progress else None
        out[kind] = score_rows(model, layer, rows, own, {"ndb": (keys, True)}, batch_size,
                               desc)["ndb"]
        out[kind]["fact"] = np.array([-1 if i is None else i for i in own])
    return out


def gate_rates(scores: Mapping[str, Any], gamma: float) -> dict[str, float]:
    """At gate ``gamma``: ``own_hit`` the share of prompts where the own fact is top-1 and
    passes at some token; ``any_gate`` the share where some token passes; ``token_gate`` the
    share of searched tokens that pass."""
    has_own = scores["fact"] >= 0
    tokens = np.concatenate([*scores["top1"], np.zeros(0)])
    return {
        "own_hit": float(np.mean(scores["own_top1"][has_own] > gamma)) if has_own.any()
        else float("nan"),
        "any_gate": float(np.mean(scores["best"] > gamma)),
        "token_gate": float(np.mean(tokens > gamma)) if len(tokens) else float("nan"),
    }


def describe(values: np.ndarray | Sequence[float]) -> dict[str, float]:
    """Count, mean, standard deviation and quantiles of the finite values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"n": 0}
    q = np.quantile(v, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    return {"n": int(len(v)), "mean": float(v.mean()), "std": float(v.std()),
            **{k: float(x) for k, x in zip(("min", "q05", "q25", "q50", "q75", "q95", "max"), q)}}


def _weight_rows(tokenizer, facts: Sequence[Fact]) -> dict[str, tuple[list, list, list]]:
    """Per kind: anchored rows, own fact, and the query position (None: every token)."""
    kinds: dict[str, tuple[list, list, list]] = {k: ([], [], []) for k in KINDS[:3]}

    def add(kind: str, ids: list[int], fact: int, position: int | None) -> None:
        rows, own, positions = kinds[kind]
        rows.append(ids)
        own.append(fact)
        positions.append(position)

    for i, fact in enumerate(facts):
        ids, s = encode_prompt(tokenizer, "", fact.prompt, fact.subject)
        add("rewrite", ids, i, s)
        for text in fact.paraphrases:
            start = text.rfind(fact.subject)
            if start >= 0:  # else a reworded subject, whose position is unknown
                ids, s = encode_with_span(tokenizer, text, start + len(fact.subject))
                add("paraphrase", ids, i, s)
    for i, text in eval_prompts(facts)["neighborhood"]:
        add("neighborhood", encode(tokenizer, text), i, None)
    return kinds


def weight_score_view(
    model,
    tokenizer,
    facts: Sequence[Fact],
    layer: int,
    moment: torch.Tensor,
    config: WeightEditConfig,
    keys: torch.Tensor | None = None,
    n_sample: int = 5000,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """w = K^T S k of a single-layer MEMIT or AlphaEdit update, per prompt kind.

    The query k is the key at the subject's last token for rewrite prompts and paraphrases
    (paraphrases whose text lacks the subject string are skipped). A neighbor's subject is
    not known, so for neighborhood prompts the query is the token (any but the first) where
    |w| of the fact it neighbors is largest: the most that prompt could leak of that fact.
    ``keys`` are the facts' raw keys (default: bare-prompt keys, ``compute_keys`` with [""]).

    Per kind: ``fact`` (own index), ``positive`` w of the own fact, ``negative_max`` the
    largest other entry, ``rank1`` positive > negative_max, ``negative_mean`` and
    ``negative_std`` over all other entries, ``negative_sample`` a seeded sample of them.
    """
    if keys is not None and keys.dim() != 2:
        raise ValueError(f"the weight editors take one key per fact, got keys {keys.shape}")
    if list(config.layers) != [layer]:
        raise ValueError(f"the view is for a single-layer update at {layer}, got {config.layers}")
    if keys is None:
        keys = compute_keys(model, tokenizer, facts, layer, [""])
    # w is linear in the query: one solve with identity queries gives the map k -> w, (d1, n)
    w_of = weight_scores(keys, torch.eye(keys.shape[1]), moment, config)
    generator = np.random.default_rng(seed)
    out = {}
    for kind, (rows, own, positions) in _weight_rows(tokenizer, facts).items():
        if not rows:
            continue
        w = torch.zeros(len(rows), len(facts))
        desc = f"weight scores: {kind} ({config.method})" if progress else None
        own_t = torch.tensor(own)
        every_token = positions[0] is None
        for idx, x, mask in token_key_batches(model, layer, rows, batch_size, desc):
            if every_token:
                scores = x @ w_of  # (B, T, n)
                o = own_t[idx]
                leak = scores.gather(2, o[:, None, None].expand(-1, scores.shape[1], 1))
                mask[:, 0] = False
                token = leak.squeeze(2).abs().masked_fill(~mask, -1).argmax(1)
                w[idx] = scores[torch.arange(len(idx)), token]
            else:
                pos = torch.tensor([positions[i] for i in idx.tolist()])
                w[idx] = x[torch.arange(len(idx)), pos] @ w_of
        own_mask = F.one_hot(own_t, len(facts)).bool()
        positive = w[own_mask]
        negative = w[~own_mask].numpy()
        negative_max = w.masked_fill(own_mask, -torch.inf).max(1).values
        sample = generator.choice(negative, min(n_sample, len(negative)), replace=False)
        out[kind] = {
            "fact": own_t.numpy(),
            "positive": positive.numpy(),
            "negative_max": negative_max.numpy(),
            "rank1": (positive > negative_max).numpy(),
            "negative_mean": float(negative.mean()) if len(negative) else float("nan"),
            "negative_std": float(negative.std()) if len(negative) else float("nan"),
            "negative_sample": sample,
        }
    return out


def _paper_boxes(ax, groups: Sequence[tuple[str, np.ndarray, str]]) -> None:
    """Boxes as in the paper's Figure 2: center line the mean, box +-1 std, whiskers +-1.5
    std; the values themselves are drawn faintly beside each box, since a mean and a spread
    hide the tails a gate cares about."""
    stats, rng = [], np.random.default_rng(0)
    for pos, (label, values, color) in enumerate(groups, 1):
        v = np.asarray(values, dtype=float)
        v = v[np.isfinite(v)]
        mean, std = (float(v.mean()), float(v.std())) if len(v) else (np.nan, np.nan)
        stats.append({"label": label, "med": mean, "q1": mean - std, "q3": mean + std,
                      "whislo": mean - 1.5 * std, "whishi": mean + 1.5 * std, "fliers": []})
        shown = v if len(v) <= 400 else rng.choice(v, 400, replace=False)
        ax.scatter(pos + 0.3 + rng.uniform(-0.06, 0.06, len(shown)), shown, s=3, alpha=0.3,
                   color=color, linewidths=0)
    boxes = ax.bxp(stats, showfliers=False, patch_artist=True, widths=0.45)
    for patch, (_, _, color) in zip(boxes["boxes"], groups):
        patch.set_facecolor(color)
        patch.set_alpha(0.5)
    ax.tick_params(axis="x", labelrotation=30)


POSITIVE, NEGATIVE, LEAK = "tab:red", "tab:blue", "tab:orange"


def plot_kv_view(
    gates: Mapping[str, Mapping[str, Mapping[str, Any]]],
    weights: Mapping[str, Mapping[str, Mapping[str, Any]]],
    gamma: float,
    path: str | Path,
    title: str | None = None,
) -> Path:
    """One PNG: a panel per NeuralDB key set (label -> ``gate_scores`` result) with the gate
    cosines per kind and the gamma line (own-fact cosine for rewrite/paraphrase, best cosine
    for the rest), then a panel per weight editor (method -> ``weight_score_view`` result)
    with the own fact's w (red; orange for the fact a neighborhood prompt neighbors, ideally
    0) and the other facts' w (blue) per kind."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    panels = len(gates) + len(weights)
    fig = Figure(figsize=(4.5 * panels, 4.2))
    axes = np.atleast_1d(fig.subplots(1, panels))
    for ax, (label, gate) in zip(axes, gates.items()):
        groups = []
        for kind in KINDS:
            if kind in gate:
                field = "own" if kind in ("rewrite", "paraphrase") else "best"
                color = POSITIVE if field == "own" else NEGATIVE
                groups.append((f"{kind}\n({field})", gate[kind][field], color))
        _paper_boxes(ax, groups)
        ax.axhline(gamma, color="black", linestyle="--", linewidth=1, label=f"gamma {gamma}")
        ax.set_title(f"NeuralDB ({label}): cosine" if label else "NeuralDB: cosine")
        ax.set_ylabel("cosine")
        ax.legend(loc="lower left", fontsize=8)
    for ax, (method, view) in zip(axes[len(gates):], weights.items()):
        groups = []
        for kind in KINDS[:3]:
            if kind in view:
                color = LEAK if kind == "neighborhood" else POSITIVE
                groups.append((f"{kind}\nown", view[kind]["positive"], color))
                groups.append((f"{kind}\nothers", view[kind]["negative_sample"], NEGATIVE))
        _paper_boxes(ax, groups)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_title(f"{method}: w = K^T S k")
        ax.set_ylabel("w")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
