"""The research commands of ``ndb`` (tune, eval, bench): loaded only when one of them runs,
so that the library's commands never import the evaluation code (ndb.eval)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ndb.cli.main import DEVICE, _load, user_errors
from ndb.errors import ConfigError
from ndb.eval.legend import GENERATIVE, TEACHER_FORCED
from ndb.output import dumps_strict, write_strict_json
from ndb.record_formats import read_facts
from ndb.store import check_creatable, check_writable


def _numbers(text: str, kind: type) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of {kind.__name__}s")
    return values


@click.command()
@click.argument("devset")
@click.option("--model", "model_name", default=None, help="Embedded model name or local HF dir.")
@click.option("--layers", default=None,
              help="Comma-separated layers to try (default: every other one up to half depth).")
@click.option("--gammas", default="0.6,0.65,0.7,0.75,0.8", show_default=True,
              help="Comma-separated gate thresholds to try at each layer.")
@click.option("--text", "text_files", multiple=True,
              help="Generic text (.txt or JSONL) for the false-trigger rate; default: text "
                   "the model writes itself.")
@click.option("--n-text", type=click.IntRange(1), default=100, show_default=True)
@click.option("--max-trigger", type=click.FloatRange(0, 1), default=0.001, show_default=True,
              help="Largest acceptable fraction of generic tokens passing the gate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None)
@user_errors
def tune(devset, model_name, layers, gammas, text_files, n_text, max_trigger, seed, device):
    """Choose the layer and gamma for a model on DEVSET (CounterFact-schema facts with
    paraphrases and neighborhood prompts); later builds with this model use them."""
    from ndb.eval.baselines.stats import read_texts
    from ndb.eval.tune import check_dev_facts, model_texts, save_tuned
    from ndb.eval.tune import tune as run_tune
    from ndb.models import num_layers

    facts = read_facts(devset)
    check_dev_facts(facts)
    model, tokenizer = _load(model_name, device)
    depth = num_layers(model)
    tried = _numbers(layers, int) if layers else list(range(1, depth // 2 + 1, 2))
    texts = (read_texts(text_files)[:n_text] if text_files
             else model_texts(model, tokenizer, n_text, seed))
    result = run_tune(model, tokenizer, facts, tried, _numbers(gammas, float), texts,
                      seed=seed, max_trigger=max_trigger, say=lambda m: click.echo(m, err=True))
    path = save_tuned(model, result)
    best = result["best"]
    trigger = "-" if best["trigger_rate"] is None else f"{best['trigger_rate']:.4f}"
    click.echo(f"layer {best['layer']}, gamma {best['gamma']}: score {best['score']:.3f} "
               f"(efficacy {best['efficacy']:.3f}, paraphrase {best['generalization']:.3f}, "
               f"neighborhood {best['specificity']:.3f}, generic trigger rate {trigger}) on "
               f"{result['n_dev']} known dev facts; saved to {path}")


def _eval_legend() -> str:
    lines = [f"{k}: {v}" for k, v in {**TEACHER_FORCED, **GENERATIVE}.items()]
    # \b keeps click from rewrapping the lines into one paragraph
    return "\b\nMetrics (percent; teacher-forced first, then greedy generation):\n" + \
        "\n".join(lines) + "\nGenerative metrics count an object when the text names it " \
        "as a whole word (case, accents and spacing aside); a greedy text ends at the end " \
        "of sequence, its token limit, or as soon as it names every object it is judged on " \
        "followed by a non-word character (no metric can change after that). The " \
        "pre-edited row is the base rate, and decides which facts are known for chat_known."


@click.command(name="eval", epilog=_eval_legend())
@click.argument("facts")
@click.option("--db", "db_path", default=None,
              help="NeuralDB to evaluate; built (or finished, if interrupted) from FACTS.")
@click.option("--n", "limit", type=click.IntRange(1), default=None, help="Use the first N facts.")
@click.option("--methods", default="neuraldb", show_default=True,
              help="Comma-separated: neuraldb (ndb's defaults), neuraldb-paper (the paper's "
                   "per-fact residuals, in DB-paper beside --db), memit (5 layers), memit-1 "
                   "(one layer), alphaedit.")
@click.option("--stats-text", multiple=True,
              help="Generic text (.txt or JSONL) for MEMIT/AlphaEdit's C0 statistics; "
                   "default: lambada_test.jsonl in the --general directory.")
@click.option("--stats-positions", type=click.IntRange(1000), default=100_000,
              show_default=True, help="Token positions sampled for C0.")
@click.option("--memit-lambda", type=click.FloatRange(0, min_open=True), default=None,
              help="MEMIT's lambda (default: tuned for the default model, else 15000).")
@click.option("--alphaedit-threshold", type=click.FloatRange(0, min_open=True), default=None,
              help="AlphaEdit's null-space eigenvalue threshold (default: tuned, else 0.02).")
@click.option("--general", "general_dir", default=None,
              help="Directory of general-ability data (e.g. ../shared/data/general).")
@click.option("--general-tasks", default=None, help="Comma-separated task names.")
@click.option("--general-limit", type=click.IntRange(1), default=None,
              help="Documents per task (quick runs).")
@click.option("--mmlu-limit", type=click.IntRange(1), default=None,
              help="Questions per MMLU subject (default: --general-limit).")
@click.option("--fluency-cases", type=click.IntRange(0), default=100, show_default=True)
@click.option("--no-generation", is_flag=True,
              help="Skip the greedy continuations (gen_*, groups, cross-talk, spill-over).")
@click.option("--no-chat", is_flag=True, help="Skip the chat questions.")
@click.option("--gen-neighbors", type=click.IntRange(0), default=2, show_default=True,
              help="Neighborhood and spill-over prompts generated per fact.")
@click.option("--consistency-dir", default=None,
              help="Directory with ROME's attribute_snippets.json, idf.npy, tfidf_vocab.json.")
@click.option("--json", "json_out", default=None, help="Write all results to this JSON file.")
@click.option("--no-cache", is_flag=True,
              help="Measure the unedited model again, not read from $NDB_HOME/eval-cache (kept "
                   "by the hash of the weights, facts, settings and metric code).")
@click.option("--model", "model_name", default=None)
@click.option("--device", type=DEVICE, default=None)
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="prompts run at once, scored and generated alike (default: 32 scored, "
                   "64 generated greedily, 32 sampled for fluency)")
@user_errors
def evaluate(facts, db_path, limit, methods, stats_text, stats_positions, memit_lambda,
             alphaedit_threshold, general_dir, general_tasks, general_limit, mmlu_limit,
             fluency_cases, no_generation, no_chat, gen_neighbors, consistency_dir, json_out,
             no_cache, model_name, device, batch_size):
    """Edit the facts in FACTS (CounterFact or ZsRE schema) and report the paper's metrics."""
    import tempfile
    import time

    from ndb.config import ComputeConfig
    from ndb.database import NeuralDB
    from ndb.eval.methods import METHODS, make_methods
    from ndb.eval.run import EvalSettings, evaluate, markdown_table, noted_rows, schema_of
    from ndb.models import ndb_home
    from ndb.store import is_database

    records = read_facts(facts)[:limit]
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        raise click.ClickException(f"unknown method(s): {', '.join(unknown)} "
                                   f"(known: {', '.join(METHODS)})")
    lambada = Path(general_dir or "") / "lambada_test.jsonl"
    stats_text = list(stats_text) or ([lambada] if general_dir and lambada.is_file() else [])
    _check_eval_inputs(records, chosen, stats_text, general_dir, json_out)
    sizes = {} if batch_size is None else {"batch_size": batch_size, "gen_batch_size": batch_size,
                                           "fluency_batch_size": batch_size}
    settings = EvalSettings(
        **sizes, fluency_cases=fluency_cases, general_dir=general_dir,
        general_tasks=general_tasks.split(",") if general_tasks else None,
        general_limit=general_limit, mmlu_limit=mmlu_limit,
        generation=not no_generation, chat=not no_chat, gen_prompts=gen_neighbors,
        consistency=_consistency_reference(consistency_dir) if consistency_dir else None)
    tmp = tempfile.TemporaryDirectory() if db_path is None else None
    path = Path(db_path) if db_path else Path(tmp.name) / "eval.ndb"
    paths = {"neuraldb": path, "neuraldb-paper": path.with_name(path.name + "-paper")}
    wanted = ["neuraldb"] + (["neuraldb-paper"] if "neuraldb-paper" in chosen else [])
    # the databases are opened (or their places checked) before minutes of model loading
    existing = {m: NeuralDB.from_pretrained(paths[m]) for m in wanted
                if is_database(paths[m])}
    for method in wanted:
        if method not in existing:
            check_creatable(paths[method])
    model, tokenizer = _load(model_name, device)
    dbs, build_s, added = {}, 0.0, 0
    for method in wanted:
        compute = ComputeConfig.paper() if method == "neuraldb-paper" else None
        dbs[method] = existing.get(method) or NeuralDB.create(paths[method], model, tokenizer,
                                                              compute=compute)
        start = time.perf_counter()
        added += len(dbs[method].add(records, model, tokenizer, skip_existing=True,
                                     progress=True, commit_each_batch=True))
        build_s += time.perf_counter() - start
        dbs[method].flush()
    db = dbs["neuraldb"]

    def say(message: str) -> None:
        click.echo(message, err=True)

    say(f"build: {build_s:.1f} s ({added} edits computed)")

    hyper = {k: v for k, v in (("mom2_weight", memit_lambda),
                               ("null_threshold", alphaedit_threshold)) if v is not None}
    contexts = make_methods(chosen, model, tokenizer, records, db, stats_text, stats_positions,
                            say, hyper, paper_db=dbs.get("neuraldb-paper"))
    rows = evaluate(model, tokenizer, records, contexts, settings, say,
                    cache=None if no_cache else ndb_home() / "eval-cache")
    click.echo(f"{len(records)} facts ({schema_of(records)} schema); NeuralDB layer "
               f"{db.config.layer}, gamma {db.config.gamma}; {added} edits computed in "
               f"{build_s:.0f} s\n")
    click.echo(markdown_table(rows))
    if json_out:
        report = {"facts": facts, "n": len(records), "schema": schema_of(records),
                  "methods": chosen, "stats_text": [str(p) for p in stats_text],
                  "db": str(path) if db_path else None, "layer": db.config.layer,
                  "gamma": db.config.gamma, "edits_computed": added,
                  "build_seconds": build_s, "seconds": settings.timings,
                  "rows": noted_rows(rows, schema_of(records))}
        write_strict_json(json_out, report, indent=2)
    for opened in dbs.values():
        opened.close()
    if tmp is not None:
        tmp.cleanup()


