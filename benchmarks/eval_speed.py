"""How fast ``ndb eval`` measures a row: today's code against an earlier revision's, in one run.

The same facts, database and settings (``ndb eval``'s defaults, fluency included) are
measured by the whole ``ndb`` package as it was at ``--before`` (read from git into a
temporary directory) and by today's, each in a child process of its own, one after the
other: the unedited row and the NeuralDB row, with the time of each stage. ``--dtype``
loads the model of today's run in another dtype (``--before HEAD --dtype bfloat16``: the
same code in float32 against bfloat16). Per-fact costs are extrapolated to
``--extrapolate`` facts (fluency samples at most ``fluency_cases`` prompts, so its cost is
per sampled prompt, up to that cap). The two runs' metrics are
compared per fact. The load average before and after is recorded: on a shared machine
every row slows alike, so the ratio is the figure to read.

    python benchmarks/eval_speed.py --facts geo48.json --db geo48.ndb --before eb1bf83
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PER_FACT = ("teacher-forced", "chat", "generation")  # stages whose cost grows with the facts
ROWS = ("pre-edited", "neuraldb")


def package_at(revision: str, into: Path) -> Path:
    """The ``ndb`` package as it was at git ``revision``, unpacked under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "ndb"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def measure_rows(facts_path: str, db_path: str, n: int, dtype: str = "float32") -> dict:
    """Child process: both rows, by whichever ``ndb`` is first on the path."""
    import numpy as np
    import torch

    import ndb
    from ndb import NeuralDB, load_model, read_facts
    from ndb.eval.run import EvalSettings, measure_cases

    model, tok = load_model(**({} if dtype == "float32" else {"dtype": dtype}))
    facts = read_facts(facts_path)[:n]
    settings = EvalSettings()
    rows, per_case = {}, {}
    rows["pre-edited"], unedited = measure_cases(model, tok, facts, settings, "pre-edited")
    known = unedited["chat_true"] == 1 if "chat_true" in unedited else None
    db = NeuralDB.from_pretrained(db_path, model, tok)
    db.attach(model, tok)
    rows["neuraldb"], edited = measure_cases(model, tok, facts, settings, "neuraldb", known)
    db.detach()
    for name, cases in (("pre-edited", unedited), ("neuraldb", edited)):
        per_case[name] = {k: np.where(np.isfinite(v), v, -1.0).tolist()
                          for k, v in cases.items()}
    return {"code": str(Path(ndb.__file__).parent), "threads": torch.get_num_threads(),
            "seconds": settings.timings, "rows": rows, "per_case": per_case,
            "fluency_cases": min(settings.fluency_cases, len(facts))}


def build_database(facts_path: str, db_path: str) -> None:
    """Child process: ``db_path`` built from the facts by whichever ``ndb`` is first on the
    path (the earlier revision's: it cannot read settings that later databases record)."""
    from ndb import NeuralDB, load_model, read_facts

    model, tok = load_model()
    db = NeuralDB.create(db_path, model, tok)
    db.add(read_facts(facts_path), model, tok, progress=True)
    db.close()


def _child_env(code_root: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(code_root),
                                                         os.environ.get("PYTHONPATH", "")])}


def run_child(code_root: Path, args, dtype: str = "float32") -> dict:
    env = _child_env(code_root)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "--child", out.name, "--facts", args.facts,
                        "--db", args.db, "--n", str(args.n), "--dtype", dtype], env=env,
                       check=True)
        result = json.loads(Path(out.name).read_text())
    if Path(result["code"]).resolve() != (code_root / "ndb").resolve():
        raise RuntimeError(f"the child imported ndb from {result['code']}, not {code_root}")
    return result


def per_row_cost(run: dict, row: str, n: int, extrapolate: int, fluency_cap: int) -> dict:
    """Seconds per fact of each stage, and the row's seconds extrapolated to ``extrapolate``
    facts (fluency: per sampled prompt, times the cap)."""
    seconds = run["seconds"]
    per_fact = {s: seconds.get(f"{row}/{s}", 0.0) / n for s in PER_FACT}
    fluency = seconds.get(f"{row}/fluency", 0.0) / max(run["fluency_cases"], 1)
    total = sum(per_fact.values()) * extrapolate + fluency * min(fluency_cap, extrapolate)
    return {"measured_s": seconds[row], "per_fact_s": per_fact,
            "fluency_per_prompt_s": fluency, "extrapolated_s": total}


