"""First-token ablation: what ndb's fixed first token does for the gate (keys only).

SmolLM2's tokenizer adds no BOS, so without ndb's anchor a prompt that starts with its subject
puts the subject at position 0, whose FFN key is an attention sink nearly the same for every
input. Variants (the same texts, the same sampled prefixes):

- naive: the paper as written on a BOS-less model: keys and inputs without the anchor, every
  position searched, position 0 included;
- skip first: no anchor anywhere, but each input's first position is never searched (what
  ndb's hook does for a tokenizer that was not set up with ndb.anchor_tokenizer);
- anchor at inference: naive keys, inputs anchored, first position never searched;
- ndb: the anchor in keys and inputs, first position never searched.

Each with both kinds of fact key: the paper's (MEMIT's average of the bare-prompt key and the
prefixed keys' mean) and the two kept as two keys of the fact (ndb's default). For each gamma:
own-fact hits on rewrite prompts and paraphrases (the own fact is top-1 and passes at some
token), false triggers on neighborhood prompts and generic passages (some token passes), and
the share of generic tokens that pass.

    .venv/bin/python benchmarks/first_token.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ndb.anchor import encode
from ndb.compute import compute_keys, context_prefixes, encode_prompt
from ndb.config import ComputeConfig, model_name
from ndb.eval.baselines.stats import read_texts
from ndb.eval.kvview import GAMMAS, KINDS, eval_prompts, gate_rates, score_rows, token_key_batches
from ndb.facts import Fact, parse_record
from ndb.loading import load_model
from ndb.models import default_edit_settings
from ndb.output import write_strict_json
from ndb.record_formats import read_facts

HERE = Path(__file__).resolve().parent
LAMBADA = HERE.parents[1] / "shared" / "data" / "general" / "lambada_test.jsonl"
DEV = HERE.parent / "ndb" / "data" / "dev_counterfact.json"
KEY_KINDS = ("average", "two keys")
VARIANTS = tuple(f"{v} ({k})" for v in ("naive", "skip first", "anchor at inference", "ndb")
                 for k in KEY_KINDS)
PAPER = "naive (average)"  # the paper as written, on a model without BOS
NDB = f"ndb ({KEY_KINDS[int(ComputeConfig().keys_per_fact > 1)]})"  # what a database does
PLOTTED = {PAPER: "--", NDB: "-"}
METRICS = {  # column -> (kind, gate_rates field)
    "rewrite hit": ("rewrite", "own_hit"),
    "paraphrase hit": ("paraphrase", "own_hit"),
    "neighborhood false trigger": ("neighborhood", "any_gate"),
    "generic false trigger": ("generic", "any_gate"),
    "generic tokens": ("generic", "token_gate"),
}


def naive_keys(model, tokenizer, facts: Sequence[Fact], layer: int, prefixes: Sequence[str],
               batch_size: int = 32) -> torch.Tensor:
    """Keys as ``compute_keys(..., split=True)`` computes them, (n, 2, d1) (bare prompt,
    prefixes' mean), but from text without the anchor token."""
    rows, last = [], []
    for fact in facts:
        for prefix in prefixes:
            ids, s = encode_prompt(tokenizer, prefix, fact.prompt, fact.subject)
            rows.append(ids[1 : s + 1])  # drop the anchor: the text tokenized on its own
            last.append(s - 1)
    keys: torch.Tensor | None = None
    for idx, x, _ in token_key_batches(model, layer, rows, batch_size, desc="naive keys"):
        if keys is None:
            keys = torch.empty(len(rows), x.shape[-1])
        keys[idx] = x[torch.arange(len(idx)), torch.tensor([last[i] for i in idx.tolist()])]
    keys = keys.view(len(facts), len(prefixes), -1)
    return torch.stack([keys[:, 0], keys[:, 1:].mean(1)], 1)


def measure(model, tokenizer, facts: Sequence[Fact], layer: int, gamma: float,
            prefixes: Sequence[str], generic: Sequence[str], max_tokens: int, batch_size: int,
            name: str) -> dict:
    """Gate rates of every variant over GAMMAS, and diagnostics at ``gamma``."""
    split = {"naive": naive_keys(model, tokenizer, facts, layer, prefixes, batch_size),
             "ndb": compute_keys(model, tokenizer, facts, layer, prefixes, progress=True,
                                 split=True)}
    # MEMIT's average: the bare prompt weighs as much as all prefixes together
    keys = {(origin, kind): k if kind == "two keys" else k.mean(1)
            for origin, k in split.items() for kind in KEY_KINDS}
    prompts = eval_prompts(facts, generic)
    scores: dict[str, dict] = {v: {} for v in VARIANTS}
    for kind, items in prompts.items():
        own = [i for i, _ in items]
        anchored = [encode(tokenizer, text)[:max_tokens] for _, text in items]
        plain = [row[1:] for row in anchored]
        for rows, views in (
            (plain, {**{f"naive ({k})": (keys["naive", k], False) for k in KEY_KINDS},
                     **{f"skip first ({k})": (keys["naive", k], True) for k in KEY_KINDS}}),
            (anchored, {**{f"anchor at inference ({k})": (keys["naive", k], True)
                           for k in KEY_KINDS},
                        **{f"ndb ({k})": (keys["ndb", k], True) for k in KEY_KINDS}}),
        ):
            desc = f"{name}: {kind}, {'anchored' if rows is anchored else 'plain'} inputs"
            for variant, s in score_rows(model, layer, rows, own, views, batch_size,
                                         desc).items():
                scores[variant][kind] = {**s, "fact": np.array([-1 if i is None else i
                                                                for i in own])}
    # a subject whose last token is the text's first: without the anchor its key is the sink
    first = [encode_prompt(tokenizer, "", f.prompt, f.subject)[1] == 1 for f in facts]
    return {
        "facts": len(facts),
        "subject_first": int(sum(f.prompt.startswith("{}") for f in facts)),
        "subject_at_position_0": int(sum(first)),
        "prompts": {k: len(v) for k, v in prompts.items()},
        "rates": {
            variant: {f"{g:.2f}": {kind: gate_rates(s[kind], g) for kind in KINDS if kind in s}
                      for g in GAMMAS}
            for variant, s in scores.items()
        },
        # where the best-scoring token of unrelated text sits: position 0 is the sink
        "best_at_first_token": {
            variant: {kind: float(np.mean(s[kind]["best_token"] == 0))
                      for kind in ("neighborhood", "generic") if kind in s}
            for variant, s in scores.items()
        },
        "rewrite_hit_by_subject_position": {
            variant: {
                label: float(np.mean(s["rewrite"]["own_top1"][np.array(first) == at] > gamma))
                for label, at in (("subject at position 0", True), ("elsewhere", False))
                if any(f == at for f in first)
            }
            for variant, s in scores.items()
        },
    }


def _cell(rates: dict, column: str) -> str:
    kind, field = METRICS[column]
    value = rates.get(kind, {}).get(field)
    return "-" if value is None or not np.isfinite(value) else f"{value:.3f}"


def markdown(r: dict) -> str:
    gamma = f"{r['gamma']:.2f}"
    lines = [
        "# The first token: the gate with and without ndb's anchor (keys only)",
        "",
        "Reproduce with:",
        "",
        "```",
        r["command"],
        "```",
        "",
        f"Model `{r['model']}`, layer {r['layer']}; fact keys from the bare prompt and "
        f"{len(r['prefixes']) - 1} sampled prefixes, either *average* (MEMIT's key: bare-prompt "
        "key and prefixed keys' mean weigh half each) or *two keys* (those two kept apart, a "
        f"fact scoring its better one; a database's default: {r['ndb_variant']}); generic "
        "text: the last "
        f"{r['generic']} passages of `{r['text']}`, cut to {r['max_tokens']} tokens. "
        "Variants: *naive*: no anchor in keys or inputs, every position searched (the paper "
        "as written, on a model without BOS); *skip first*: no anchor, each input's first "
        "position never searched; *anchor at inference*: naive keys, anchored inputs, first "
        "position never searched; *ndb*: anchor in keys and inputs, first position never "
        "searched. *Hit*: the own fact is top-1 and passes the gate at some token. "
        "*False trigger*: some token passes. *Tokens*: share of searched generic tokens "
        "that pass. Neighborhood prompts naming a subject edited in the same set are left out.",
        "",
    ]
    for set_name, m in r["sets"].items():
        lines += [
            f"## {set_name}: {m['facts']} facts ({m['source']})",
            "",
            f"{m['subject_first']} prompts start with the subject; in "
            f"{m['subject_at_position_0']} the subject's last token is the text's first (a "
            "one-token subject first). Prompts: "
            + ", ".join(f"{k} {v}" for k, v in m["prompts"].items()) + "."
            + (" (Every neighborhood prompt of this set names a subject the set edits.)"
               if not m["prompts"]["neighborhood"] else ""),
            "",
            f"At gamma {gamma} (what still triggers under ndb: see kv_view.md):",
            "",
            "| variant | " + " | ".join(METRICS) + " | best token of unrelated text at "
            "position 0 (neighborhood / generic) |",
            "|---|" + "---:|" * (len(METRICS) + 1),
        ]
        for variant, rates in m["rates"].items():
            at0 = m["best_at_first_token"][variant]
            lines.append(
                f"| {variant} | " + " | ".join(_cell(rates[gamma], c) for c in METRICS)
                + f" | {at0.get('neighborhood', float('nan')):.3f} / "
                f"{at0.get('generic', float('nan')):.3f} |")
        split = m["rewrite_hit_by_subject_position"]
        lines += [
            "",
            f"Rewrite hit at gamma {gamma} by where the subject's last token sits: "
            + "; ".join(f"{v}: " + ", ".join(f"{k} {x:.3f}" for k, x in split[v].items())
                        for v in PLOTTED) + ".",
            "",
        ]
        for variant in PLOTTED:
            lines += [
                f"{variant}, over gamma:",
                "",
                "| gamma | " + " | ".join(METRICS) + " |",
                "|---:|" + "---:|" * len(METRICS),
            ]
            for g, rates in m["rates"][variant].items():
                lines.append(f"| {g} | " + " | ".join(_cell(rates, c) for c in METRICS) + " |")
            lines.append("")
    lines += [
        "![rates over gamma](first_token.png)",
        "",
        f"Ran in {r['seconds']:.0f} s on {r['machine']}.",
        "",
    ]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    sets = r["sets"]
    fig = Figure(figsize=(5.5 * len(sets), 4))
    axes = np.atleast_1d(fig.subplots(1, len(sets)))
    colors = dict(zip(METRICS, ("tab:red", "tab:orange", "tab:blue", "tab:purple", "tab:grey")))
    for ax, (set_name, m) in zip(axes, sets.items()):
        for variant, style in PLOTTED.items():
            rates = m["rates"][variant]
            gammas = [float(g) for g in rates]
            for column in METRICS:
                kind, field = METRICS[column]
                ys = [rates[g].get(kind, {}).get(field, np.nan) for g in rates]
                ax.plot(gammas, ys, style, color=colors[column],
                        label=f"{column} ({variant})")
        ax.axvline(r["gamma"], color="black", linewidth=0.5)
        ax.set_title(f"{set_name} ({m['facts']} facts)")
        ax.set_xlabel("gamma")
        ax.set_ylabel("rate")
        ax.set_ylim(-0.02, 1.02)
    axes[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"{PAPER} (dashed) vs {NDB} (solid)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, help="edited layer [default: the model's]")
    parser.add_argument("--geo-n", type=int, default=300, help="geo facts (build_geo)")
    parser.add_argument("--seed", type=int, default=0, help="geo facts and prefixes seed")
    parser.add_argument("--dev", type=Path, default=DEV, help="dev facts file")
    parser.add_argument("--text", type=Path, default=LAMBADA, help="generic text (JSONL or .txt)")
    parser.add_argument("--generic", type=int, default=300, help="generic passages")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch CPU threads [default: torch's]")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "first_token")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    model, tok = load_model()
    default_layer, gamma = default_edit_settings(model)
    layer = default_layer if args.layer is None else args.layer
    generic = read_texts([args.text])[-args.generic:] if args.generic else []
    prefixes = context_prefixes(model, tok, 5, 10, seed=args.seed)

    from ndb.eval.geo import build_geo

    fact_sets = {
        "geo": ([parse_record(rec, f"geo record {i}")
                 for i, rec in enumerate(build_geo(n=args.geo_n, seed=args.seed))],
                f"build_geo(n={args.geo_n}, seed={args.seed})"),
        "dev": (read_facts(args.dev), args.dev.name),
    }
    sets = {}
    for name, (facts, source) in fact_sets.items():
        t = time.time()
        sets[name] = {"source": source,
                      **measure(model, tok, facts, layer, gamma, prefixes, generic,
                                args.max_tokens, args.batch_size, name)}
        sets[name]["seconds"] = time.time() - t
    command = shlex.join([".venv/bin/python", "benchmarks/first_token.py",
                          *(argv or sys.argv[1:])])
    result = {
        "command": command,
        "model": model_name(model),
        "layer": layer,
        "gamma": gamma,
        "paper_variant": PAPER,
        "ndb_variant": NDB,
        "prefixes": prefixes,
        "text": args.text.name,
        "generic": len(generic),
        "max_tokens": args.max_tokens,
        "sets": sets,
        "machine": (f"{platform.machine()} CPU ({os.cpu_count()} cores), "
                    f"torch threads: {torch.get_num_threads()}"),
        "seconds": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_strict_json(args.out.with_suffix(".json"), result, indent=1)
    args.out.with_suffix(".md").write_text(markdown(result))
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
