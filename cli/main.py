"""The ``ndb`` command: thin click commands over the library."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path

import click

from ndb.errors import USER_ERRORS as NDB_ERRORS
from ndb.eval.legend import GENERATIVE, TEACHER_FORCED
from ndb.facts import read_facts

# ValueError and OSError too: bad option values and unreadable paths are the user's errors
USER_ERRORS: tuple[type[BaseException], ...] = (*NDB_ERRORS, ValueError, OSError)


def user_errors(fn: Callable) -> Callable:
    """Turn expected failures into one line on stderr and a non-zero exit, no traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            click.echo("ndb: interrupted; the database keeps what was committed before", err=True)
            sys.exit(130)
        except USER_ERRORS as err:
            message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
            raise click.ClickException(message) from None

    return wrapper


def _load(name: str | None, device: str | None):
    from transformers.utils import logging

    from ndb.models import load_model

    logging.disable_progress_bar()  # ndb's own bars are the ones worth watching

    return load_model(name, device=device)


def _open(db_path: str, model_override: str | None = None, device: str | None = None,
          need_model: bool = True):
    from ndb.database import NeuralDB

    db = NeuralDB.from_pretrained(db_path)
    if not need_model:
        return db, None, None
    model, tokenizer = _load(model_override or db.config.model_name, device)
    return db, model, tokenizer


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ndb")
def cli() -> None:
    """ndb: edit what a language model knows with a gated fact database (NeuralDB)."""


@cli.command()
@click.argument("facts")
@click.option("-o", "--output", "db_path", required=True, help="Database directory to create.")
@click.option("--model", "model_name", default=None, help="Embedded model name or local HF dir.")
@click.option("--layer", type=int, default=None, help="Edited layer (default: swept per model).")
@click.option("--gamma", type=float, default=None, help="Gate threshold on cosine similarity.")
@click.option("--device", default=None, help="torch device, e.g. cpu or cuda.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Facts optimized together (and committed together).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--index", "index_kind", default="auto", show_default=True,
              help="Key index backend.")
@click.option("--precision", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True, help="Of the residual optimization (bfloat16: faster).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted build: keep the database, skip facts it holds.")
@user_errors
def build(facts, db_path, model_name, layer, gamma, device, batch_size, seed, index_kind,
          precision, resume):
    """Build a fact database DB from a FACTS file (JSONL/JSON; '-' for stdin)."""
    from ndb.compute import ComputeConfig
    from ndb.database import NeuralDB

    records = read_facts(facts)
    path = Path(db_path)
    if path.exists() and not resume:
        raise click.ClickException(
            f"{path} already exists; use --resume to finish an interrupted build, "
            f"or 'ndb add {path} FACTS' to add facts")
    if resume and (path / "config.json").is_file():
        db, model, tokenizer = _open(db_path, model_name, device)
    else:
        model, tokenizer = _load(model_name, device)
        compute = ComputeConfig(precision=precision)
        if batch_size:
            compute.batch_size = batch_size
        db = NeuralDB.create(path, model, tokenizer, layer=layer, gamma=gamma, seed=seed,
                             compute=compute, index=index_kind)
    if batch_size:
        db.config.compute.batch_size = batch_size
    ids = db.add(records, model, tokenizer, skip_existing=resume, progress=True)
    db.flush()
    click.echo(f"{path}: {len(db)} facts ({len(ids)} added), layer {db.config.layer}, "
               f"gamma {db.config.gamma}")


@cli.command()
@click.argument("db_path", metavar="DB")
@click.argument("facts")
@click.option("--model", "model_name", default=None, help="Override the model to load.")
@click.option("--device", default=None)
@click.option("--batch-size", type=click.IntRange(1), default=None)
@user_errors
def add(db_path, facts, model_name, device, batch_size):
    """Add the facts in FACTS to the database DB."""
    records = read_facts(facts)
    db, model, tokenizer = _open(db_path, model_name, device)
    if batch_size:
        db.config.compute.batch_size = batch_size
    ids = db.add(records, model, tokenizer, progress=True)
    db.flush()
    click.echo(f"added {len(ids)} facts (ids {_ranges(ids)}); {len(db)} in total")


