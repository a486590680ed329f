"""Do today's greedy texts equal an earlier revision's? On the default model, unedited and
with a database attached, for the continuations and chat answers ``ndb eval`` generates.

Today's generator runs rows in a key-value cache and drops a row from its batch when it
ends; with ``watch`` it also stops a row once the objects it is judged on are named for
good. Each text is compared with ``--before``'s (``model.generate`` over whole batches):
without ``watch`` the texts should be equal; with it, each should be a prefix of the old
text that names the watched objects exactly when the old text does. Float differences
between batch shapes can flip a near-tie of the greedy choice: those are counted.

    python benchmarks/greedy_texts.py --facts geo48.json --db geo48.ndb --n 12
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ndb import NeuralDB, load_model, read_facts
from ndb.anchor import encode
from ndb.eval import generation
from ndb.eval.generation import chat_ids, mentions
from ndb.eval.metrics import _group_others, chat_question

HERE = Path(__file__).resolve().parent


def generation_at(revision: str, workdir: Path):
    """ndb/eval/generation.py as it was at git ``revision``, as a module of its own."""
    source = subprocess.run(["git", "-C", str(HERE.parent), "show",
                             f"{revision}:ndb/eval/generation.py"],
                            capture_output=True, text=True, check=True).stdout
    path = workdir / f"generation_{revision}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"generation_{revision}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def inputs_of(tok, facts) -> tuple[list[list[int]], list[list[str]], list[int]]:
    """Token ids, watched objects and token limit of every text ``ndb eval`` generates."""
    others = _group_others(facts)
    rows = []
    for i, f in enumerate(facts):
        watched = [f.target_new, f.target_true or "", *others[i]]
        for prompt in [f.text, *f.paraphrases, *f.extra.get("neighborhood_prompts", [])[:2]]:
            rows.append((encode(tok, prompt), watched, 16))
        if question := chat_question(f):
            rows.append((chat_ids(tok, question), watched, 32))
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def compare(old, model, tok, inputs, watch, limits) -> dict[str, int]:
    counts = {"texts": 0, "equal": 0, "watched_prefix": 0, "watched_same_mentions": 0}
    for limit in sorted(set(limits)):
        rows = [i for i, n in enumerate(limits) if n == limit]
        ids = [inputs[i] for i in rows]
        before = old.greedy_generate(model, tok, ids, limit, 16)
        full = generation.greedy_generate(model, tok, ids, limit, 32)
        short = generation.greedy_generate(model, tok, ids, limit, 32, [watch[i] for i in rows])
        for b, f, s, i in zip(before, full, short, rows):
            counts["texts"] += 1
            counts["equal"] += b == f
            counts["watched_prefix"] += b.startswith(s)
            counts["watched_same_mentions"] += all(mentions(s, n) == mentions(b, n)
                                                   for n in watch[i])
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", required=True)
    ap.add_argument("--db", required=True)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--before", default="eb1bf83")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "greedy_texts.json")
    args = ap.parse_args()
    model, tok = load_model()
    facts = read_facts(args.facts)[: args.n]
    inputs, watch, limits = inputs_of(tok, facts)
    with tempfile.TemporaryDirectory() as tmp:
        old = generation_at(args.before, Path(tmp))
        result = {"facts": args.facts, "n": args.n, "before": args.before,
                  "unedited": compare(old, model, tok, inputs, watch, limits)}
        db = NeuralDB.from_pretrained(args.db, model, tok)
        db.attach(model, tok)
        result["neuraldb"] = compare(old, model, tok, inputs, watch, limits)
        db.detach()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
