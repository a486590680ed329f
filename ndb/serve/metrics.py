"""Counters of a running server, rendered in Prometheus' text format."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

TOKENS_WINDOW_S = 30.0  # tokens/s is measured over the batches of the last half minute


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, status) -> count
        self.tokens = 0
        self.batches = 0
        self.batch_rows = 0
        self.gate_hits = 0
        self._recent: deque[tuple[float, int]] = deque()  # (end time, tokens) per batch

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[route, status] += 1

    def batch(self, rows: int, tokens: int, hits: int, _seconds: float) -> None:
        with self._lock:
            self.batches += 1
            self.batch_rows += rows
            self.tokens += tokens
            self.gate_hits += hits
            self._recent.append((time.monotonic(), tokens))

    def tokens_per_second(self) -> float:
        with self._lock:
            start = time.monotonic() - TOKENS_WINDOW_S
            while self._recent and self._recent[0][0] < start:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / TOKENS_WINDOW_S

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; ``gauges``: name -> (help, value) read at scrape time."""
        lines = ["# HELP ndb_requests_total HTTP requests answered, by route and status.",
                 "# TYPE ndb_requests_total counter"]
        with self._lock:
            for (route, status), count in sorted(self.requests.items()):
                lines.append(f'ndb_requests_total{{route="{route}",status="{status}"}} {count}')
            counters = {
                "ndb_generated_tokens_total": ("Tokens generated.", self.tokens),
                "ndb_batches_total": ("Generation batches run.", self.batches),
                "ndb_batched_requests_total": ("Requests answered in those batches.",
                                               self.batch_rows),
                "ndb_gate_hits_total": ("Tokens whose key passed the gate (a fact fired).",
                                        self.gate_hits),
            }
        for name, (text, value) in counters.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {value}"]
        gauges = {"ndb_tokens_per_second": (f"Tokens generated per second, over the last "
                                            f"{TOKENS_WINDOW_S:.0f} s.",
                                            self.tokens_per_second()), **gauges}
        for name, (text, value) in gauges.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"
