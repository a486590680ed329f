"""Edit metrics and general ability as the number of edited facts grows (paper Figs. 1, 4).

Keys and residuals are computed once, for the largest N, into a NeuralDB at --db (built
with skip-existing, so an interrupted run resumes where it stopped); each smaller N reuses
the first N facts' vectors. MEMIT and AlphaEdit reuse the same residuals. Every finished
(method, N) row is written to the JSON at once, so a rerun skips what is done.

    python benchmarks/scaling.py --facts .scratch/geo2000.json --sizes 100,500,1000,2000 \\
        --methods neuraldb,memit,alphaedit --general ../shared/data/general
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ndb import NeuralDB, load_model, read_facts
from ndb.compute import compute_keys
from ndb.config import ComputeConfig
from ndb.eval.baselines.editors import WeightEditConfig
from ndb.eval.methods import baseline_hyper, make_methods
from ndb.eval.run import EvalSettings, markdown_table, measure
from ndb.models import default_edit_settings
from ndb.output import write_strict_json
from ndb.store import is_database

HERE = Path(__file__).resolve().parent
PLOTTED = ("efficacy", "generalization", "specificity")


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def save(path: Path, meta: dict, rows: list[dict]) -> None:
    write_strict_json(path, {**meta, "rows": rows}, indent=2)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    general = sorted({k for r in rows for k in r["metrics"] if k.startswith("general/")})
    panels = [("mean of E, G, S", None), *[(k, k) for k in PLOTTED], *[(k, k) for k in general]]
    cols = 4
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols,
                             figsize=(4 * cols, 3.2 * ((len(panels) + cols - 1) // cols)),
                             squeeze=False)
    for ax, (title, key) in zip(axes.flat, panels):
        for method in methods:
            pts = sorted((r["n"], _value(r, key)) for r in rows if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xscale("log")
        ax.set_title(title.removeprefix("general/"))
        ax.set_xlabel("edited facts")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _value(row: dict, key: str | None) -> float:
    m = row["metrics"]
    return float(np.mean([m[k] for k in PLOTTED])) if key is None else m.get(key, np.nan)


def machine(model) -> str:
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", required=True)
    ap.add_argument("--sizes", default="100,500,1000,2000")
    ap.add_argument("--methods", default="neuraldb,memit,alphaedit")
    ap.add_argument("--db", type=Path, default=HERE.parent / ".scratch" / "scaling.ndb")
    ap.add_argument("--general", default=None, help="general-ability data directory")
    ap.add_argument("--general-tasks", default="arc_easy,arc_challenge,wsc273,lambada,mmlu")
    ap.add_argument("--general-limit", type=int, default=100)
    ap.add_argument("--mmlu-limit", type=int, default=4, help="questions per MMLU subject")
    ap.add_argument("--fluency-cases", type=int, default=50)
    ap.add_argument("--stats-text", default=None, help="default: lambada in --general")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scaling")
    ap.add_argument("--memit-lambda", type=float, default=None,
                    help="default: the model's tuned value (eval.methods.BASELINE_DEFAULTS)")
    ap.add_argument("--alphaedit-threshold", type=float, default=None)
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the Markdown table and plot from the JSON, computing nothing")
    ap.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    ap.add_argument("--model", default=None, help="default: the embedded default model")
    args = ap.parse_args()
    out_json = args.out.with_suffix(".json")
    if args.report_only:
        saved = json.loads(out_json.read_text())
        write_report(args.out, saved, saved.pop("rows"))
        return

    sizes = sorted(int(x) for x in args.sizes.split(","))
    methods = args.methods.split(",")
    model, tok = load_model(args.model, device=args.device)
    facts = read_facts(args.facts)[: sizes[-1]]
    if len(facts) < sizes[-1]:
        raise SystemExit(f"{args.facts} holds {len(facts)} facts, fewer than {sizes[-1]}")

    big = NeuralDB.from_pretrained(args.db) if is_database(args.db) else \
        NeuralDB.create(args.db, model, tok)
    start = time.perf_counter()
    computed = big.add(facts, model, tok, skip_existing=True, progress=True,
                       commit_each_batch=True)
    if computed:
        print(f"computed {len(computed)} edits in {time.perf_counter() - start:.0f} s")
    ids = big.ids_of(facts)
    residuals = torch.from_numpy(big.store.read("residuals", ids)).float()
    compute = ComputeConfig()  # keys as a new database makes them (cheap to recompute)
    layer, gamma = default_edit_settings(model)
    if layer != big.config.layer:
        raise SystemExit(f"{args.db} was built at layer {big.config.layer}, not {layer}")
    keys = compute_keys(model, tok, facts, layer, big.config.prefixes, progress=True,
                        split=compute.keys_per_fact > 1)

    stats_text = args.stats_text or (str(Path(args.general) / "lambada_test.jsonl")
                                     if args.general else None)
    settings = EvalSettings(fluency_cases=args.fluency_cases, general_dir=args.general,
                            general_tasks=args.general_tasks.split(","),
                            general_limit=args.general_limit, mmlu_limit=args.mmlu_limit)
    hyper = {"mom2_weight": WeightEditConfig.mom2_weight,
             "null_threshold": WeightEditConfig.null_threshold, **baseline_hyper(model)}
    if args.memit_lambda is not None:
        hyper["mom2_weight"] = args.memit_lambda
    if args.alphaedit_threshold is not None:
        hyper["null_threshold"] = args.alphaedit_threshold
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = load_rows(out_json)
    done = {(r["method"], r["n"]) for r in rows}
    command = (f"python benchmarks/scaling.py --facts {args.facts} --sizes {args.sizes} "
               f"--methods {args.methods} --memit-lambda {hyper['mom2_weight']:g} "
               f"--alphaedit-threshold {hyper['null_threshold']:g}" +
               (f" --general {args.general} --general-limit {args.general_limit}"
                f" --mmlu-limit {args.mmlu_limit}" if args.general else "") +
               (f" --device {args.device}" if args.device else "") +
               (f" --model {args.model}" if args.model else ""))
    meta = {"facts": args.facts, "sizes": sizes, "layer": layer, "gamma": gamma,
            "keys_per_fact": compute.keys_per_fact,
            "general_limit": args.general_limit, "mmlu_limit": args.mmlu_limit,
            "general_tasks": args.general_tasks, "fluency_cases": args.fluency_cases,
            "memit_lambda": hyper["mom2_weight"], "alphaedit_threshold": hyper["null_threshold"],
            "machine": machine(model), "command": command}
    for n in sizes:
        subset = facts[:n]
        if ("pre-edited", n) not in done:
            rows.append({"method": "pre-edited", "n": n,
                         "metrics": measure(model, tok, subset, settings)})
            save(out_json, meta, rows)
        todo = [m for m in methods if (m, n) not in done]
        if not todo:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            db = NeuralDB.create(Path(tmp) / "db", model, tok, layer=layer, gamma=gamma,
                                 compute=compute)
            db.add_vectors(subset, keys[:n], residuals[:n])
            contexts = make_methods(todo, model, tok, subset, db,
                                    [stats_text] if stats_text else [], say=print,
                                    hyper=hyper)
            for method in todo:
                began = time.perf_counter()
                with contexts[method]():
                    metrics = measure(model, tok, subset, settings)
                rows.append({"method": method, "n": n, "metrics": metrics,
                             "seconds": time.perf_counter() - began})
                save(out_json, meta, rows)
                print(f"n={n} {method}: " + ", ".join(
                    f"{k} {metrics[k]:.1f}" for k in PLOTTED if k in metrics))
            db.close()
    write_report(args.out, meta, rows)


def write_report(out: Path, meta: dict, rows: list[dict]) -> None:
    """OUT.md (one table per size) and OUT.png from the rows measured so far."""
    missing = [f"{m} at {n}" for n in meta["sizes"]
               for m in dict.fromkeys(r["method"] for r in rows)
               if not any(r["method"] == m and r["n"] == n for r in rows)]
    lines = ["# Scaling: edit metrics and general ability vs number of edits", "",
             f"Measured on {meta['machine']}. Facts: `{meta['facts']}`; layer {meta['layer']}, "
             f"gamma {meta['gamma']}, {meta['keys_per_fact']} key(s) per fact; MEMIT lambda "
             f"{meta['memit_lambda']:g}, AlphaEdit null-space threshold "
             f"{meta['alphaedit_threshold']:g}; general ability on {meta['general_tasks']} "
             f"(--general-limit {meta['general_limit']}, --mmlu-limit {meta['mmlu_limit']}); "
             f"fluency on {meta['fluency_cases']} cases.", "",
             f"Reproduce: `{meta['command']}` (rows already in the JSON are kept).", ""]
    if missing:
        lines += [f"Not measured yet: {', '.join(missing)}.", ""]
    for n in meta["sizes"]:
        lines += [f"## {n} edits", "",
                  markdown_table({r["method"]: r["metrics"] for r in rows if r["n"] == n}), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    plot(rows, out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
