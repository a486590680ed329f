"""Where an IVF index's scan by list starts to pay: one search of the first T tokens of real
text, FAISS's per-query scan against the scan by list, on databases ``ndb bench run`` built
(their calibrated nprobe and coarse margin, the gate's gamma). Sets where
``ndb.indexes.ivf.SCAN_BY_LIST_FROM`` lies. Writes OUT.json and OUT.md.

    python benchmarks/scan_crossover.py bench-work/bench-10000.ndb bench-work/bench-100000.ndb \\
        --texts ../shared/data/general/lambada_test.jsonl --out benchmarks/results/scan_crossover
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import ndb
from ndb.calibration import token_queries
from ndb.eval.baselines.stats import read_texts
from ndb.output import write_strict_json

BATCHES = (1, 8, 16, 32, 64, 128, 256)


def time_search(index, queries: np.ndarray, gamma: float, repeats: int) -> float:
    """Median milliseconds of one search of ``queries``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        index.search(queries, gamma)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dbs", type=Path, nargs="+", help="databases with an ivf index")
    ap.add_argument("--texts", type=Path, required=True)
    ap.add_argument("--n-texts", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model, tok = ndb.load_model()
    texts = read_texts([args.texts])[: args.n_texts]
    rows = []
    for path in args.dbs:
        db = ndb.NeuralDB.from_pretrained(path)
        index, gamma = db.index, db.config.gamma
        if index.kind != "ivf" or index.needs_training:
            raise SystemExit(f"{path}: its index is {index.kind}, not a trained ivf")
        queries = token_queries(model, tok, db.config.layer, texts)
        for t in tqdm(BATCHES, desc=path.name):
            batch = queries[:t]
            lists = index._probed_lists(batch, gamma)[1]
            probed = lists[lists >= 0]
            row = {"db": path.name, "keys": index.ntotal, "nprobe": index.nprobe,
                   "nlist": index.nlist, "margin": index.coarse_margin, "tokens": t,
                   "queries_per_list": len(probed) / max(len(np.unique(probed)), 1)}
            for name, first in (("faiss_ms", None), ("by_list_ms", 1)):
                index.scan_by_list_from = first
                row[name] = time_search(index, batch, gamma, args.repeats)
            rows.append(row)
        db.close()
    command = " ".join(["python", *sys.argv])
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} "
               f"with {torch.get_num_threads()} threads; load average before "
               f"{os.getloadavg()[0]:.1f}")
    write_strict_json(args.out.with_suffix(".json"),
                      {"command": command, "machine": machine, "rows": rows}, indent=2)
    lines = ["# IVF search of T prompt tokens: FAISS's scan against the scan by list", "",
             f"Reproduce: `{command}`", "",
             f"{machine}. One search of the first T tokens of {len(texts)} LAMBADA passages "
             f"with the gate's floor (the coarse-margin skip on), median of {args.repeats}.",
             "", "| database | keys | lists probed | T | queries per probed list | "
             "FAISS's scan, ms | scan by list, ms |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['db']} | {r['keys']:,} | {r['nprobe']}/{r['nlist']}, margin "
              f"{r['margin']} | {r['tokens']} | {r['queries_per_list']:.1f} | "
              f"{r['faiss_ms']:.1f} | {r['by_list_ms']:.1f} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
