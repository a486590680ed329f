"""``ndb serve``: loaded only when asked for, so that no other command imports the server
or needs the serve extra."""

from __future__ import annotations

import click

from ndb.cli.main import DEVICE, _model_of, user_errors
from ndb.errors import ConfigError


@click.command()
@click.argument("db_path", metavar="DB")
@click.option("--model", "model_name", default=None, help="Override the model to load.")
@click.option("--device", type=DEVICE, default=None)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; one other machines reach needs --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="NDB_API_KEY", default=None,
              help="Key the fact-changing endpoints require (or NDB_API_KEY).")
@click.option("--max-tokens", type=click.IntRange(1, 1 << 16), default=512, show_default=True,
              help="The most tokens one answer may ask for.")
@click.option("--max-prompt-tokens", type=click.IntRange(1, 1 << 20), default=2048,
              show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 256), default=16, show_default=True,
              help="Requests generated together in one batch.")
@user_errors
def serve(db_path, model_name, device, host, port, api_key, max_tokens, max_prompt_tokens,
          max_batch):
    """Serve DB with its model: an OpenAI-compatible API with live edits, and a page at /."""
    try:
        import uvicorn

        from ndb.serve import Limits, Server, create_app
    except ImportError as err:
        raise ConfigError(f"ndb serve needs the serve extra ({err.name} is missing): "
                          "pip install 'ndb[serve]'") from None
    from ndb.database import NeuralDB
    from ndb.serve.server import check_bind

    check_bind(host, port, api_key)
    db = NeuralDB.from_pretrained(db_path)
    url = f"http://{host}:{port}"
    with db.store.writing(holder=Server.holder(url)):  # before the model loads: fail fast
        model, tokenizer = _model_of(db, model_name, device)
        server = Server(db, model, tokenizer, url=url, api_key=api_key, max_batch=max_batch,
                        limits=Limits(max_tokens=max_tokens,
                                      max_prompt_tokens=max_prompt_tokens))
        click.echo(f"serving {db_path} ({len(db)} facts) with {server.name} on {url}",
                   err=True)
        try:
            uvicorn.run(create_app(server), host=host, port=port, log_level="warning")
        finally:
            server.close()