@cli.command()
@click.argument("db_path", metavar="DB")
@click.argument("ids", nargs=-1, type=int)
@click.option("--subject", "subjects", multiple=True, help="Remove every fact about SUBJECT.")
@user_errors
def remove(db_path, ids, subjects):
    """Remove facts by id (see 'ndb list') and/or by subject."""
    if not ids and not subjects:
        raise click.UsageError("give fact ids and/or --subject")
    db, _, _ = _open(db_path, need_model=False)
    targets = set(ids)
    for subject in subjects:
        found = db.find(subject)
        if not found:
            raise click.ClickException(f"no fact about subject {subject!r} in {db_path}; "
                                       "nothing was removed")
        targets.update(found)
    db.remove(sorted(targets))
    db.flush()
    click.echo(f"removed {len(targets)} facts (ids {_ranges(sorted(targets))}); "
               f"{len(db)} remain")


@cli.command(name="list")
@click.argument("db_path", metavar="DB")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@user_errors
def list_facts(db_path, as_json):
    """List the facts in DB."""
    db, _, _ = _open(db_path, need_model=False)
    for fact_id, fact in sorted(db.facts().items()):
        if as_json:
            click.echo(json.dumps({"id": fact_id, **fact.to_json()}, ensure_ascii=False))
        else:
            old = f" (was: {fact.target_true})" if fact.target_true else ""
            click.echo(f"{fact_id:>6}  {fact.text} -> {fact.target_new}{old}")


