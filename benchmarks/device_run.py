"""One lent accelerator session, prepared: build speed against batch size (with the batch
size ``--batch-size auto`` picks), ndb's residuals against the paper's on 2,000 real geo edits
with groups of 2-4 facts per subject, measured as ``ndb eval`` does (issue 9), 10k real geo
edits built and evaluated (NeuralDB, MEMIT, AlphaEdit), the largest build up to 100k that the
time left allows (efficacy and generalization on a random sample of it), and the hook's decode
and prefill overhead at growing numbers of keys; everything under --out (JSON, Markdown,
plots), rewritten after every stage, so a run stopped at its limit keeps what it measured.

Each stage first checks the time left (--budget-s, from the start of this script) and is
skipped, or sized down, when it would not fit; the JSON says which and why. A stage that
fails is recorded with its error, and the run goes on to the next.

    bash benchmarks/device_run.sh                 # on the device machine (see that file)
    python benchmarks/device_run.py --dry-run     # here: tiny model, a few facts, the CPU

The dry run goes through every stage with a tiny random model and a few dozen facts, so that
device minutes are not spent on set-up errors; its numbers mean nothing and are labelled so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from ndb import ComputeConfig, NeuralDB, load_model, read_facts
from ndb.auto_batch import auto_batch_size
from ndb.facts import Fact
from ndb.output import write_strict_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class Clock:
    """Time left of the run's budget."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.monotonic(), budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


