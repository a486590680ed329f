"""Generation for the server: requests that arrive together are batched (left-padded, one
forward pass per token for the whole batch), each row sampled with its own settings and
stopped on its own, and every new piece of text handed to its request as it is decoded.

One scheduler thread runs the batches; a batch pins one database snapshot (or none, for
the unedited model) for its whole life, so every answer comes from one database version.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ndb.serve.snapshot import ServingHook, Snapshot


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Finished:
    """The end of an answer: why it ended, and what the database did for it."""

    reason: str  # "stop" (end of text or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    fired: list[int]  # ids of the facts whose residual was added
    version: int  # the database version the answer was read from (-1: unedited)


@dataclass
class Answer:
    """One answer to compute. ``emit`` is called from the scheduler thread with each new
    piece of text (a str) and finally with a :class:`Finished` (or an exception)."""

    prompt_ids: list[int]
    sampling: Sampling
    edited: bool
    emit: Callable[[object], None]
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)


class Stopper:
    """Turns a row's generated tokens into text pieces safe to send: never half a
    character, never the start of what may become a stop string, nothing after a stop."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        ends = [text.find(s, max(0, self.sent - len(s))) for s in self.stops]
        ends = [e for e in ends if e >= 0]
        if ends:
            self.stopped = True
            return self._take(text, min(ends))
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)
        return self._take(text, len(text) - held)

    def flush(self) -> str:
        """What was held back, once the answer ended without a stop string."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return "" if self.stopped else self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        piece = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None
           ) -> int:
    """The next token from one row's logits: greedy at temperature 0, else nucleus."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    # in float64 (which holds every positive temperature; float32 rounds 1e-300 to 0) and
    # from the largest logit down, so that a tiny temperature gives -inf, never inf or NaN
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / sampling.temperature, dim=-1)
    if sampling.top_p >= 1:
        return int(torch.multinomial(probs.cpu(), 1, generator=generator))
    kept, tokens = nucleus(probs, sampling.top_p)  # drawn among the candidates alone
    return int(tokens[torch.multinomial(kept.cpu(), 1, generator=generator)])


NUCLEUS_FIRST = 64  # the likeliest tokens a nucleus is looked for among first


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, token ids) of candidates that hold the top-p nucleus, the tokens
    outside it at probability 0: a token is in it if the tokens likelier than it sum to at
    most ``top_p``. The candidates are the likeliest 64, or 256, ..., once they sum to more
    than ``top_p``: a partial sort, where sorting all 49k probabilities and drawing among
    them took 6-8 ms per row and step on a 2-core CPU, against 0.3 for this (SmolLM2 after
    "The capital of France is", top_p 0.9)."""
    k = min(NUCLEUS_FIRST, len(probs))
    while True:
        top, order = probs.topk(k)
        cumulative = top.cumsum(0)
        if cumulative[-1] > top_p or k == len(probs):
            break
        k = min(4 * k, len(probs))
    top[cumulative - top > top_p] = 0
    return top, order


class Engine:
    """The scheduler thread and the batches it runs."""

    def __init__(self, model: nn.Module, tokenizer, hook: ServingHook,
                 current: Callable[[], Snapshot], *, max_batch: int = 16,
                 window_s: float = 0.01,
                 on_batch: Callable[[int, int, int, float], None] | None = None):
        self.model, self.tokenizer, self.hook = model, tokenizer, hook
        self.current = current
        self.max_batch, self.window_s = max_batch, window_s
        # told (requests, tokens generated, gate hits, seconds) after each batch
        self.on_batch = on_batch or (lambda rows, tokens, hits, seconds: None)
        self.device = next(model.parameters()).device
        self.eos = self._eos_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.unedited = Snapshot.unedited(hook.config.d_value, self.device)
        self.queue: queue.Queue[Answer] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ndb-generate", daemon=True)
        self._thread.start()

    @staticmethod
    def _eos_ids(model, tokenizer) -> set[int]:
        ids = model.generation_config.eos_token_id if model.generation_config else None
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        return {*ids, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}

    def submit(self, answer: Answer) -> None:
        self.queue.put(answer)

    def _run(self) -> None:
        while True:
            batch = self._collect()
            for edited in (True, False):
                rows = [r for r in batch if r.edited == edited and not r.cancelled]
                if rows:
                    self._serve(rows, self.current() if edited else self.unedited)

    def _collect(self) -> list[Answer]:
        """The next request, and those arriving within the collection window after it."""
        batch = [self.queue.get()]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _serve(self, requests: list[Answer], snapshot: Snapshot) -> None:
        try:
            self._generate(requests, snapshot)
        except Exception as err:  # a bug: every request of the batch hears of it
            for request in requests:
                request.emit(err)

    @torch.no_grad()
    def _generate(self, requests: list[Answer], snapshot: Snapshot) -> None:
        started = time.monotonic()
        ids, mask = self._left_padded([r.prompt_ids for r in requests])
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        generators = [self._generator(r.sampling.seed) for r in requests]
        stoppers = [Stopper(self.tokenizer, r.sampling.stop) for r in requests]
        finished: list[str | None] = [None] * len(requests)
        counts = [0] * len(requests)
        cache = None
        with self.hook.pinned(snapshot, len(requests)) as pin:
            while True:
                past = 0 if cache is None else cache.get_seq_length()
                pin.expect(ids.shape[1], mask, past)
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 cache=cache, use_cache=True)
                cache, logits = out.cache, out.logits[:, -1]
                next_ids = torch.full((len(requests), 1), self.pad, dtype=torch.long)
                for row, request in enumerate(requests):
                    if finished[row] is not None:
                        continue
                    if request.cancelled:
                        finished[row] = "cancelled"
                        continue
                    token = sample(logits[row], request.sampling, generators[row])
                    next_ids[row, 0] = token
                    counts[row] += 1
                    finished[row] = self._step(request, stoppers[row], token)
                    if finished[row] is not None:
                        self._finish(request, stoppers[row], Finished(
                            finished[row], len(request.prompt_ids), counts[row],
                            sorted(pin.fired[row]), snapshot.version))
                if all(f is not None for f in finished):
                    break
                ids = next_ids.to(self.device)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                positions = positions[:, -1:] + 1
        self.on_batch(len(requests), sum(counts), pin.hits, time.monotonic() - started)

    def _step(self, answer: Answer, stopper: Stopper, token: int) -> str | None:
        """Hand out the text of ``token``; why the row ends now, or None."""
        if token in self.eos:
            return "stop"
        piece = stopper.push(token)
        if piece:
            answer.emit(piece)
        if stopper.stopped:
            return "stop"
        return "length" if len(stopper.ids) >= answer.sampling.max_tokens else None

    @staticmethod
    def _finish(answer: Answer, stopper: Stopper, finished: Finished) -> None:
        rest = stopper.flush()
        if rest:
            answer.emit(rest)
        answer.emit(finished)

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        return ids.to(self.device), mask.to(self.device)

    @staticmethod
    def _generator(seed: int | None) -> torch.Generator:
        generator = torch.Generator()
        if seed is None:
            generator.seed()  # from the OS, leaving torch's global generator alone
        else:
            generator.manual_seed(seed)
        return generator
