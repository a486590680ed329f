"""bfloat16 builds on a CPU with AMX: matrix products against attention.

Times (1) this CPU's matrix products in float32 and bfloat16 on the shapes a residual
optimization step runs, and (2) the same residual optimization (the first facts of the demo
set, a fixed number of steps, no early stop) in float32; in bfloat16 as ndb runs it (the
FFNs and the LM head under autocast, attention in float32); and under autocast everywhere
(as ndb did before), with PyTorch's default attention kernel and with its math kernel. A
profile (a separate run: the profiler slows some rows more than others) shows where the
autocast-everywhere build's time goes. ndb does not switch the
attention kernel: ``sdpa_kernel`` sets a process-wide flag, which would change every other
thread's attention while a build runs.

    python benchmarks/bf16_build.py --facts 16 --steps 10 --repeats 2 \
        --out benchmarks/results/bf16_build
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ndb import load_model, read_facts
from ndb.compute import compute_residuals, context_prefixes
from ndb.config import ComputeConfig
from ndb.models import default_edit_settings
from ndb.output import write_strict_json

DEMO = Path(__file__).resolve().parents[1] / "ndb" / "data" / "demo_facts.jsonl"
SHAPES = ((1700, 576, 1536), (1700, 1536, 576), (200, 576, 49152))  # rows x in x out


def matmul_rate(shape: tuple[int, int, int], dtype: torch.dtype, repeats: int = 20) -> float:
    """GFLOP/s of one (m, k) @ (k, n) product."""
    m, k, n = shape
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


def machine_line() -> str:
    """The CPU, its cores, torch and its threads, as the reports name them."""
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bf16_build"))
    args = ap.parse_args()
    model, tok = load_model()
    layer, _ = default_edit_settings(model)
    facts = read_facts(DEMO)[: args.facts]
    prefixes = context_prefixes(model, tok, 5, 10, 0)
    rates = {f"{m}x{k} @ {k}x{n}": {str(dt).split(".")[1]: matmul_rate((m, k, n), dt)
                                    for dt in (torch.float32, torch.bfloat16)}
             for m, k, n in SHAPES}
    compute_residuals(model, tok, facts[:2], layer, prefixes,
                      ComputeConfig(steps=2, extra_steps=0))  # warm-up
    everywhere = torch.autocast("cpu", dtype=torch.bfloat16)
    rows = {"float32": ("float32", contextlib.nullcontext),
            "bfloat16 (ndb: FFNs and LM head)": ("bfloat16", contextlib.nullcontext),
            "bfloat16 autocast everywhere": ("float32", lambda: everywhere),
            "bfloat16 autocast everywhere, math attention": ("float32", lambda: math_kernel())}

    def math_kernel() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(everywhere)
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack

    def build(name: str) -> float:
        precision, region = rows[name]
        config = ComputeConfig(steps=args.steps, extra_steps=0, stop_loss=0.0,
                               precision=precision)
        with region():
            start = time.perf_counter()
            compute_residuals(model, tok, facts, layer, prefixes, config)
            return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.repeats):  # alternating, so that a busy moment slows every row alike
        for name in rows:
            times[name].append(build(name))
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    runs = {name: statistics.median(t) for name, t in times.items()}
    with torch.profiler.profile() as prof:
        build("bfloat16 autocast everywhere")
    profile = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6)
    machine = machine_line()
    report = {"machine": machine, "facts": len(facts), "steps": args.steps,
              "matmul_gflops": rates, "seconds": times, "repeats": args.repeats,
              "bfloat16_profile": profile}
    write_strict_json(args.out.with_suffix(".json"), report, indent=2)
    lines = [f"# bfloat16 build on this CPU\n\nReproduce: `python benchmarks/bf16_build.py "
             f"--facts {args.facts} --steps {args.steps} --repeats {args.repeats} "
             f"--out {args.out}`\n\n{machine}; "
             f"residuals of the first {len(facts)} demo facts, {args.steps} steps each; builds "
             f"alternating, medians of {args.repeats}.\n",
             "| product | float32 GFLOP/s | bfloat16 GFLOP/s |", "|---|---:|---:|"]
    lines += [f"| {shape} | {r['float32']:.0f} | {r['bfloat16']:.0f} |"
              for shape, r in rates.items()]
    lines += ["", "| build | seconds | against float32 |", "|---|---:|---:|"]
    lines += [f"| {name} | {s:.1f} | {runs['float32'] / s:.2f}x |" for name, s in runs.items()]
    lines += ["", "Where the time of autocast everywhere goes (default attention kernel):", "",
              "```", profile.strip(), "```", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
