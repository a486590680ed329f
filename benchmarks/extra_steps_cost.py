"""What steps until the edits hold cost in build time: the residuals of the same facts with
ComputeConfig's extra steps (the default) and without them (25 steps only), in one run,
grouped by subject as a database groups them. A fact that holds by step 25 costs the same
in both; the price is paid by the groups that do not.

    python benchmarks/extra_steps_cost.py --n 32
    python benchmarks/extra_steps_cost.py --facts benchmarks/results/sweep_method_groups_facts.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from ndb import load_model, read_facts
from ndb.compute import FactBar, compute_residuals, context_prefixes
from ndb.config import ComputeConfig
from ndb.models import default_edit_settings
from ndb.output import write_strict_json

HERE = Path(__file__).resolve().parent


def timed(model, tok, facts, layer, prefixes, config: ComputeConfig) -> tuple[float, int]:
    """Seconds to compute the residuals, and the optimization steps taken (of all batches:
    each step reports its progress once)."""
    steps = []
    with FactBar(len(facts), "residuals") as bar:
        def advance(done: float) -> None:
            steps.append(done)
            bar.update(done)

        start = time.perf_counter()
        compute_residuals(model, tok, facts, layer, prefixes, config, progress=advance,
                          groups=[f.subject for f in facts])
        return time.perf_counter() - start, len(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", default=str(HERE.parent / "ndb/data/dev_counterfact.json"))
    ap.add_argument("--n", type=int, default=None, help="the first N facts (default: all)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON and markdown stem (default: results/extra_steps_cost_<facts>)")
    args = ap.parse_args()
    model, tok = load_model()
    facts = read_facts(args.facts)[: args.n]
    layer, _ = default_edit_settings(model)
    default = ComputeConfig()
    prefixes = context_prefixes(model, tok, default.n_prefixes, default.prefix_tokens, seed=0)
    compute_residuals(model, tok, facts[:1], layer, prefixes, ComputeConfig(steps=2, extra_steps=0))
    load = os.getloadavg()
    rows = {}
    for name, config in ((f"extra_steps {default.extra_steps} (default)", default),
                         ("25 steps only", ComputeConfig(extra_steps=0))):
        seconds, steps = timed(model, tok, facts, layer, prefixes, config)
        rows[name] = {"seconds": seconds, "s_per_fact": seconds / len(facts), "steps": steps}
    names = list(rows)
    ratio = rows[names[0]]["seconds"] / rows[names[1]]["seconds"]
    stem = args.out or HERE / "results" / f"extra_steps_cost_{Path(args.facts).stem}"
    subjects = len({f.subject for f in facts})
    write_strict_json(stem.with_suffix(".json"), {
        "facts": args.facts, "n": len(facts), "subjects": subjects, "layer": layer,
        "threads": torch.get_num_threads(), "load_average_before": load,
        "load_average_after": os.getloadavg(), "rows": rows, "ratio": ratio}, indent=2)
    asked = "" if args.facts == ap.get_default("facts") else f" --facts {args.facts}"
    asked += f" --n {args.n}" if args.n else ""
    lines = ["# The build time of steps until the edits hold", "",
             f"Reproduce: `python benchmarks/extra_steps_cost.py{asked}` ({len(facts)} facts "
             f"about {subjects} subjects, default model, layer {layer}, batch "
             f"{default.batch_size}, {torch.get_num_threads()} torch threads; load average "
             f"{load[0]:.1f} before, {os.getloadavg()[0]:.1f} after). Residuals only (the keys "
             "are the same in both).", "",
             "| residuals | s/fact | optimization steps (all batches) |", "|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['s_per_fact']:.2f} | {row['steps']} |")
    lines += ["", f"Extra steps take {ratio:.2f}x the time of 25 steps only."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
