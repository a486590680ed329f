"""The ``ndb`` command: thin click commands over the library."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path

import click
from click.core import ParameterSource

from ndb.errors import USER_ERRORS, ConfigError, ModelError, environment_error
from ndb.eval.legend import GENERATIVE, TEACHER_FORCED
from ndb.facts import read_facts
from ndb.output import check_writable, dumps_strict, write_strict_json


def user_errors(fn: Callable) -> Callable:
    """Turn ndb's own errors into one line on stderr and a non-zero exit; anything else is
    a bug and keeps its traceback."""

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
            raise _refuse(err) from None
        except Exception as err:
            refused = environment_error(err)
            if refused is None:
                raise  # a bug: Python prints the traceback and exits with status 1
            raise _refuse(refused) from None

    return wrapper


def _refuse(err: BaseException) -> click.ClickException:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # end a progress bar's line first
        bar.close()
    return click.ClickException(_one_line(err))


def _one_line(err: BaseException | str) -> str:
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(message.split())


class DeviceType(click.ParamType):
    """A torch device this machine has, checked before any model is loaded."""

    name = "device"

    def convert(self, value, param, ctx):
        import torch

        try:
            device = torch.device(value)
        except (RuntimeError, TypeError):
            self.fail(f"{value!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)",
                      param, ctx)
        if device.type == "cpu":
            return value
        backend = getattr(torch, device.type, None)
        if backend is None or not hasattr(backend, "is_available"):
            self.fail(f"{value!r}: ndb does not run on {device.type!r} devices", param, ctx)
        if not backend.is_available():
            self.fail(f"{value!r}: this machine's torch {torch.__version__} has no "
                      f"{device.type} device", param, ctx)
        count = backend.device_count() if hasattr(backend, "device_count") else 1
        if device.index is not None and device.index >= count:
            self.fail(f"{value!r}: there are only {count} {device.type} device(s)", param, ctx)
        return value


class FiniteFloatRange(click.FloatRange):
    """A float range that also refuses NaN (which compares false with both bounds)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a number in the range {self._describe_range()}.",
                      param, ctx)
        return value


DEVICE = DeviceType()
GAMMA = FiniteFloatRange(0, 1)  # a cosine threshold; below 0 nearly every key would pass
SEED = click.IntRange(0, 2**32 - 1)
BATCH_SIZE = click.IntRange(1, 4096)
MAX_GENERATE_CHARS = 100_000  # a prompt may be a long chat; the model's context bounds it


def _load(name: str | None, device: str | None):
    from transformers.utils import logging

    from ndb.models import load_model

    logging.disable_progress_bar()  # ndb's own bars are the ones worth watching

    try:
        return load_model(name, device=device)
    except ModelError:
        raise
    except (OSError, ValueError) as err:  # the model's files: missing, unreadable, not a model
        if environment_error(err) is not None:
            raise
        raise ModelError(f"cannot load model {name or 'smollm2-135m'}: {_one_line(err)}"
                         ) from None


def _open(db_path: str, model_override: str | None = None, device: str | None = None,
          need_model: bool = True):
    from ndb.database import NeuralDB

    db = NeuralDB.from_pretrained(db_path)
    if not need_model:
        return db, None, None
    name = model_override or db.config.model_name
    if not name:
        raise click.ClickException(
            f"{db_path} does not record how to load its model (it was built from a model "
            f"without a name or path): give --model")
    model, tokenizer = _load(name, device)
    return db, model, tokenizer


