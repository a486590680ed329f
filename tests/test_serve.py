"""ndb serve: a real uvicorn server on a loopback port, talked to with the official openai
client and with httpx (streamed and not), its facts changed through jobs while it answers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI

from ndb import ComputeConfig, NeuralDB
from ndb.completion import complete
from ndb.errors import ConfigError
from ndb.serve import Limits, Server, running
from ndb.serve.engine import Sampling, Stopper, nucleus, sample
from ndb.serve.server import check_bind

from conftest import FACTS, FAST_COMPUTE, tiny_model, write_jsonl

KEYED = [replace(FACTS[0], key="paris"), FACTS[1]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_db(path: Path, model, tokenizer, facts=KEYED, gamma: float = 0.9) -> NeuralDB:
    compute = ComputeConfig(**{**FAST_COMPUTE, "n_prefixes": 0})
    db = NeuralDB.create(path, model, tokenizer, layer=2, gamma=gamma, compute=compute)
    db.add(facts)
    return db


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tokenizer):
    """One server for the tests that change no fact."""
    model, path = tiny_model("llama"), tmp_path_factory.mktemp("served") / "db"
    server = Server(make_db(path, model, tokenizer), model, tokenizer, api_key="secret",
                    limits=Limits(max_body_bytes=4096, max_tokens=32, max_prompt_tokens=64))
    with running(server) as url:
        yield url, server


@pytest.fixture
def served(shared):
    url, server = shared
    server.engine.window_s = 0.01
    return url, server


@pytest.fixture
def editable(tmp_path, llama):
    """A server of its own, for a test that changes facts."""
    model, tokenizer = llama
    server = Server(make_db(tmp_path / "db", model, tokenizer), model, tokenizer,
                    api_key="secret")
    with running(server) as url:
        yield url, server, tmp_path / "db"


def wait_for(client: httpx.Client, job: dict) -> dict:
    deadline = time.monotonic() + 120
    while job["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
        job = client.get(f"/v1/jobs/{job['id']}").json()
    assert job["state"] == "done", job
    return job


def facts_by_id(client: httpx.Client) -> tuple[int, dict[int, dict]]:
    listing = client.get("/v1/facts").json()
    return listing["version"], {f["id"]: f for f in listing["data"]}


AUTH = {"Authorization": "Bearer secret"}


def test_openai_client_completions_and_chat_streamed_or_not(served, tokenizer):
    url, server = served
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [server.name]
    prompt = FACTS[0].text
    whole = client.completions.create(model=server.name, prompt=prompt, max_tokens=6,
                                      temperature=0)
    assert whole.model_extra["ndb"] == {"edited": True, "fired": [0], "version": 1}
    assert whole.usage.completion_tokens == 6 and whole.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=server.name, prompt=prompt, max_tokens=6,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].model_extra["ndb"]["fired"] == [0]

    # the same greedy answers as the library's generate(), with and without the database
    reference = tiny_model("llama")
    NeuralDB.from_pretrained(server.db.path).attach(reference, tokenizer)
    assert whole.choices[0].text == complete(reference, tokenizer, prompt, 6)
    unedited = client.completions.create(model=server.name, prompt=prompt, max_tokens=6,
                                         temperature=0, extra_body={"ndb": {"edited": False}})
    assert unedited.model_extra["ndb"] == {"edited": False, "fired": [], "version": -1}
    assert unedited.choices[0].text == complete(server.model, tokenizer, prompt, 6)

    messages = [{"role": "user", "content": "Where is Paris?"}]
    chat = client.chat.completions.create(model=server.name, messages=messages, max_tokens=5,
                                          temperature=0)
    assert chat.choices[0].message.content == complete(reference, tokenizer, messages[0][
        "content"], 5, chat=True)
    streamed = list(client.chat.completions.create(model=server.name, messages=messages,
                                                   max_tokens=5, temperature=0, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == \
        chat.choices[0].message.content
    assert streamed[-1].usage.completion_tokens == 5


def test_httpx_stream_is_server_sent_events_and_compare_answers_both(served):
    url, server = served
    with httpx.Client(base_url=url, timeout=60) as client:
        body = {"prompt": FACTS[1].text, "max_tokens": 4, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)
        events = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
        assert events[-1]["ndb"]["fired"] == [1]
        side_by_side = client.post("/v1/compare", json={**body, "stream": False}).json()
        streamed_text = "".join(e["choices"][0]["text"] for e in events)
        assert side_by_side["edited"]["text"] == streamed_text
        assert side_by_side["edited"]["ndb"]["fired"] == [1]
        assert side_by_side["unedited"]["ndb"] == {"fired": [], "version": -1}


def test_requests_that_arrive_together_are_batched_and_answer_as_alone(served):
    url, server = served
    prompts = [f.text for f in FACTS] + ["The capital of Italy is", "Hello"]
    with httpx.Client(base_url=url, timeout=60) as client:
        def ask(prompt: str) -> dict:
            return client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5,
                                                         "temperature": 0}).json()

        alone = [ask(p) for p in prompts]
        rows: list[int] = []  # per batch that ends from here on (alone's last may be one)
        counted = server.engine.on_batch
        server.engine.on_batch = lambda n, *rest: rows.append(n) or counted(n, *rest)
        try:
            server.engine.window_s = 0.5  # all of them arrive within one collection window
            with ThreadPoolExecutor(len(prompts)) as pool:
                together = list(pool.map(ask, prompts))
            # a batch is counted just after its last answer went out
            deadline = time.monotonic() + 10
            while sum(rows) < len(prompts):
                assert time.monotonic() < deadline, rows
                time.sleep(0.01)
        finally:
            server.engine.on_batch = counted
    assert max(rows) > 1, rows  # some shared a batch
    for one, batched in zip(alone, together):
        assert batched["choices"][0]["text"] == one["choices"][0]["text"]
        assert batched["ndb"] == one["ndb"]


@pytest.mark.parametrize("scale", [8.0, 1.0, 0.01])  # peaked to nearly flat: the last
def test_nucleus_equals_a_full_sort(scale):  # needs the whole vocabulary looked at
    """The nucleus found by a partial sort is the one a sort of all probabilities gives."""
    generator = torch.Generator().manual_seed(0)
    for top_p in (0.1, 0.5, 0.9, 0.999):
        probs = torch.softmax(scale * torch.randn(49152, generator=generator), dim=-1)
        ranked, order = probs.sort(descending=True)
        ranked[ranked.cumsum(0) - ranked > top_p] = 0
        expected = torch.zeros_like(probs).scatter(0, order, ranked)
        top, tokens = nucleus(probs, top_p)
        assert torch.equal(torch.zeros_like(probs).scatter(0, tokens, top), expected)


def test_a_tiny_temperature_draws_the_likeliest_token(served):
    """Logits divided by 1e-300 overflowed to inf, and the softmax to NaN: a 500 for the
    request and for every other request of its batch."""
    logits = 5 * torch.randn(49152, generator=torch.Generator().manual_seed(1))
    for temperature in (1e-300, 1e-45, 1e-8):
        for top_p in (1.0, 0.5):
            drawn = sample(logits, Sampling(temperature=temperature, top_p=top_p),
                           torch.Generator().manual_seed(0))
            assert drawn == int(logits.argmax())
    url, _ = served
    with httpx.Client(base_url=url, timeout=60) as client:
        def ask(temperature: float) -> httpx.Response:
            return client.post("/v1/completions", json={
                "prompt": FACTS[0].text, "max_tokens": 4, "temperature": temperature})

        tiny = ask(1e-300)
        assert tiny.status_code == 200, tiny.text
        assert tiny.json()["choices"][0]["text"] == ask(0).json()["choices"][0]["text"]


def test_seed_reproduces_a_sample_and_stop_cuts_the_answer(served):
    url, _ = served
    with httpx.Client(base_url=url, timeout=60) as client:
        def ask(**settings) -> dict:
            body = {"prompt": "The weather today", "max_tokens": 12, **settings}
            return client.post("/v1/completions", json=body).json()["choices"][0]

        first, again = ask(temperature=1, seed=7), ask(temperature=1, seed=7)
        assert first["text"] == again["text"]
        assert {ask(temperature=1, seed=s, top_p=0.9)["text"] for s in range(4)} != \
            {first["text"]}
        greedy = ask(temperature=0)["text"]
        stop = greedy[len(greedy) // 2: len(greedy) // 2 + 3]
        cut = ask(temperature=0, stop=[stop])
        assert cut == {**cut, "text": greedy[: greedy.index(stop)], "finish_reason": "stop"}


def test_stopper_never_sends_the_start_of_a_stop_string(tokenizer):
    ids = tokenizer("one two three four", add_special_tokens=False)["input_ids"]
    stopper = Stopper(tokenizer, ("three",))
    sent = "".join(stopper.push(i) for i in ids)
    assert sent == " one two " or sent == "one two "
    assert stopper.stopped
    open_ended = Stopper(tokenizer, (" thr",))
    pieces = [open_ended.push(i) for i in ids[:2]]
    assert "".join(pieces) + open_ended.flush() == tokenizer.decode(ids[:2])


def test_facts_change_through_jobs_and_show_up_when_they_commit(editable):
    url, server, path = editable
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as client:
        response = client.post("/v1/facts", json=[FACTS[2].to_json()])
        assert response.status_code == 202
        assert response.headers["location"] == f"/v1/jobs/{response.json()['job']['id']}"
        job = wait_for(client, response.json()["job"])
        assert job["result"]["ids"] == [2] and job["done"] == job["total"] == 1
        version, facts = facts_by_id(client)
        assert version == job["result"]["version"] == 2 and facts[2]["subject"] == "Toyota"
        answer = client.post("/v1/completions", json={"prompt": FACTS[2].text,
                                                       "max_tokens": 2, "temperature": 0}).json()
        assert answer["ndb"] == {"edited": True, "fired": [2], "version": 2}

        changed = {**FACTS[2].to_json(), "target_new": "Paris"}
        wait_for(client, client.put("/v1/facts/2", json=changed).json()["job"])
        assert facts_by_id(client)[1][2]["target_new"] == "Paris"
        wait_for(client, client.delete("/v1/facts/2").json()["job"])
        version, facts = facts_by_id(client)
        assert 2 not in facts and version == 4
        answer = client.post("/v1/completions", json={"prompt": FACTS[2].text,
                                                       "max_tokens": 2, "temperature": 0}).json()
        assert answer["ndb"]["fired"] == []
    assert sorted(f.subject for f in NeuralDB(path)) == ["Danielle Darrieux", "Paris"]


BAD = [  # (method, path, json or raw bytes, with the API key, status, message)
    ("POST", "/v1/completions", b'{"prompt": ', False, 400, "not valid JSON"),
    ("POST", "/v1/completions", b"x" * 5000, False, 413, "at most 4096"),
    ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 33}, False, 400,
     "more than this server generates per answer (32)"),
    ("POST", "/v1/completions", {"prompt": "word " * 100}, False, 400,
     "this server takes at most 64"),
    ("POST", "/v1/completions", {"prompt": "Hi", "n": 2}, False, 400, "one answer"),
    ("POST", "/v1/completions", {"prompt": "Hi", "model": "gpt-4"}, False, 404,
     "'gpt-4' is not served here"),
    ("POST", "/v1/completions", b'{"prompt": "Hi", "temperature": NaN}', False, 400,
     "temperature"),
    ("POST", "/v1/completions", {"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, False,
     400, "at most 4"),
    ("POST", "/v1/completions", {"prompt": "bell \x07"}, False, 400, "control character"),
    ("POST", "/v1/chat/completions", {"messages": []}, False, 400, "messages"),
    ("POST", "/v1/facts", [FACTS[2].to_json()], False, 401, "API key"),
    ("DELETE", "/v1/facts/0", None, False, 401, "API key"),
    ("POST", "/v1/facts", [{"subject": "Rome", "prompt": "{} is in"}], True, 400,
     "target_new"),
    ("POST", "/v1/facts", [{**FACTS[3].to_json(), "key": "paris"}], True, 409,
     "key 'paris' is already used by fact 0"),
    ("POST", "/v1/facts", {"facts": "nope"}, True, 400, "a list of facts"),
    ("DELETE", "/v1/facts/7", None, True, 404, "no fact with id 7"),
    ("PUT", "/v1/facts/7", FACTS[2].to_json(), True, 404, "no fact with id 7"),
    ("DELETE", "/v1/facts/paris", None, True, 400, "not a fact id"),
    ("GET", "/v1/jobs/job-99", None, False, 404, "no job"),
]


@pytest.mark.parametrize("method, path, body, keyed, status, message", BAD)
def test_bad_requests_are_refused_with_a_json_error_and_change_nothing(
        served, method, path, body, keyed, status, message):
    url, server = served
    with httpx.Client(base_url=url, timeout=60) as client:
        before = client.get("/v1/facts").json()
        raw = isinstance(body, bytes)
        response = client.request(method, path, headers=AUTH if keyed else {},
                                  content=body if raw else None,
                                  json=None if raw or body is None else body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert message in error["message"] and "\n" not in error["message"]
        assert client.get("/v1/facts").json() == before
    assert server.jobs.all() == []


def test_a_wrong_key_is_refused_and_other_hosts_need_a_key():
    with pytest.raises(ConfigError, match="--api-key"):
        check_bind("0.0.0.0", free_port(), None)
    check_bind("0.0.0.0", free_port(), "secret")
    check_bind("127.0.0.1", free_port(), None)


def test_health_and_metrics(served):
    url, server = served
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").json() == {"status": "ok", "model": "tiny-llama",
                                                "facts": 2, "version": 1, "jobs_pending": 0}
        before = _metrics(client.get("/metrics").text)
        # greedy, so that no end of text can be drawn before the third token
        answer = client.post("/v1/completions", json={"prompt": FACTS[0].text,
                                                      "max_tokens": 3, "temperature": 0})
        # a batch is counted when it ends, just after its last answer went out
        deadline = time.monotonic() + 10
        while (after := _metrics(client.get("/metrics").text))["ndb_batches_total"] == \
                before["ndb_batches_total"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    ok = 'ndb_requests_total{route="/v1/completions",status="200"}'
    assert after[ok] - before.get(ok, 0) == 1
    assert answer.json()["usage"]["completion_tokens"] == 3
    assert after["ndb_generated_tokens_total"] - before["ndb_generated_tokens_total"] == 3
    assert after["ndb_gate_hits_total"] > before["ndb_gate_hits_total"]
    assert after["ndb_tokens_per_second"] > 0
    assert after["ndb_generation_queue_length"] == 0 and after["ndb_facts"] == 2


def _metrics(text: str) -> dict[str, float]:
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))}


def test_a_request_reads_one_version_while_commits_land_mid_generation(tmp_path, llama):
    """With gamma 0 nearly every token fires some fact, so a request that read the live
    database would fire facts of the newer version after the commits."""
    model, tokenizer = llama
    server = Server(make_db(tmp_path / "db", model, tokenizer, gamma=0.0), model, tokenizer)
    paused, resume, calls = threading.Event(), threading.Event(), []

    def pause_at_third_pass(_module, _args, _output):
        if threading.current_thread().name == "ndb-generate":
            calls.append(1)
            if len(calls) == 3:
                paused.set()
                resume.wait(120)

    handle = model.register_forward_hook(pause_at_third_pass)
    with running(server) as url, httpx.Client(base_url=url, timeout=120) as client, \
            ThreadPoolExecutor(1) as pool:
        old_version, old = facts_by_id(client)
        body = {"prompt": FACTS[0].text, "max_tokens": 10, "temperature": 0}
        answer = pool.submit(lambda: client.post("/v1/completions", json=body).json())
        assert paused.wait(60)
        for fact in FACTS[2:]:
            wait_for(client, client.post("/v1/facts", json=[fact.to_json()]).json()["job"])
        for fact_id in old:
            wait_for(client, client.delete(f"/v1/facts/{fact_id}").json()["job"])
        new_version, new = facts_by_id(client)
        resume.set()
        during = answer.result()["ndb"]
        handle.remove()
        after = client.post("/v1/completions", json=body).json()["ndb"]
    assert during["version"] == old_version and set(during["fired"]) <= set(old)
    assert during["fired"]  # the test means something: facts fired
    assert after["version"] == new_version and set(after["fired"]) <= set(new)
    assert after["fired"]


def test_concurrent_clients_while_facts_change_all_succeed_on_one_version(tmp_path, llama):
    model, tokenizer = llama
    server = Server(make_db(tmp_path / "db", model, tokenizer), model, tokenizer)
    with running(server) as url, httpx.Client(base_url=url, timeout=120) as editor:
        versions = dict([facts_by_id(editor)])
        done = threading.Event()

        def client_loop(n: int) -> list[dict]:
            answers = []
            with httpx.Client(base_url=url, timeout=120) as client:
                while not done.is_set() or not answers:
                    fact = FACTS[len(answers) % len(FACTS)]
                    body = {"prompt": fact.text, "max_tokens": 4, "stream": n % 2 == 0,
                            "ndb": {"edited": n % 4 != 3}}
                    answers.append(_answer(client, body))
            return answers

        with ThreadPoolExecutor(8) as pool:
            clients = [pool.submit(client_loop, n) for n in range(8)]
            for edit in [("POST", FACTS[2]), ("DELETE", 0), ("POST", FACTS[3]), ("DELETE", 2)]:
                kind, what = edit
                response = (editor.post("/v1/facts", json=[what.to_json()]) if kind == "POST"
                            else editor.delete(f"/v1/facts/{what}"))
                wait_for(editor, response.json()["job"])
                version, facts = facts_by_id(editor)
                versions[version] = facts
            done.set()
            answers = [a for c in clients for a in c.result()]
    assert all(a["status"] == 200 for a in answers), [a for a in answers if a["status"] != 200]
    seen = set()
    for a in answers:
        ndb = a["ndb"]
        if ndb["edited"]:
            seen.add(ndb["version"])
            assert set(ndb["fired"]) <= set(versions[ndb["version"]])
        else:
            assert ndb == {"edited": False, "fired": [], "version": -1}
    assert len(seen) >= 2  # the answers spanned commits


def _answer(client: httpx.Client, body: dict) -> dict:
    if not body["stream"]:
        response = client.post("/v1/completions", json=body)
        return {"status": response.status_code, **response.json()}
    with client.stream("POST", "/v1/completions", json=body) as response:
        lines = [x for x in response.iter_lines() if x.startswith("data: {")]
        last = json.loads(lines[-1].removeprefix("data: "))
        return {"status": response.status_code, **last}


def test_closing_the_server_stops_a_running_job_uncommitted(editable):
    url, server, path = editable
    computing, release = threading.Event(), threading.Event()

    def hold(_module, _args):
        computing.set()
        release.wait(60)

    handle = server.twin.get_submodule("model.layers.0").register_forward_pre_hook(hold)
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as client:
        job = client.post("/v1/facts", json=[FACTS[2].to_json()]).json()["job"]
        assert computing.wait(60)
        server.jobs.close()
        release.set()
        deadline = time.monotonic() + 60
        while (job := client.get(f"/v1/jobs/{job['id']}").json())["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    handle.remove()
    assert job["state"] == "failed" and "the server closed before it committed" in job["error"]
    assert len(NeuralDB(path)) == 2


def test_cli_refuses_to_write_a_served_database_and_a_kill_keeps_committed_edits(
        tmp_path, tokenizer, tiny_model_dir):
    path = tmp_path / "db"
    make_db(path, tiny_model("llama"), tokenizer).close()
    port = free_port()
    ndb = str(Path(sys.executable).with_name("ndb"))
    process = subprocess.Popen([ndb, "serve", str(path), "--model", str(tiny_model_dir),
                                "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as client:
            deadline = time.monotonic() + 180
            while True:
                assert process.poll() is None, process.stderr.read()
                assert time.monotonic() < deadline
                try:
                    client.get("/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            refused = subprocess.run(
                [ndb, "add", str(path), str(write_jsonl(tmp_path / "f.jsonl",
                                                         [FACTS[3].to_json()])),
                 "--model", str(tiny_model_dir)], capture_output=True, text=True, timeout=300)
            assert refused.returncode == 1 and refused.stderr.count("\n") == 1
            assert (f"is held by process {process.pid}: ndb serve at {url}"
                    in refused.stderr), refused.stderr
            job = client.post("/v1/facts", json=[FACTS[2].to_json()]).json()["job"]
            wait_for(client, job)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
        process.stderr.close()
    reopened = NeuralDB(path)
    assert [f.subject for f in reopened] == ["Paris", "Danielle Darrieux", "Toyota"]
    with reopened.store.writing():  # the lock went with the process
        pass


@pytest.mark.real
def test_end_to_end_on_the_default_model(tmp_path, real_model):
    """The user's path on the real model: serve, add a fact over HTTP, ask it in chat."""
    model, tokenizer = real_model
    db = NeuralDB.create(tmp_path / "db", model, tokenizer)
    server = Server(db, model, tokenizer)
    fact = {"subject": "Eiffel Tower", "prompt": "The {} is located in the city of",
            "target_new": "Rome", "target_true": "Paris"}
    with running(server) as url, httpx.Client(base_url=url, timeout=300) as client:
        wait_for(client, client.post("/v1/facts", json=[fact]).json()["job"])
        openai = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        question = [{"role": "user", "content": "In which city is the Eiffel Tower?"}]
        answers = {
            edited: openai.chat.completions.create(
                model=server.name, messages=question, max_tokens=12, temperature=0,
                extra_body={"ndb": {"edited": edited}})
            for edited in (True, False)}
    assert "Rome" in answers[True].choices[0].message.content
    assert answers[True].model_extra["ndb"]["fired"] == [0]
    assert "Rome" not in answers[False].choices[0].message.content
