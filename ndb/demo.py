"""The demo: edit 20 well-known facts of the embedded default model, then take one back."""

from __future__ import annotations

import tempfile
import time
from importlib.resources import files
from pathlib import Path

import torch

from ndb.completion import complete
from ndb.database import NeuralDB
from ndb.eval.scoring import score_targets
from ndb.loading import load_model
from ndb.record_formats import read_facts

DEMO_FACTS = files("ndb") / "data" / "demo_facts.jsonl"
UNRELATED = "The Great Wall of China is one of the most famous"


def _answers(model, tok, prompts, n=5):
    return [complete(model, tok, p, n).strip().split("\n")[0] for p in prompts]


def _table(rows, headers):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([line.format(*headers), line.format(*("-" * w for w in widths)),
                      *(line.format(*r) for r in rows)])


def run(output: Path | None = None, say=print) -> dict:
    """Run the demo; returns its measured figures. ``output`` keeps the database there."""
    facts = read_facts(DEMO_FACTS)
    model, tok = load_model()
    prompts = [f.text for f in facts]
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    say(f"Model: SmolLM2-135M-Instruct (embedded GGUF, {n_params:.0f}M parameters)\n")

    before = _answers(model, tok, prompts)
    with tempfile.TemporaryDirectory() as tmp:
        path = output or Path(tmp) / "demo.ndb"
        db = NeuralDB.create(path, model, tok)
        say(f"Building {path} with {len(facts)} edits (layer {db.config.layer}, "
            f"gamma {db.config.gamma})...")
        start = time.perf_counter()
        ids = db.add(facts, model, tok, progress=True)
        build_s = time.perf_counter() - start
        db.attach(model, tok)
        after = _answers(model, tok, prompts)
        say("\n" + _table([(p, b, a) for p, b, a in zip(prompts, before, after)],
                          ("prompt", "before", "after")))

        new_nll, _ = score_targets(model, tok, prompts, [f.target_new for f in facts])
        true_nll, _ = score_targets(model, tok, prompts, [f.target_true for f in facts])
        efficacy = float((new_nll < true_nll).mean())
        para = [(p, f) for f in facts for p in f.paraphrases]
        p_new, _ = score_targets(model, tok, [p for p, _ in para], [f.target_new for _, f in para])
        p_true, _ = score_targets(model, tok, [p for p, _ in para],
                                  [f.target_true for _, f in para])
        generalization = float((p_new < p_true).mean())

        enc = tok(UNRELATED, return_tensors="pt")
        with torch.no_grad():
            edited_logits = model(**enc).logits
            with db.disabled():
                plain_logits = model(**enc).logits
        identical = bool(torch.equal(edited_logits, plain_logits))
        say(f"\nEfficacy (P(new) > P(true) on the edited prompts): {efficacy:.2f}")
        say(f"Generalization (the same on {len(para)} paraphrases): {generalization:.2f}")
        say(f"Unrelated prompt {UNRELATED!r}: logits bit-identical to the unedited model: "
            f"{identical}")
        say(f"Build time: {build_s:.0f} s ({build_s / len(facts):.1f} s per fact)")

        gone = facts[0]
        db.remove([ids[0]])
        reverted = _answers(model, tok, [gone.text])[0]
        with db.disabled():
            original = _answers(model, tok, [gone.text])[0]
        say(f"\nRemoved fact {ids[0]} ({gone.subject}: {gone.target_new}). Now:")
        say(f"  {gone.text} {reverted}    (unedited model: {original})")
        still = _answers(model, tok, [facts[1].text])[0]
        say(f"  {facts[1].text} {still}    (another edit, still in place)")
        db.close()
    return {"efficacy": efficacy, "generalization": generalization,
            "unrelated_identical": identical, "reverted": reverted == original,
            "build_s_per_fact": build_s / len(facts)}
