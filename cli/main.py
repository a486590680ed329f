"""The ``ndb`` command: thin click commands over the library."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from functools import wraps
from importlib import import_module
from pathlib import Path

import click
from click.core import ParameterSource

from ndb.config import read_database
from ndb.errors import USER_ERRORS, ConfigError, ModelError, environment_error, one_line
from ndb.facts import read_stored
from ndb.output import dumps_strict
from ndb.store import check_creatable


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
    return click.ClickException(one_line(err))


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


class BuildBatchSize(click.ParamType):
    """A batch size, or "auto" (resolved once the model is loaded)."""

    name = "integer|auto"

    def convert(self, value, param, ctx):
        return "auto" if value == "auto" else BATCH_SIZE.convert(value, param, ctx)


def _load(name: str | None, device: str | None):
    from transformers.utils import logging

    from ndb.loading import load_model

    logging.disable_progress_bar()  # ndb's own bars are the ones worth watching

    try:
        return load_model(name, device=device)
    except ModelError:
        raise
    except (OSError, ValueError) as err:  # the model's files: missing, unreadable, not a model
        if environment_error(err) is not None:
            raise
        raise ModelError(f"cannot load model {name or 'smollm2-135m'}: {one_line(err)}"
                         ) from None


def _open(db_path: str):
    from ndb.database import NeuralDB

    return NeuralDB.from_pretrained(db_path)


def _model_of(db, model_name: str | None, device: str | None):
    """(model, tokenizer) to edit ``db`` with: ``model_name``, else the model it records."""
    name = model_name or db.config.model_name
    if not name:
        raise ConfigError(f"{db.path} does not record how to load its model (it was built "
                          "from a model without a name or path): give --model")
    return _load(name, device)


class OneLineUsageErrors(click.Group):
    """Usage errors of every subcommand as one line, like ndb's own errors (the usage text
    is one '-h' away). The research commands, and those that run the model on text, live in
    their own modules, imported only when one of them is asked for, so that the library's
    commands never load ndb.eval."""

    LAZY = {"data": "ndb.cli.data:data", "tune": "ndb.cli.research:tune",
            "eval": "ndb.cli.research:evaluate", "bench": "ndb.cli.research:bench",
            "generate": "ndb.cli.answers:generate", "demo": "ndb.cli.answers:demo",
            "serve": "ndb.cli.serve:serve"}

    # what 'ndb -h' says of them, so that it loads none (and so neither torch): 4 s less.
    # test_cli checks each against the command's own first sentence
    LAZY_HELP = {
        "data": "Generate benchmark data sets.",
        "tune": "Choose the layer and gamma for a model on DEVSET (CounterFact-schema facts "
                "with paraphrases and neighborhood prompts); later builds with this model "
                "use them.",
        "eval": "Edit the facts in FACTS (CounterFact or ZsRE schema) and report the paper's "
                "metrics.",
        "bench": "Speed and scale benchmarks (see ndb/eval/bench.py).",
        "generate": "Complete PROMPT with the database attached (greedy decoding).",
        "demo": "Edit 20 well-known facts of the default model, then remove one (about 2 "
                "minutes).",
        "serve": "Serve DB with its model: an OpenAI-compatible API with live edits, and a "
                 "page at /.",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        rows = []
        for name in names:
            command = (click.Command(name, help=self.LAZY_HELP[name]) if name in self.LAZY
                       else super().get_command(ctx, name))
            rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.LAZY:
            return super().get_command(ctx, name)
        module, attribute = self.LAZY[name].split(":")
        return getattr(import_module(module), attribute)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            where = err.ctx.command_path if err.ctx else ctx.command_path
            refusal = click.ClickException(f"{where}: {one_line(err.format_message())} "
                                           f"(see '{where} -h')")
            refusal.exit_code = err.exit_code
            raise refusal from None


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
@click.option("--batch-size", type=BuildBatchSize(), default=None,
              help="Facts optimized together (and committed together); auto: on CUDA the "
                   "most that fit in free memory (measured on a probe batch), else 32.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--index", "index_kind", default="auto", show_default=True,
              help="Key index backend.")
@click.option("--precision", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True, help="Of the residual optimization's FFNs and LM head "
                                      "(bfloat16 measured 1.4x faster on a 2-core CPU, "
                                      "with fewer chat answers right).")
@click.option("--residual-prefixes", type=click.IntRange(0), default=None,
              help="How many of the 5 sampled context prefixes each residual is optimized in "
                   "(default all): 2 builds about 1.5-2x faster on a CPU, with weaker chat "
                   "answers about subjects with several edits.")
@click.option("--method", type=click.Choice(["ndb", "paper"]), default="ndb", show_default=True,
              help="Residuals: ndb's (one per subject, shared by its facts, keeping the "
                   "subject's identity) or the paper's (one per fact), for comparison.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted build: keep the database, skip facts it holds.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Processes that compute the build together on this machine (with --device "
                   "cuda, one per GPU), committed at once; torchrun starts them across nodes.")
@user_errors
def build(facts, db_path, model_name, layer, gamma, device, batch_size, seed, index_kind,
          precision, residual_prefixes, method, resume, workers):
    """Build a fact database DB from a FACTS file (JSONL/JSON; '-' for stdin)."""
    settings = dict(facts=facts, db_path=db_path, model_name=model_name, layer=layer,
                    gamma=gamma, batch_size=batch_size, seed=seed, index_kind=index_kind,
                    precision=precision, residual_prefixes=residual_prefixes, method=method,
                    resume=resume)
    if workers == 1 and "WORLD_SIZE" not in os.environ:  # one process, as nearly always
        return _build(**settings, device=device, distributed=False)
    from ndb import distributed

    rank, size = distributed.world()
    if size == 1 and workers > 1:
        sys.exit(distributed.launch(sys.argv[1:], workers))
    if size == 1:
        return _build(**settings, device=device, distributed=False)
    device = distributed.rank_device(device)
    with distributed.process_group():
        if rank > 0:
            return distributed.follow(lambda name: _load(model_name or name, device))
        return _build(**settings, device=device, distributed=True)


def _build(facts, db_path, model_name, layer, gamma, device, batch_size, seed, index_kind,
           precision, residual_prefixes, method, resume, distributed: bool) -> None:
    """One process's build, or rank 0's part of a distributed one (committed at once)."""
    from ndb.config import ComputeConfig
    from ndb.database import NeuralDB
    from ndb.indexes import check_kind
    from ndb.models import edit_defaults, ffn_out_path
    from ndb.record_formats import read_facts
    from ndb.store import is_database

    records = read_facts(facts)
    path = Path(db_path)
    if path.exists() and not resume:
        raise click.ClickException(
            f"{path} already exists; use --resume to finish an interrupted build, "
            f"or 'ndb add {path} FACTS' to add facts")
    if resume and is_database(path):
        db = NeuralDB.from_pretrained(path)
        _refuse_changed_settings(db)
        model, tokenizer = _model_of(db, model_name, device)
    else:
        check_creatable(path)
        check_kind(index_kind, auto=True)
        try:
            compute = (ComputeConfig.paper if method == "paper" else ComputeConfig)(
                precision=precision, residual_prefixes=residual_prefixes)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--residual-prefixes") from None
        model, tokenizer = _load(model_name, device)
        defaults = edit_defaults(model) if layer is None or gamma is None else None
        if defaults is not None:
            layer = defaults.layer if layer is None else layer
            gamma = defaults.gamma if gamma is None else gamma
        if batch_size and batch_size != "auto":
            compute.batch_size = batch_size
        ffn_out_path(model, layer)  # refuses a layer the model lacks before anything is said
        click.echo(f"creating {path}: sampling context prefixes and background text from the "
                   "model (once per database)", err=True)
        db = NeuralDB.create(path, model, tokenizer, layer=layer, gamma=gamma, seed=seed,
                             compute=compute, index=index_kind)
        if defaults is not None:  # said once the settings are known to be valid
            click.echo(f"default layer {defaults.layer}, gamma {defaults.gamma}: "
                       f"{defaults.source}", err=True)
    if batch_size == "auto":
        batch_size = _auto_batch_size(db, records, model, tokenizer)
    if batch_size:
        db.config.compute.batch_size = batch_size
    before = len(db)
    try:  # one process: batch by batch, so that --resume can finish an interrupted build
        if distributed:
            from ndb.distributed import lead

            ids = lead(db, records, model, tokenizer, skip_existing=resume, progress=True)
        else:
            ids = db.add(records, model, tokenizer, skip_existing=resume, progress=True,
                         commit_each_batch=True)
    except BaseException:
        click.echo(f"ndb: {len(db) - before} facts were committed to {path} before the "
                   f"failure; 'ndb build FACTS -o {path} --resume' continues", err=True)
        raise
    db.flush()
    click.echo(f"{path}: {len(db)} facts ({len(ids)} added), layer {db.config.layer}, "
               f"gamma {db.config.gamma}")


def _auto_batch_size(db, records, model, tokenizer) -> int:
    from ndb.auto_batch import auto_batch_size

    cfg = db.config
    size = auto_batch_size(model, tokenizer, records, cfg.layer, cfg.prefixes, cfg.compute)
    how = ("the most facts whose optimization fits in free memory, measured on a probe batch"
           if next(model.parameters()).is_cuda else "the default off CUDA")
    click.echo(f"batch size {size} (auto: {how})", err=True)
    return size


def _refuse_changed_settings(db) -> None:
    """A resumed build must finish the database it started: refuse options given on the
    command line that differ from what the database was built with (the batch size may)."""
    cfg = db.config
    stored = {"model_name": cfg.model_name, "layer": cfg.layer, "gamma": cfg.gamma,
              "seed": cfg.seed, "index_kind": cfg.index, "precision": cfg.compute.precision,
              "residual_prefixes": cfg.compute.residual_prefixes}
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
    from ndb.record_formats import read_facts

    records = read_facts(facts)
    db = _open(db_path)
    model, tokenizer = _model_of(db, model_name, device)
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
@click.option("--device", type=DEVICE, default=None)
@user_errors
def remove(db_path, ids, keys, subjects, model_name, device):
    """Remove facts by database id (see 'ndb list'), --key and/or --subject; if one is not
    found, nothing is removed."""
    if not ids and not keys and not subjects:
        raise click.UsageError("give fact ids, --key and/or --subject")
    db = _open(db_path)
    targets = {db.id_of(_fact_id(i)) for i in ids} | {db.id_of(key) for key in keys}
    for subject in subjects:
        found = db.ids_about(subject)
        if not found:
            raise click.ClickException(f"no fact about subject {subject!r} in {db_path}; "
                                       "nothing was removed")
        targets.update(found)
    mates = db.mates(targets)
    model = tokenizer = None
    if mates:  # they share a residual with removed facts: it is re-optimized without them
        click.echo(f"re-editing {len(mates)} remaining facts about the same subjects "
                   f"(ids {_ranges(mates)})", err=True)
        model, tokenizer = _model_of(db, model_name, device)
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
    _, store = read_database(Path(db_path))  # no model, no torch: a second, not three
    for fact_id, fact in sorted(read_stored(store).items()):
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
    cfg, store = read_database(Path(db_path))
    size = sum(p.stat().st_size for p in Path(db_path).rglob("*") if p.is_file())
    report = {
        "path": str(store.path), "facts": len(store.entries), "model": cfg.model_name,
        "model_type": cfg.model_type, "fingerprint": cfg.fingerprint, "layer": cfg.layer,
        "module": cfg.module, "gamma": cfg.gamma, "d_key": cfg.d_key, "d_value": cfg.d_value,
        "key_dtype": cfg.key_dtype, "residual_dtype": cfg.residual_dtype,
        "index": cfg.index, "calibration": _calibration_summary(cfg.index_calibration),
        "segments": len(store.manifest.segments),
        "version": store.manifest.version, "disk_bytes": size,
        "residuals": _residuals_summary(cfg.compute),
    }
    if as_json:
        click.echo(dumps_strict({**report, "compute": cfg.compute.to_dict()}, indent=2))
    else:
        for key, value in report.items():
            click.echo(f"{key:>14}: {value}")


@cli.command()
@click.argument("db_path", metavar="DB")
@click.option("--model", "model_name", default=None, help="Override the model to load.")
@click.option("--device", type=DEVICE, default=None)
@user_errors
def calibrate(db_path, model_name, device):
    """Tune DB's approximate key index (lists probed, gate-skip margin) on its model's keys
    of texts about stored subjects; add, update and remove do it when it is due."""
    db = _open(db_path)
    if not db.keys.approximate:  # before minutes of loading the model for nothing
        click.echo(f"{db_path}: its {db.index.kind} index searches exactly (an IVF kind until "
                   "it has enough keys to train on); nothing to tune")
        return
    model, tokenizer = _model_of(db, model_name, device)
    db.calibrate(model, tokenizer, progress=True)
    db.flush()
    click.echo(f"calibrated: {_calibration_summary(db.config.index_calibration)}")


def _calibration_summary(done: dict | None) -> str:
    """How the last calibration tuned an approximate index (`info`), in words."""
    if done is None:
        return ("none (an approximate index is calibrated by an add with the model, or by "
                "'ndb calibrate')")
    margin = "off" if done["coarse_margin"] is None else done["coarse_margin"]
    return (f"{done['kind']} at {done['n_keys']} keys, gamma {done['gamma']}: probes "
            f"{done['probe_fraction']:.4g} of its lists, gate-skip margin {margin}")


def _residuals_summary(compute) -> str:
    """How the database computes residuals, in words (`info`; its JSON has every setting)."""
    scope = "one per fact"
    if compute.residual_scope == "subject":
        edits = "each edit in full" if compute.group_loss == "sum" else "edits averaged"
        bound = "bound growing with the group" if compute.clamp_grows_with_group else "one bound"
        scope = f"one per subject ({edits}, {bound})"
    steps = f"{compute.steps} steps"
    if compute.extra_steps:
        steps += f" and up to {compute.extra_steps} more until the edits hold"
    n = len(compute.kl_prompts)
    contexts = ""
    if compute.residual_prefixes is not None and compute.residual_prefixes < compute.n_prefixes:
        contexts = (f", optimized in {compute.residual_prefixes} of the {compute.n_prefixes} "
                    "sampled prefixes")
    return (f"{scope}, {steps}, KL weight {compute.kl_weight:g} on {n} prompt{'s' * (n != 1)}"
            f"{contexts}")


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

