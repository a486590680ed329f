"""What one ``ndb serve`` process holds: the database and its writer lock, the served model
with the database's hook, a twin of the model for computing edits, the generation engine,
the job queue and the counters."""

from __future__ import annotations

import copy
import ipaddress
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from torch import nn

from ndb.database import NeuralDB
from ndb.errors import ConfigError
from ndb.serve.engine import Engine
from ndb.serve.jobs import Jobs
from ndb.serve.metrics import Metrics
from ndb.serve.snapshot import ServingHook, Snapshot


@dataclass
class Limits:
    """What one request may ask for; more is refused with a 4xx and a message."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 512  # generated per answer
    max_prompt_tokens: int = 2048
    max_facts: int = 1000  # per POST /v1/facts
    max_waiting: int = 256  # generation requests waiting for a batch
    max_jobs: int = 64  # edit jobs queued or running


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, port: int, api_key: str | None) -> None:
    """Refuse, before the model loads, an address that would expose unguarded edits or
    that cannot be bound."""
    if not is_loopback(host) and not api_key:
        raise ConfigError(f"--host {host} is reachable from other machines: give --api-key "
                          "(or NDB_API_KEY) so that only its holders can change facts")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConfigError(f"--host {host}: {err.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror})") from None


def shared_weights_twin(model: nn.Module) -> nn.Module:
    """A second module tree over the same weights. Computing residuals hooks the model's
    modules and truncates its layer list while it runs; on the twin that never reaches the
    forward passes of requests served meanwhile."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo=shared)


class Server:
    """A database served with a model: ``create_app(Server(...))`` is the HTTP side.
    It holds the database's writer lock from creation to :meth:`close`."""

    def __init__(self, db: NeuralDB, model: nn.Module, tokenizer, *, url: str = "",
                 api_key: str | None = None, limits: Limits | None = None,
                 max_batch: int = 16, window_s: float = 0.01):
        self.db = db
        self.name = db.config.model_name or model.config.name_or_path or "model"
        self.api_key = api_key or None
        self.limits = limits or Limits()
        self.tokenizer = tokenizer
        self.model = model
        self.tokenizer_lock = threading.Lock()  # handlers' encoding, one at a time
        self._exit = ExitStack()
        self._exit.enter_context(db.store.writing(holder=self.holder(url)))
        try:
            self.twin = shared_weights_twin(model)  # before the hook is attached
            self.twin_tokenizer = copy.deepcopy(tokenizer)
            self.hook = ServingHook(db, model, tokenizer)
            self._exit.callback(self.hook.detach)
            self.device = next(model.parameters()).device
            self.snapshot = Snapshot.of(db, self.device)
            self.metrics = Metrics()
            # each thread its own tokenizer: the engine decodes while handlers encode
            self.engine = Engine(model, copy.deepcopy(tokenizer), self.hook,
                                 lambda: self.snapshot,
                                 max_batch=max_batch, window_s=window_s,
                                 on_batch=self.metrics.batch)
            self.jobs = Jobs(self.publish, max_queued=self.limits.max_jobs)
            self._exit.callback(self.jobs.close)  # runs first: before the lock goes
        except BaseException:
            self._exit.close()
            raise

    @staticmethod
    def holder(url: str) -> str:
        """What a CLI write on the served database is told."""
        where = f" at {url}" if url else ""
        return (f"ndb serve{where}, which keeps it open for writing; change its facts "
                "through that server (POST /v1/facts, DELETE /v1/facts/ID) or stop it first")

    def publish(self) -> int:
        """Make the committed state what new batches read; returns its version."""
        self.snapshot = Snapshot.of(self.db, self.device)
        return self.snapshot.version

    def close(self) -> None:
        """Stop the jobs (a running one commits nothing), unhook the model, release the
        writer lock."""
        self._exit.close()


@contextmanager
def running(server: Server, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``server`` with uvicorn in a thread of this process while inside (a notebook,
    a test, a benchmark); yields its URL (port 0: a free one). Closes ``server`` on exit."""
    import uvicorn

    from ndb.serve.app import create_app

    web = uvicorn.Server(uvicorn.Config(create_app(server), host=host, port=port,
                                       log_level="warning"))
    thread = threading.Thread(target=web.run, name="ndb-http", daemon=True)
    thread.start()
    try:
        while not web.started:
            if not thread.is_alive():
                raise ConfigError(f"cannot listen on {host}:{port}")
            time.sleep(0.02)
        bound = web.servers[0].sockets[0].getsockname()[1]
        yield f"http://{host}:{bound}"
    finally:
        web.should_exit = True
        thread.join(30)
        server.close()
