"""How wide ivf-pq4's codes and how many candidates it re-ranks: where the exact top-1 key of
each real token query that passes the gate ranks among the fast scan's candidates, for codes
of d/8 and d/4 subquantizers, with one search's time.

The keys and queries are prefill_search.py's (real keys completed with fitted synthetic
ones; hit queries not used for calibration and LAMBADA passages). For each width an
``ivf-pq4`` index is built as a database builds it, ``--nprobe`` lists are probed, and the
``--candidates`` best fast-scan candidates of each query are read before re-ranking. Writes
OUT.json and OUT.md.

    python benchmarks/pq4_widths.py --real-keys scale-keys --n 1000000 \\
        --texts ../shared/data/general/lambada_test.jsonl --out benchmarks/results/pq4_widths
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np
import torch
from prefill_search import add_scale_arguments, scale_keys_and_queries  # beside
from scan_crossover import time_search

import ndb
from ndb.eval.baselines.stats import read_texts
from ndb.eval.bench import exact_top1
from ndb.indexes import make_index
from ndb.models import default_edit_settings
from ndb.output import write_strict_json

RANKS = (4, 8, 16, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_scale_arguments(ap, n_texts=20)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--candidates", type=int, default=max(RANKS))
    ap.add_argument("--widths", default="8,4", help="dimensions per subquantizer")
    args = ap.parse_args()
    model, tok = ndb.load_model()
    layer, gamma = default_edit_settings(model)
    texts = read_texts([args.texts])[:args.n_texts]
    keys, real, _, evaluation, generic = scale_keys_and_queries(
        model, tok, layer, args.real_keys, args.n, texts)
    ids = np.arange(len(keys))
    exact_scores, exact_ids = exact_top1(keys, ids, evaluation)
    hits = np.flatnonzero(exact_scores > gamma)
    print(f"{len(keys)} keys; {len(hits)} of {len(evaluation)} queries pass the gate", flush=True)

    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        index = make_index("ivf-pq4", keys.shape[1], pq_m=keys.shape[1] // width,
                           rerank=args.candidates)
        for s in range(0, len(keys), 65_536):
            index.add(keys[s:s + 65_536].astype(np.float32), ids[s:s + 65_536])
        index.nprobe = args.nprobe
        scores, rows_found = index._top(evaluation[hits], args.candidates, None)
        found = index._external(rows_found)
        rank = np.array([np.flatnonzero(f == i)[0] if (f == i).any() else args.candidates
                         for f, i in zip(found, exact_ids[hits], strict=True)])
        seen = rank < args.candidates
        underestimate = exact_scores[hits][seen] - scores[np.flatnonzero(seen), rank[seen]]
        row = {"width": width, "pq_m": index.pq_m, "bytes_per_code": index.pq_m // 2,
               "nlist": index.nlist,
               **{f"within_{k}": int((rank < k).sum()) for k in RANKS if k <= args.candidates},
               "underestimate_mean": float(underestimate.mean()),
               "underestimate_sd": float(underestimate.std()),
               "search_256_ms": time_search(index, generic[:256], gamma, repeats=5)}
        rows.append(row)
        print(row, flush=True)
        del index

    command = " ".join(["python", *sys.argv])
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} "
               f"with {torch.get_num_threads()} threads")
    write_strict_json(args.out.with_suffix(".json"), {
        "command": command, "machine": machine, "n": args.n, "real_keys": len(real),
        "gamma": gamma, "queries": len(evaluation), "passing": len(hits),
        "nprobe": args.nprobe, "rows": rows}, indent=2)
    within = [k for k in RANKS if k <= args.candidates]
    lines = [
        "# ivf-pq4: code width against where the exact top-1 key ranks", "",
        f"Reproduce: `{command}`", "",
        f"{machine}. {args.n:,} keys: {len(real):,} real, the rest synthetic (a Gaussian "
        f"fitted to the real ones). {len(hits)} of {len(evaluation)} real token queries pass "
        f"the gate (gamma {gamma}); {args.nprobe} of {rows[0]['nlist']} lists probed. For "
        "each width: how many of "
        "those have their exact top-1 key among the k best fast-scan candidates, how much the "
        "4-bit score underestimates that key's cosine, and one search of 256 LAMBADA tokens "
        "(median of 5, with re-ranking).", "",
        "| dims per code | subquantizers | bytes per key | "
        + " | ".join(f"within {k}" for k in within) + " | underestimate, mean (sd) | "
        "256 tokens, ms |",
        "|---|---|---|" + "---|" * len(within) + "---|---|"]
    for r in rows:
        lines.append(f"| {r['width']} | {r['pq_m']} | {r['bytes_per_code']} | "
                     + " | ".join(str(r[f"within_{k}"]) for k in within)
                     + f" | {r['underestimate_mean']:.3f} ({r['underestimate_sd']:.3f}) | "
                     f"{r['search_256_ms']:.0f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
