"""A build spread over several processes with torch.distributed.

    torchrun --nproc-per-node 4 -m ndb.cli build facts.jsonl -o big.ndb --device cuda
    ndb build facts.jsonl -o big.ndb --workers 4 --device cuda    # the same, launched by ndb

Rank 0 creates (or opens) the database, holds its writer lock for the whole build and gives
every fact its id, exactly as a one-process build does. The facts, in the batches of whole
groups (facts sharing a residual) that a one-process build computes, are dealt to the ranks
in turn; each rank writes its keys and residuals as one segment of the database,
unreferenced, and once every rank has written its own, rank 0 adopts them all in one
manifest swap. A rank that fails or is killed before that leaves the database as it was
(its orphaned segments are removed by the next commit): the launcher (torchrun, or
:func:`launch`) ends every rank when one fails, and a rank's error reaches rank 0 first.

Only small control messages travel through the process group (gloo, over TCP, whatever the
device): the vectors go through the database directory, which every rank must therefore
see (across nodes: one shared file system).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from ndb import edits
from ndb.compute import FactBar, check_encodable
from ndb.config import ComputeConfig
from ndb.errors import ConfigError, DistributedError
from ndb.facts import Fact, as_facts
from ndb.store import Pending

MAX_WORKERS = 10_000  # each rank writes segment number RANK, of four digits
# the slowest rank's shard is waited for in one collective: a long build must not time out
TIMEOUT = timedelta(days=7)
FAILURE_GRACE_S = 5.0  # how long the other ranks may take to stop once one has failed


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes), as torchrun's variables say."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank_device(device: str | None) -> str | None:
    """The device a rank computes on: its own accelerator (``cuda`` -> ``cuda:LOCAL_RANK``)."""
    if device is None or device == "cpu" or ":" in device:
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    count = getattr(torch, device).device_count()
    if local_rank >= count:
        raise ConfigError(f"rank {world()[0]} is local rank {local_rank}, but this node has "
                          f"{count} {device} device(s): start at most {count} processes a node")
    return f"{device}:{local_rank}"


@contextmanager
def process_group() -> Iterator[None]:
    rank, size = world()
    if size > MAX_WORKERS:
        raise ConfigError(f"{size} processes: a distributed build takes at most {MAX_WORKERS}")
    dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


@dataclass
class Plan:
    """What rank 0 decided, sent to every rank: the database, its manifest version, how
    to compute (its batch size may be this build's own), and the batches of (id, fact)."""

    path: str
    model_name: str | None
    version: int
    compute: ComputeConfig
    batches: list[list[tuple[int, Fact]]]


def lead(db, facts: Iterable[Fact | dict], model, tokenizer, *, skip_existing: bool = False,
         progress: bool = False) -> edits.AddResult:
    """Rank 0's part: add ``facts`` to ``db`` (a NeuralDB) with every rank's help, in one
    commit; the facts it holds already are skipped (all of them with ``skip_existing``,
    as ``NeuralDB.add`` does). Every other rank runs :func:`follow` meanwhile."""
    facts = edits.unique(as_facts(facts))
    check_encodable(facts, model, tokenizer, db.config.prefixes, db.config.compute)
    with db.store.writing():
        db.refresh()
        new, _, skipped = edits.sort_out(db.facts(), facts, False, skip_existing, db.path)
        ids, todo = edits.plan(db.facts(), [(None, f) for f in new], (),
                               db.store.manifest.next_id, db.config.compute.residual_scope)
        if todo:
            db.config.check_model(model, db.path)
        writer = edits.Writer(db.store, db.config, db.keys)
        plan = Plan(str(db.path), db.config.model_name, db.store.manifest.version,
                    db.config.compute, writer.batches(todo))
        _broadcast(plan)
        pending = _compute_shard(db, plan, model, tokenizer, progress)
        summaries = _gather(pending.summary())
        failed = [(rank, s) for rank, s in enumerate(summaries) if isinstance(s, str)]
        if failed:
            pending.discard()
            rank, why = failed[0]
            raise DistributedError(f"rank {rank} failed ({why}); nothing was committed")
        for summary in summaries[1:]:
            pending.adopt(summary)
        db.store.commit_now(pending)
    db.refresh()
    return edits.AddResult(ids, skipped)


def follow(load: Callable[[str | None], tuple]) -> None:
    """Every other rank's part: compute its shard of rank 0's plan with the model that
    ``load(model name recorded in the database)`` returns, and write it for rank 0 to adopt."""
    from ndb.database import NeuralDB

    plan = _broadcast(None)
    try:
        db = NeuralDB.from_pretrained(plan.path)
        if db.store.manifest.version != plan.version:
            raise DistributedError(f"{plan.path} changed under rank 0's lock (version "
                                   f"{db.store.manifest.version}, not {plan.version})")
        db.config.compute = plan.compute
        model, tokenizer = load(plan.model_name)
        if plan.batches:
            db.config.check_model(model, db.path)
        summary = _compute_shard(db, plan, model, tokenizer, progress=False).summary()
    except Exception as err:
        _gather(" ".join(str(err).split()) or type(err).__name__)
        raise
    _gather(summary)


def _compute_shard(db, plan: Plan, model, tokenizer, progress: bool) -> Pending:
    """This rank's batches of ``plan``, written as one unreferenced segment (numbered by the
    rank, so that the ranks' segments of one commit have distinct names)."""
    rank, size = dist.get_rank(), dist.get_world_size()
    writer = edits.Writer(db.store, db.config, db.keys)
    mine = plan.batches[rank::size]
    pending = Pending(db.store, first_segment=rank)
    if pending.version != plan.version + 1:
        raise DistributedError("internal error: the shard's version is not the plan's")
    total = sum(len(part) for part in mine)
    parts, keys, residuals = [], [], []
    with FactBar(total, f"edit (rank 0 of {size})", disable=not progress) as bar:
        for part in mine:
            k, r = writer.compute(part, model, tokenizer, bar.update)
            parts += part
            keys.append(k.cpu())
            residuals.append(r.cpu())
    if parts:
        writer.stage(pending, [f for _, f in parts], torch.cat(keys), torch.cat(residuals),
                     np.array([i for i, _ in parts], np.int64))
    return pending


def _broadcast(obj: object) -> object:
    box = [obj]
    with _peers_needed():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: object) -> list:
    out: list = [None] * dist.get_world_size()
    with _peers_needed():
        dist.all_gather_object(out, obj)
    return out


