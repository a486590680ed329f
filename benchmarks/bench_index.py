"""Benchmark the key index backends: build, add, remove and search latency, memory per key,
and gate agreement with exact search.

Gate agreement: a query's decision is (exact top-1 score > gamma ? top-1 id : none); the
benchmark reports the fraction of queries whose decision differs from exact float32 search.
Queries are "hits" (noisy copies of stored keys, cosine to their key uniform in 0.55-0.99) and
"misses" (unrelated keys of the same distribution, or the rows of ``--queries``).

Keys are synthetic unless ``--keys FILE.npy`` is given: an anisotropic mixture fitted to real
SmolLM2-135M FFN keys (see ndb/eval/synthetic.py), not isotropic Gaussians. Results go to
benchmarks/results/bench_index.{json,md,png}, rewritten after every (size, backend) run; a rerun
skips runs already in the JSON unless ``--force`` (so an interrupted run resumes).

    python benchmarks/bench_index.py --sizes 1000,10000,100000,1000000
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from ndb.eval.synthetic import KeyDistribution, gate_queries, noisy_copies
from ndb.indexes import make_index
from ndb.output import write_strict_json

RESULTS = Path(__file__).resolve().parent / "results"
SWEEP_FRACTIONS = (1 / 64, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def exact_top1(keys: np.ndarray, queries: np.ndarray, chunk: int = 32768):
    """Brute-force float32 top-1 (scores, row numbers)."""
    best = np.full(len(queries), -np.inf, np.float32)
    rows = np.full(len(queries), -1, np.int64)
    for start in tqdm(range(0, len(keys), chunk), desc="exact search", leave=False):
        scores = queries @ np.asarray(keys[start:start + chunk], np.float32).T
        top = scores.argmax(axis=1)
        top_scores = scores[np.arange(len(queries)), top]
        better = top_scores > best
        best[better] = top_scores[better]
        rows[better] = start + top[better]
    return best, rows


def decisions(scores: np.ndarray, ids: np.ndarray, gamma: float) -> np.ndarray:
    return np.where(scores > gamma, ids, -1)


def timed(fn, budget_s: float, max_reps: int, min_reps: int = 3) -> list[float]:
    """Milliseconds of repeated calls, until ``budget_s`` is spent or ``max_reps`` done."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps
                                     or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn(len(times))
        times.append((time.perf_counter() - t) * 1e3)
    return times


def disagreement(index, queries: np.ndarray, exact: np.ndarray, n_hits: int,
                 gamma: float) -> dict[str, float]:
    scores, ids = [], []
    for start in range(0, len(queries), 256):
        s, i = index.search(queries[start:start + 256])
        scores.append(s)
        ids.append(i)
    differ = decisions(np.concatenate(scores), np.concatenate(ids), gamma) != exact
    return {"all": float(differ.mean()), "hits": float(differ[:n_hits].mean()),
            "misses": float(differ[n_hits:].mean())}


def bench_backend(kind: str, keys: np.ndarray, ids: np.ndarray, queries: np.ndarray,
                  exact: np.ndarray, n_hits: int, extra: np.ndarray, args) -> dict:
    n, dim = keys.shape
    gc.collect()
    rss0 = rss_bytes()
    index = make_index(kind, dim)
    t = time.perf_counter()
    for start in tqdm(range(0, n, 65536), desc=f"{kind} build", leave=False):
        index.add(keys[start:start + 65536], ids[start:start + 65536])
    build_s = time.perf_counter() - t
    rss_delta = rss_bytes() - rss0
    out: dict = {"kind": kind, "n": n, "build_s": build_s,
                 "memory_bytes_per_key": index.memory_bytes() / n,
                 "rss_bytes_per_key": rss_delta / n}
    if kind.startswith("ivf"):
        out.update(nlist=index.nlist, nprobe=index.nprobe)
    index.search(queries[:8])  # warm-up
    single = timed(lambda i: index.search(queries[i % len(queries)][None]), 5.0, 200)
    batch = timed(lambda i: index.search(queries[:256]), 10.0, 5)
    out.update(query1_ms=float(np.median(single)), query1_p90_ms=float(np.quantile(single, 0.9)),
               batch256_ms=float(np.median(batch)))
    out["disagreement"] = disagreement(index, queries, exact, n_hits, args.gamma)
    if kind == "ivf" and index.nlist:
        default = index.nprobe
        sweep = []
        for fraction in SWEEP_FRACTIONS:
            index.nprobe = max(1, math.ceil(fraction * index.nlist))
            times = timed(lambda i: index.search(queries[i % len(queries)][None]), 2.0, 100)
            sweep.append({"nprobe": index.nprobe, "fraction": fraction,
                          "query1_ms": float(np.median(times)),
                          "disagreement": disagreement(index, queries, exact, n_hits, args.gamma)})
        index.nprobe = default
        out["nprobe_sweep"] = sweep
    next_id = int(ids.max()) + 1
    add1 = timed(lambda i: index.add(extra[i][None], np.array([next_id + i])), 2.0, 20)
    out["add1_ms"] = float(np.median(add1))
    t = time.perf_counter()
    index.add(extra[20:1020], np.arange(next_id + 20, next_id + 1020))
    out["add1000_ms"] = (time.perf_counter() - t) * 1e3
    victims = np.random.default_rng(0).choice(ids, min(1000, n), replace=False)
    t = time.perf_counter()
    removed = index.remove(victims)
    out["remove1000_ms"] = (time.perf_counter() - t) * 1e3
    assert removed == len(victims)
    return out


