"""One lent accelerator session, prepared: build speed against batch size, 10k real geo edits
built and evaluated (NeuralDB, MEMIT, AlphaEdit), the largest build up to 100k that the time
left allows (efficacy and generalization on a random sample of it), and the hook's decode and
prefill overhead at growing numbers of keys; everything under --out (JSON, Markdown, plots),
rewritten after every stage, so a run stopped at its limit keeps what it measured.

Each stage first checks the time left (--budget-s, from the start of this script) and is
skipped, or sized down, when it would not fit; the JSON says which and why.

    bash benchmarks/device_run.sh                 # on the device machine (see that file)
    python benchmarks/device_run.py --dry-run     # here: tiny model, a few facts, the CPU

The dry run goes through every stage with a tiny random model and a few dozen facts, so that
device minutes are not spent on set-up errors; its numbers mean nothing and are labelled so.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ndb import ComputeConfig, NeuralDB, load_model, read_facts
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
        lines += [f"| {r['batch_size']} | {r['precision']} | {r['n']} | {r['seconds']:.1f} | "
                  f"{r['edits_per_s']:.1f} |" for r in speed["rows"]]
        lines.append("")
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
    skipped = {k: v["skipped"] for k, v in stages.items() if "skipped" in v}
    if skipped:
        lines += ["## Not measured in this run", ""]
        lines += [f"- {k}: {why}" for k, why in skipped.items()]
    return "\n".join(lines) + "\n"


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, torch {torch.__version__}"


def timed_build(path: Path, model, tok, facts: list, batch_size: int, precision: str,
                commit_each_batch: bool = False, db: NeuralDB | None = None) -> dict:
    """Add ``facts`` to a new database at ``path`` (or to ``db``); the seconds of the add
    alone (creating a database samples its prefixes once, whatever its size)."""
    db = db or NeuralDB.create(path, model, tok, compute=ComputeConfig(precision=precision))
    db.config.compute.batch_size = batch_size
    _sync(model)
    start = time.perf_counter()
    added = len(db.add(facts, model, tok, skip_existing=True,
                       commit_each_batch=commit_each_batch))
    _sync(model)
    seconds = time.perf_counter() - start
    return {"n": len(db), "added": added, "batch_size": batch_size,
            "precision": db.config.compute.precision, "seconds": seconds,
            "edits_per_s": added / seconds}


def _sync(model) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def build_speed(args, model, tok, facts, work: Path, clock: Clock) -> dict:
    """Edits/s at each batch size in --precision, then the best size in the other precision
    (for the record: the builds use --precision), while --speed-s lasts."""
    start = time.monotonic()
    other = "bfloat16" if args.precision == "float32" else "float32"
    points = [(size, args.precision) for size in args.batch_sizes] + [(None, other)]
    rows: list[dict] = []
    for size, precision in points:
        if rows and time.monotonic() - start + rows[-1]["seconds"] > args.speed_s:
            break
        size = size or max((r for r in rows if r["precision"] == args.precision),
                           key=lambda r: r["edits_per_s"])["batch_size"]
        rows.append(timed_build(work / f"speed-{size}-{precision}.ndb", model, tok,
                                facts[: args.speed_n], size, precision))
    best = max((r for r in rows if r["precision"] == args.precision),
               key=lambda r: r["edits_per_s"])
    return {"rows": rows, "best_batch_size": best["batch_size"],
            "best_edits_per_s": best["edits_per_s"]}


def fitting(wanted: int, have: int, rate: float, seconds: float, step: int) -> int:
    """The most facts, up to ``wanted``, that ``have`` grows to in ``seconds`` at ``rate``
    (with a margin), in multiples of ``step``."""
    return min(wanted, have + int(rate * seconds * 0.8) // step * step)


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
    if clock.left() < needs_s:
        report.stage(name, {"skipped": f"{clock.left():.0f} s left, the stage needs about "
                                       f"{needs_s:.0f} s"})
        return None
    start = time.perf_counter()
    result = {**fn(), "stage_s": time.perf_counter() - start}
    report.stage(name, result)
    return result


def dry_run_inputs(work: Path) -> tuple[str, Path]:
    """A tiny random model (the tests' configuration) and 60 real geo facts."""
    import transformers as tf

    from ndb.anchor import anchor_tokenizer
    from ndb.models import resolve_model_path

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
    return str(model_dir), facts


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ndb-device-run"))
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny random model, 60 facts, small sizes: to test the script here")
    ap.add_argument("--facts", type=Path, help="geo facts (ndb data geo), at least --big")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else None)
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--reserve-s", type=float, default=20.0, help="kept for writing results")
    ap.add_argument("--batch-sizes", default="128,512")
    ap.add_argument("--speed-n", type=int, default=512, help="facts per build-speed point")
    ap.add_argument("--speed-s", type=float, default=100.0, help="for the build-speed points")
    ap.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                    help="of the builds' residual optimization")
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
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        args.model, args.facts = dry_run_inputs(args.work)
        args.batch_sizes, args.speed_n, args.small, args.big = "4,8", 8, 20, 40
        args.sample, args.overhead_sizes, args.general_limit, args.mmlu_limit = 10, "100,1000", 2, 1
        args.fluency_cases, args.big_eval_s, args.overhead_s = 2, 20.0, 20.0
        args.eval_small_s, args.speed_s = 60.0, 30.0
    args.batch_sizes = [int(x) for x in str(args.batch_sizes).split(",")]
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
    args.batch_size = speed["best_batch_size"] if speed else args.batch_sizes[0]
    rate = speed["best_edits_per_s"] if speed else 1.0
    # at today's speed 10k edits do not fit: then the most that leave time for the rest
    room = clock.left() - args.reserve_s - args.eval_small_s - args.big_eval_s - args.overhead_s
    small = fitting(args.small, 0, rate, room, max(args.small // 100, 1))
    small_db = args.work / "geo-small.ndb"
    built = run_stage(report, "build_small", clock, args.reserve_s if small > 0 else 1e9,
                      lambda: {**timed_build(small_db, model, tok, facts[:small],
                                             args.batch_size, args.precision, True),
                               "wanted": args.small})
    if built:
        run_stage(report, "eval_small", clock, 60, lambda: evaluate_small(
            args, args.facts, small_db, small, clock, args.work))
        grown = run_stage(report, "build_big", clock, args.big_eval_s, lambda: build_big(
            args, model, tok, facts, small_db, built["edits_per_s"], clock))
        if grown and "skipped" not in grown:
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
