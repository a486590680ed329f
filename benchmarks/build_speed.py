"""How fast edits are computed: batched against one fact at a time, in the same run.

For the same facts and settings, keys and residuals are computed (a) with the default batch
size and (b) one fact at a time; both results are then checked for quality (efficacy of the
edits when attached, on the facts' rewrite prompts and paraphrases).

    python benchmarks/build_speed.py --n 32
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from ndb import NeuralDB, load_model, read_facts
from ndb.compute import ComputeConfig, compute_keys, compute_residuals, context_prefixes
from ndb.eval.metrics import counterfact_metrics, summarize
from ndb.models import default_edit_settings
from ndb.output import write_strict_json

HERE = Path(__file__).resolve().parent


def timed_build(model, tok, facts, layer, prefixes, config):
    start = time.perf_counter()
    keys = compute_keys(model, tok, facts, layer, prefixes, split=config.keys_per_fact > 1)
    residuals = compute_residuals(model, tok, facts, layer, prefixes, config, progress=True)
    return keys, residuals, time.perf_counter() - start


def quality(model, tok, facts, keys, residuals, layer) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        db = NeuralDB.create(Path(tmp) / "db", model, tok, layer=layer,
                             compute=ComputeConfig(split_keys=keys.dim() == 3))
        db.add_vectors(facts, keys, residuals)
        db.attach(model)
        metrics = summarize(counterfact_metrics(model, tok, facts))
        db.close()
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", default=str(HERE.parent / "ndb/data/dev_counterfact.json"))
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=ComputeConfig().batch_size)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "build_speed")
    args = ap.parse_args()

    model, tok = load_model()
    facts = read_facts(args.facts)[: args.n]
    layer, _ = default_edit_settings(model)
    config = ComputeConfig(batch_size=args.batch_size)
    prefixes = context_prefixes(model, tok, config.n_prefixes, config.prefix_tokens, seed=0)
    runs = {}
    for name, batch_size, precision in (("batched", args.batch_size, "float32"),
                                        ("batched, bfloat16", args.batch_size, "bfloat16"),
                                        ("one at a time", 1, "float32")):
        config.batch_size, config.precision = batch_size, precision
        keys, residuals, seconds = timed_build(model, tok, facts, layer, prefixes, config)
        runs[name] = {"batch_size": batch_size, "precision": precision, "seconds": seconds,
                      "s_per_fact": seconds / len(facts),
                      **quality(model, tok, facts, keys, residuals, layer)}
    ratio = runs["one at a time"]["seconds"] / runs["batched"]["seconds"]
    result = {"facts": args.facts, "n": len(facts), "layer": layer, "threads":
              torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "runs": runs, "speedup": ratio}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_strict_json(args.out.with_suffix(".json"), result, indent=2)
    lines = ["# Edit build speed (keys + residuals, default model)", "",
             f"Reproduce: `python benchmarks/build_speed.py --n {args.n}` "
             f"({len(facts)} dev facts, layer {layer}, {torch.get_num_threads()} torch threads)",
             "", "| run | batch | precision | s/fact | efficacy | generalization | specificity |",
             "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['batch_size']} | {r['precision']} | {r['s_per_fact']:.2f} | "
                     f"{r['efficacy']:.3f} | {r['generalization']:.3f} | "
                     f"{r['specificity']:.3f} |")
    lines += ["", f"Batched is {ratio:.1f}x faster than one fact at a time."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