def _check_eval_inputs(records, methods: list[str], stats_text: list, general_dir: str | None,
                       json_out: str | None) -> None:
    """What would otherwise fail after the edits are computed, refused before."""
    from ndb.eval.run import schema_of

    if schema_of(records) == "counterfact":
        missing = next((i for i, f in enumerate(records) if not f.target_true), None)
        if missing is not None:
            raise ConfigError(f"fact {missing + 1} has no target_true, which CounterFact "
                              "metrics compare the new object with")
    if any(m not in ("neuraldb", "neuraldb-paper") for m in methods) and not stats_text:
        raise ConfigError("MEMIT and AlphaEdit need generic text for their C0 statistics: "
                          "pass --stats-text FILE (e.g. lambada_test.jsonl) or --general DIR")
    for text in stats_text:
        if not Path(text).is_file():
            raise ConfigError(f"--stats-text {text}: no such file")
    if general_dir and not Path(general_dir).is_dir():
        raise ConfigError(f"--general {general_dir}: no such directory")
    if json_out:
        check_writable(json_out)


def _consistency_reference(directory: str):
    from ndb.eval.generation import TfidfReference

    try:
        return TfidfReference.load(directory)
    except (OSError, ValueError) as err:  # the files are missing, unreadable or not ROME's
        raise ConfigError(f"--consistency-dir {directory}: {err}") from None


