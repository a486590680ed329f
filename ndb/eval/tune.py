"""Choosing the edited layer and the gate gamma for a model, on a dev set.

`ndb tune` and benchmarks/sweep.py share this. Each (layer, gamma) is scored by the mean of
efficacy, generalization (paraphrases) and specificity (neighborhood prompts) on the dev
facts the unedited model knows; beside it, the fraction of tokens of generic text that pass
the gate. The choice is the best score among settings whose trigger rate is at most
MAX_TRIGGER, ties to the higher gamma, which protects unrelated text.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ndb.compute import sample_texts
from ndb.config import ComputeConfig, model_name
from ndb.database import NeuralDB
from ndb.errors import FactError
from ndb.eval.metrics import counterfact_metrics, summarize
from ndb.eval.scoring import score_targets
from ndb.facts import Fact
from ndb.models import model_identity, tuned_path
from ndb.store import atomic_write_json

MAX_TRIGGER = 0.001  # at most one generic token in a thousand may pass the gate


def check_dev_facts(facts: Sequence[Fact]) -> None:
    """Refuse a dev set that cannot be scored, before anything is computed."""
    missing = [i + 1 for i, f in enumerate(facts) if not f.target_true]
    if missing:
        raise FactError(f"dev fact {missing[0]} has no target_true; tuning compares it with "
                        f"target_new (CounterFact records have both)")


def known_facts(model, tokenizer, facts: Sequence[Fact]) -> list[Fact]:
    """The facts the unedited model gets right (an edit of an unknown fact proves less)."""
    prompts = [f.text for f in facts]
    true, _ = score_targets(model, tokenizer, prompts, [f.target_true for f in facts])
    new, _ = score_targets(model, tokenizer, prompts, [f.target_new for f in facts])
    return [f for f, t, n in zip(facts, true, new) if t < n]


def model_texts(model, tokenizer, n: int, seed: int, length: int = 48) -> list[str]:
    """Generic text that needs no data: texts the model writes itself, with a seed apart
    from the one of a database's background keys (which the key guard already avoids)."""
    return [tokenizer.decode(ids) for ids in sample_texts(model, tokenizer, n, length, seed + 2)]


def trigger_rate(model, tokenizer, db: NeuralDB, texts: Sequence[str]) -> float:
    """Fraction of searched tokens of generic text that pass the gate."""
    stats = db.retrieval.stats
    stats.searched = stats.hits = 0
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
                  .to(model.device))
    return stats.hits / max(stats.searched, 1)


def score_gammas(model, tokenizer, db: NeuralDB, facts: Sequence[Fact],
                 gammas: Sequence[float], texts: Sequence[str]) -> list[dict]:
    """One row per gamma for ``db`` (attached to ``model``, holding ``facts``)."""
    rows = []
    for gamma in gammas:
        db.retrieval.gamma = gamma
        metrics = summarize(counterfact_metrics(model, tokenizer, facts))
        score = (metrics["efficacy"] + metrics["generalization"] + metrics["specificity"]) / 3
        rows.append({"layer": db.config.layer, "gamma": gamma, **metrics, "score": score,
                     "trigger_rate": trigger_rate(model, tokenizer, db, texts) if texts
                     else None})
    return rows


def choose(rows: Sequence[dict], max_trigger: float = MAX_TRIGGER) -> dict:
    """Best score among rows that leave generic text alone, ties to the higher gamma (all
    rows if none does)."""
    safe = [r for r in rows if r["trigger_rate"] is None or r["trigger_rate"] <= max_trigger]
    return max(safe or rows, key=lambda r: (round(r["score"], 4), r["gamma"]))


def tune(model, tokenizer, facts: Sequence[Fact], layers: Sequence[int],
         gammas: Sequence[float], texts: Sequence[str], *, compute: ComputeConfig | None = None,
         seed: int = 0, max_trigger: float = MAX_TRIGGER,
         say: Callable[[str], None] = print) -> dict:
    """Edit the known dev facts at each layer, as `ndb build` would, and score every gamma;
    returns the rows, the chosen one ("best") and the counts behind them."""
    check_dev_facts(facts)
    dev = known_facts(model, tokenizer, facts)
    if not dev:
        raise FactError(f"the model knows none of the {len(facts)} dev facts (it does not "
                        f"prefer target_true to target_new on any): nothing to tune on")
    say(f"{len(dev)} of {len(facts)} dev facts are known to the unedited model; "
        f"{len(texts)} generic texts")
    rows: list[dict] = []
    for layer in layers:
        with tempfile.TemporaryDirectory() as tmp:
            db = NeuralDB.create(Path(tmp) / "dev.ndb", model, tokenizer, layer=layer,
                                 gamma=gammas[0], seed=seed, compute=compute)
            db.add(dev, model, tokenizer, progress=True)
            db.attach(model, tokenizer)
            try:
                rows += score_gammas(model, tokenizer, db, dev, gammas, texts)
            finally:
                db.close()
        say(f"layer {layer}: " + ", ".join(f"gamma {r['gamma']} score {r['score']:.3f}"
                                           for r in rows if r["layer"] == layer))
    return {"n_facts": len(facts), "n_dev": len(dev), "n_text": len(texts),
            "max_trigger": max_trigger, "rows": rows, "best": choose(rows, max_trigger)}


def save_tuned(model, result: dict) -> Path:
    """Keep the chosen (layer, gamma) where models.edit_defaults finds it for this model."""
    path = tuned_path(model_identity(model))
    path.parent.mkdir(parents=True, exist_ok=True)
    best = result["best"]
    atomic_write_json(path, {"layer": best["layer"], "gamma": best["gamma"],
                             "model": model_name(model), **result})
    return path
