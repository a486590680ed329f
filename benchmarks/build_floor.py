"""The float32 build's arithmetic floor on this CPU: FLOPs per fact against the matrix rate.

Builds a database of the first N dev facts with the default settings twice: once timed, once
under torch's FlopCounterMode, which counts the matrix products, forward and backward (not
the CPU attention kernel, nor element-wise work: a floor, then). This CPU's float32
matrix-product rate is measured on the shapes a step runs (``bf16_build.matmul_rate``).
Counted FLOPs per fact over the best of those rates is the time per fact that no float32
build with these settings can beat here, however little else it spent: the gap between it
and 1.0 s per fact is what settings that change quality (fewer contexts or steps) would
have to close.

    python benchmarks/build_floor.py --n 32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bf16_build import SHAPES, machine_line, matmul_rate
from torch.utils.flop_counter import FlopCounterMode

from ndb import NeuralDB, load_model, read_facts
from ndb.output import write_strict_json

HERE = Path(__file__).resolve().parent
DEV = HERE.parent / "ndb" / "data" / "dev_counterfact.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32, help="dev facts built")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "build_floor")
    args = ap.parse_args()
    model, tok = load_model()
    facts = read_facts(DEV)[: args.n]
    rates = {f"{m}x{k} @ {k}x{n}": matmul_rate((m, k, n), torch.float32) for m, k, n in SHAPES}
    with tempfile.TemporaryDirectory() as tmp:
        timed = NeuralDB.create(Path(tmp) / "timed", model, tok, progress=False)
        counted = NeuralDB.create(Path(tmp) / "counted", model, tok, progress=False)
        start = time.perf_counter()
        timed.add(facts, model, tok)
        seconds = time.perf_counter() - start
        with FlopCounterMode(display=False) as counter:
            counted.add(facts, model, tok)
        timed.close()
        counted.close()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    flops = counter.get_total_flops() / len(facts)
    best = max(rates.values())
    floor = flops / (best * 1e9)
    machine = machine_line()
    report = {"machine": machine, "facts": len(facts), "seconds_per_fact": seconds / len(facts),
              "gflop_per_fact": flops / 1e9, "gflop_per_fact_by_op":
                  {op: n / len(facts) / 1e9 for op, n in by_op.items()},
              "float32_matmul_gflops": rates, "floor_seconds_per_fact": floor}
    write_strict_json(args.out.with_suffix(".json"), report, indent=2)
    lines = [f"# The float32 build's arithmetic floor\n\nReproduce: `python "
             f"benchmarks/build_floor.py --n {args.n}` ({machine}; the first {len(facts)} "
             "facts of the dev set, default settings).\n",
             "| | per fact |", "|---|---:|",
             f"| build, measured | {seconds / len(facts):.2f} s |",
             f"| counted FLOPs (matrix products, forward and backward) | "
             f"{flops / 1e9:.0f} GFLOP |"]
    lines += [f"| of which {op} | {n / len(facts) / 1e9:.0f} GFLOP |"
              for op, n in sorted(by_op.items(), key=lambda kv: -kv[1])]
    lines += [f"| floor: counted FLOPs at the best float32 matrix rate ({best:.0f} GFLOP/s) | "
              f"{floor:.2f} s |", "", "float32 matrix-product rates on a step's shapes: "
              + ", ".join(f"{shape} {r:.0f} GFLOP/s" for shape, r in rates.items()) + ".", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