@click.group()
def bench() -> None:
    """Speed and scale benchmarks (see ndb/eval/bench.py)."""


@bench.command("keys")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Directory for the keys (resumable).")
@click.option("--n", type=click.IntRange(1), default=1_000_000, show_default=True)
@user_errors
def bench_keys(out, n):
    """Real keys of up to N real facts (cities in relation prompts), for 'ndb bench run'."""
    from ndb.compute import context_prefixes
    from ndb.eval.bench import key_fidelity, write_scale_keys
    from ndb.models import default_edit_settings

    model, tok = _load(None, None)
    layer, _ = default_edit_settings(model)
    facts = write_scale_keys(model, tok, out, n, layer)
    sample = facts[:: max(1, len(facts) // 200)][:200]
    report = {"n": len(facts), "layer": layer,
              **key_fidelity(model, tok, sample, layer, context_prefixes(model, tok, 5, 10, 0))}
    write_strict_json(out / "report.json", report, indent=2)
    click.echo(dumps_strict(report))


@bench.command("run")
@click.option("--keys", "keys_dir", required=True, type=click.Path(path_type=Path),
              help="Directory written by 'ndb bench keys'.")
@click.option("--residuals", "residual_db", required=True, type=click.Path(path_type=Path),
              help="A database of real edits whose residuals the benchmark databases reuse.")
@click.option("--sizes", default="1000,10000,100000,1000000", show_default=True)
@click.option("--texts", required=True, type=click.Path(path_type=Path),
              help="JSONL of generic text ({'text': ...}) for real token queries.")
@click.option("--n-texts", type=click.IntRange(1), default=40, show_default=True)
@click.option("--index", "index_kind", default="auto", show_default=True)
@click.option("--work", type=click.Path(path_type=Path), default=Path("bench-work"),
              show_default=True, help="Where the benchmark databases are built (reused).")
@click.option("--new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench_inference"),
              show_default=True, help="Writes OUT.json, OUT.md and OUT.png.")
@user_errors
def bench_run(keys_dir, residual_db, sizes, texts, n_texts, index_kind, work, new_tokens,
              repeats, out):
    """Decode/prefill overhead, memory, add/remove latency and gate agreement vs size."""
    from ndb.eval.baselines.stats import read_texts
    from ndb.eval.bench import report, run

    # sizes already in OUT.json (same command) are kept: a long run resumes after a stop
    command = " ".join(["ndb bench run", *sys.argv[3:]])
    saved = Path(out).with_suffix(".json")
    rows = json.loads(saved.read_text())["rows"] if saved.is_file() else []
    todo = [m for m in (int(s) for s in sizes.split(",")) if m not in {r["m"] for r in rows}]
    model, tok = _load(None, None)
    passages = read_texts([texts])[:n_texts]
    prompts = [p[:200] for p in passages[:4]]

    def keep(row: dict) -> None:
        rows.append(row)
        report(sorted(rows, key=lambda r: r["m"]), out, command)

    if todo:
        run(model, tok, keys_dir, residual_db, todo, work, passages, prompts, index_kind,
            new_tokens, repeats, say=click.echo, on_row=keep)
    click.echo(Path(out).with_suffix(".md").read_text())
