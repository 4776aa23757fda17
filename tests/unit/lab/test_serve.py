"""tokensieve.serve on a tiny random Llama: continuous batching equals serving alone, admission by KV bytes, stored
contexts, cancellation, and the HTTP API (FastAPI's TestClient): chat and text completions, streaming, per-request
specs, OpenAI-style errors for bad requests."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import tokensieve as ts
from tests.conftest import make_tiny_model
from tests.unit.lab.serve_helpers import Collector, one_thread  # noqa: F401 (an autouse fixture)
from tokensieve.data.testing import CharTokenizer
from tokensieve.serve.engine import Engine, Job, RequestError, Sampling, parse_bytes
from tokensieve.spec import Spec

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from tokensieve.serve.app import create_app  # noqa: E402

TOK = CharTokenizer()


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=3)


def prompt(i: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randint(3, 97, (n,), generator=g).tolist()


def submit(
    engine: Engine, ids: list[int], spec: str | None = None, max_tokens: int = 12, **kw
) -> tuple[Job, Collector]:
    c = Collector()
    job = Job(ids, engine.compressor(spec), c, max_tokens, **kw)
    engine.submit(job)
    return job, c


def alone(model, spec: str, ids: list[int], n: int) -> list[int]:
    """The library's own greedy answer for one prompt (no EOS stop: the tiny model's EOS is just a token)."""
    press = ts.compress(model, spec)
    ctx = press.prefill(torch.tensor([ids]), reserve=n)
    return press.decode(ctx, n).tokens[0]


# ------------------------------------------------------------------------------------------- batching
SPECS = ["full", "snapkv:0.5", "snapkv:0.5+quest[page=4]:0.5", "+h2o:24", "streaming_llm:0.5", "tova:0.5"]


def test_batched_greedy_equals_alone_with_mixed_specs_and_staggered_joins(model):
    engine = Engine(model, TOK, spec="full", max_batch=8)
    engine.eos = set()  # run every request to max_tokens so whole sequences are compared
    engine.start()
    try:
        lengths = [30, 47, 18, 61, 33, 40]
        jobs = []
        for i, (spec, n) in enumerate(zip(SPECS, lengths)):
            jobs.append((spec, prompt(i, n), *submit(engine, prompt(i, n), spec, max_tokens=14 + i)))
            if i % 2 == 1:  # join a batch that is already decoding
                jobs[-1][3].first.wait(30)
        for spec, ids, job, c in jobs:
            assert c.end.finish_reason == "length"
            assert len(job.tokens) == job.max_tokens
            assert job.tokens == alone(model, spec, ids, job.max_tokens), spec
            assert c.text == TOK.decode(job.tokens, skip_special_tokens=True)
        assert engine.counters.max_batch >= 3  # sequences really shared decode steps
        assert engine.counters.batched_rows > engine.counters.decode_steps
    finally:
        engine.stop()
    assert engine.gauges()["running"] == 0
    assert engine.gauges()["kv_bytes_reserved"] == 0


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    engine = Engine(model, TOK, spec="snapkv:0.5", max_batch=4)
    engine.eos = set()
    engine.start()
    try:
        s = Sampling(temperature=0.9, top_p=0.9, seed=7)
        one, c1 = submit(engine, prompt(0, 40), max_tokens=10, sampling=s)
        c1.end  # noqa: B018
        others = [submit(engine, prompt(i, 30 + i), max_tokens=10, sampling=Sampling(1.0, 1.0, i)) for i in (1, 2)]
        two, c2 = submit(engine, prompt(0, 40), max_tokens=10, sampling=s)
        for _, c in others:
            c.end  # noqa: B018
        c2.end  # noqa: B018
        assert one.tokens == two.tokens
    finally:
        engine.stop()


# ------------------------------------------------------------------------------------------- admission
def test_admission_keeps_the_held_kv_bytes_within_the_budget_and_compression_admits_more(model):
    n, new = 120, 8
    token_bytes = Engine(model, TOK).token_bytes
    budget = 3 * (n + new) * token_bytes  # three full-cache requests
    peaks = {}
    for spec in ("full", "snapkv:0.25"):
        engine = Engine(model, TOK, spec=spec, kv_memory=budget, max_batch=16)
        engine.eos = set()
        jobs = [submit(engine, prompt(i, n), max_tokens=new) for i in range(10)]
        assert engine.gauges()["queue_length"] == 10
        engine.start()
        try:
            for _, c in jobs:
                assert c.end.completion_tokens == new
        finally:
            engine.stop()
        assert engine.counters.peak_held <= budget
        peaks[spec] = engine.counters.max_batch
        full_bytes = (n + new) * token_bytes
        if spec == "full":
            assert engine.counters.peak_request_bytes == full_bytes  # the real cache: prompt + answer headroom
    assert peaks["full"] == 3
    assert peaks["snapkv:0.25"] >= 3 * peaks["full"] - 1  # a quarter of the prompt: about 3x as many at once


def test_a_request_larger_than_the_whole_budget_is_refused_up_front(model):
    engine = Engine(model, TOK, kv_memory=10_000)
    with pytest.raises(RequestError, match="whole budget") as exc:
        submit(engine, prompt(0, 100))
    assert exc.value.code == "kv_memory_exceeded"


def test_parse_bytes():
    assert parse_bytes("1GB") == 10**9
    assert parse_bytes("256MiB") == 256 * 2**20
    assert parse_bytes("1.5 MB") == 1_500_000
    assert parse_bytes(4096) == 4096
    for bad in ("", "1XB", "-1GB", "0"):
        with pytest.raises(ts.ConfigError):
            parse_bytes(bad)


# ------------------------------------------------------------------------------------------- cancellation
def test_a_cancelled_request_leaves_the_batch_and_frees_its_cache(model):
    engine = Engine(model, TOK, max_batch=4)
    engine.eos = set()
    engine.start()
    try:
        keep, ck = submit(engine, prompt(1, 30), max_tokens=40)
        gone, cg = submit(engine, prompt(2, 30), max_tokens=400)
        cg.first.wait(30)
        gone.cancel()
        ck.end  # noqa: B018
        assert keep.tokens == alone(model, "full", prompt(1, 30), 40)
        for _ in range(200):
            if engine.gauges()["running"] == 0:
                break
            threading.Event().wait(0.02)
        assert engine.counters.cancelled == 1
        assert not cg.done.is_set()
        assert len(gone.tokens) < 400
        assert engine.gauges()["kv_bytes_reserved"] == 0
        assert gone.ctx is None
    finally:
        engine.stop()


# ------------------------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def client(model):
    engine = Engine(model, TOK, spec="full", max_tokens=10, model_name="tiny", kv_memory=150_000)
    engine.eos = set()
    with TestClient(create_app(engine)) as c:
        c.engine = engine
        yield c


def chat(client, content: str, **kw):
    messages = [{"role": "user", "content": content}]
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, **kw})


def sse(text: str) -> list[dict]:
    lines = [ln for ln in text.split("\n\n") if ln.strip()]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: ") :]) for ln in lines[:-1]]


def test_models_health_and_metrics(client):
    m = client.get("/v1/models").json()
    assert m["data"][0]["id"] == "tiny"
    h = client.get("/health").json()
    assert h["status"] == "ok"
    assert h["kv_bytes_budget"] == 150_000
    text = client.get("/metrics").text
    for name in ("requests_total", "generated_tokens_total", "kv_bytes_in_use", "queue_length", "running_sequences"):
        assert f"# TYPE tokensieve_{name} " in text


def test_chat_completion_equals_the_library_and_takes_a_per_request_spec(client, model):
    for spec in ("full", "snapkv:0.5", "+quest[page=4]:0.5"):
        r = chat(client, "what comes next in this sequence of letters abcdefgh", spec=spec, max_tokens=8)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["tokensieve"]["spec"] == Spec.parse(spec).label
        ids = client.engine.encode_chat([{"role": "user", "content": "what comes next in this sequence of letters "
                                                                     "abcdefgh"}])  # fmt: skip
        want = TOK.decode(alone(model, spec, ids, 8), skip_special_tokens=True)
        assert body["choices"][0]["message"]["content"] == want
        assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 8, "total_tokens": len(ids) + 8}
        assert body["choices"][0]["finish_reason"] == "length"
    snap = chat(client, "x" * 200, spec="snapkv:0.25", max_tokens=2).json()["tokensieve"]
    full = chat(client, "x" * 200, spec="full", max_tokens=2).json()["tokensieve"]
    assert snap["kv_bytes"] < full["kv_bytes"] / 2


def test_streaming_chunks_add_up_to_the_non_streamed_answer(client):
    plain = chat(client, "hello there streaming", max_tokens=9).json()
    r = chat(client, "hello there streaming", max_tokens=9, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 9
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 5, "stream": True})
    parts = sse(r.text)
    assert parts[-1]["choices"][0]["finish_reason"] == "length"
    plain = client.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 5}).json()
    assert "".join(p["choices"][0]["text"] for p in parts) == plain["choices"][0]["text"]


def test_stop_strings_cut_the_answer(client):
    full = client.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 10}).json()
    text = full["choices"][0]["text"]
    assert len(text) >= 4
    stop = text[2:4]
    cut = client.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 10, "stop": [stop]}).json()
    assert cut["choices"][0]["text"] == text[: text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    r = client.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 10, "stop": stop, "stream": True})
    streamed = "".join(p["choices"][0]["text"] for p in sse(r.text))
    assert streamed == text[: text.find(stop)]


@pytest.mark.parametrize(
    ("body", "param", "status"),
    [
        (b"{not json", None, 400),
        (b"[1, 2]", None, 400),
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens", 400),
        ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens", 400),
        ({"prompt": "hi", "max_tokens": True}, "max_tokens", 400),
        ({"prompt": "hi", "temperature": "hot"}, "temperature", 400),
        ({"prompt": "hi", "temperature": 3}, "temperature", 400),
        ({"prompt": "hi", "stream": "yes"}, "stream", 400),
        ({"prompt": "hi", "n": 2}, "n", 400),
        ({"prompt": 42}, "prompt", 400),
        ({"prompt": [1, 2, 500]}, "prompt", 400),
        ({"prompt": "hi", "spec": "nosuchmethod:0.5"}, "spec", 400),
        ({"prompt": "hi", "spec": "snapkv[window=64:0.25"}, "spec", 400),
        ({"prompt": "hi", "spec": "snapkv:1000"}, "spec", 400),
        ({"prompt": "hi", "spec": 0.5}, "spec", 400),
        ({"prompt": "hi", "stop": [""]}, "stop", 400),
        ({"prompt": "hi", "model": "gpt-4"}, "model", 404),
        ({"prompt": "x" * 600}, None, 400),  # beyond the tiny model's 512 positions
        ({"prompt": "x" * 400, "max_tokens": 200}, "max_tokens", 400),
        ({"prompt": "hi", "context_id": "ctx-nope"}, "context_id", 404),
    ],
)
def test_bad_requests_get_openai_style_errors(client, body, param, status):
    if isinstance(body, bytes):
        r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    ok = client.post("/v1/completions", json={"prompt": "still alive", "max_tokens": 2})
    assert ok.status_code == 200  # the server survives every bad request


def test_bad_chat_messages(client):
    for messages in ([], "hi", [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 5}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]):  # fmt: skip
        r = client.post("/v1/chat/completions", json={"messages": messages})
        assert r.status_code == 400, messages
        assert r.json()["error"]["param"] == "messages"
    assert client.get("/v1/nothing").status_code == 404
    assert "error" in client.get("/v1/nothing").json()


def test_a_request_beyond_the_kv_budget_is_a_clear_error(client):
    r = client.post("/v1/completions", json={"prompt": "x" * 480, "max_tokens": 30})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "kv_memory_exceeded"


# ------------------------------------------------------------------------------------------- contexts
def test_context_reuse_answers_on_forks_and_never_modifies_the_context(client, model):
    document = "The passkey is 4417. " + "Grass is green and the sky is blue. " * 6
    r = client.post("/v1/contexts", json={"document": document, "mode": "text", "spec": "snapkv:0.5"})
    assert r.status_code == 200, r.text
    info = r.json()
    cid = info["id"]
    stored = client.engine.contexts[cid]
    keys_before = [s.keys.clone() for s in stored.ctx.cache.stores()]
    bytes_before = stored.ctx.cache.kv_bytes()
    # The lab's query-agnostic answer: compress the document alone, then append the question on a fork.
    press = ts.compress(model, "snapkv:0.5")
    doc_ids = TOK(document)["input_ids"]
    base = press.prefill(torch.tensor([doc_ids]))
    for question in (" What is the passkey?", " What colour is grass?"):
        r = client.post("/v1/completions", json={"prompt": question, "context_id": cid, "max_tokens": 6})
        assert r.status_code == 200, r.text
        fork = base.fork()
        press.extend(fork, torch.tensor([TOK.encode_text(question)]))
        want = TOK.decode(press.decode(fork, 6).tokens[0], skip_special_tokens=True)
        assert r.json()["choices"][0]["text"] == want
        assert r.json()["usage"]["prompt_tokens"] == len(doc_ids) + len(question)
        assert r.json()["tokensieve"]["context_id"] == cid
    assert stored.ctx.cache.kv_bytes() == bytes_before
    assert all(torch.equal(a, s.keys) for a, s in zip(keys_before, stored.ctx.cache.stores()))
    assert client.get(f"/v1/contexts/{cid}").json()["uses"] == 2
    assert cid in [c["id"] for c in client.get("/v1/contexts").json()["data"]]
    # a chat question needs a chat-mode context; a context's spec is fixed
    assert chat(client, "q", context_id=cid).status_code == 400
    assert client.post("/v1/completions", json={"prompt": "q", "context_id": cid, "spec": "full"}).status_code == 400
    assert client.delete(f"/v1/contexts/{cid}").json()["deleted"] is True
    assert client.delete(f"/v1/contexts/{cid}").status_code == 404
    assert client.post("/v1/completions", json={"prompt": "q", "context_id": cid}).status_code == 404


def test_chat_mode_context_and_eviction_under_memory_pressure(model):
    docs = [f"document {i} " + "words " * 40 for i in range(3)]
    token_bytes = Engine(model, TOK).token_bytes
    ctx_bytes = len(Engine(model, TOK).encode_document(docs[0], "chat")) * token_bytes  # full cache, no headroom
    engine = Engine(model, TOK, spec="full", max_tokens=4, model_name="tiny", kv_memory=int(2.5 * ctx_bytes))
    engine.eos = set()
    with TestClient(create_app(engine)) as client:
        ids = []
        for doc in docs[:2]:
            r = client.post("/v1/contexts", json={"document": doc})
            assert r.status_code == 200, r.text
            assert r.json()["allocated_bytes"] == ctx_bytes
            ids.append(r.json()["id"])
        # A question on the second context needs a fork of it (another context's worth of memory): the least
        # recently used other context is evicted; the one asked about is kept.
        r = chat(client, "which document?", context_id=ids[1])
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] > client.get(f"/v1/contexts/{ids[1]}").json()["prompt_tokens"]
        left = [c["id"] for c in client.get("/v1/contexts").json()["data"]]
        assert left == [ids[1]]
        assert engine.counters.contexts_evicted == 1
        assert "tokensieve_contexts_evicted_total 1" in client.get("/metrics").text
        assert engine.counters.peak_held <= engine.kv_memory
        # the same question on a fresh engine without memory pressure gives the same answer
        again = chat(client, "which document?", context_id=ids[1]).json()["choices"][0]["message"]["content"]
        assert again == r.json()["choices"][0]["message"]["content"]
