"""A database's approximate index before and after it calibrates itself: the gate decisions
against exact search, one search of 256 prompt tokens and the prefill with the database
attached, as a database of real keys searches by default (uncalibrated) and once an add with
the model has calibrated it (``NeuralDB.calibrate``: token keys of the prompts of 256 stored
facts and of a question about each subject).

The database holds the first N facts of ``ndb bench keys`` with their real keys and random
residuals (built once into --work, then reused). The evaluation queries are not the
calibration's: the facts' texts and a key template of 200 other sampled facts, and every
token of LAMBADA passages. Writes OUT.json and OUT.md.

    python benchmarks/db_calibration.py --real-keys scale-keys --n 101000 \\
        --texts ../shared/data/general/lambada_test.jsonl --work scratch \\
        --out benchmarks/results/db_calibration_101k
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
from prefill_search import decisions  # beside
from scan_crossover import time_search

import ndb
from ndb.calibration import token_queries
from ndb.eval.baselines.stats import read_texts
from ndb.eval.bench import KEY_TEMPLATES, build_database, exact_top1, load_scale_keys
from ndb.models import default_edit_settings
from ndb.output import write_strict_json
from ndb.store import write_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real-keys", type=Path, required=True, help="'ndb bench keys' output")
    ap.add_argument("--n", type=int, default=101_000)
    ap.add_argument("--texts", type=Path, required=True)
    ap.add_argument("--n-texts", type=int, default=20, help="passages for generic queries")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", type=Path, required=True, help="where the database is built")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model, tok = ndb.load_model()
    layer, gamma = default_edit_settings(model)
    facts, keys = load_scale_keys(args.real_keys, layer, args.n)
    residuals = np.random.default_rng(0).standard_normal((256, model.config.hidden_size))
    db = build_database(args.work / f"calibration-{args.n}.ndb", model, tok, facts, keys,
                        0.05 * residuals, layer, gamma, "auto")
    if db.config.index_calibration is not None:  # calibrated by an earlier run: start over
        with db.store.writing():
            db.config.index_calibration = None
            write_config(db.path, db.config.to_dict())
            db.store.forget_saved_index()

    texts = read_texts([args.texts])[:max(args.n_texts, 8)]
    generic = token_queries(model, tok, layer, texts[:args.n_texts])
    sample = [facts[i] for i in np.random.default_rng(1).choice(len(facts), 200, replace=False)]
    hits = token_queries(model, tok, layer, [f.text for f in sample] +
                         [KEY_TEMPLATES[-1][0].format(f.subject) for f in sample])
    evaluation = np.concatenate([hits, generic])
    exact = decisions(*exact_top1(keys, np.arange(len(keys)), evaluation), gamma)
    long_text = tok(" ".join(texts[:8]), return_tensors="pt", truncation=True, max_length=256)

    def prefill() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(**long_text)
        return long_text["input_ids"].shape[1] / (time.perf_counter() - start)

    def measure(label: str) -> dict:
        index = db.index
        found = decisions(*index.search(evaluation, gamma), gamma)
        rates = {"unedited": [], "attached": []}
        db.attach(model)
        prefill()  # the residuals of the text's hits into the cache
        for _ in range(args.repeats):
            with db.disabled():
                rates["unedited"].append(prefill())
            rates["attached"].append(prefill())
        db.detach()
        unedited, attached = (statistics.median(r) for r in rates.values())
        row = {"state": label, "kind": index.kind, "nlist": index.nlist,
               "nprobe": index.nprobe, "coarse_margin": index.coarse_margin,
               "gate_disagreement": float(np.mean(found != exact)),
               "search_256_ms": time_search(index, generic[:256], gamma, repeats=5),
               "prefill_unedited_tok_s": unedited, "prefill_attached_tok_s": attached,
               "prefill_overhead": unedited / attached - 1}
        print(row, flush=True)
        return row

    rows = [measure("as built (uncalibrated)")]
    start = time.perf_counter()
    table = db.calibrate(model, tok, progress=True)
    calibrate_s = time.perf_counter() - start
    rows.append(measure("calibrated by the database"))

    command = " ".join(["python", *sys.argv])
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} "
               f"with {torch.get_num_threads()} threads")
    write_strict_json(args.out.with_suffix(".json"), {
        "command": command, "machine": machine, "n": args.n, "gamma": gamma,
        "queries": len(evaluation), "calibration": {str(k): v for k, v in table.items()},
        "calibrate_s": calibrate_s, "rows": rows}, indent=2)
    lines = [
        "# A database's approximate index, uncalibrated and calibrated by the database", "",
        f"Reproduce: `{command}`", "",
        f"{machine}. {args.n:,} facts with real keys (`ndb bench keys`), gamma {gamma}. "
        f"`db.calibrate` took {calibrate_s:.0f} s (agreement by nprobe: "
        + ", ".join(f"{k}: {v:.4f}" for k, v in table.items()) + "). Gate decisions "
        f"against exact search on {len(evaluation)} real token queries (200 facts' texts and "
        f"a key template, not the calibration's; {args.n_texts} LAMBADA passages); one search "
        f"of 256 LAMBADA tokens (median of 5); a 256-token prefill with the database attached, "
        f"on and off (`db.disabled()`) in turn, medians of {args.repeats}.", "",
        "| index | kind | lists probed | coarse margin | gate decisions differing from exact "
        "| 256-token search, ms | prefill overhead |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['state']} | {r['kind']} | {r['nprobe']}/{r['nlist']} | "
              f"{r['coarse_margin']} | {r['gate_disagreement']:.5f} | "
              f"{r['search_256_ms']:.0f} | {100 * r['prefill_overhead']:+.1f}% |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
