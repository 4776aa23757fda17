"""tokensieve serve over real HTTP (uvicorn on 127.0.0.1, started by the test) with the official ``openai`` client:
non-streaming and streaming, the extra body field ``spec``, a bounded concurrent load (no lost, duplicated or
mixed-up answers, each equal to the answer served alone), and a client that disconnects mid-stream."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.conftest import make_tiny_model
from tokensieve.data.testing import CharTokenizer
from tokensieve.serve.engine import Engine

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from tests.unit.lab.serve_helpers import one_thread  # noqa: E402, F401 (an autouse fixture)
from tokensieve.serve.app import create_app  # noqa: E402
from tokensieve.serve.bench import running_server  # noqa: E402

TOK = CharTokenizer()


@pytest.fixture(scope="module")
def server():
    engine = Engine(make_tiny_model(seed=5), TOK, spec="snapkv:0.5", max_tokens=8, model_name="tiny", max_batch=8)
    engine.eos = set()  # every answer runs to max_tokens, so answers are long enough to tell apart
    with running_server(create_app(engine)) as url:
        yield engine, url


@pytest.fixture(scope="module")
def client(server):
    _, url = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def question(i: int) -> str:
    return f"request {i}: " + " ".join(f"w{(i * 7 + k) % 50}" for k in range(6 + i % 5))


def test_openai_client_chat_streaming_and_spec(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question(1)}])
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    text = r.choices[0].message.content
    assert text
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question(1)}], stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == "length"
    full = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question(1)}], extra_body={"spec": "full"}, max_tokens=3
    )
    assert full.model_extra["tokensieve"]["spec"] == "full"
    assert r.model_extra["tokensieve"]["spec"] == "snapkv:0.5"
    done = client.completions.create(model="tiny", prompt="abc def", max_tokens=4)
    assert done.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt="abc", extra_body={"spec": "snapkv[oops"})
    assert exc.value.body["param"] == "spec"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-nope", prompt="abc")
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_concurrent_load_no_lost_duplicated_or_mixed_answers(server, client):
    engine, _ = server
    n_req, n_clients = 32, 8
    # what each request gets when served alone, one at a time
    alone = {}
    for i in range(4):
        alone[i] = client.completions.create(model="tiny", prompt=question(i), max_tokens=8).choices[0].text
    answers: dict[int, list[str]] = {}
    ids: list[str] = []
    errors: list[BaseException] = []
    todo = list(range(n_req))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            try:
                if i % 2:
                    s = client.completions.create(model="tiny", prompt=question(i % 16), max_tokens=8, stream=True)
                    parts = list(s)
                    text = "".join(p.choices[0].text for p in parts if p.choices)
                    rid = parts[0].id
                else:
                    r = client.completions.create(model="tiny", prompt=question(i % 16), max_tokens=8)
                    text, rid = r.choices[0].text, r.id
                with lock:
                    answers.setdefault(i % 16, []).append(text)
                    ids.append(rid)
            except BaseException as exc:  # reported below
                errors.append(exc)

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    assert time.monotonic() - t0 < 600
    assert len(ids) == n_req
    assert len(set(ids)) == n_req  # no duplicated responses
    assert sorted(answers) == list(range(16))
    for q, texts in answers.items():
        assert len(texts) == 2
        assert texts[0] == texts[1], q  # the same prompt, streamed or not, in different batches: same answer
        if q in alone:
            assert texts[0] == alone[q]  # equal to serving it alone
    assert len({texts[0] for texts in answers.values()}) > 1  # different prompts, different answers
    assert engine.counters.max_batch > 1  # requests shared decode steps


def test_client_disconnect_mid_stream_frees_the_cache(server):
    engine, url = server
    cancelled = engine.counters.cancelled
    body = {"model": "tiny", "prompt": question(3), "max_tokens": 400, "stream": True}
    with httpx.Client(timeout=120) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # got a token; now go away
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        g = engine.gauges()
        if g["running"] == 0 and engine.counters.cancelled > cancelled:
            break
        time.sleep(0.05)
    assert engine.counters.cancelled == cancelled + 1
    assert engine.gauges()["kv_bytes_reserved"] == 0
    assert engine.counters.generated_tokens < 10_000
    with httpx.Client(timeout=120) as c:
        ok = c.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 2})
    assert ok.status_code == 200
