"""Hyper-parameters of the weight-editing baselines for the default model, on the dev set.

MEMIT's lambda and AlphaEdit's null-space threshold were tuned for GPT-J / Llama-3, whose
keys have another scale than SmolLM2's; a fair comparison tunes them here the way NeuralDB's
gamma is tuned (benchmarks/sweep.py): on the dev set, by the mean of efficacy,
generalization and specificity, with the fraction of generic-text next-token predictions
that change (argmax) as the cost beside it. Residuals come from the sweep's cache.

    python benchmarks/baseline_sweep.py --text ../shared/data/general/lambada_test.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from scaling import machine  # the scripts beside this one
from sweep import cached_residuals, known_facts

from ndb import load_model, read_facts
from ndb.compute import context_prefixes
from ndb.config import ComputeConfig, fingerprint
from ndb.eval.baselines.editors import WeightEditConfig, applied, compute_deltas
from ndb.eval.baselines.stats import key_second_moments, read_texts
from ndb.eval.methods import SPREAD
from ndb.eval.metrics import counterfact_metrics, summarize
from ndb.models import default_edit_settings

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def predictions(model, tok, texts: list[str]) -> list[torch.Tensor]:
    return [model(**tok(t, return_tensors="pt", truncation=True, max_length=128)
                  .to(model.device)).logits[0].argmax(-1) for t in texts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", default=str(HERE.parent / "ndb/data/dev_counterfact.json"))
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--lambdas", default="1000,3000,5000,15000")
    ap.add_argument("--thresholds", default="0.005,0.01,0.02")
    ap.add_argument("--cache", type=Path, default=HERE.parent / ".scratch" / "sweep")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "baseline_sweep")
    ap.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    args = ap.parse_args()

    model, tok = load_model(device=args.device)
    layer, _ = default_edit_settings(model)
    dev = known_facts(model, tok, read_facts(args.facts))
    config = ComputeConfig()
    prefixes = context_prefixes(model, tok, config.n_prefixes, config.prefix_tokens, seed=0)
    residuals, _ = cached_residuals(args.cache, layer, dev, model, tok, prefixes, config)
    texts = read_texts([args.text])
    probe = texts[-100:]  # the C0 sample is drawn from the start of the file
    plain = predictions(model, tok, probe)
    layers = list(range(max(0, layer - SPREAD + 1), layer + 1))
    moments = key_second_moments(model, tok, texts, layers, fingerprint(model, layer),
                                 progress=True)
    settings = [WeightEditConfig("memit", layers, mom2_weight=float(x))
                for x in args.lambdas.split(",")]
    settings += [WeightEditConfig("alphaedit", layers, null_threshold=float(x))
                 for x in args.thresholds.split(",")]
    rows = []
    for cfg in settings:
        deltas = compute_deltas(model, tok, dev, residuals, prefixes, moments, cfg)
        with applied(model, deltas):
            m = summarize(counterfact_metrics(model, tok, dev))
            changed = [(a != b).float().mean().item()
                       for a, b in zip(plain, predictions(model, tok, probe))]
        rows.append({"method": cfg.method, "lambda": cfg.mom2_weight,
                     "threshold": cfg.null_threshold, **m,
                     "score": (m["efficacy"] + m["generalization"] + m["specificity"]) / 3,
                     "generic_changed": sum(changed) / len(changed)})
        print(rows[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"layers": layers, "n_dev": len(dev), "rows": rows}, indent=2))
    lines = ["# Baseline hyper-parameters on the dev set", "",
             f"Reproduce: `python benchmarks/baseline_sweep.py --text {args.text} --lambdas "
             f"{args.lambdas} --thresholds {args.thresholds}"
             + (f" --device {args.device}`" if args.device else "`")
             + f" (measured on {machine(model)}).", "",
             f"{len(dev)} dev facts, layers {layers}; generic changed = fraction of next-token "
             "argmax predictions on 100 LAMBADA passages that the edit changes.", "",
             "| method | lambda | null threshold | E | G | S | score | generic changed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lam = f"{r['lambda']:g}" if r["method"] == "memit" else "-"
        thr = f"{r['threshold']:g}" if r["method"] == "alphaedit" else "-"
        lines.append(f"| {r['method']} | {lam} | {thr} | {r['efficacy']:.3f} | "
                     f"{r['generalization']:.3f} | {r['specificity']:.3f} | {r['score']:.3f} | "
                     f"{r['generic_changed']:.4f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
