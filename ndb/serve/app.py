"""The HTTP side of ``ndb serve``: OpenAI-compatible completions (streamed as server-sent
events when asked), the facts and their edit jobs, health, metrics, and the page at ``/``.

Every refusal is a 4xx with one line in OpenAI's error shape,
``{"error": {"message": ..., "type": ..., "code": ...}}``, and changes nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from ndb import edits
from ndb.compute import check_encodable
from ndb.errors import FactError, NdbError, one_line
from ndb.facts import Fact, as_facts, check_text
from ndb.serve.engine import Answer, Finished, Sampling
from ndb.serve.server import Server

MAX_PROMPT_CHARS = 100_000  # before tokenizing; the token limit is the real bound


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": one_line(message), "type": kind,
                                   "code": status}}, status_code=status)


# -- request bodies ----------------------------------------------------------------------------
class _Body(BaseModel):
    # fields other clients send and ndb has no use for (user, logprobs: null, ...) are ignored
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    ndb: dict[str, bool] = {}  # {"edited": false}: the unedited model


class _Completion(_Body):
    prompt: str | list[str]


class _Part(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[_Part]


class _Chat(_Body):
    messages: list[_Message] = Field(min_length=1, max_length=1000)


def _validated(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "body"
        raise ApiError(400, f"{where}: {first['msg']}") from None


async def _json_body(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes; this server takes at "
                            f"most {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes, the most this "
                                "server takes")
    try:
        return json.loads(bytes(body))
    except (ValueError, RecursionError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({one_line(err)})") from None


# -- the app -----------------------------------------------------------------------------------
def create_app(server: Server) -> FastAPI:
    """The FastAPI application over ``server``."""
    app = FastAPI(title="ndb", docs_url=None, redoc_url=None, openapi_url=None)
    api = _Api(server)

    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return _error(err.status, err.message, err.kind)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return _error(err.status_code, f"{request.method} {request.url.path}: {err.detail}")

    @app.exception_handler(Exception)
    async def bug(_request, err: Exception):  # the traceback goes to the server's log
        return _error(500, f"internal error: {err!r}", "server_error")

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        server.metrics.request(getattr(route, "path", "other"), response.status_code)
        return response

    page = resources.files("ndb.serve").joinpath("page.html").read_text(encoding="utf-8")
    app.get("/", response_class=HTMLResponse)(lambda: page)
    app.get("/health")(api.health)
    app.get("/metrics", response_class=PlainTextResponse)(api.metrics)
    app.get("/v1/models")(api.models)
    app.post("/v1/completions")(api.completions)
    app.post("/v1/chat/completions")(api.chat_completions)
    app.post("/v1/compare")(api.compare)
    app.get("/v1/facts")(api.list_facts)
    app.post("/v1/facts", status_code=202)(api.add_facts)
    app.put("/v1/facts/{fact_id}", status_code=202)(api.update_fact)
    app.delete("/v1/facts/{fact_id}", status_code=202)(api.remove_fact)
    app.get("/v1/jobs")(api.list_jobs)
    app.get("/v1/jobs/{job_id}")(api.job)
    return app


class _Api:
    """The endpoints; each one a method, so that the routes above read as a table."""

    def __init__(self, server: Server):
        self.server = server
        self.limits = server.limits

    # -- status ----------------------------------------------------------------------------
    async def health(self) -> dict:
        snapshot = self.server.snapshot
        return {"status": "ok", "model": self.server.name, "facts": len(snapshot.facts),
                "version": snapshot.version, "jobs_pending": self.server.jobs.pending()}

    async def metrics(self) -> str:
        snapshot = self.server.snapshot
        return self.server.metrics.render({
            "ndb_generation_queue_length": ("Requests waiting for a generation batch.",
                                            self.server.engine.queue.qsize()),
            "ndb_job_queue_length": ("Edit jobs queued or running.",
                                     self.server.jobs.pending()),
            "ndb_facts": ("Facts in the served database version.", len(snapshot.facts)),
            "ndb_database_version": ("The served database version.", snapshot.version),
        })

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.server.name, "object": "model",
                                            "created": 0, "owned_by": "ndb"}]}

    # -- answers ---------------------------------------------------------------------------
    async def completions(self, request: Request):
        body = _validated(_Completion, await _json_body(request, self.limits.max_body_bytes))
        prompt = body.prompt if isinstance(body.prompt, str) else self._one(body.prompt)
        ids = self._encode(lambda tok: tok(prompt)["input_ids"], prompt)
        return await self._respond(body, ids, chat=False)

    async def chat_completions(self, request: Request):
        body = _validated(_Chat, await _json_body(request, self.limits.max_body_bytes))
        messages = [{"role": m.role, "content": self._text(m.content)} for m in body.messages]
        text = "\n".join(m["content"] for m in messages)
        ids = self._encode(lambda tok: list(tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]), text)
        return await self._respond(body, ids, chat=True)

    async def compare(self, request: Request) -> dict:
        """The same request answered with and without the database, side by side."""
        data = await _json_body(request, self.limits.max_body_bytes)
        chat = isinstance(data, dict) and "messages" in data
        body = _validated(_Chat if chat else _Completion, data)
        if body.stream:
            raise ApiError(400, "stream: /v1/compare answers at once (stream each model "
                                "through /v1/completions with ndb.edited instead)")
        if chat:
            messages = [{"role": m.role, "content": self._text(m.content)}
                        for m in body.messages]
            ids = self._encode(lambda tok: list(tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]), "\n".join(m["content"] for m in messages))
        else:
            prompt = body.prompt if isinstance(body.prompt, str) else self._one(body.prompt)
            ids = self._encode(lambda tok: tok(prompt)["input_ids"], prompt)
        sampling = self._sampling(body, ids, chat)
        edited, unedited = await asyncio.gather(self._collect(ids, sampling, True),
                                                self._collect(ids, sampling, False))
        return {"object": "ndb.comparison", "model": self.server.name,
                "edited": self._side(*edited), "unedited": self._side(*unedited)}

    @staticmethod
    def _side(text: str, finished: Finished) -> dict:
        return {"text": text, "finish_reason": finished.reason,
                "ndb": {"fired": finished.fired, "version": finished.version}}

    @staticmethod
    def _one(prompts: list[str]) -> str:
        if len(prompts) != 1:
            raise ApiError(400, "prompt: give one prompt per request (this server answers "
                                f"one; got {len(prompts)})")
        return prompts[0]

    @staticmethod
    def _text(content: str | list[_Part]) -> str:
        return content if isinstance(content, str) else "".join(p.text for p in content)

    def _encode(self, encode: Callable[[Any], list[int]], text: str) -> list[int]:
        try:
            check_text(text, "prompt", empty_ok=True, limit=MAX_PROMPT_CHARS)
        except FactError as err:
            raise ApiError(400, str(err)) from None
        with self.server.tokenizer_lock:
            ids = list(encode(self.server.tokenizer))
        if len(ids) > self.limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                                f"{self.limits.max_prompt_tokens}")
        return ids

    def _sampling(self, body: _Body, ids: list[int], chat: bool) -> Sampling:
        if body.model not in (None, self.server.name):
            raise ApiError(404, f"model {body.model!r} is not served here (this server "
                                f"serves {self.server.name!r})", "not_found_error")
        if body.n != 1:
            raise ApiError(400, f"n: this server gives one answer per request, not {body.n}")
        wanted = body.max_completion_tokens or body.max_tokens
        most = self.limits.max_tokens
        if wanted is not None and wanted > most:
            raise ApiError(400, f"max_tokens: {wanted} is more than this server generates "
                                f"per answer ({most})")
        max_tokens = wanted or (most if chat else 16)  # OpenAI's default for completions
        context = getattr(self.server.model.config, "max_position_embeddings", None)
        if context and len(ids) + max_tokens > context:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) and max_tokens "
                                f"({max_tokens}) exceed the model's context ({context})")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: at most 4 non-empty strings")
        return Sampling(max_tokens, body.temperature, body.top_p, body.seed, tuple(stops))

    async def _respond(self, body: _Body, ids: list[int], chat: bool):
        sampling = self._sampling(body, ids, chat)
        edited = body.ndb.get("edited", True)
        shape = _ChatShape(self.server.name) if chat else _CompletionShape(self.server.name)
        if body.stream:
            events = self._submit(ids, sampling, edited)
            return StreamingResponse(_sse(events, shape), media_type="text/event-stream")
        text, finished = await self._collect(ids, sampling, edited)
        return shape.whole(text, finished, edited)

    def _submit(self, ids: list[int], sampling: Sampling, edited: bool) -> _Events:
        if self.server.engine.queue.qsize() >= self.limits.max_waiting:
            raise ApiError(503, f"{self.limits.max_waiting} requests are waiting already; "
                                "try again shortly", "server_busy")
        events = _Events(asyncio.get_running_loop())
        events.answer = Answer(ids, sampling, edited, events.put)
        self.server.engine.submit(events.answer)
        return events

    async def _collect(self, ids: list[int], sampling: Sampling, edited: bool
                       ) -> tuple[str, Finished]:
        events = self._submit(ids, sampling, edited)
        pieces = []
        async for event in events:
            if isinstance(event, Finished):
                return "".join(pieces), event
            pieces.append(event)
        raise AssertionError("the engine ended an answer without finishing it")

    # -- facts and jobs --------------------------------------------------------------------
    async def list_facts(self) -> dict:
        snapshot = self.server.snapshot
        return {"object": "list", "version": snapshot.version,
                "data": [_fact_record(i, f) for i, f in sorted(snapshot.facts.items())]}

    async def add_facts(self, request: Request) -> JSONResponse:
        self._authorize(request)
        data = await _json_body(request, self.limits.max_body_bytes)
        update = False
        if isinstance(data, dict):
            update = data.get("update", False)
            if not isinstance(update, bool):
                raise ApiError(400, "update: expected true or false")
            data = data.get("facts")
        if not isinstance(data, list):
            raise ApiError(400, 'the body is a list of facts, or {"facts": [...], '
                                '"update": false}')
        if len(data) > self.limits.max_facts:
            raise ApiError(413, f"{len(data)} facts in one request; this server takes at most "
                                f"{self.limits.max_facts}")
        facts = self._checked(data)
        try:  # refused keys now, not as a failed job (the job checks again when it runs)
            edits.sort_out(self.server.snapshot.facts, facts, update, False, "the database")
        except FactError as err:
            raise ApiError(409, str(err)) from None
        server = self.server

        def work(progress) -> dict:
            added = server.db.add(facts, server.twin, server.twin_tokenizer, update=update,
                                  progress=progress)
            return {"ids": list(added), "skipped": added.skipped, "updated": added.updated}

        return self._queued("add", work)

    async def update_fact(self, fact_id: str, request: Request) -> JSONResponse:
        self._authorize(request)
        fact_id = self._known_id(fact_id)
        (fact,) = self._checked([await _json_body(request, self.limits.max_body_bytes)])
        server = self.server

        def work(progress) -> dict:
            server.db.update(fact_id, fact, server.twin, server.twin_tokenizer,
                             progress=progress)
            return {"updated": [fact_id]}

        return self._queued("update", work)

    async def remove_fact(self, fact_id: str, request: Request) -> JSONResponse:
        self._authorize(request)
        fact_id = self._known_id(fact_id)
        server = self.server

        def work(progress) -> dict:
            server.db.remove([fact_id], server.twin, server.twin_tokenizer, progress=progress)
            return {"removed": [fact_id]}

        return self._queued("remove", work)

    async def list_jobs(self) -> dict:
        return {"object": "list", "data": [j.to_json() for j in self.server.jobs.all()]}

    async def job(self, job_id: str) -> dict:
        job = self.server.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r} (jobs are kept while the server runs)",
                           "not_found_error")
        return job.to_json()

    def _authorize(self, request: Request) -> None:
        key = self.server.api_key
        given = request.headers.get("authorization", "").encode()
        if key and not hmac.compare_digest(given, f"Bearer {key}".encode()):
            raise ApiError(401, "changing facts needs this server's API key (header "
                                "'Authorization: Bearer KEY')", "authentication_error")

    def _known_id(self, text: str) -> int:
        if not text.isdigit() or len(text) > 18:
            raise ApiError(400, f"{text!r} is not a fact id (ids are the integers that "
                                "GET /v1/facts lists)")
        if int(text) not in self.server.snapshot.facts:
            raise ApiError(404, f"no fact with id {text}", "not_found_error")
        return int(text)

    def _checked(self, records: list) -> list[Fact]:
        """Facts that parse and that the model can encode, or a 400 naming the first bad one."""
        server = self.server
        try:
            facts = edits.unique(as_facts(records))
            with server.tokenizer_lock:
                check_encodable(facts, server.model, server.tokenizer, server.db.config.prefixes,
                                server.db.config.compute)
        except NdbError as err:
            raise ApiError(400, one_line(err)) from None
        return facts

    def _queued(self, kind: str, work) -> JSONResponse:
        job = self.server.jobs.submit(kind, work)
        if job is None:
            raise ApiError(429, f"{self.limits.max_jobs} edit jobs are queued already; try "
                                "again when some have finished", "server_busy")
        return JSONResponse({"job": job.to_json()}, status_code=202,
                            headers={"Location": f"/v1/jobs/{job.id}"})


def _fact_record(fact_id: int, fact: Fact) -> dict:
    return {"id": fact_id, "key": fact.key, **fact.to_json()}


# -- from the engine's thread to the response --------------------------------------------------
class _Events:
    """What the engine emits for one answer, read by the event loop as it arrives."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.answer: Answer | None = None

    def put(self, event: object) -> None:  # called from the engine's thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is gone (the server is stopping): stop generating
            self.answer.cancelled = True

    def __aiter__(self) -> AsyncIterator[object]:
        return self._events()

    async def _events(self) -> AsyncIterator[object]:
        try:
            while True:
                event = await self._queue.get()
                if isinstance(event, Exception):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:  # the client left, or the answer ended: nothing more to compute
            self.answer.cancelled = True


