"""Choose the edited layer and the gate gamma for a model by a sweep on a dev set.

Stage 1 tries every layer on a coarse gamma grid, stage 2 the best layer on a fine grid,
with ndb's two keys per fact and the paper's one. Residuals of the dev facts are computed
once per layer (cached, so an interrupted sweep resumes); each gamma only changes the gate.
The score and the selection rule are ndb.eval.tune's (which `ndb tune` runs for any
model, on the user's dev set): the mean of efficacy, generalization and specificity, best
among settings whose generic-text trigger rate is at most --max-trigger.

    python benchmarks/sweep.py --text ../shared/data/general/lambada_test.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ndb import NeuralDB, load_model, read_facts
from ndb.compute import compute_keys, compute_residuals, context_prefixes
from ndb.config import ComputeConfig
from ndb.eval.metrics import counterfact_metrics, summarize
from ndb.eval.tune import MAX_TRIGGER, choose, known_facts, score_gammas

HERE = Path(__file__).resolve().parent


def generic_texts(path: Path | None, n: int) -> list[str]:
    if path is None or not path.is_file():
        return []
    texts = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        texts.append(record.get("text") or record.get("context", ""))
    return [t for t in texts if t][:n]


def cached_residuals(cache: Path, layer: int, facts, model, tok, prefixes, config):
    """Residuals of ``facts`` at ``layer``, computed once per fact (cached by its edit)."""
    path = cache / f"layer{layer}.pt"
    saved = torch.load(path) if path.is_file() else {"by_edit": {}, "seconds_per_fact": 0.0}
    todo = [f for f in facts if (f.subject, f.prompt, f.target_new) not in saved["by_edit"]]
    if todo:
        start = time.perf_counter()
        residuals = compute_residuals(model, tok, todo, layer, prefixes, config, progress=True)
        saved["seconds_per_fact"] = (time.perf_counter() - start) / len(todo)
        for f, r in zip(todo, residuals):
            saved["by_edit"][(f.subject, f.prompt, f.target_new)] = r
        torch.save(saved, path)
    residuals = torch.stack([saved["by_edit"][(f.subject, f.prompt, f.target_new)]
                             for f in facts])
    return residuals, saved["seconds_per_fact"] * len(facts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", default=str(HERE.parent / "ndb/data/dev_counterfact.json"))
    ap.add_argument("--layers", default="4,6,8,10,12,14")
    ap.add_argument("--coarse-gammas", default="0.6,0.7,0.8", help="for every layer")
    ap.add_argument("--gammas", default="0.5,0.55,0.6,0.65,0.7,0.75,0.8,0.85,0.9",
                    help="for the best layer")
    ap.add_argument("--text", type=Path, default=None,
                    help="JSONL of generic text ({'text': ...}) for the false-trigger rate")
    ap.add_argument("--n-text", type=int, default=100)
    ap.add_argument("--max-trigger", type=float, default=MAX_TRIGGER,
                    help="largest acceptable fraction of generic tokens passing the gate")
    ap.add_argument("--cache", type=Path, default=HERE.parent / ".scratch" / "sweep")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "sweep")
    args = ap.parse_args()

    model, tok = load_model()
    facts = read_facts(args.facts)
    dev = known_facts(model, tok, facts)
    texts = generic_texts(args.text, args.n_text)
    print(f"{len(dev)} of {len(facts)} dev facts are known to the unedited model; "
          f"{len(texts)} generic texts")
    config = ComputeConfig()
    prefixes = context_prefixes(model, tok, config.n_prefixes, config.prefix_tokens, seed=0)
    layers = [int(x) for x in args.layers.split(",")]
    gammas = [float(x) for x in args.gammas.split(",")]
    coarse = [float(x) for x in args.coarse_gammas.split(",")]
    args.cache.mkdir(parents=True, exist_ok=True)

    unedited = summarize(counterfact_metrics(model, tok, dev))
    rows: list[dict] = []

    def evaluate(layer: int, residuals, seconds: float, keys_mode: str, gammas: list[float]):
        split = compute_keys(model, tok, dev, layer, prefixes, split=True)  # (n, 2, d1)
        keys = split if keys_mode == "split" else split.mean(1)
        compute = ComputeConfig(split_keys=keys_mode == "split")
        with tempfile.TemporaryDirectory() as tmp:
            db = NeuralDB.create(Path(tmp) / "db", model, tok, layer=layer, compute=compute)
            db.add_vectors(dev, keys, residuals)
            db.attach(model)
            for row in score_gammas(model, tok, db, dev, gammas, texts):
                rows.append({**row, "keys": keys_mode, "s_per_fact": seconds / len(dev)})
            db.close()

    vectors = {}
    for layer in layers:  # stage 1: every layer, ndb's keys, a coarse gamma grid
        residuals, seconds = cached_residuals(args.cache, layer, dev, model, tok, prefixes,
                                              config)
        vectors[layer] = residuals, seconds
        evaluate(layer, residuals, seconds, "mean", coarse)
    # stage 2: at the best layer, the fine gamma grid, for both kinds of keys
    top = choose(rows, args.max_trigger)["layer"]
    for keys_mode in ("mean", "split"):
        done = {r["gamma"] for r in rows if r["layer"] == top and r["keys"] == keys_mode}
        evaluate(top, *vectors[top], keys_mode, [g for g in gammas if g not in done])

    best = choose(rows, args.max_trigger)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"facts": args.facts, "n_dev": len(dev), "unedited": unedited, "rows": rows,
              "best": best, "n_text": len(texts)}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Layer and gamma sweep for the default model", "",
        "Reproduce: `python benchmarks/sweep.py --text ../shared/data/general/"
        "lambada_test.jsonl`", "",
        f"{len(dev)} dev facts the unedited model knows (of {len(facts)} in `{args.facts}`); "
        f"score = mean of efficacy (E), generalization (G), specificity (S); trigger = "
        f"fraction of tokens of {len(texts)} generic LAMBADA passages passing the gate.", "",
        f"Unedited model: E {unedited['efficacy']:.3f}, G {unedited['generalization']:.3f}, "
        f"S {unedited['specificity']:.3f}", "",
        "| layer | keys | gamma | E | G | S | score | trigger | s/fact |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        trig = "-" if r["trigger_rate"] is None else f"{r['trigger_rate']:.4f}"
        mark = " **best**" if r is best else ""
        lines.append(f"| {r['layer']} | {r['keys']} | {r['gamma']:.2f} | {r['efficacy']:.3f} | "
                     f"{r['generalization']:.3f} | {r['specificity']:.3f} | "
                     f"{r['score']:.3f}{mark} | {trig} | {r['s_per_fact']:.1f} |")
    lines += ["", f"Chosen: layer {best['layer']}, {best['keys']} keys, gamma {best['gamma']}: "
              f"the highest score among settings whose trigger rate is at most "
              f"{args.max_trigger} (ties go to the higher gamma).",
              "", "keys: `mean` is the paper's (MEMIT's) single key per fact, the average of "
              "the bare-prompt key and the sampled-prefix keys; `split` keeps the two as "
              "separate keys of the fact."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
