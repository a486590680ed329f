"""Seconds per fluency sample and per greedy text at several batch sizes, on the dev set.

Fluency samples (100 sampled tokens after each fact's first generation prompt) and greedy
texts (chat answers of 32 tokens, continuations of 16) as ``ndb eval`` draws them, the
prompts repeated to ``--prompts``, each batch size in turn on the unedited model, for
``--rounds`` rounds (the best of them is reported: on a shared machine the first of several
runs is often slower): where ``EvalSettings``' batch sizes come from. Writes OUT.json and
OUT.md.

    python benchmarks/decode_batch.py --sample 32,64,100 --greedy 64,128
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bf16_build import machine_line

from ndb import load_model, read_facts
from ndb.anchor import encode
from ndb.eval.generation import chat_ids, generate, sample_generations
from ndb.eval.metrics import chat_question
from ndb.output import write_strict_json

HERE = Path(__file__).resolve().parent
DEV = HERE.parent / "ndb" / "data" / "dev_counterfact.json"


def repeated(items: list, n: int) -> list:
    return (items * (n // len(items) + 1))[:n]


def per_text(decode, model, tok, inputs: list, tokens: int, batch: int) -> float:
    start = time.perf_counter()
    decode(model, tok, inputs, tokens, batch_size=batch)
    return (time.perf_counter() - start) / len(inputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sample", default="32,64,100", help="fluency batch sizes")
    ap.add_argument("--greedy", default="64,128", help="greedy batch sizes")
    ap.add_argument("--prompts", type=int, default=100, help="fluency prompts")
    ap.add_argument("--greedy-prompts", type=int, default=256, help="chat questions and prompts")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "decode_batch")
    args = ap.parse_args()
    model, tok = load_model()
    facts = read_facts(DEV)
    sampled = repeated([f.extra["generation_prompts"][0] for f in facts
                        if f.extra.get("generation_prompts")], args.prompts)
    n = args.greedy_prompts
    chats = repeated([chat_ids(tok, q) for f in facts if (q := chat_question(f))], n)
    completions = repeated([encode(tok, f.prompt.format(f.subject)) for f in facts], n)
    runs: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for size in map(int, args.sample.split(",")):
            runs.setdefault(("fluency sample, 100 tokens", size), []).append(
                per_text(sample_generations, model, tok, sampled, 100, size))
        for size in map(int, args.greedy.split(",")):
            for kind, inputs, tokens in (("chat answer, 32 tokens", chats, 32),
                                         ("continuation, 16 tokens", completions, 16)):
                runs.setdefault((kind, size), []).append(
                    per_text(generate, model, tok, inputs, tokens, size))
        print(runs, flush=True)
    rows = [{"kind": kind, "batch": size, "s_per_text": min(seconds), "rounds": seconds}
            for (kind, size), seconds in runs.items()]
    machine = machine_line()
    write_strict_json(args.out.with_suffix(".json"), {"machine": machine, "rows": rows},
                      indent=2)
    lines = [f"# Decoding batch sizes\n\nReproduce: `python benchmarks/decode_batch.py --sample "
             f"{args.sample} --greedy {args.greedy} --prompts {args.prompts} "
             f"--greedy-prompts {args.greedy_prompts} "
             f"--rounds {args.rounds}` ({machine}; "
             f"{len(sampled)} fluency prompts, {n} chat questions and prompts of the dev "
             "set, repeated; unedited model; the best of the rounds).\n",
             "| texts | batch | s per text | each round |", "|---|---:|---:|---|"]
    lines += [f"| {r['kind']} | {r['batch']} | {r['s_per_text']:.3f} | "
              f"{', '.join(f'{x:.3f}' for x in r['rounds'])} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