class _CompletionShape:
    """OpenAI's text completion objects."""

    object = "text_completion"

    def __init__(self, model: str):
        self.model, self.id, self.created = model, f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def _head(self) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model}

    def choice(self, text: str | None, reason: str | None) -> dict:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

    def whole(self, text: str, finished: Finished, edited: bool) -> dict:
        return {**self._head(), "choices": [self.choice(text, finished.reason)],
                "usage": _usage(finished), "ndb": _extension(finished, edited)}

    def first(self) -> dict | None:
        return None

    def piece(self, text: str) -> dict:
        return {**self._head(), "choices": [self.choice(text, None)]}

    def last(self, finished: Finished, edited: bool) -> dict:
        return {**self._head(), "choices": [self.choice(None, finished.reason)],
                "usage": _usage(finished), "ndb": _extension(finished, edited)}


class _ChatShape(_CompletionShape):
    """OpenAI's chat completion objects."""

    object = "chat.completion"

    def __init__(self, model: str):
        super().__init__(model)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"

    def whole(self, text: str, finished: Finished, edited: bool) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finished.reason}
        return {**self._head(), "choices": [choice], "usage": _usage(finished),
                "ndb": _extension(finished, edited)}

    def _chunk(self, delta: dict, reason: str | None) -> dict:
        return {**self._head(), "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": reason}]}

    def first(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def piece(self, text: str) -> dict:
        return self._chunk({"content": text}, None)

    def last(self, finished: Finished, edited: bool) -> dict:
        return {**self._chunk({}, finished.reason), "usage": _usage(finished),
                "ndb": _extension(finished, edited)}


def _usage(finished: Finished) -> dict:
    return {"prompt_tokens": finished.prompt_tokens,
            "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}


def _extension(finished: Finished, edited: bool) -> dict:
    """ndb's own field of an answer: which facts fired, from which database version."""
    return {"edited": edited, "fired": finished.fired, "version": finished.version}


async def _sse(events: _Events, shape: _CompletionShape) -> AsyncIterator[str]:
    def data(obj: object) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    first = shape.first()
    if first is not None:
        yield data(first)
    try:
        async for event in events:
            if isinstance(event, Finished):
                yield data(shape.last(event, events.answer.edited))
            else:
                yield data(shape.piece(event))
    except Exception as err:  # a bug in the engine: the client hears of it, then the end
        yield data({"error": {"message": one_line(f"internal error: {err!r}"),
                              "type": "server_error", "code": 500}})
    yield "data: [DONE]\n\n"
