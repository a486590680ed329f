"""Throughput of ``ndb serve``: tokens per second at 1, 4 and 16 concurrent clients, with a
large database and without one, measured in one run and reported as ratios.

One server (the default model, on this machine's CPU unless --device) serves a database of
--facts facts over loopback. "With" requests read the database (every generated token is
searched in the key index); "without" requests ask the same server for the unedited model
(``"ndb": {"edited": false}``: no search). Cells run in interleaved order, each --repeats
times, and the median counts.

The database's keys and residuals are synthetic (``ndb.eval.synthetic``): computing 10k real
residuals takes about 12 s per fact on this CPU. Synthetic keys cost the hook's search what
real ones do, but real text rarely passes the gate on them, so the residual lookup on a hit
is not part of what is measured.

    python benchmarks/serve_load.py --facts 10000 --clients 1,4,16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from ndb import Fact, NeuralDB, load_model
from ndb.eval.synthetic import synthetic_keys
from ndb.serve import Server, running

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Write one sentence about the sea:",
    "Toyota is headquartered in",
    "The mother tongue of Danielle Darrieux is",
    "A short list of fruits:",
    "The capital of Canada is",
    "Lionel Messi plays the sport of",
    "In the morning I usually",
]


def synthetic_database(path: Path, model, tokenizer, n: int) -> NeuralDB:
    db = NeuralDB.create(path, model, tokenizer)
    facts = [Fact(f"Entity {i}", "{} is related to", f"object {i}", key=str(i))
             for i in range(n)]
    per_fact = db.config.compute.keys_per_fact
    keys = synthetic_keys(n * per_fact, db.config.d_key, seed=0).reshape(n, per_fact, -1)
    residuals = np.random.default_rng(0).normal(0, 0.05, (n, db.config.d_value))
    db.add_vectors(facts, keys, residuals.astype(np.float32))
    return db


def cell(url: str, clients: int, requests: int, max_tokens: int, edited: bool) -> dict:
    """``clients`` threads, each sending ``requests`` completions one after another."""
    def client(n: int) -> int:
        tokens = 0
        with httpx.Client(base_url=url, timeout=600) as http:
            for r in range(requests):
                body = {"prompt": PROMPTS[(n + r) % len(PROMPTS)], "max_tokens": max_tokens,
                        "temperature": 0, "ndb": {"edited": edited}}
                response = http.post("/v1/completions", json=body)
                response.raise_for_status()
                tokens += response.json()["usage"]["completion_tokens"]
        return tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client, range(clients)))
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--facts", type=int, default=10_000)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=2, help="per client and cell")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/serve_load")
    args = parser.parse_args()
    concurrency = [int(c) for c in args.clients.split(",")]

    model, tokenizer = load_model(args.model, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        db = synthetic_database(Path(tmp) / "db", model, tokenizer, args.facts)
        server = Server(db, model, tokenizer, max_batch=max(concurrency))
        runs: dict[tuple[int, bool], list[dict]] = {}
        with running(server) as url:
            cell(url, 1, 1, 4, True)  # warm-up
            for repeat in range(args.repeats):
                for clients in concurrency:
                    for edited in (True, False) if repeat % 2 == 0 else (False, True):
                        result = cell(url, clients, args.requests, args.max_tokens, edited)
                        runs.setdefault((clients, edited), []).append(result)
                        print(f"clients {clients:>2} {'with' if edited else 'without'}: "
                              f"{result['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    report(runs, concurrency, args)


def report(runs: dict, concurrency: list[int], args: argparse.Namespace) -> None:
    rate = {key: statistics.median(r["tokens_per_s"] for r in results)
            for key, results in runs.items()}
    rows = [{"clients": c, "with_db_tokens_per_s": rate[c, True],
             "without_db_tokens_per_s": rate[c, False],
             "with_over_without": rate[c, True] / rate[c, False],
             "with_over_1_client": rate[c, True] / rate[concurrency[0], True],
             "without_over_1_client": rate[c, False] / rate[concurrency[0], False]}
            for c in concurrency]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "settings": vars(args), "rows": rows,
         "runs": [{"clients": c, "edited": e, **r} for (c, e), rs in runs.items() for r in rs]},
        indent=2) + "\n")
    lines = [
        "# ndb serve: tokens per second under concurrent clients",
        "",
        f"`{command}`",
        "",
        f"One server, the {'default model' if not args.model else args.model} on "
        f"{args.device or 'this machine CPU'}, loopback; each client sends {args.requests} "
        f"completions of up to {args.max_tokens} tokens (greedy) one after another; median of "
        f"{args.repeats} interleaved runs. \"With\": a database of {args.facts:,} facts "
        "(synthetic keys and residuals, see the script), every token searched; \"without\": "
        "the same server asked for the unedited model.",
        "",
        "| clients | with db (tok/s) | without (tok/s) | with / without | with vs 1 client "
        "| without vs 1 client |",
        "|---:|---:|---:|---:|---:|---:|",
        *(f"| {r['clients']} | {r['with_db_tokens_per_s']:.1f} | "
          f"{r['without_db_tokens_per_s']:.1f} | {r['with_over_without']:.2f} | "
          f"{r['with_over_1_client']:.2f}x | {r['without_over_1_client']:.2f}x |"
          for r in rows),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
