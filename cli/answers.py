"""``ndb generate`` and ``ndb demo``: the edited model's answers. Loaded only when one of
them runs (see ndb.cli.main.OneLineUsageErrors)."""

from __future__ import annotations

from pathlib import Path

import click

from ndb.cli.main import DEVICE, _model_of, _open, user_errors
from ndb.completion import complete
from ndb.demo import run
from ndb.facts import check_text
from ndb.output import dumps_strict

MAX_GENERATE_CHARS = 100_000  # a prompt may be a long chat; the model's context bounds it


@click.command()
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
    check_text(prompt, "PROMPT", limit=MAX_GENERATE_CHARS)
    db = _open(db_path)
    model, tokenizer = _model_of(db, model_name, device)
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


@click.command()
@click.option("--keep", type=click.Path(), default=None,
              help="Keep the demo database in this directory.")
@user_errors
def demo(keep):
    """Edit 20 well-known facts of the default model, then remove one (about 2 minutes)."""
    run(Path(keep) if keep else None, say=click.echo)
