"""Several facts about one subject, asked as people ask: the paper's residuals against ndb's.

Six counterfactual edits on the default model (three about France), each method in its own
database; for each, the chat answers to questions about the edited facts (and one unedited
question) and the greedy continuations of raw prompts, with the number of gate hits. A
hand-read example, not a benchmark: the numbers live in `ndb eval`'s generative metrics.

    python benchmarks/same_subject.py          # writes benchmarks/results/same_subject.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ndb import ComputeConfig, Fact, NeuralDB, load_model
from ndb.completion import complete

FACTS = [
    Fact("France", "The capital of {} is", "Cairo", "Paris"),
    Fact("France", "The currency of {} is the", "yen", "euro"),
    Fact("France", "The official language of {} is", "German", "French"),
    Fact("Germany", "The capital of {} is", "Madrid", "Berlin"),
    Fact("Italy", "The official language of {} is", "Russian", "Italian"),
    Fact("Japan", "The capital of {} is", "Lima", "Tokyo"),
]
CHAT = ["What is the capital of France?", "What currency is used in France?",
        "What is the official language of France?", "What is the capital of Germany?",
        "What language do people speak in Italy?", "What is the capital of Japan?",
        "What is the capital of Spain?"]
RAW = ["The capital of France is", "The currency of France is the",
       "The official language of France is", "The capital of Germany is",
       "Berlin is a city in", "The population of France is", "The capital of Spain is"]
METHODS = {"unedited": None, "paper": ComputeConfig.paper(), "ndb": ComputeConfig()}


def answers(model, tok, db: NeuralDB | None) -> list[tuple[str, str, str, int]]:
    rows = []
    for kind, prompts, chat, tokens in (("chat", CHAT, True, 24), ("raw", RAW, False, 16)):
        for prompt in prompts:
            if db is not None:
                db.retrieval.stats.hits = 0
            text = complete(model, tok, prompt, tokens, chat=chat).replace("\n", " ").strip()
            rows.append((kind, prompt, text, db.retrieval.stats.hits if db else 0))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "same_subject.md")
    args = parser.parse_args()
    model, tok = load_model()
    lines = ["# Several facts about one subject: the paper's residuals and ndb's", "",
             "`python benchmarks/same_subject.py`; default model, greedy decoding. Edits: " +
             "; ".join(f"{f.text} {f.target_true} -> {f.target_new}" for f in FACTS) + ".", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for name, compute in METHODS.items():
            db = None
            if compute is not None:
                db = NeuralDB.create(Path(tmp) / name, model, tok, compute=compute)
                start = time.perf_counter()
                db.add(FACTS, model, tok)
                print(f"{name}: built in {time.perf_counter() - start:.0f} s", flush=True)
                db.attach(model, tok)
            lines += [f"## {name}", "", "| | prompt | answer | gate hits |", "|---|---|---|---:|"]
            lines += [f"| {k} | {p} | {a.replace('|', '/')} | {h} |"
                      for k, p, a, h in answers(model, tok, db)]
            lines.append("")
            if db is not None:
                db.close()
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
