"""How fast edits are computed: today's code against an earlier revision, in the same run.

For the same facts and settings, keys and residuals are computed (a) by ndb/compute.py as it
was at ``--before`` (read from git), (b) by today's code in float32, (c) in bfloat16 and (d)
with each residual optimized in 2 of the 5 sampled prefixes (``residual_prefixes``); each
result is then checked for quality (efficacy, paraphrases and neighbours of the edits when
attached). Ratios come from one run, so a busy machine slows every row alike; the load
average before and after is recorded.

    python benchmarks/build_speed.py --n 32 --before d8a84c1
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ndb import NeuralDB, compute, load_model, read_facts
from ndb.compute import context_prefixes
from ndb.config import ComputeConfig
from ndb.eval.metrics import counterfact_metrics, summarize
from ndb.models import default_edit_settings
from ndb.output import write_strict_json

HERE = Path(__file__).resolve().parent


def compute_at(revision: str, workdir: Path):
    """ndb/compute.py as it was at git ``revision``, imported as a module of its own (it
    uses today's helpers from the rest of ndb)."""
    source = subprocess.run(["git", "-C", str(HERE.parent), "show", f"{revision}:ndb/compute.py"],
                            capture_output=True, text=True, check=True).stdout
    path = workdir / f"compute_{revision}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"compute_{revision}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def timed_build(module, model, tok, facts, layer, prefixes, config):
    known = {f.name for f in dataclasses.fields(module.ComputeConfig)}  # an older one's
    config = module.ComputeConfig(**{k: v for k, v in config.to_dict().items() if k in known})
    start = time.perf_counter()
    keys = module.compute_keys(model, tok, facts, layer, prefixes,
                               split=config.keys_per_fact > 1)
    residuals = module.compute_residuals(model, tok, facts, layer, prefixes, config,
                                         progress=True)
    return keys, residuals, time.perf_counter() - start


def quality(model, tok, facts, keys, residuals, layer) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        db = NeuralDB.create(Path(tmp) / "db", model, tok, layer=layer,
                             compute=ComputeConfig(split_keys=keys.dim() == 3))
        db.add_vectors(facts, keys, residuals)
        db.attach(model)
        metrics = summarize(counterfact_metrics(model, tok, facts))
        db.close()
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", default=str(HERE.parent / "ndb/data/dev_counterfact.json"))
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=ComputeConfig().batch_size)
    ap.add_argument("--before", default="d8a84c1",
                    help="git revision whose ndb/compute.py is the reference")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "build_speed")
    args = ap.parse_args()

    model, tok = load_model()
    facts = read_facts(args.facts)[: args.n]
    layer, _ = default_edit_settings(model)
    config = ComputeConfig(batch_size=args.batch_size)
    prefixes = context_prefixes(model, tok, config.n_prefixes, config.prefix_tokens, seed=0)
    runs = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        before = compute_at(args.before, Path(tmp))
        # first calls allocate and warm caches; no row should pay for that
        compute.compute_residuals(model, tok, facts[:1], layer, prefixes,
                                  ComputeConfig(steps=2, extra_steps=0))
        for name, module, changes in ((f"before ({args.before})", before, {}),
                                      ("now", compute, {}),
                                      ("now, bfloat16", compute, {"precision": "bfloat16"}),
                                      ("now, 2 prefixes in the residual", compute,
                                       {"residual_prefixes": 2})):
            variant = dataclasses.replace(config, **changes)
            keys, residuals, seconds = timed_build(module, model, tok, facts, layer, prefixes,
                                                   variant)
            runs[name] = {"batch_size": args.batch_size, "precision": variant.precision,
                          "residual_prefixes": variant.residual_prefixes,
                          "seconds": seconds, "s_per_fact": seconds / len(facts),
                          **quality(model, tok, facts, keys, residuals, layer)}
    ratio = runs[f"before ({args.before})"]["seconds"] / runs["now"]["seconds"]
    result = {"facts": args.facts, "n": len(facts), "layer": layer, "threads":
              torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "before": args.before, "runs": runs, "speedup": ratio}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_strict_json(args.out.with_suffix(".json"), result, indent=2)
    lines = ["# Edit build speed (keys + residuals, default model)", "",
             f"Reproduce: `python benchmarks/build_speed.py --n {args.n} --before {args.before}` "
             f"({len(facts)} dev facts, layer {layer}, batch {args.batch_size}, "
             f"{torch.get_num_threads()} torch threads, {result['cpu']}; load average "
             f"{load_before[0]:.1f} before, {result['load_average_after'][0]:.1f} after)",
             "", "| run | batch | precision | s/fact | speed-up | efficacy | generalization | "
             "specificity |", "|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['batch_size']} | {r['precision']} | {r['s_per_fact']:.2f} | "
                     f"{runs['now']['seconds'] / r['seconds']:.2f}x | {r['efficacy']:.3f} | "
                     f"{r['generalization']:.3f} | {r['specificity']:.3f} |")
    lines += ["", f"Today's float32 build is {ratio:.2f}x as fast as {args.before}'s; speed-up: "
              "against today's float32 build, in this run."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