def load_keys(args) -> np.ndarray:
    if args.keys:
        keys = np.load(args.keys, mmap_mode="r")
        if keys.ndim != 2:
            raise SystemExit(f"--keys must hold an (n, d) array, got shape {keys.shape}")
        return keys
    cache = Path(args.cache) / f"synthetic_{max(args.sizes)}_{args.dim}.npy"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        print(f"generating {max(args.sizes)} synthetic keys -> {cache}", file=sys.stderr)
        np.save(cache, KeyDistribution(args.dim).sample(max(args.sizes) + 1020, args.seed))
    return np.load(cache, mmap_mode="r")


def make_queries(keys: np.ndarray, n: int, args) -> tuple[np.ndarray, int]:
    """(queries, number of hits first): hits are noisy copies of the first ``n`` keys."""
    if args.queries:
        rng = np.random.default_rng(args.seed)
        picked = np.asarray(keys[np.sort(rng.choice(n, args.hits, replace=False))], np.float32)
        hits = noisy_copies(picked, rng.uniform(0.55, 0.99, size=args.hits), args.seed)
        real = np.asarray(np.load(args.queries, mmap_mode="r")[:args.misses], np.float32)
        real /= np.linalg.norm(real, axis=1, keepdims=True)
        return np.concatenate([hits, real]), args.hits
    stored = np.asarray(keys[:n], np.float32)
    return gate_queries(stored, args.hits, args.misses, seed=args.seed), args.hits


