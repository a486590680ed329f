"""Why a chat answer misses its edit: does the gate fire on the subject inside the chat prompt?

For each fact with a chat question, the question is asked through the model's chat template
with the database attached and without it; the script prints both answers, whether the
edited one names the new object, and how many prompt tokens passed the gate. A miss with
hits is the residual's doing in a chat (what it makes the model say); a miss without hits
is the key's (retrieval).

    python benchmarks/chat_probe.py DB FACTS [--out benchmarks/results/chat_probe.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ndb import NeuralDB, load_model, read_facts
from ndb.eval.generation import chat_ids, mentions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("db")
    ap.add_argument("facts")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    model, tok = load_model()
    db = NeuralDB.from_pretrained(args.db)
    db.attach(model, tok)
    stats = db.retrieval.stats
    lines = [f"# Chat answers and the gate (`python benchmarks/chat_probe.py {args.db} "
             f"{args.facts}`)", "", "| | hits in prompt | question | new | edited answer | "
             "unedited answer |", "|---|---|---|---|---|---|"]
    counts = {"hit": 0, "hit+ok": 0, "miss+nohit": 0, "n": 0}
    for fact in read_facts(args.facts):
        question = fact.extra.get("chat_question")
        if not question:
            continue
        ids = torch.tensor([chat_ids(tok, question)])
        with torch.no_grad():
            stats.hits = 0
            model(ids)
            hits = stats.hits
            edited = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
            with db.disabled():
                unedited = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
        answer = tok.decode(edited[0, ids.shape[1]:], skip_special_tokens=True)
        before = tok.decode(unedited[0, ids.shape[1]:], skip_special_tokens=True)
        ok = mentions(answer, fact.target_new)
        counts["n"] += 1
        counts["hit"] += hits > 0
        counts["hit+ok"] += hits > 0 and ok
        counts["miss+nohit"] += hits == 0 and not ok
        cells = [("OK" if ok else "miss"), str(hits), question, fact.target_new,
                 answer.replace("|", "/").replace("\n", " "),
                 before.replace("|", "/").replace("\n", " ")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{counts['n']} chat questions: the gate fired in the prompt of "
              f"{counts['hit']}; {counts['hit+ok']} of those answers name the new object; "
              f"{counts['miss+nohit']} misses had no hit (retrieval)."]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
