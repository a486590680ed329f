"""The hook's IVF search at scale: FAISS's scan, the coarse-margin skip, the scan by list,
the projected index (ivf-pca) and the 4-bit fast-scan index (ivf-pq4), in one run.

At N keys (real keys of ``ndb bench keys``, completed with synthetic ones drawn from a
Gaussian fitted to them: mean, top principal directions, isotropic rest), an ``ivf``, an
``ivf-pca`` and an ``ivf-pq4`` index (``--kinds``) are each calibrated as ``ndb bench run``
calibrates them (nprobe, then the coarse margin) on hit queries. Then, alternating: the
unedited model; ``ivf`` and ``ivf-pca`` with the skip and FAISS's per-query scan, and with
the skip and a prompt's queries scanned list by list (``IVFIndex.scan_by_list_from``, their
default); ``ivf-pq4`` with the skip and FAISS's fast scan; each a 256-token prefill and
greedy decoding. Gate
decisions of each are compared with exact search over the stored keys on real token queries
(LAMBADA passages and hit queries not used for calibration). Residuals: random vectors of
the residuals' size (only their cost matters here). Writes OUT.json and OUT.md.

    python benchmarks/prefill_search.py --real-keys scale-keys --n 1000000 \\
        --texts ../shared/data/general/lambada_test.jsonl --out benchmarks/results/prefill_search
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
from scan_crossover import time_search  # the script beside this one

import ndb
from ndb.anchor import anchor_token_id
from ndb.calibration import token_queries
from ndb.eval.baselines.stats import read_texts
from ndb.eval.bench import KEY_TEMPLATES, exact_top1, load_scale_keys
from ndb.indexes import KeyIndex, make_index
from ndb.indexes.ivf import SCAN_BY_LIST_FROM
from ndb.models import default_edit_settings, ffn_out_path, get_module
from ndb.output import write_strict_json
from ndb.retrieval import GatedRetrieval


def fitted_keys(real: np.ndarray, n: int, seed: int = 0, rank: int = 256,
                   chunk: int = 20_000) -> np.ndarray:
    """``n`` normalized float16 keys from a Gaussian fitted to ``real``."""
    real = real.astype(np.float32)
    mean = real.mean(0)
    _, s, vt = np.linalg.svd(real - mean, full_matrices=False)
    scale = s[:rank] / np.sqrt(len(real))
    rest = np.sqrt((s[rank:] ** 2).sum() / len(real) / (real.shape[1] - rank))
    rng = np.random.default_rng(seed)
    out = np.empty((n, real.shape[1]), np.float16)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = mean + (rng.standard_normal((m, rank)) * scale) @ vt[:rank]
        x += rest * rng.standard_normal((m, real.shape[1]))
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


class RandomResiduals:
    """Residual lookups for the hook: random rows, one per id modulo a small table."""

    def __init__(self, dim: int, rows: int = 1000, scale: float = 1.0):
        self.table = scale * torch.randn(rows, dim, generator=torch.Generator().manual_seed(0))

    def lookup(self, ids: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
        return self.table[ids.clamp_min(0) % len(self.table)]


KINDS = ("ivf", "ivf-pca", "ivf-pq4")
SCANNED_BY_LIST = ("ivf", "ivf-pca")  # ivf-pq4's fast scan is FAISS's own


def add_scale_arguments(ap: argparse.ArgumentParser, n_texts: int) -> None:
    """The options of ``scale_keys_and_queries``, and where results go."""
    ap.add_argument("--real-keys", type=Path, required=True, help="'ndb bench keys' output")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--texts", type=Path, required=True)
    ap.add_argument("--n-texts", type=int, default=n_texts, help="passages for generic queries")
    ap.add_argument("--out", type=Path, required=True)


def scale_keys_and_queries(model, tok, layer: int, real_keys: Path, n: int,
                           texts: list[str]) -> tuple[np.ndarray, ...]:
    """(keys, real keys, calibration queries, evaluation queries, generic queries): ``n``
    keys, the real ones of ``ndb bench keys`` completed with fitted synthetic ones; real token
    queries: the facts' texts and a key template of 200 sampled facts (hits, halved between
    calibration and evaluation), and every token of ``texts`` (generic, evaluation)."""
    real_n = len((real_keys / "facts.jsonl").read_text().splitlines())
    facts, real = load_scale_keys(real_keys, layer, min(real_n, n))
    keys = np.concatenate([real, fitted_keys(real, n - len(real))])
    generic = token_queries(model, tok, layer, texts)
    sample = [facts[i] for i in np.random.default_rng(0).choice(len(facts), 200, replace=False)]
    hits = token_queries(model, tok, layer, [f.text for f in sample] +
                         [KEY_TEMPLATES[-1][0].format(f.subject) for f in sample])
    return keys, real, hits[::2], np.concatenate([hits[1::2], generic]), generic


def decisions(scores: np.ndarray, ids: np.ndarray, gamma: float) -> np.ndarray:
    return np.where(scores > gamma, ids, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_scale_arguments(ap, n_texts=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--nprobe", type=int, default=None,
                    help="lists probed per query after calibration (default: calibrate's "
                         "choice; the coarse margin stays calibrated)")
    ap.add_argument("--pca-dim", type=int, default=None,
                    help="ivf-pca's projection width (default: its own, d/4)")
    ap.add_argument("--rerank", type=int, default=32, help="ivf-pca's candidates re-ranked")
    ap.add_argument("--kinds", default=",".join(KINDS), help="the indexes compared")
    ap.add_argument("--retrain", action="store_true",
                    help="retrain the index on all N keys before calibrating (default: the "
                         "lists it was last trained with while the keys were added)")
    args = ap.parse_args()
    model, tok = ndb.load_model()
    layer, gamma = default_edit_settings(model)
    texts = read_texts([args.texts])[:max(args.n_texts, 8)]
    keys, real, calibration, evaluation, generic = scale_keys_and_queries(
        model, tok, layer, args.real_keys, args.n, texts[:args.n_texts])
    ids = np.arange(len(keys))
    print(f"{len(keys)} keys, {len(evaluation)} evaluation queries", flush=True)

    indexes, build_s = {}, {}
    options_of = {"ivf-pca": {"pca_dim": args.pca_dim, "rerank": args.rerank}}
    for kind in args.kinds.split(","):
        options = options_of.get(kind, {})
        start = time.perf_counter()
        index = make_index(kind, keys.shape[1], **options)
        for s in range(0, len(keys), 65_536):
            index.add(keys[s:s + 65_536].astype(np.float32), ids[s:s + 65_536])
        if args.retrain:
            index.retrain()
        build_s[kind] = time.perf_counter() - start
        index.calibrate(calibration, gamma)
        if args.nprobe is not None:
            index.nprobe = args.nprobe
        indexes[kind] = index
        print(f"{kind}: built in {build_s[kind]:.0f} s; nprobe {index.nprobe}/{index.nlist}, "
              f"margin {index.coarse_margin}", flush=True)
    exact = decisions(*exact_top1(keys, ids, evaluation), gamma)
    # mode -> (index, coarse margin, scan_by_list_from); None for the unedited model
    modes: dict[str, tuple | None] = {"unedited": None}
    for kind, index in indexes.items():
        modes[f"{kind} skip"] = (index, index.coarse_margin, None)
        if kind in SCANNED_BY_LIST:
            modes[f"{kind} skip, by list"] = (index, index.coarse_margin, SCAN_BY_LIST_FROM)
    timed = [name for name in modes if name != "unedited"]

    def use(mode) -> KeyIndex:
        index, index.coarse_margin, index.scan_by_list_from = mode
        return index

    differing = {name: float(np.mean(decisions(*use(mode).search(evaluation, gamma), gamma)
                                     != exact))
                 for name, mode in modes.items() if mode is not None}

    # where the scan by list starts to pay: one search of T consecutive generic tokens (as a
    # prompt's are), with the skip, each way
    crossover = []
    for t in (1, 2, 4, 8, 16, 32, 64, 256):
        row = {"queries": t}
        for name in timed:
            row[name] = time_search(use(modes[name]), generic[:t], gamma, repeats=5)
        crossover.append(row)
        print(row, flush=True)

    projection = get_module(model, ffn_out_path(model, layer))
    residuals = RandomResiduals(model.config.hidden_size)
    long_text = tok(" ".join(texts[:8]), return_tensors="pt", truncation=True, max_length=256)
    prompts = [tok(t[:200], return_tensors="pt") for t in texts[:2]]

    def prefill() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(**long_text)
        return long_text["input_ids"].shape[1] / (time.perf_counter() - start)

    def decode() -> float:
        start = time.perf_counter()
        for enc in prompts:
            model.generate(**enc, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id)
        return args.new_tokens * len(prompts) / (time.perf_counter() - start)

    rates: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in modes}
    for _ in range(args.repeats):
        for name, mode in modes.items():
            retrieval = None
            if mode is not None:
                retrieval = GatedRetrieval(use(mode), residuals, gamma, anchor_token_id(tok))
                retrieval.attach(model.base_model, projection)
            rates[name]["prefill"].append(prefill())
            rates[name]["decode"].append(decode())
            if retrieval is not None:
                retrieval.detach()
    median = {k: {s: statistics.median(v) for s, v in r.items()} for k, r in rates.items()}
    rows = [{"mode": name, "prefill_tok_s": median[name]["prefill"],
             "decode_tok_s": median[name]["decode"],
             "prefill_overhead": median["unedited"]["prefill"] / median[name]["prefill"] - 1,
             "decode_overhead": median["unedited"]["decode"] / median[name]["decode"] - 1,
             "gate_disagreement": differing.get(name)} for name in modes]
    command = " ".join(["python", *sys.argv])
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} "
               f"with {torch.get_num_threads()} threads; load average before "
               f"{os.getloadavg()[0]:.1f}")
    settings = {kind: {"nlist": index.nlist, "nprobe": index.nprobe,
                       "coarse_margin": index.coarse_margin, "build_s": build_s[kind],
                       **{name: getattr(index, name) for name in ("pca_dim", "pq_m", "rerank")
                          if getattr(index, name, None)}}
                for kind, index in indexes.items()}
    result = {"command": command, "machine": machine, "n": args.n, "real_keys": len(real),
              "gamma": gamma, "queries": len(evaluation), "indexes": settings, "rows": rows,
              "crossover": crossover}
    write_strict_json(args.out.with_suffix(".json"), result, indent=2)
    chosen = "set by --nprobe" if args.nprobe else "calibrated as `ndb bench` does"
    described = "; ".join(
        f"{kind} {v['nprobe']}/{v['nlist']} lists, coarse margin {v['coarse_margin']}"
        + "".join(f", {name} {v[name]}" for name in ("pca_dim", "pq_m", "rerank") if name in v)
        for kind, v in settings.items())
    lines = [
        "# The hook's IVF search at scale: FAISS's scan, the coarse-margin skip, the scan by "
        "list, the projected and the 4-bit fast-scan indexes", "",
        f"Reproduce: `{command}`", "",
        f"{machine}. {args.n:,} keys: {len(real):,} real (`ndb bench keys`), the rest "
        f"synthetic (a Gaussian fitted to the real ones). {described} ({chosen}); "
        f"gamma {gamma}. 256-token "
        f"prefill and greedy decoding of {args.new_tokens} tokens from {len(prompts)} "
        f"prompts, the modes alternating, medians of {args.repeats}. Scan by list from "
        f"{SCAN_BY_LIST_FROM} queries on (a prefill; decoding takes FAISS's scan). Gate decisions "
        f"against exact search on {len(evaluation)} real token queries (hit queries and "
        f"{args.n_texts} LAMBADA passages).", "",
        "| mode | prefill tok/s | prefill overhead | decode tok/s | decode overhead | "
        "gate decisions differing from exact |", "|---|---|---|---|---|---|"]
    for r in rows:
        differs = "" if r["gate_disagreement"] is None else f"{r['gate_disagreement']:.5f}"
        lines.append(f"| {r['mode']} | {r['prefill_tok_s']:.0f} | "
                     f"{100 * r['prefill_overhead']:+.1f}% | {r['decode_tok_s']:.1f} | "
                     f"{100 * r['decode_overhead']:+.1f}% | {differs} |")
    lines += ["", "One search of the first T tokens of the LAMBADA passages, with the skip "
              "(median of 5, ms):", "", f"| T | {' | '.join(timed)} |",
              "|---|" + "---|" * len(timed)]
    lines += [f"| {r['queries']} | " + " | ".join(f"{r[name]:.1f}" for name in timed) + " |"
              for r in crossover]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