class Report:
    """device_run.json and .md under --out, rewritten after every stage."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta, self.stages = out, meta, {}

    def stage(self, name: str, result: dict) -> None:
        self.stages[name] = result
        print(f"[{name}] {json.dumps(result, default=str)[:600]}", flush=True)
        self.write()

    def write(self) -> None:
        write_strict_json(self.out / "device_run.json",
                          {**self.meta, "stages": self.stages}, indent=2)
        (self.out / "device_run.md").write_text(markdown(self.meta, self.stages))


def markdown(meta: dict, stages: dict) -> str:
    dry = " (DRY RUN: a tiny random model on the CPU, numbers mean nothing)"
    lines = [f"# Device run{dry if meta['dry_run'] else ''}",
             "", f"Machine: {meta['machine']}. Model: `{meta['model']}`. Facts: "
             f"`{meta['facts']}`. Budget {meta['budget_s']:.0f} s.", ""]
    speed = stages.get("build_speed", {})
    if speed.get("rows"):
        lines += ["## Build speed against batch size", "",
                  "| batch size | precision | facts | seconds | edits/s |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['batch_size']}{' (auto)' if r.get('auto') else ''} | "
                  f"{r['precision']} | {r['n']} | {r['seconds']:.1f} | "
                  f"{r['edits_per_s']:.1f} |" if "failed" not in r else
                  f"| {r['batch_size']} | {r['precision']} | failed: {r['failed']} | | |"
                  for r in speed["rows"]]
        lines.append("")
    lines += compare_markdown(stages.get("residuals", {}))
    for name in ("build_small", "build_big"):
        s = stages.get(name, {})
        if "n" in s:
            lines += [f"Build to {s['n']} edits ({s['added']} computed): {s['seconds']:.0f} s, "
                      f"{s['edits_per_s']:.1f} edits/s (batch size {s['batch_size']}).", ""]
    if stages.get("eval_small", {}).get("markdown"):
        lines += ["## Edits, evaluated", "", stages["eval_small"]["markdown"], ""]
    big = stages.get("eval_big", {})
    if big.get("metrics"):
        lines += [f"## {big['n']} edits, a random sample of {big['sample']}", "",
                  "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.1f} |" for k, v in big["metrics"].items()
                  if isinstance(v, (int, float))]
        lines.append("")
    overhead = stages.get("overhead", {})
    if overhead.get("rows"):
        lines += ["## Hook overhead against the unedited model (same run)", "",
                  "| keys | index | decode overhead | prefill overhead |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {r['m']} | {r['index']} | {100 * r['decode_overhead']:+.1f}% | "
                  f"{100 * r['prefill_overhead']:+.1f}% |" for r in overhead["rows"]]
        lines.append("")
    missing = {k: v.get("skipped") or f"failed: {v['failed']}" for k, v in stages.items()
               if "skipped" in v or "failed" in v}
    if missing:
        lines += ["## Not measured in this run", ""]
        lines += [f"- {k}: {why}" for k, why in missing.items()]
    return "\n".join(lines) + "\n"


def compare_markdown(stage: dict) -> list[str]:
    """The residuals stage as ``ndb eval`` prints it, with how its facts and builds came."""
    if not stage.get("table"):
        return []
    builds = ", ".join(f"{b['method']}'s {b['seconds']:.0f} s ({b['edits_per_s']:.1f} edits/s, "
                       f"batch size {b['batch_size']})" for b in stage["builds"])
    lines = [f"## ndb's residuals against the paper's: {stage['n']} edits, "
             f"{stage['in_groups']} of them in {stage['groups']} groups", "",
             f"Facts: `{stage['facts']}` (sha256 {stage['facts_sha256'][:16]}), made by "
             f"`{stage['facts_made_by']}`. Builds: {builds}. Rows measured as `ndb eval "
             f"--methods neuraldb,neuraldb-paper` does (eval batch size "
             f"{stage['eval_batch_size']}, fluency on {stage['fluency_cases']} cases); seconds "
             f"per row: {', '.join(f'{k} {v:.0f}' for k, v in stage['row_seconds'].items())}.",
             "", stage["table"], ""]
    if stage.get("wanted", stage["n"]) != stage["n"]:
        lines += [f"Sized down from {stage['wanted']}: {stage['sized_down']}.", ""]
    lines += [f"- {name}: {why}" for name, why in stage.get("rows_skipped", {}).items()]
    return lines + ([""] if stage.get("rows_skipped") else [])


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, torch {torch.__version__}"


def timed_build(path: Path, model, tok, facts: list, batch_size: int | str, precision: str,
                commit_each_batch: bool = False, db: NeuralDB | None = None,
                method: str = "ndb") -> dict:
    """Add ``facts`` to a new database at ``path`` (or to ``db``) with ``method``'s residuals
    (ndb's or the paper's); the seconds of the add alone (creating a database samples its
    prefixes once, whatever its size). ``batch_size`` "auto" is resolved as ``ndb build
    --batch-size auto`` does, its probe timed apart."""
    compute = (ComputeConfig.paper if method == "paper" else ComputeConfig)(precision=precision)
    db = db or NeuralDB.create(path, model, tok, compute=compute)
    auto = {}
    if batch_size == "auto":
        start = time.perf_counter()
        batch_size = auto_batch_size(model, tok, facts, db.config.layer, db.config.prefixes,
                                     db.config.compute)
        auto = {"auto": True, "auto_probe_s": time.perf_counter() - start}
    db.config.compute.batch_size = batch_size
    _sync(model)
    start = time.perf_counter()
    added = len(db.add(facts, model, tok, skip_existing=True,
                       commit_each_batch=commit_each_batch))
    _sync(model)
    seconds = time.perf_counter() - start
    return {"n": len(db), "added": added, "batch_size": batch_size, **auto, "method": method,
            "precision": db.config.compute.precision, "seconds": seconds,
            "edits_per_s": added / seconds}


def _sync(model) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def build_speed(args, model, tok, facts, work: Path, clock: Clock) -> dict:
    """Edits/s at each batch size in --precision, then the best size in the other precision
    (for the record: the builds use --precision), while --speed-s lasts. A point that fails
    (the auto probe, or memory) is recorded and the others still run. The best size is
    capped at --speed-n: the later builds use a batch that was measured, not extrapolated."""
    start = time.monotonic()
    other = "bfloat16" if args.precision == "float32" else "float32"
    points = [(size, args.precision) for size in args.batch_sizes] + [(None, other)]
    rows: list[dict] = []
    for size, precision in points:
        done = [r for r in rows if "failed" not in r]
        if done and time.monotonic() - start + done[-1]["seconds"] > args.speed_s:
            break
        if size is None and not any(r["precision"] == args.precision for r in done):
            break
        size = size or best_row(rows, args.precision)["batch_size"]
        try:
            rows.append(timed_build(work / f"speed-{size}-{precision}.ndb", model, tok,
                                    facts[: args.speed_n], size, precision))
        except Exception as err:  # recorded; the other sizes may still be measured
            _free_cached()
            rows.append({"batch_size": size, "precision": precision,
                         "failed": f"{type(err).__name__}: {err}".splitlines()[0]})
    best = best_row(rows, args.precision)
    return {"rows": rows, "best_batch_size": min(best["batch_size"], args.speed_n),
            "best_edits_per_s": best["edits_per_s"]}


def best_row(rows: list[dict], precision: str) -> dict:
    """The fastest measured row in ``precision`` (ValueError when there is none)."""
    return max((r for r in rows if r["precision"] == precision and "failed" not in r),
               key=lambda r: r["edits_per_s"])


def _free_cached() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # an out-of-memory error leaves its blocks cached


def fitting(wanted: int, have: int, rate: float, seconds: float, step: int) -> int:
    """The most facts, up to ``wanted``, that ``have`` grows to in ``seconds`` at ``rate``
    (with a margin), in multiples of ``step``."""
    return min(wanted, have + int(rate * seconds * 0.8) // step * step)


def grouped_subset(facts: list[Fact], n: int) -> list[Fact]:
    """``n`` of ``facts``, in their order, keeping each group (the "group" field) whole and
    the share of grouped facts as it was."""
    groups: dict[str, list[Fact]] = {}
    singles = []
    for fact in facts:
        if fact.extra.get("group"):
            groups.setdefault(fact.extra["group"], []).append(fact)
        else:
            singles.append(fact)
    grouped_n = round(n * (len(facts) - len(singles)) / max(len(facts), 1))
    picked: list[Fact] = []
    for members in groups.values():
        if len(picked) + len(members) > grouped_n:
            break
        picked += members
    return picked + singles[: n - len(picked)]


def compare_residuals(args, model, tok, rate: float, clock: Clock,
                      save: Callable[[dict], None]) -> dict:
    """Issue 9: ndb's residuals (ComputeConfig()) against the paper's (ComputeConfig.paper())
    on --compare-n real geo facts with groups, every row of ``ndb eval --methods
    neuraldb,neuraldb-paper`` (teacher-forced, generative, chat, groups, cross-talk, spill,
    fluency). Sized down when two builds at ``rate`` and three rows at the seconds per fact
    of an unedited probe do not fit; a row that no longer fits is skipped, not cut."""
    from ndb.eval.methods import make_methods
    from ndb.eval.run import (
        EvalSettings,
        markdown_table,
        measure_cases,
        measure_unedited,
        noted_rows,
    )

    every = read_facts(str(args.group_facts))
    settings = EvalSettings(batch_size=args.eval_batch_size, gen_batch_size=args.eval_batch_size,
                            fluency_cases=args.fluency_cases)
    # seconds per fact of one row: the unedited model on one eval batch of the facts (fluency
    # is a fixed cost, a number of cases, so it is timed apart)
    probe = grouped_subset(every, min(args.eval_batch_size, len(every)))
    measure_cases(model, tok, probe, settings, "probe")
    fixed = settings.timings.get("probe/fluency", 0.0)
    per_fact = (settings.timings["probe"] - fixed) / len(probe)
    # per fact: its two builds and its three rows, an edited row taken as 1.5 unedited ones
    # (the hook; 4x on the dry run's tiny model, whose own forward pass costs next to
    # nothing). Too few facts cost less than a missing row: fitting() keeps its own margin
    stage_rate = 1 / (2 / rate + 3 * 1.5 * per_fact)
    room = clock.left() - args.reserve_s - 3 * fixed - 20  # 20: creating the two databases
    wanted = min(args.compare_n, len(every))
    n = fitting(wanted, 0, stage_rate, room, max(wanted // 20, 1))
    estimate = {"build_edits_per_s": rate, "eval_s_per_fact_row": per_fact,
                "fluency_s_per_row": fixed, "room_s": room}
    if n < max(wanted // 10, 1):
        return {"skipped": f"{room:.0f} s left: at {rate:.1f} edits/s and {per_fact:.3f} s per "
                           f"fact and row, {n} of {wanted} facts would fit", **estimate}
    facts = grouped_subset(every, n)
    groups = {f.extra["group"] for f in facts if f.extra.get("group")}
    result = {"n": len(facts), "wanted": wanted, "groups": len(groups),
              "in_groups": sum(bool(f.extra.get("group")) for f in facts),
              "facts": str(args.group_facts), "facts_made_by": args.group_facts_made_by,
              "facts_sha256": hashlib.sha256(args.group_facts.read_bytes()).hexdigest(),
              "eval_batch_size": args.eval_batch_size, "fluency_cases": args.fluency_cases,
              "estimate": estimate, "builds": [], "rows": {}, "row_seconds": {}}
    if n < wanted:
        result["sized_down"] = (f"{room:.0f} s left, at {rate:.1f} edits/s per build and "
                                f"{per_fact:.3f} s per fact and row")
    dbs = {}
    for method in ("ndb", "paper"):
        path = args.work / f"residuals-{method}.ndb"
        result["builds"].append(timed_build(path, model, tok, facts, args.batch_size,
                                            args.precision, True, method=method))
        dbs[method] = NeuralDB.from_pretrained(path)
        save({**result, "running": f"built {method}'s"})
    methods = make_methods(["neuraldb", "neuraldb-paper"], model, tok, facts, dbs["ndb"],
                           paper_db=dbs["paper"])
    rows, skipped = {}, {}
    start = time.perf_counter()
    rows["pre-edited"], known = measure_unedited(model, tok, facts, settings)
    result["row_seconds"]["pre-edited"] = time.perf_counter() - start
    for name, apply in methods.items():
        row_s = max(result["row_seconds"].values())
        if clock.left() - args.reserve_s < 1.1 * row_s:
            skipped[name] = f"{clock.left():.0f} s left, a row takes up to {row_s:.0f} s"
            continue
        save({**result, "rows": noted_rows(rows, "counterfact"), "running": name,
              "table": markdown_table(rows)})  # the rows so far, should the run end here
        start = time.perf_counter()
        with apply():
            rows[name], _ = measure_cases(model, tok, facts, settings, name, known)
        result["row_seconds"][name] = time.perf_counter() - start
    for db in dbs.values():
        db.close()
    timings = {k: v for k, v in settings.timings.items() if not k.startswith("probe")}
    result = {**result, "rows": noted_rows(rows, "counterfact"), "seconds": timings,
              "table": markdown_table(rows), **({"rows_skipped": skipped} if skipped else {})}
    # on their own too, to be committed as a result of issue 9
    write_strict_json(args.out / "residuals_groups.json", result, indent=2)
    (args.out / "residuals_groups.md").write_text("\n".join(compare_markdown(result)))
    return result


def evaluate_small(args, facts_file: Path, db_path: Path, n: int, clock: Clock,
                   work: Path) -> dict:
    """NeuralDB, MEMIT and AlphaEdit at ``n`` edits through benchmarks/scaling.py, which
    reuses the residuals of the database just built; its rows are saved as they come."""
    out = work / "scaling"
    command = [sys.executable, str(HERE / "scaling.py"), "--facts", str(facts_file),
               "--sizes", str(n), "--db", str(db_path), "--methods", args.methods,
               "--out", str(out), "--fluency-cases", str(args.fluency_cases),
               "--model", args.model, *(["--device", args.device] if args.device else [])]
    if args.general:
        command += ["--general", args.general, "--general-limit", str(args.general_limit),
                    "--mmlu-limit", str(args.mmlu_limit)]
    limit = max(clock.left() - args.reserve_s - args.big_eval_s, 30)
    try:
        subprocess.run(command, check=True, timeout=limit)
        result = {}
    except subprocess.TimeoutExpired:
        result = {"stopped": f"after {limit:.0f} s, to leave time for the next stages"}
    saved = out.with_suffix(".json")
    rows = json.loads(saved.read_text())["rows"] if saved.is_file() else []
    if out.with_suffix(".png").is_file():
        (args.out / "scaling.png").write_bytes(out.with_suffix(".png").read_bytes())
    markdown_file = out.with_suffix(".md")
    return {**result, "rows": rows, "command": " ".join(command),
            "markdown": markdown_file.read_text().split("\n", 2)[-1]
            if markdown_file.is_file() else None}


def build_big(args, model, tok, facts, small_db: Path, rate: float, clock: Clock) -> dict:
    """Grow the small database to the most facts (up to --big) that the time left allows
    at the measured rate, keeping --big-eval-s for its evaluation."""
    have = len(NeuralDB(small_db))
    room = clock.left() - args.reserve_s - args.big_eval_s - args.overhead_s
    n = fitting(min(args.big, len(facts)), have, rate, room, max(args.small // 10, 1))
    if n <= have:
        return {"skipped": f"{room:.0f} s left for building: at {rate:.1f} edits/s, no "
                           f"more than the {have} facts built already"}
    db = NeuralDB.from_pretrained(small_db)
    return {**timed_build(small_db, model, tok, facts[:n], args.batch_size, args.precision,
                          True, db), "wanted": args.big}


def evaluate_big(args, model, tok, facts, db_path: Path, clock: Clock) -> dict:
    from ndb.eval.run import EvalSettings, measure

    db = NeuralDB.from_pretrained(db_path)
    stored = facts[: len(db)]  # as read, with their paraphrases and neighborhood prompts
    sample = random.Random(0).sample(stored, min(args.sample, len(stored)))
    settings = EvalSettings(fluency_cases=0, generation=False, chat=False)
    start = time.perf_counter()
    db.attach(model, tok)
    try:
        metrics = measure(model, tok, sample, settings)
    finally:
        db.detach()
    return {"n": len(stored), "sample": len(sample), "seconds": time.perf_counter() - start,
            "metrics": {k: v for k, v in metrics.items()
                        if k.split("/")[0] in ("efficacy", "generalization", "specificity")}}


def overhead(args, model, tok, residual_db: Path, work: Path, clock: Clock) -> dict:
    """Decode and prefill against the unedited model at each size that fits (ndb bench), on
    each index of --index (a size's keys are computed once, its database built per index)."""
    from ndb.eval.baselines.stats import read_texts
    from ndb.eval.bench import report, run, write_scale_keys
    from ndb.indexes import GpuUnavailableError

    layer = NeuralDB(residual_db).config.layer
    passages = read_texts([args.texts])[:40]
    rows: list[dict] = []
    skipped, unavailable = [], {}
    if not next(model.parameters()).is_cuda and "gpu-flat" in args.index:
        unavailable["gpu-flat"] = "the model is not on a CUDA device"
    for m in args.overhead_sizes:
        # each size costs about ten times the last (keys, databases, indexes): stop in time
        last = [r for r in rows if r["m"] == rows[-1]["m"]] if rows else []
        cost = sum(r["build_s"] for r in last) + (last[0]["keys_s"] if last else 0.0)
        if clock.left() < args.reserve_s + 12 * cost + 10:
            skipped.append(m)
            continue
        start = time.perf_counter()
        # a directory per size: a partly filled chunk of a smaller set would not grow
        keys_dir = work / f"bench-keys-{m}"
        write_scale_keys(model, tok, keys_dir, m + 1000, layer)
        keys_s = time.perf_counter() - start
        for kind in args.index:
            if kind in unavailable:
                continue
            try:
                rows += [{**row, "keys_s": keys_s} for row in run(
                    model, tok, keys_dir, residual_db, [m], work / f"bench-{kind}", passages,
                    [p[:200] for p in passages[:4]], kind, say=print)]
            except GpuUnavailableError as err:
                unavailable[kind] = str(err)
            report(rows, work / "bench_inference", "benchmarks/device_run.py")
    png = work / "bench_inference.png"
    if png.is_file():
        (args.out / "bench_inference.png").write_bytes(png.read_bytes())
    result = {"rows": rows}
    if skipped:
        result["not_measured"] = f"sizes {skipped}: no time left"
    if unavailable:
        result["indexes_unavailable"] = unavailable
    return result


def run_stage(report: Report, name: str, clock: Clock, needs_s: float,
              fn: Callable[[], dict]) -> dict | None:
    """``fn``'s result, recorded; None when it was skipped or failed. A failure is recorded
    with its traceback and ends only its stage: device minutes are too few to lose the rest
    of the run to one stage's error."""
    if clock.left() < needs_s:
        report.stage(name, {"skipped": f"{clock.left():.0f} s left, the stage needs about "
                                       f"{needs_s:.0f} s"})
        return None
    start = time.perf_counter()
    try:
        result = {**fn(), "stage_s": time.perf_counter() - start}
    except Exception as err:  # recorded, and the run goes on
        _free_cached()
        # what the stage saved on its way (the residuals' rows so far) is kept
        report.stage(name, {**report.stages.get(name, {}),
                            "failed": f"{type(err).__name__}: {err}".splitlines()[0],
                            "traceback": traceback.format_exc(),
                            "stage_s": time.perf_counter() - start})
        return None
    report.stage(name, result)
    return None if "skipped" in result else result


def group_facts_command(out: Path, n: int) -> list[str]:
    """``ndb data geo`` for the residuals stage: ``n`` facts, half of them in groups of 2-4
    about one subject, drawn with a seed no other result uses, none about a subject of the
    dev sets that chose the defaults (ndb/data/dev_counterfact.json, and the grouped one of
    benchmarks/results/sweep_method_groups.md)."""
    return ["ndb", "data", "geo", "-o", str(out), "--n", str(n), "--seed", "12",
            "--groups", "4", "--group-share", "0.5",
            "--exclude", "ndb/data/dev_counterfact.json",
            "--exclude", "benchmarks/results/sweep_method_groups_facts.json"]


def write_group_facts(out: Path, n: int) -> None:
    """Run ``group_facts_command`` (here, where the geo data packages are installed)."""
    subprocess.run([sys.executable, "-m", "ndb.cli", *group_facts_command(out, n)[1:]],
                   check=True, cwd=ROOT)


def dry_run_inputs(work: Path) -> tuple[str, Path, Path]:
    """A tiny random model (the tests' configuration), 60 real geo facts, and 16 in groups."""
    import transformers as tf

    from ndb.anchor import anchor_tokenizer
    from ndb.loading import resolve_model_path

    model_dir = work / "tiny-llama"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        config = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=49152, num_hidden_layers=4)
        tiny = tf.AutoModelForCausalLM.from_config(config)
        tiny.save_pretrained(model_dir)
        tok = anchor_tokenizer(tf.AutoTokenizer.from_pretrained(resolve_model_path(None)))
        tok.save_pretrained(model_dir)
    facts = work / "geo.json"
    if not facts.is_file():
        subprocess.run([sys.executable, "-m", "ndb.cli", "data", "geo", "-o", str(facts),
                        "--n", "60", "--seed", "0"], check=True)
    grouped = work / "geo_groups.json"
    if not grouped.is_file():
        write_group_facts(grouped, 16)
    return str(model_dir), facts, grouped


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--write-group-facts", type=Path, metavar="FILE",
                    help="only write the residuals stage's --compare-n facts to FILE (with the "
                         "geo data packages: benchmarks/device_cargo.sh does) and stop")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ndb-device-run"))
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny random model, 60 facts, small sizes: to test the script here")
    ap.add_argument("--facts", type=Path, help="geo facts (ndb data geo), at least --big")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else None)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for the whole run (default 540; 1800 with --dry-run, "
                         "whose shared CPU is slow: the stages, not the budget, are checked)")
    ap.add_argument("--reserve-s", type=float, default=20.0, help="kept for writing results")
    ap.add_argument("--batch-sizes", default="auto,128",
                    help="of the build-speed points, in order while --speed-s lasts; auto: as "
                         "'ndb build --batch-size auto' (first: the size the builds would use)")
    ap.add_argument("--speed-n", type=int, default=512, help="facts per build-speed point")
    ap.add_argument("--speed-s", type=float, default=100.0, help="for the build-speed points")
    ap.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                    help="of the builds' residual optimization")
    ap.add_argument("--group-facts", type=Path, default=None,
                    help="geo facts with groups for the residuals stage (group_facts_command)")
    ap.add_argument("--compare-n", type=int, default=2000,
                    help="facts of the residuals stage (ndb's against the paper's)")
    ap.add_argument("--eval-batch-size", type=int, default=256,
                    help="prompts scored or generated together in the residuals stage")
    ap.add_argument("--eval-small-s", type=float, default=150.0)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--big", type=int, default=100_000)
    ap.add_argument("--sample", type=int, default=2000, help="facts evaluated at --big")
    ap.add_argument("--big-eval-s", type=float, default=60.0)
    ap.add_argument("--overhead-s", type=float, default=60.0)
    ap.add_argument("--overhead-sizes", default="10000,100000,1000000")
    ap.add_argument("--index", default="torch,gpu-flat",
                    help="key indexes of the overhead databases, comma-separated")
    ap.add_argument("--methods", default="neuraldb,memit,alphaedit")
    ap.add_argument("--general", default=None, help="general-ability data directory")
    ap.add_argument("--general-limit", type=int, default=50)
    ap.add_argument("--mmlu-limit", type=int, default=2)
    ap.add_argument("--fluency-cases", type=int, default=20)
    ap.add_argument("--texts", default=None, help="generic text (JSONL) for the overhead "
                                                  "queries; default: lambada in --general")
    args = ap.parse_args()
    if args.write_group_facts:
        write_group_facts(args.write_group_facts, args.compare_n)
        sys.exit(0)
    if args.out is None:
        ap.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        args.model, args.facts, args.group_facts = dry_run_inputs(args.work)
        args.batch_sizes, args.speed_n, args.small, args.big = "auto,4", 8, 20, 40
        args.compare_n, args.eval_batch_size = 16, 8
        args.budget_s = args.budget_s or 1800.0
        args.sample, args.overhead_sizes, args.general_limit, args.mmlu_limit = 10, "100,1000", 2, 1
        args.fluency_cases, args.big_eval_s, args.overhead_s = 2, 20.0, 20.0
        args.eval_small_s, args.speed_s = 60.0, 30.0
    args.budget_s = args.budget_s or 540.0
    args.batch_sizes = [x if x == "auto" else int(x) for x in str(args.batch_sizes).split(",")]
    args.group_facts_made_by = " ".join(group_facts_command(Path("FILE"), args.compare_n))
    args.overhead_sizes = [int(x) for x in str(args.overhead_sizes).split(",")]
    args.index = [x for x in str(args.index).split(",") if x]
    args.texts = args.texts or (str(Path(args.general) / "lambada_test.jsonl")
                                if args.general else None)
    if args.facts is None:
        ap.error("--facts is required (geo facts from 'ndb data geo'), unless --dry-run")
    return args