@cli.command()
@click.argument("db_path", metavar="DB")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def info(db_path, as_json):
    """Show a database's configuration and size."""
    db, _, _ = _open(db_path, need_model=False)
    size = sum(p.stat().st_size for p in Path(db_path).rglob("*") if p.is_file())
    cfg = db.config
    report = {
        "path": str(db.path), "facts": len(db), "model": cfg.model_name,
        "model_type": cfg.model_type, "fingerprint": cfg.fingerprint, "layer": cfg.layer,
        "module": cfg.module, "gamma": cfg.gamma, "d_key": cfg.d_key, "d_value": cfg.d_value,
        "key_dtype": cfg.key_dtype, "residual_dtype": cfg.residual_dtype,
        "index": cfg.index, "segments": len(db.store.manifest.segments),
        "version": db.store.manifest.version, "disk_bytes": size,
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            click.echo(f"{key:>14}: {value}")


@cli.command()
@click.argument("db_path", metavar="DB")
@click.argument("prompt")
@click.option("--max-new-tokens", type=click.IntRange(1), default=20, show_default=True)
@click.option("--compare", is_flag=True, help="Also show the unedited model's answer.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--model", "model_name", default=None)
@click.option("--device", default=None)
@user_errors
def generate(db_path, prompt, max_new_tokens, compare, chat, as_json, model_name, device):
    """Complete PROMPT with the database attached (greedy decoding)."""
    from ndb.generation import complete

    db, model, tokenizer = _open(db_path, model_name, device)
    db.attach(model, tokenizer)
    result = {"prompt": prompt, "edited": complete(model, tokenizer, prompt, max_new_tokens, chat)}
    result["gate_hits"] = db.retrieval.stats.hits
    if compare:
        with db.disabled():
            result["unedited"] = complete(model, tokenizer, prompt, max_new_tokens, chat)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
    else:
        click.echo(f"edited:   {prompt}{result['edited']}")
        if compare:
            click.echo(f"unedited: {prompt}{result['unedited']}")


def _eval_legend() -> str:
    lines = [f"{k}: {v}" for k, v in {**TEACHER_FORCED, **GENERATIVE}.items()]
    # \b keeps click from rewrapping the lines into one paragraph
    return "\b\nMetrics (percent; teacher-forced first, then greedy generation):\n" + \
        "\n".join(lines) + "\nGenerative metrics count an object when the text names it " \
        "as a whole word (case, accents and spacing aside). The pre-edited row is the base " \
        "rate, and decides which facts are known for chat_known."


@cli.command(name="eval", epilog=_eval_legend())
@click.argument("facts")
@click.option("--db", "db_path", default=None,
              help="NeuralDB to evaluate; built (or finished, if interrupted) from FACTS.")
@click.option("--n", "limit", type=click.IntRange(1), default=None, help="Use the first N facts.")
@click.option("--methods", default="neuraldb", show_default=True,
              help="Comma-separated: neuraldb, memit (5 layers), memit-1 (one layer), "
                   "alphaedit.")
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
@click.option("--model", "model_name", default=None)
@click.option("--device", default=None)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@user_errors
def evaluate(facts, db_path, limit, methods, stats_text, stats_positions, memit_lambda,
             alphaedit_threshold, general_dir, general_tasks, general_limit, mmlu_limit,
             fluency_cases, no_generation, no_chat, gen_neighbors, consistency_dir, json_out,
             model_name, device, batch_size):
    """Edit the facts in FACTS (CounterFact or ZsRE schema) and report the paper's metrics."""
    import tempfile
    import time

    from ndb.database import NeuralDB
    from ndb.eval.generation import TfidfReference
    from ndb.eval.methods import METHODS, make_methods
    from ndb.eval.run import EvalSettings, evaluate, markdown_table, schema_of

    records = read_facts(facts)[:limit]
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        raise click.ClickException(f"unknown method(s): {', '.join(unknown)} "
                                   f"(known: {', '.join(METHODS)})")
    lambada = Path(general_dir or "") / "lambada_test.jsonl"
    stats_text = list(stats_text) or ([lambada] if general_dir and lambada.is_file() else [])
    settings = EvalSettings(
        batch_size=batch_size, fluency_cases=fluency_cases, general_dir=general_dir,
        general_tasks=general_tasks.split(",") if general_tasks else None,
        general_limit=general_limit, mmlu_limit=mmlu_limit,
        generation=not no_generation, chat=not no_chat, gen_prompts=gen_neighbors,
        consistency=TfidfReference.load(consistency_dir) if consistency_dir else None)
    model, tokenizer = _load(model_name, device)
    tmp = tempfile.TemporaryDirectory() if db_path is None else None
    path = Path(db_path) if db_path else Path(tmp.name) / "eval.ndb"
    if (path / "config.json").is_file():
        db = NeuralDB.from_pretrained(path)
    else:
        db = NeuralDB.create(path, model, tokenizer)
    start = time.perf_counter()
    added = db.add(records, model, tokenizer, skip_existing=True, progress=True)
    build_s = time.perf_counter() - start
    db.flush()

    def say(message: str) -> None:
        click.echo(message, err=True)

    hyper = {k: v for k, v in (("mom2_weight", memit_lambda),
                               ("null_threshold", alphaedit_threshold)) if v is not None}
    contexts = make_methods(chosen, model, tokenizer, records, db, stats_text, stats_positions,
                            say, hyper)
    rows = evaluate(model, tokenizer, records, contexts, settings, say)
    click.echo(f"{len(records)} facts ({schema_of(records)} schema); NeuralDB layer "
               f"{db.config.layer}, gamma {db.config.gamma}; {len(added)} edits computed in "
               f"{build_s:.0f} s\n")
    click.echo(markdown_table(rows))
    if json_out:
        report = {"facts": facts, "n": len(records), "schema": schema_of(records),
                  "methods": chosen, "stats_text": [str(p) for p in stats_text],
                  "db": str(path) if db_path else None, "layer": db.config.layer,
                  "gamma": db.config.gamma, "edits_computed": len(added),
                  "build_seconds": build_s, "seconds": settings.timings, "rows": rows}
        Path(json_out).write_text(json.dumps(report, indent=2))
    db.close()
    if tmp is not None:
        tmp.cleanup()


@cli.command()
@click.option("--keep", type=click.Path(), default=None,
              help="Keep the demo database in this directory.")
@user_errors
def demo(keep):
    """Edit 20 well-known facts of the default model, then remove one (about 2 minutes)."""
    from ndb.demo import run

    run(Path(keep) if keep else None, say=click.echo)


@cli.group()
def bench() -> None:
    """Speed and scale benchmarks (see ndb/bench.py)."""


@bench.command("keys")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Directory for the keys (resumable).")
@click.option("--n", type=click.IntRange(1), default=1_000_000, show_default=True)
@user_errors
def bench_keys(out, n):
    """Real keys of up to N real facts (cities in relation prompts), for 'ndb bench run'."""
    from ndb.bench import key_fidelity, write_scale_keys
    from ndb.compute import context_prefixes
    from ndb.models import default_edit_settings

    model, tok = _load(None, None)
    layer, _ = default_edit_settings(model)
    facts = write_scale_keys(model, tok, out, n, layer)
    sample = facts[:: max(1, len(facts) // 200)][:200]
    report = {"n": len(facts), "layer": layer,
              **key_fidelity(model, tok, sample, layer, context_prefixes(model, tok, 5, 10, 0))}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    click.echo(json.dumps(report))


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
    from ndb.baselines.stats import read_texts
    from ndb.bench import report, run

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


def _ranges(ids: list[int]) -> str:
    ids = sorted(ids)
    parts, start = [], None
    for i, x in enumerate(ids):
        start = x if start is None else start
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(parts) or "none"


def main() -> None:
    cli(prog_name="ndb")


def _register_subgroups() -> None:
    from ndb.cli.data import data

    cli.add_command(data)


_register_subgroups()