def write_outputs(results: dict, out: Path) -> None:
    write_strict_json(out.with_suffix(".json"), results, indent=1)
    runs = sorted(results["runs"].values(), key=lambda r: (r["n"], r["kind"]))
    reproduce = "\n".join(f"    {c}" for c in results["commands"])
    lines = [f"# Key index benchmark\n\nReproduce (in order):\n\n{reproduce}\n",
             results["notes"] + "\n",
             "ivf/ivf-pq hold keys in an exact float32 buffer below 8192 keys (the 1,000 rows), "
             "train when they reach it and retrain at every 4x growth: with 64k-key add "
             "batches the 1M index was last trained at 262k keys (nlist 1024). nprobe = half "
             "the lists. ivf-pq: RAM holds 192-byte PQ codes and ids; float16 copies of the keys "
             "(3 KB per key) sit in a temporary file on disk, read for re-ranking the best 128 "
             "PQ candidates (page cache, not counted in RSS).\n",
             "| n | backend | build s | add 1 ms | add 1000 ms | remove 1000 ms | query 1 ms "
             "| batch 256 ms | bytes/key (index) | bytes/key (RSS) | disagree all | hits "
             "| misses | nlist/nprobe |",
             "|" + "---|" * 14]
    for r in runs:
        d = r["disagreement"]
        probe = f"{r['nlist']}/{r['nprobe']}" if r.get("nlist") else ""
        lines.append(
            f"| {r['n']:,} | {r['kind']} | {r['build_s']:.2f} | {r['add1_ms']:.3f} "
            f"| {r['add1000_ms']:.1f} | {r['remove1000_ms']:.1f} | {r['query1_ms']:.3f} "
            f"| {r['batch256_ms']:.1f} | {r['memory_bytes_per_key']:.0f} "
            f"| {r['rss_bytes_per_key']:.0f} | {d['all']:.4f} | {d['hits']:.4f} "
            f"| {d['misses']:.4f} | {probe} |")
    sweeps = [r for r in runs if r.get("nprobe_sweep")]
    if sweeps:
        lines += ["\n## ivf: gate disagreement vs nprobe\n",
                  "| n | nlist | nprobe | fraction | query 1 ms | disagree all | hits | misses |",
                  "|" + "---|" * 8]
        for r in sweeps:
            for s in r["nprobe_sweep"]:
                d = s["disagreement"]
                lines.append(f"| {r['n']:,} | {r['nlist']} | {s['nprobe']} | {s['fraction']:.3f} "
                             f"| {s['query1_ms']:.3f} | {d['all']:.4f} | {d['hits']:.4f} "
                             f"| {d['misses']:.4f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(runs, out.with_suffix(".png"))


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind in sorted({r["kind"] for r in runs}):
        mine = [r for r in runs if r["kind"] == kind]
        ns = [r["n"] for r in mine]
        axes[0].plot(ns, [r["query1_ms"] for r in mine], "o-", label=kind)
        axes[1].plot(ns, [r["batch256_ms"] for r in mine], "o-", label=kind)
    for ax, title in zip(axes, ("1 query", "batch of 256 queries"), strict=True):
        ax.set(xscale="log", yscale="log", xlabel="keys", ylabel="latency (ms, median)",
               title=f"Top-1 search, {title}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000",
                        help="comma-separated key counts")
    parser.add_argument("--backends", default="flat,flat-fp16,torch,ivf,ivf-pq")
    parser.add_argument("--keys", help="real fact keys, an (n, d) float16/32 .npy file")
    parser.add_argument("--queries", help="real query vectors (token keys), (m, d) .npy; "
                        "they replace the synthetic misses")
    parser.add_argument("--gamma", type=float, default=0.65, help="gate threshold")
    parser.add_argument("--hits", type=int, default=1000)
    parser.add_argument("--misses", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=1536, help="key size of synthetic keys")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma-separated kind@n runs to leave out")
    parser.add_argument("--cache", default="/tmp/ndb-bench-index", help="synthetic keys cache")
    parser.add_argument("--out", default=str(RESULTS / "bench_index"))
    parser.add_argument("--force", action="store_true", help="redo runs already in the JSON")
    parser.add_argument("--threads", type=int, default=1,
                        help="FAISS/torch threads (1: stable timings on a shared machine)")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    args.sizes = sorted(int(s) for s in args.sizes.split(","))
    kinds = args.backends.split(",")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"runs": {}}
    if out.with_suffix(".json").exists() and not args.force:
        results = json.loads(out.with_suffix(".json").read_text())
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    # a resumed or partial rerun adds its command: together they reproduce the JSON
    results["commands"] = [c for c in results.get("commands", []) if c != command] + [command]
    results["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"{args.threads} search thread(s)")
    results["notes"] = (
        f"Machine: {results['machine']}, shared with other jobs, so latencies are noisy. "
        f"Keys: {args.keys or 'synthetic anisotropic keys (ndb/eval/synthetic.py)'}; "
        f"queries: {args.hits} hits (noisy copies, cosine 0.55-0.99) + {args.misses} "
        f"{'rows of ' + args.queries if args.queries else 'unrelated synthetic keys'}; "
        f"gamma = {args.gamma}. 'disagree' = fraction of queries whose gate decision "
        "(score > gamma, id) differs from exact float32 search. bytes/key (RSS) = resident "
        "memory growth while building / n (allocator noise at small n).")
    keys = load_keys(args)
    skip = set(args.skip.split(","))
    for n in tqdm(args.sizes, desc="sizes"):
        if n + 1020 > len(keys):
            raise SystemExit(f"--keys has {len(keys)} rows; size {n} needs n + 1020")
        todo = [k for k in kinds if f"{k}@{n}" not in results["runs"] and f"{k}@{n}" not in skip]
        if not todo:
            continue
        base = np.asarray(keys[:n], np.float32)
        extra = np.asarray(keys[n:n + 1020], np.float32)
        ids = np.arange(n, dtype=np.int64) * 3 + 1  # ids unrelated to row numbers
        queries, n_hits = make_queries(keys, n, args)
        scores, rows = exact_top1(base, queries)
        exact = decisions(scores, ids[rows], args.gamma)
        for kind in tqdm(todo, desc=f"n={n:,}", leave=False):
            run = bench_backend(kind, base, ids, queries, exact, n_hits, extra, args)
            results["runs"][f"{kind}@{n}"] = run
            gc.collect()  # the backend's index is gone: free it before the next build
            tqdm.write(json.dumps({k: v for k, v in run.items() if k != "nprobe_sweep"}))
            write_outputs(results, out)
        del base
        gc.collect()


if __name__ == "__main__":
    main()
