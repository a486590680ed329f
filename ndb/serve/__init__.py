"""``ndb serve``: a fact database served with its model over an OpenAI-compatible HTTP API,
with facts added and removed while it serves. Needs the ``serve`` extra (FastAPI, uvicorn);
the library core never imports this package.

    server = Server(db, model, tokenizer)        # holds the database's writer lock
    app = create_app(server)                     # a FastAPI app: run it with uvicorn
    with running(server) as url: ...             # or serve it from a thread of this process

The parts: snapshot (the database version a request reads), engine (batched generation),
jobs (edits in the background), server (what a serving process holds), app (the routes).
"""

from ndb.serve.app import create_app
from ndb.serve.server import Limits, Server, running

__all__ = ["Limits", "Server", "create_app", "running"]
