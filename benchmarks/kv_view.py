"""The key-value view (paper Figure 2) of NeuralDB, MEMIT and AlphaEdit on one layer.

NeuralDB: cosines of prompt tokens' FFN keys with the stored fact keys, per prompt kind, and
the gate's hit rates over gamma (the table for choosing gamma). MEMIT and AlphaEdit: the
weight scores w = K^T S k of a single-layer update, own fact (positive) against the others
(negative). Also the eigenvalue spectrum of C0, which sets AlphaEdit's null space.

    .venv/bin/python benchmarks/kv_view.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ndb.anchor import encode
from ndb.compute import compute_keys, context_prefixes
from ndb.config import ComputeConfig, fingerprint, model_name
from ndb.eval.baselines.editors import WeightEditConfig, null_space_projector
from ndb.eval.baselines.stats import key_second_moments, read_texts
from ndb.eval.kvview import (
    GAMMAS,
    KINDS,
    describe,
    eval_prompts,
    gate_rates,
    gate_scores,
    plot_kv_view,
    weight_score_view,
)
from ndb.facts import parse_record
from ndb.loading import load_model
from ndb.models import default_edit_settings
from ndb.output import write_strict_json
from ndb.record_formats import read_facts

HERE = Path(__file__).resolve().parent
LAMBADA = HERE.parents[1] / "shared" / "data" / "general" / "lambada_test.jsonl"
THRESHOLDS = (1e-4, 1e-3, 1e-2, 2e-2, 5e-2, 1e-1, 1.0)
METHODS = {"MEMIT": "memit", "AlphaEdit": "alphaedit"}


def load_facts(path: Path | None, n: int, seed: int):
    if path is not None:
        return read_facts(path), str(path)
    from ndb.eval.geo import build_geo

    records = build_geo(n=n, seed=seed)
    facts = [parse_record(r, f"geo record {i}") for i, r in enumerate(records)]
    return facts, f"build_geo(n={n}, seed={seed})"


def spectrum(moment: torch.Tensor) -> dict:
    """Eigenvalues of C0 and how many fall below AlphaEdit-style null-space thresholds."""
    values = torch.linalg.eigvalsh(moment.double()).numpy()
    total = values.sum()
    return {
        "dim": int(len(values)),
        "min": float(values.min()),
        "median": float(np.median(values)),
        "mean": float(values.mean()),
        "max": float(values.max()),
        "quantiles": {f"q{int(q * 100):02d}": float(np.quantile(values, q))
                      for q in (0.01, 0.05, 0.1, 0.25, 0.75, 0.9)},
        "below": {f"{t:g}": int((values < t).sum()) for t in THRESHOLDS},
        # the share of generic keys' squared norm, E||P k||^2 / E||k||^2, that a null-space
        # projector at this threshold lets through: what AlphaEdit's update would disturb
        "energy_below": {f"{t:g}": float(values[values < t].sum() / total) for t in THRESHOLDS},
    }


def triggers(tokenizer, facts, prompts: dict, gate: dict, gamma: float) -> dict:
    """What passes the gate on prompts that should not trigger: the token where the best
    cosine sits and the subject of the fact it meets (top 10), and for neighborhood prompts
    the rate per relation of the fact they neighbor."""
    out = {}
    for kind in ("neighborhood", "generic"):
        if kind not in gate:
            continue
        g = gate[kind]
        fired = [(i, text, int(t), int(f)) for (i, text), b, t, f in
                 zip(prompts[kind], g["best"], g["best_token"], g["best_fact"]) if b > gamma]
        tokens = Counter(f"`{tokenizer.decode([encode(tokenizer, text)[t]])}` -> "
                         f"{facts[f].subject}" for _, text, t, f in fired)
        out[kind] = {"tokens": dict(tokens.most_common(10))}
        if kind == "neighborhood":
            relation = [facts[i].extra.get("relation_id", "?") for i, _ in prompts[kind]]
            total, hit = Counter(relation), Counter(facts[i].extra.get("relation_id", "?")
                                                    for i, *_ in fired)
            out[kind]["relations"] = {r: {"prompts": n, "false_trigger": hit[r] / n}
                                      for r, n in total.items()}
    return out


def _round(values: np.ndarray) -> list:
    return [None if not np.isfinite(v) else round(float(v), 4) for v in values]


def _row(s: dict, fields=("mean", "std", "q05", "q25", "q50", "q75", "q95")) -> str:
    return " | ".join(f"{s[f]:.3f}" if s.get("n") else "-" for f in fields)


def _gate_section(key_kind: str, g: dict, gamma: float) -> list[str]:
    lines = [
        f"## NeuralDB ({key_kind}): cosine of prompt tokens' keys with the fact keys",
        "",
        "All tokens but the first (the anchor) are searched. *own*: max over the prompt's "
        "tokens of the cosine with its own fact (for a neighborhood prompt: the fact it "
        "neighbors). *best*: max over tokens of the top-1 cosine with any fact. *best is "
        "own*: the top-1 fact at that token is the own fact.",
        "",
        "| kind | score | n | mean | std | q05 | q25 | q50 | q75 | q95 | best is own |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, v in g["scores"].items():
        for score in ("own", "best"):
            s = v["summary"][score]
            if s.get("n"):
                own = f"{v['best_is_own']:.3f}" if kind != "generic" else "-"
                lines.append(f"| {kind} | {score} | {s['n']} | {_row(s)} | {own} |")
    lines += [
        "",
        f"### Choosing gamma ({key_kind}): gate rates",
        "",
        "*Hit*: the own fact is top-1 and passes the gate at some token (the edit applies). "
        "*False trigger*: some token passes the gate (with any fact). *Tokens*: the share of "
        "searched generic tokens that pass.",
        "",
        "| gamma | rewrite hit | paraphrase hit | neighborhood false trigger "
        "| generic false trigger | generic tokens |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for value, rates in g["rates"].items():
        cells = [rates.get(kind, {}).get(rate) for kind, rate in (
            ("rewrite", "own_hit"), ("paraphrase", "own_hit"), ("neighborhood", "any_gate"),
            ("generic", "any_gate"), ("generic", "token_gate"))]
        bold = "**" if float(value) == gamma else ""
        lines.append(f"| {bold}{value}{bold} | "
                     + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    trig = g["triggers"]
    lines += ["", f"### What passes the gate where it should not ({key_kind}, gamma {gamma})",
              ""]
    for kind, t in trig.items():
        lines.append(f"Best-scoring token of {kind} prompts that pass -> the subject of the "
                     "fact it meets: " + ("; ".join(f"{k} ({v})" for k, v in t["tokens"].items())
                                          or "none") + ".")
        lines.append("")
    if "neighborhood" in trig:
        lines += ["| relation of the neighbored fact | neighborhood prompts | false trigger |",
                  "|---|---:|---:|"]
        for relation, v in trig["neighborhood"]["relations"].items():
            lines.append(f"| {relation} | {v['prompts']} | {v['false_trigger']:.3f} |")
        lines.append("")
    return lines


def markdown(r: dict) -> str:
    gamma = r["gamma"]
    memit, alpha = r["configs"]["MEMIT"], r["configs"]["AlphaEdit"]
    null = r["null_space_dim"]
    lines = [
        "# Key-value view: NeuralDB gate cosines and MEMIT/AlphaEdit weight scores",
        "",
        "Reproduce with:",
        "",
        "```",
        r["command"],
        "```",
        "",
        f"Model `{r['model']}`, layer {r['layer']}, gamma {gamma}; {r['n_facts']} facts "
        f"({r['facts']}); fact keys from the bare prompt and {len(r['prefixes']) - 1} sampled "
        "prefixes, for NeuralDB both as *two keys* per fact (bare-prompt key, prefixed keys' "
        "mean; a fact scores its better one) and as their *average* (MEMIT's key); "
        f"a database's default is {r['db_key_kind']}. MEMIT and AlphaEdit use the average. "
        "Generic text: the last "
        f"{r['prompts']['generic']} passages of `{r['text']}` (cut to {r['max_tokens']} tokens; "
        f"C0 comes from its first passages, {r['c0_positions']} positions). Prompts per kind: "
        + ", ".join(f"{k} {v}" for k, v in r["prompts"].items()) + ".",
        "",
        "![kv view](kv_view.png)",
        "",
    ]
    for key_kind, g in r["gate"].items():
        lines += _gate_section(key_kind, g, gamma)
    lines += [
        "",
        "## MEMIT and AlphaEdit: weight scores w = K^T S k (single layer)",
        "",
        "Query k: the key at the subject's last token of the rewrite prompt and of each "
        "paraphrase (bare prompt, no prefix); for a neighborhood prompt, whose subject is not "
        "known, the token (anchor excluded) where |w| of the neighbored fact is largest. "
        "*own*: w of the prompt's fact (for neighborhood prompts: of the fact it neighbors, "
        "ideally 0); *others*: all other entries of w; *own is top*: own > max of the others.",
        "",
        f"Settings: MEMIT lambda {memit['mom2_weight']:g}; AlphaEdit L2 {alpha['l2']:g}, "
        f"null-space threshold {alpha['null_threshold']:g} ({null} of "
        f"{r['spectrum']['dim']} eigenvalues of C0 below it).",
        "",
        "| method | kind | w | n | mean | std | q05 | q25 | q50 | q75 | q95 | own is top |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, view in r["weights"].items():
        for kind, v in view.items():
            pos, neg = v["positive"], v["negative"]
            lines.append(f"| {method} | {kind} | own | {pos['n']} | {_row(pos)} "
                         f"| {v['rank1']:.3f} |")
            quantiles = _row(v["negative_sample"], ("q05", "q25", "q50", "q75", "q95"))
            lines.append(f"| {method} | {kind} | others | {neg['n']} | {neg['mean']:.4f} "
                         f"| {neg['std']:.4f} | {quantiles} | |")
    sp = r["spectrum"]
    lines += [
        "",
        "## Eigenvalues of C0 (AlphaEdit's null space)",
        "",
        f"C0 = E[k k^T] over {r['c0_positions']} positions of generic text at layer "
        f"{r['layer']}, dimension {sp['dim']}. AlphaEdit's threshold (2e-2) was set for "
        "Llama-3-8B's key scale; the null space is spanned by the eigenvectors below it.",
        "",
        f"min {sp['min']:.3g}, "
        + ", ".join(f"{k} {v:.3g}" for k, v in sp["quantiles"].items() if k < "q50")
        + f", median {sp['median']:.3g}, mean {sp['mean']:.3g}, "
        + ", ".join(f"{k} {v:.3g}" for k, v in sp["quantiles"].items() if k > "q50")
        + f", max {sp['max']:.3g}.",
        "",
        "| threshold | " + " | ".join(sp["below"]) + " |",
        "|---|" + "---:|" * len(sp["below"]),
        "| eigenvalues below | " + " | ".join(str(v) for v in sp["below"].values()) + " |",
        "| share of generic keys' energy E[k^T P k] / E[k^T k] below | "
        + " | ".join(f"{v:.3f}" for v in sp["energy_below"].values()) + " |",
        "",
        f"Ran in {r['seconds']:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in r["timings"].items())
        + f") on {r['machine']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=Path, help="facts file [default: 200 geo facts]")
    parser.add_argument("--n-facts", type=int, default=200, help="geo facts when no --facts")
    parser.add_argument("--seed", type=int, default=0, help="geo facts and prefixes seed")
    parser.add_argument("--layer", type=int, help="edited layer [default: the model's]")
    parser.add_argument("--gamma", type=float, help="gate [default: the model's]")
    parser.add_argument("--text", type=Path, default=LAMBADA,
                        help="generic text (JSONL 'text' or .txt): C0 and generic prompts")
    parser.add_argument("--stats-positions", type=int, default=100_000, help="C0 token positions")
    parser.add_argument("--generic", type=int, default=500, help="generic passages scored")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch CPU threads [default: torch's]")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "kv_view")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    timings: dict[str, float] = {}
    model, tok = load_model()
    default_layer, default_gamma = default_edit_settings(model)
    layer = default_layer if args.layer is None else args.layer
    gamma = default_gamma if args.gamma is None else args.gamma
    facts, source = load_facts(args.facts, args.n_facts, args.seed)
    texts = read_texts([args.text])

    t = time.time()
    prefixes = context_prefixes(model, tok, 5, 10, seed=0)
    split = compute_keys(model, tok, facts, layer, prefixes, progress=True, split=True)
    # MEMIT's key: the bare prompt weighs as much as all prefixes together
    keys = {"two keys": split, "average": split.mean(1)}
    db_kind = "two keys" if ComputeConfig().keys_per_fact > 1 else "average"
    timings["keys"] = time.time() - t

    t = time.time()
    prompts = eval_prompts(facts, texts[-args.generic:] if args.generic else [])
    gate = {kind: gate_scores(model, tok, facts, keys[kind], layer, prompts, args.max_tokens,
                              args.batch_size, progress=True)
            for kind in sorted(keys, key=lambda k: k != db_kind)}
    timings["gate scores"] = time.time() - t

    t = time.time()
    moment = key_second_moments(model, tok, texts, [layer], fingerprint(model, layer),
                                args.stats_positions, progress=True)[layer]
    timings["C0"] = time.time() - t

    t = time.time()
    weights, configs = {}, {}
    for name, method in METHODS.items():
        config = WeightEditConfig(method, [layer])
        configs[name] = {k: v for k, v in vars(config).items() if k not in ("method", "layers")}
        weights[name] = weight_score_view(model, tok, facts, layer, moment, config,
                                          keys=keys["average"], batch_size=args.batch_size,
                                          progress=True)
    timings["weight scores"] = time.time() - t

    plot_kv_view(gate, weights, gamma, args.out.with_suffix(".png"),
                 title=f"{model_name(model)}, layer {layer}, {len(facts)} facts ({source}); "
                       "MEMIT/AlphaEdit use the average key")
    command = shlex.join([".venv/bin/python", "benchmarks/kv_view.py", *(argv or sys.argv[1:])])
    result = {
        "command": command,
        "model": model_name(model),
        "layer": layer,
        "gamma": gamma,
        "facts": source,
        "n_facts": len(facts),
        "prefixes": prefixes,
        "text": str(args.text.name),
        "c0_positions": args.stats_positions,
        "max_tokens": args.max_tokens,
        "prompts": {k: len(v) for k, v in prompts.items()},
        "db_key_kind": db_kind,
        "gate": {
            key_kind: {
                "scores": {
                    kind: {
                        "summary": {s: describe(g[s]) for s in ("own", "best")},
                        "best_is_own": float(np.mean(g["best_is_own"])),
                        "own": _round(g["own"]),
                        "best": _round(g["best"]),
                    }
                    for kind, g in scores.items()
                },
                "triggers": triggers(tok, facts, prompts, scores, gamma),
                "rates": {f"{g:.2f}": {kind: gate_rates(scores[kind], g) for kind in KINDS
                                       if kind in scores} for g in GAMMAS},
            }
            for key_kind, scores in gate.items()
        },
        "configs": configs,
        "weights": {
            method: {
                kind: {
                    "positive": describe(v["positive"]),
                    "rank1": float(np.mean(v["rank1"])),
                    "negative": {"n": int(len(v["fact"]) * (len(facts) - 1)),
                                 "mean": v["negative_mean"], "std": v["negative_std"]},
                    "negative_sample": describe(v["negative_sample"]),
                    "negative_max": describe(v["negative_max"]),
                    "positive_values": _round(v["positive"]),
                }
                for kind, v in view.items()
            }
            for method, view in weights.items()
        },
        "spectrum": spectrum(moment),
        "null_space_dim": int(null_space_projector(moment, configs["AlphaEdit"]["null_threshold"])
                              .trace().round()),
        "machine": (f"{platform.machine()} CPU ({os.cpu_count()} cores), "
                    f"torch threads: {torch.get_num_threads()}"),
        "timings": timings,
        "seconds": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_strict_json(args.out.with_suffix(".json"), result, indent=1)
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
