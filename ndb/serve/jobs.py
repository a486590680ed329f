"""Edits that take seconds per fact, run one at a time by a worker thread while the server
keeps answering. A job's facts become visible when it commits: the worker then publishes
the new database snapshot, and only after that reports the job done."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ndb.errors import NdbError, environment_error, one_line

log = logging.getLogger("ndb.serve")

# what a job runs: given a progress callable (facts done, facts to do), it edits and
# returns what it did
Work = Callable[[Callable[[float, int], None]], dict[str, Any]]


@dataclass
class Job:
    id: str
    kind: str  # "add", "update" or "remove"
    work: Work
    state: str = "queued"  # then "running", then "done" or "failed"
    done: float = 0.0
    total: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "ndb.job", "kind": self.kind, "state": self.state,
                "done": round(self.done, 3), "total": self.total, "result": self.result,
                "error": self.error, "created": self.created, "finished": self.finished}


class Cancelled(Exception):
    """The server is closing: the running job stops before it commits."""


class Jobs:
    """The queue of edit jobs and the thread that runs them in order."""

    def __init__(self, publish: Callable[[], int], *, max_queued: int = 64,
                 kept: int = 1000):
        self.publish = publish  # makes the committed state visible; returns its version
        self.max_queued = max_queued
        self._kept = kept
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: queue.Queue[Job] = queue.Queue()
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ndb-jobs", daemon=True)
        self._thread.start()

    def submit(self, kind: str, work: Work) -> Job | None:
        """Queue ``work``; None when the queue is full."""
        with self._lock:
            if self.pending() >= self.max_queued:
                return None
            job = Job(f"job-{next(self._numbers)}", kind, work)
            self._jobs[job.id] = job
            while len(self._jobs) > self._kept:  # forget the oldest finished ones
                oldest = next(j for j in self._jobs.values() if j.state in ("done", "failed"))
                del self._jobs[oldest.id]
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        return list(self._jobs.values())

    def pending(self) -> int:
        """Jobs queued or running."""
        return sum(j.state in ("queued", "running") for j in list(self._jobs.values()))

    def close(self) -> None:
        """Start no more jobs, and stop the running one at its next step, uncommitted (the
        writer lock is about to go, and a commit after that could race another writer)."""
        self._closed.set()

    def _run(self) -> None:
        while not self._closed.is_set():
            self._execute(self._queue.get())

    def _execute(self, job: Job) -> None:
        job.state = "running"

        def progress(done: float, total: int) -> None:
            if self._closed.is_set():
                raise Cancelled(f"{job.id} was stopped: the server closed before it committed")
            job.done, job.total = done, total

        try:
            progress(0, 0)
            job.result = job.work(progress)
            job.result["version"] = self.publish()
            job.done = job.total
            job.state = "done"
        except Exception as err:
            refused = err if isinstance(err, (NdbError, Cancelled)) else environment_error(err)
            if refused is None:  # a bug: keep its traceback in the server's log
                log.error("job %s failed:\n%s", job.id, traceback.format_exc())
                refused = err
            job.error = one_line(refused)
            job.state = "failed"
        job.finished = time.time()