def differences(before: dict, now: dict) -> dict[str, dict[str, int]]:
    """Per row and metric: how many units (facts, groups, pairs) differ between the runs."""
    out = {}
    for row in ROWS:
        a, b = before["per_case"][row], now["per_case"][row]
        out[row] = {k: sum(abs(x - y) > 1e-6 for x, y in zip(a[k], b[k]))
                    for k in a if k in b and not k.endswith("_magnitude")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", required=True, help="CounterFact-schema facts (ndb data geo)")
    ap.add_argument("--db", required=True,
                    help="a NeuralDB of those facts; built by the --before code if missing")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--before", default="eb1bf83",
                    help="git revision whose ndb package is the reference")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the model's dtype in today's run (the earlier one: float32)")
    ap.add_argument("--extrapolate", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "eval_speed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--build-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.child).write_text(json.dumps(measure_rows(args.facts, args.db, args.n,
                                                            args.dtype)))
        return
    if args.build_child:
        build_database(args.facts, args.db)
        return

    with tempfile.TemporaryDirectory() as tmp:
        before = package_at(args.before, Path(tmp))
        if not Path(args.db).exists():
            subprocess.run([sys.executable, __file__, "--build-child", "--facts", args.facts,
                            "--db", args.db], env=_child_env(before), check=True)
        load_before = os.getloadavg()
        runs = {"before": run_child(before, args), "now": run_child(ROOT, args, args.dtype)}
    load_after = os.getloadavg()
    from ndb.eval.run import EvalSettings

    cap = EvalSettings().fluency_cases
    costs = {name: {row: per_row_cost(run, row, args.n, args.extrapolate, cap) for row in ROWS}
             for name, run in runs.items()}
    ratio = {row: costs["before"][row]["extrapolated_s"] / costs["now"][row]["extrapolated_s"]
             for row in ROWS}
    result = {"facts": args.facts, "n": args.n, "before": args.before, "dtype": args.dtype,
              "extrapolate": args.extrapolate, "threads": runs["now"]["threads"],
              "cpu": platform.processor() or platform.machine(),
              "load_average_before": load_before, "load_average_after": load_after,
              "costs": costs, "speedup": ratio, "rows": {k: r["rows"] for k, r in runs.items()},
              "seconds": {k: r["seconds"] for k, r in runs.items()},
              "differing_units": differences(runs["before"], runs["now"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    report = markdown(result, args)
    args.out.with_suffix(".md").write_text(report)
    print(report)


def markdown(result: dict, args) -> str:
    dtype = "" if args.dtype == "float32" else f" --dtype {args.dtype}"
    against = (f"today's code with the model in {args.dtype} against {args.before}'s in float32"
               if dtype else "today's code against an earlier revision's")
    lines = [f"# `ndb eval` speed: one row, {against}", "",
             f"Reproduce: `python benchmarks/eval_speed.py --facts {args.facts} --db {args.db} "
             f"--n {args.n} --before {args.before}{dtype}` ({result['threads']} torch threads, "
             f"{result['cpu']}; load average {result['load_average_before'][0]:.1f} before, "
             f"{result['load_average_after'][0]:.1f} after). Default settings: fluency on "
             "(100 prompts x 100 sampled tokens), generation and chat on, no general ability.",
             "", f"| code | row | measured s ({args.n} facts) | teacher-forced s/fact | "
             "chat s/fact | generation s/fact | fluency s/prompt | "
             f"extrapolated to {args.extrapolate} facts, min |", "|---" * 8 + "|"]
    for name, rows in result["costs"].items():
        for row, c in rows.items():
            f = c["per_fact_s"]
            lines.append(f"| {name} | {row} | {c['measured_s']:.1f} | "
                         f"{f['teacher-forced']:.3f} | {f['chat']:.3f} | "
                         f"{f['generation']:.3f} | {c['fluency_per_prompt_s']:.3f} | "
                         f"{c['extrapolated_s'] / 60:.1f} |")
    untimed_chat = not any(k.endswith("/chat") for k in result["seconds"]["before"])
    if untimed_chat:
        lines += ["", f"{result['before']}'s code times chat answers within generation."]
    lines += ["", "Speed-up (extrapolated row time, before / now): " + ", ".join(
        f"{row} {r:.2f}x" for row, r in result["speedup"].items()), "",
        "Units (facts, groups, pairs) whose metric differs between the two runs: " + "; ".join(
            f"{row}: " + (", ".join(f"{k} {v}" for k, v in d.items() if v) or "none")
            for row, d in result["differing_units"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