class OneLineUsageErrors(click.Group):
    """Usage errors of every subcommand as one line, like ndb's own errors (the usage text
    is one '-h' away)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            where = err.ctx.command_path if err.ctx else ctx.command_path
            one_line = click.ClickException(f"{where}: {_one_line(err.format_message())} "
                                            f"(see '{where} -h')")
            one_line.exit_code = err.exit_code
            raise one_line from None


@click.group(cls=OneLineUsageErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ndb")
def cli() -> None:
    """ndb: edit what a language model knows with a gated fact database (NeuralDB)."""


@cli.command()
@click.argument("facts")
@click.option("-o", "--output", "db_path", required=True, help="Database directory to create.")
@click.option("--model", "model_name", default=None, help="Embedded model name or local HF dir.")
@click.option("--layer", type=click.IntRange(0), default=None,
              help="Edited layer (default: swept for the default model, or tuned by 'ndb tune'; "
                   "else a quarter of the model's depth).")
@click.option("--gamma", type=GAMMA, default=None,
              help="Gate threshold on cosine similarity (default: swept or tuned like --layer, "
                   "else 0.65).")
@click.option("--device", type=DEVICE, default=None, help="torch device, e.g. cpu or cuda.")
@click.option("--batch-size", type=BATCH_SIZE, default=None,
              help="Facts optimized together (and committed together).")
@click.option("--seed", type=SEED, default=0, show_default=True)
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
    from ndb.database import NeuralDB, check_creatable, check_index_kind
    from ndb.models import edit_defaults

    records = read_facts(facts)
    path = Path(db_path)
    if path.exists() and not resume:
        raise click.ClickException(
            f"{path} already exists; use --resume to finish an interrupted build, "
            f"or 'ndb add {path} FACTS' to add facts")
    if resume and (path / "config.json").is_file():
        db = NeuralDB.from_pretrained(path)
        _refuse_changed_settings(db)
        model, tokenizer = _load(model_name or db.config.model_name, device)
    else:
        check_creatable(path)
        check_index_kind(index_kind)
        model, tokenizer = _load(model_name, device)
        defaults = None
        if layer is None or gamma is None:
            defaults = edit_defaults(model)
            layer = defaults.layer if layer is None else layer
            gamma = defaults.gamma if gamma is None else gamma
        compute = ComputeConfig(precision=precision)
        if batch_size:
            compute.batch_size = batch_size
        db = NeuralDB.create(path, model, tokenizer, layer=layer, gamma=gamma, seed=seed,
                             compute=compute, index=index_kind)
        if defaults is not None:  # said once accepted: a refusal stays one line
            click.echo(f"default layer {defaults.layer}, gamma {defaults.gamma}: "
                       f"{defaults.source}", err=True)
    if batch_size:
        db.config.compute.batch_size = batch_size
    before = len(db)
    try:  # batch by batch, so that --resume can finish an interrupted build
        ids = db.add(records, model, tokenizer, skip_existing=resume, progress=True,
                     commit_each_batch=True)
    except BaseException:
        db.refresh()
        click.echo(f"ndb: {len(db) - before} facts were committed to {path} before the "
                   f"failure; 'ndb build FACTS -o {path} --resume' continues", err=True)
        raise
    db.flush()
    click.echo(f"{path}: {len(db)} facts ({len(ids)} added), layer {db.config.layer}, "
               f"gamma {db.config.gamma}")


def _refuse_changed_settings(db) -> None:
    """A resumed build must finish the database it started: refuse options given on the
    command line that differ from what the database was built with (the batch size may)."""
    cfg = db.config
    stored = {"model_name": cfg.model_name, "layer": cfg.layer, "gamma": cfg.gamma,
              "seed": cfg.seed, "index_kind": cfg.index, "precision": cfg.compute.precision}
    ctx = click.get_current_context()
    options = {p.name: p.opts[-1] for p in ctx.command.params}
    changed = []
    for name, have in stored.items():
        if ctx.get_parameter_source(name) not in (ParameterSource.COMMANDLINE,
                                                  ParameterSource.ENVIRONMENT):
            continue  # not given: the stored value is used
        value = ctx.params[name]
        if name == "model_name" and Path(value).expanduser().is_dir():
            value = str(Path(value).expanduser().resolve())  # as load_model records it
        if value != have:
            changed.append(f"{options[name]} {value} (the database has {have})")
    if changed:
        raise ConfigError(f"{db.path} was built with other settings, which --resume keeps: "
                          f"{'; '.join(changed)}")


def _edit_options(fn: Callable) -> Callable:
    for option in reversed([
        click.argument("db_path", metavar="DB"),
        click.argument("facts"),
        click.option("--model", "model_name", default=None, help="Override the model to load."),
        click.option("--device", type=DEVICE, default=None),
        click.option("--batch-size", type=BATCH_SIZE, default=None),
    ]):
        fn = option(fn)
    return fn


def _edit(db_path, facts, model_name, device, batch_size, edit: Callable) -> None:
    """Open DB with its model, run ``edit(db, facts, model, tokenizer)``, say what it did."""
    records = read_facts(facts)
    db, model, tokenizer = _open(db_path, model_name, device)
    if batch_size:
        db.config.compute.batch_size = batch_size
    result = edit(db, records, model, tokenizer)
    db.flush()
    done = [f"added {len(result)} facts (ids {_ranges(result)})"]
    if result.updated:
        done.append(f"updated {len(result.updated)} (ids {_ranges(result.updated)})")
    if result.skipped:
        done.append(f"skipped {len(result.skipped)} already stored "
                    f"(ids {_ranges(result.skipped)})")
    click.echo(f"{'; '.join(done)}; {len(db)} in total")


@cli.command()
@_edit_options
@click.option("--update", "update", is_flag=True,
              help="Re-edit, under its id, a stored fact whose key a new fact carries.")
@user_errors
def add(db_path, facts, model_name, device, batch_size, update):
    """Add the facts in FACTS to the database DB (facts it holds already are skipped)."""
    _edit(db_path, facts, model_name, device, batch_size,
          lambda db, records, model, tok: db.add(records, model, tok, update=update,
                                                 progress=True))


@cli.command(name="update")
@_edit_options
@user_errors
def update_facts(db_path, facts, model_name, device, batch_size):
    """Re-edit stored facts: each fact in FACTS carries the key of a fact in DB."""
    _edit(db_path, facts, model_name, device, batch_size,
          lambda db, records, model, tok: db.update_by_key(records, model, tok, progress=True))


def _fact_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise click.ClickException(f"{text!r} is not a fact id (an integer, see 'ndb list'); "
                                   f"to remove by key: --key {text}") from None


@cli.command()
@click.argument("db_path", metavar="DB")
@click.argument("ids", nargs=-1)
@click.option("--key", "keys", multiple=True, help="Remove the fact whose key is KEY.")
@click.option("--subject", "subjects", multiple=True, help="Remove every fact about SUBJECT.")
@click.option("--model", "model_name", default=None,
              help="Override the model to load (needed when remaining facts are re-edited).")
@click.option("--device", default=None)
@user_errors
def remove(db_path, ids, keys, subjects, model_name, device):
    """Remove facts by database id (see 'ndb list'), --key and/or --subject; if one is not
    found, nothing is removed."""
    if not ids and not keys and not subjects:
        raise click.UsageError("give fact ids, --key and/or --subject")
    db, _, _ = _open(db_path, need_model=False)
    targets = {db.resolve(_fact_id(i)) for i in ids} | {db.id_of(key) for key in keys}
    for subject in subjects:
        found = db.find(subject)
        if not found:
            raise click.ClickException(f"no fact about subject {subject!r} in {db_path}; "
                                       "nothing was removed")
        targets.update(found)
    mates = db.mates(targets)
    model = tokenizer = None
    if mates:  # they share a residual with removed facts: it is re-optimized without them
        click.echo(f"re-editing {len(mates)} remaining facts about the same subjects "
                   f"(ids {_ranges(mates)})", err=True)
        model, tokenizer = _load(model_name or db.config.model_name, device)
    db.remove(sorted(targets), model, tokenizer, progress=bool(mates))
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
        if as_json:  # both fields always: read back, a record with "key" never reads "id"
            record = {"id": fact_id, "key": fact.key, **fact.to_json()}
            click.echo(json.dumps(record, ensure_ascii=False))
        else:
            old = f" (was: {fact.target_true})" if fact.target_true else ""
            key = f"  [key {fact.key}]" if fact.key is not None else ""
            click.echo(f"{fact_id:>6}  {fact.text} -> {fact.target_new}{old}{key}")


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
        click.echo(dumps_strict(report, indent=2))
    else:
        for key, value in report.items():
            click.echo(f"{key:>14}: {value}")


@cli.command()
@click.argument("db_path", metavar="DB")
@click.argument("prompt")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=20, show_default=True)
@click.option("--compare", is_flag=True, help="Also show the unedited model's answer.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--model", "model_name", default=None)
@click.option("--device", type=DEVICE, default=None)
@user_errors
def generate(db_path, prompt, max_new_tokens, compare, chat, as_json, model_name, device):
    """Complete PROMPT with the database attached (greedy decoding)."""
    from ndb.facts import check_text
    from ndb.generation import complete

    check_text(prompt, "PROMPT", limit=MAX_GENERATE_CHARS)
    db, model, tokenizer = _open(db_path, model_name, device)
    db.attach(model, tokenizer)
    result = {"prompt": prompt, "edited": complete(model, tokenizer, prompt, max_new_tokens, chat)}
    result["gate_hits"] = db.retrieval.stats.hits
    if compare:
        with db.disabled():
            result["unedited"] = complete(model, tokenizer, prompt, max_new_tokens, chat)
    if as_json:
        click.echo(dumps_strict(result, ensure_ascii=False))
    elif chat:  # an answer, not a continuation: each on its own line(s) after the prompt
        click.echo(f"prompt:\n{prompt}")
        for label in ("edited", "unedited") if compare else ("edited",):
            click.echo(f"\n{label}:\n{result[label].strip()}")
    else:
        click.echo(f"edited:   {prompt}{result['edited']}")
        if compare:
            click.echo(f"unedited: {prompt}{result['unedited']}")


def _numbers(text: str, kind: type) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of {kind.__name__}s")
    return values


@cli.command()
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
    from ndb.baselines.stats import read_texts
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
@click.option("--device", type=DEVICE, default=None)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@user_errors
def evaluate(facts, db_path, limit, methods, stats_text, stats_positions, memit_lambda,
             alphaedit_threshold, general_dir, general_tasks, general_limit, mmlu_limit,
             fluency_cases, no_generation, no_chat, gen_neighbors, consistency_dir, json_out,
             model_name, device, batch_size):
    """Edit the facts in FACTS (CounterFact or ZsRE schema) and report the paper's metrics."""
    import tempfile
    import time

    from ndb.database import NeuralDB, check_creatable
    from ndb.eval.methods import METHODS, make_methods
    from ndb.eval.run import EvalSettings, evaluate, markdown_table, noted_rows, schema_of

    records = read_facts(facts)[:limit]
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        raise click.ClickException(f"unknown method(s): {', '.join(unknown)} "
                                   f"(known: {', '.join(METHODS)})")
    lambada = Path(general_dir or "") / "lambada_test.jsonl"
    stats_text = list(stats_text) or ([lambada] if general_dir and lambada.is_file() else [])
    _check_eval_inputs(records, chosen, stats_text, general_dir, json_out)
    settings = EvalSettings(
        batch_size=batch_size, fluency_cases=fluency_cases, general_dir=general_dir,
        general_tasks=general_tasks.split(",") if general_tasks else None,
        general_limit=general_limit, mmlu_limit=mmlu_limit,
        generation=not no_generation, chat=not no_chat, gen_prompts=gen_neighbors,
        consistency=_consistency_reference(consistency_dir) if consistency_dir else None)
    tmp = tempfile.TemporaryDirectory() if db_path is None else None
    path = Path(db_path) if db_path else Path(tmp.name) / "eval.ndb"
    # the database is opened (or its place checked) before minutes of model loading
    existing = NeuralDB.from_pretrained(path) if (path / "config.json").is_file() else None
    if existing is None:
        check_creatable(path)
    model, tokenizer = _load(model_name, device)
    db = existing or NeuralDB.create(path, model, tokenizer)
    start = time.perf_counter()
    added = db.add(records, model, tokenizer, skip_existing=True, progress=True,
                   commit_each_batch=True)
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
                  "build_seconds": build_s, "seconds": settings.timings,
                  "rows": noted_rows(rows, schema_of(records))}
        write_strict_json(json_out, report, indent=2)
    db.close()
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
    if any(m != "neuraldb" for m in methods) and not stats_text:
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
    ids = sorted(set(ids))
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