@contextmanager
def _peers_needed() -> Iterator[None]:
    """A collective whose peer is gone (killed, or ended by the launcher) is no bug here;
    gloo says so with a RuntimeError."""
    try:
        yield
    except RuntimeError:
        raise DistributedError(f"rank {dist.get_rank()}: another rank stopped (its own "
                               "message says why); nothing was committed") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], workers: int) -> int:
    """Run ``ndb ARGS`` as ``workers`` processes of one process group on this machine, with
    the variables torchrun sets; when one fails, the others are ended. Returns the exit
    status (the first failure's, else 0)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(workers), "LOCAL_WORLD_SIZE": str(workers)}
    # N processes each using every core would fight over them (torchrun sets 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    procs = [subprocess.Popen([sys.executable, "-m", "ndb.cli", *args],
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdin=None if rank == 0 else subprocess.DEVNULL)
             for rank in range(workers)]
    try:
        while not any(p.poll() for p in procs):  # a non-zero status: a rank failed
            if all(p.poll() == 0 for p in procs):
                return 0
            time.sleep(0.1)
        # the others learn of a failure through the process group and say so: let them,
        # before ending those that wait on a rank that is gone
        deadline = time.monotonic() + FAILURE_GRACE_S
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.1)
        return next(p.returncode for p in procs if p.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