def main() -> None:
    args = parse_args()
    clock = Clock(args.budget_s)
    model, tok = load_model(args.model, device=args.device)
    facts = read_facts(str(args.facts))[: args.big]
    report = Report(args.out, {"dry_run": args.dry_run, "machine": machine(args.device or "cpu"),
                               "model": args.model, "facts": str(args.facts),
                               "budget_s": args.budget_s, "argv": sys.argv[1:]})
    report.stage("setup", {"facts": len(facts), "seconds_so_far": clock.elapsed()})
    speed = run_stage(report, "build_speed", clock, 60, lambda: build_speed(
        args, model, tok, facts, args.work, clock))
    # without a measured size, a fixed one: the auto probe may be what failed
    args.batch_size = speed["best_batch_size"] if speed else ComputeConfig.batch_size
    rate = speed["best_edits_per_s"] if speed else 1.0
    # issue 9's comparison first: it takes the time it needs, the later stages what is left
    if args.group_facts:
        run_stage(report, "residuals", clock, 60, lambda: compare_residuals(
            args, model, tok, rate, clock, lambda partial: report.stage("residuals", partial)))
    else:
        report.stage("residuals", {"skipped": "no --group-facts"})
    # at today's speed 10k edits do not fit: then the most that leave time for the rest
    room = clock.left() - args.reserve_s - args.eval_small_s - args.big_eval_s - args.overhead_s
    small = fitting(args.small, 0, rate, room, max(args.small // 100, 1))
    small_db = args.work / "geo-small.ndb"
    built = None
    if small > 0:
        built = run_stage(report, "build_small", clock, args.reserve_s,
                          lambda: {**timed_build(small_db, model, tok, facts[:small],
                                                 args.batch_size, args.precision, True),
                                   "wanted": args.small})
    else:
        report.stage("build_small", {"skipped": f"{room:.0f} s left for it once the stages "
                                                f"after it have theirs: at {rate:.1f} edits/s "
                                                f"no facts fit"})
    if not built:
        for name in ("eval_small", "build_big", "eval_big", "overhead"):
            report.stage(name, {"skipped": "no database was built by build_small"})
    else:
        run_stage(report, "eval_small", clock, 60, lambda: evaluate_small(
            args, args.facts, small_db, small, clock, args.work))
        grown = run_stage(report, "build_big", clock, args.big_eval_s, lambda: build_big(
            args, model, tok, facts, small_db, built["edits_per_s"], clock))
        if grown:
            run_stage(report, "eval_big", clock, args.big_eval_s / 2, lambda: evaluate_big(
                args, model, tok, facts, small_db, clock))
        if args.texts:
            run_stage(report, "overhead", clock, args.overhead_s / 2, lambda: overhead(
                args, model, tok, small_db, args.work, clock))
        else:
            report.stage("overhead", {"skipped": "no --texts or --general for the queries"})
    report.stage("done", {"seconds": clock.elapsed()})


if __name__ == "__main__":
    main()
