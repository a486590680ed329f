"""The arithmetic floor of one ``ndb eval`` row on this CPU: FLOPs per fact against the matrix rate.

Measures the unedited row of ``ndb eval`` (default settings, fluency on) on the first N dev
facts: once timed, stage by stage, and three times under torch's FlopCounterMode, which
counts the matrix products (not CPU attention nor element-wise work: a floor, then):
teacher-forced scoring alone, then with greedy generation and chat, then with fluency too.
A NeuralDB row runs the same prompts plus the hook's search, so its floor is no lower. Each
stage's FLOPs over this CPU's best float32 matrix rate (measured on the shapes the build
and the scoring run) is the time no float32 row with these settings can beat here; per-fact
stages are extrapolated to ``--extrapolate`` facts, fluency to its capped prompt count.

    python benchmarks/eval_floor.py --n 24
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bf16_build import SHAPES, machine_line, matmul_rate
from torch.utils.flop_counter import FlopCounterMode

from ndb import load_model, read_facts
from ndb.eval.run import EvalSettings, measure_cases
from ndb.output import write_strict_json

HERE = Path(__file__).resolve().parent
DEV = HERE.parent / "ndb" / "data" / "dev_counterfact.json"
# a teacher-forced batch: 32 prompts of about 20 tokens, through an FFN and the LM head
SCORING_SHAPES = ((640, 576, 1536), (640, 1536, 576), (640, 576, 49152))
# settings that switch stages off, in the order they are added back
ONLY_SCORING = {"generation": False, "chat": False, "fluency_cases": 0}
WITHOUT_FLUENCY = {"fluency_cases": 0}


def counted_flops(model, tok, facts, settings: EvalSettings) -> float:
    with FlopCounterMode(display=False) as counter:
        measure_cases(model, tok, facts, settings, "counted")
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=24, help="dev facts measured")
    ap.add_argument("--extrapolate", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "eval_floor")
    args = ap.parse_args()
    model, tok = load_model()
    facts = read_facts(DEV)[: args.n]
    rates = {f"{m}x{k} @ {k}x{n}": matmul_rate((m, k, n), torch.float32)
             for m, k, n in (*SHAPES, *SCORING_SHAPES)}
    best = max(rates.values()) * 1e9

    settings = EvalSettings()
    measure_cases(model, tok, facts, settings, "timed")
    stage_s = {k.split("/", 1)[1]: v for k, v in settings.timings.items() if "/" in k}
    scoring = counted_flops(model, tok, facts, EvalSettings(**ONLY_SCORING))
    generative = counted_flops(model, tok, facts, EvalSettings(**WITHOUT_FLUENCY)) - scoring
    fluency = counted_flops(model, tok, facts, EvalSettings()) - scoring - generative
    fluency_prompts = min(settings.fluency_cases, len(facts))
    cap = min(settings.fluency_cases, args.extrapolate)

    per_fact = {"teacher-forced": scoring / len(facts), "generation and chat": generative /
                len(facts)}
    measured_per_fact = {"teacher-forced": stage_s.get("teacher-forced", 0.0) / len(facts),
                         "generation and chat": (stage_s.get("generation", 0.0)
                                                 + stage_s.get("chat", 0.0)) / len(facts)}
    fluency_per_prompt = fluency / fluency_prompts
    floor_s = (sum(per_fact.values()) * args.extrapolate + fluency_per_prompt * cap) / best
    measured_fluency = stage_s.get("fluency", 0.0) / fluency_prompts
    measured_s = sum(measured_per_fact.values()) * args.extrapolate + measured_fluency * cap
    machine = machine_line()
    report = {"machine": machine, "facts": len(facts), "row_seconds": settings.timings["timed"],
              "stage_seconds": stage_s, "gflop_per_fact": {k: v / 1e9 for k, v in
                                                           per_fact.items()},
              "fluency_gflop_per_prompt": fluency_per_prompt / 1e9,
              "float32_matmul_gflops": rates, "extrapolate": args.extrapolate,
              "floor_minutes": floor_s / 60, "measured_minutes": measured_s / 60}
    write_strict_json(args.out.with_suffix(".json"), report, indent=2)
    n = args.extrapolate
    lines = [f"# One `ndb eval` row's arithmetic floor\n\nReproduce: `python "
             f"benchmarks/eval_floor.py --n {args.n}` ({machine}; the unedited row on the "
             f"first {len(facts)} dev facts, `ndb eval`'s default settings, fluency on).\n",
             f"| stage | GFLOP counted | measured | floor at {best / 1e9:.0f} GFLOP/s |",
             "|---|---:|---:|---:|"]
    lines += [f"| {stage}, per fact | {per_fact[stage] / 1e9:.1f} | "
              f"{measured_per_fact[stage]:.3f} s | {per_fact[stage] / best:.3f} s |"
              for stage in per_fact]
    lines += [f"| fluency, per sampled prompt | {fluency_per_prompt / 1e9:.1f} | "
              f"{measured_fluency:.3f} s | "
              f"{fluency_per_prompt / best:.3f} s |",
              f"| **one row of {n} facts** ({cap} fluency prompts) | | "
              f"**{measured_s / 60:.1f} min** | **{floor_s / 60:.1f} min** |", "",
              "float32 matrix-product rates: " + ", ".join(
                  f"{shape} {r:.0f} GFLOP/s" for shape, r in rates.items()) + ".", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
