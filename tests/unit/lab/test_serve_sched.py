"""The serving scheduler on a tiny random Llama: prompts prefilled a chunk per step equal one-pass prefills, stored
prompt prefixes reused equal no reuse, prefix blocks evicted least recently used within the KV budget, a question on
a stored context equals the whole conversation token for token, and clients that go away (streaming or not) are
dropped within a step with their memory freed."""

from __future__ import annotations

import socket
import time

import pytest
import torch

import tokensieve as ts
from tests.conftest import make_tiny_model
from tests.unit.lab.serve_helpers import Collector, one_thread  # noqa: F401 (an autouse fixture)
from tokensieve.data.testing import CharTokenizer
from tokensieve.serve.engine import Done, Engine, Failed, Job, Sampling, StoredContext
from tokensieve.serve.staging import PrefixCache

pytest.importorskip("fastapi")
from tokensieve.serve.app import prometheus

TOK = CharTokenizer()


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=3)


def prompt(i: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(500 + i)
    return torch.randint(3, 97, (n,), generator=g).tolist()


def submit(engine: Engine, ids: list[int], spec: str | None = None, max_tokens: int = 10) -> tuple[Job, Collector]:
    c = Collector()
    job = Job(ids, engine.compressor(spec), c, max_tokens)
    engine.submit(job)
    return job, c


def alone(model, spec: str, ids: list[int], n: int) -> list[int]:
    """The library's greedy answer for one prompt prefilled in one pass."""
    press = ts.compress(model, spec)
    ctx = press.prefill(torch.tensor([ids]), reserve=n)
    return press.decode(ctx, n).tokens[0]


ENDS: dict[str, Done] = {}  # job id → its last event, for every job that run() ran


def run(
    engine: Engine, work: list[tuple[str, list[int], int]], *, serial: bool = False, first_decodes: bool = False
) -> list[Job]:
    """Serve ``work`` (spec, prompt, max_tokens) and wait for every answer: one after another (``serial``), or the
    rest once the first is decoding (``first_decodes``: a server with nothing decoding prefills a prompt whole), or
    all at once."""
    engine.eos = set()
    engine.start()
    try:
        jobs = []
        for spec, ids, n in work:
            job, c = submit(engine, ids, spec, n)
            jobs.append((job, c))
            if serial:
                c.end  # noqa: B018
            elif first_decodes and len(jobs) == 1:
                assert c.first.wait(60)
        for job, c in jobs:
            assert c.end.finish_reason == "length"
            ENDS[job.id] = c.end
        return [j for j, _ in jobs]
    finally:
        engine.stop()


# ------------------------------------------------------------------------------------------- chunked prefill
STAGED_SPECS = ["full", "snapkv:0.5", "snapkv:0.5+quest[page=4]:0.5", "+h2o:24", "streaming_llm:0.5", "tova:0.5",
                "pyramidkv:0.5", "adakv:0.5", "kvzip:0.5", "knorm:0.5"]  # fmt: skip


@pytest.mark.parametrize("spec", STAGED_SPECS)
def test_a_prompt_prefilled_a_chunk_per_step_equals_one_pass(model, spec):
    """Step budget 12 tokens: once a sequence decodes, a 70-token prompt takes several steps, interleaved with its
    decoding (a 45-token one waits behind it); every answer equals the one-pass prefill's."""
    engine = Engine(model, TOK, spec="full", step_tokens=12, prefix_cache=False)
    work = [(spec, prompt(0, 20), 30), (spec, prompt(1, 70), 8), ("full", prompt(2, 45), 6)]
    jobs = run(engine, work, first_decodes=True)
    for (s, ids, n), job in zip(work, jobs):
        assert job.tokens == alone(model, s, ids, n), s
    assert engine.counters.prefill_chunks >= 70 // 12 + 45 // 12  # the long prompts really ran in chunks
    info = ENDS[jobs[1].id].info["prefill"]
    assert info["mode"] == "chunked"
    assert info["chunks"] >= 70 // 12
    assert engine.gauges()["kv_bytes_reserved"] == 0


def test_a_spec_that_changes_the_forward_pass_is_prefilled_in_one_pass(model):
    """DapQ appends pseudo-queries to the prompt (its forward pass is its own): its prompt cannot be chunked across
    steps; it is prefilled in one pass, and its answer equals the library's."""
    engine = Engine(model, TOK, spec="full", step_tokens=12, prefix_cache=False)
    press = engine.compressor("dapq:0.5")
    assert "auxiliary tokens" in (press.replay_refusal() or "")
    ids = prompt(3, 60)
    (job,) = run(engine, [("dapq:0.5", ids, 6)])
    assert not job.stage
    assert engine.counters.prefill_chunks == 0
    assert job.tokens == alone(model, "dapq:0.5", ids, 6)
    info = ENDS[job.id].info["prefill"]
    assert info["mode"] == "one-pass"
    assert "auxiliary tokens" in info["note"]  # the reason reaches the client


def test_chunking_off_prefills_each_prompt_in_one_pass(model):
    engine = Engine(model, TOK, step_tokens=0, prefix_cache=False)
    (job,) = run(engine, [("snapkv:0.5", prompt(4, 80), 5)])
    assert engine.counters.prefill_chunks == 0
    assert not job.stage
    assert job.tokens == alone(model, "snapkv:0.5", prompt(4, 80), 5)


def test_a_client_that_goes_away_during_a_chunked_prefill_frees_it_at_the_next_step(model):
    engine = Engine(model, TOK, step_tokens=4, prefix_cache=False)
    engine.eos = set()
    engine.start()
    try:
        keep, ck = submit(engine, prompt(5, 30), "full", 60)
        ck.first.wait(60)
        gone, cg = submit(engine, prompt(6, 300), "snapkv:0.5", 5)
        deadline = time.monotonic() + 60
        while (gone.staged is None or gone.staged.done < 20) and time.monotonic() < deadline:
            time.sleep(0.002)
        assert gone.staged is not None
        assert gone.staged.remaining > 0
        gone.cancel()
        ck.end  # noqa: B018
        assert engine.counters.cancelled == 1
        assert gone.staged is None
        assert gone.ctx is None
        assert gone.reserved == 0
        assert not cg.done.is_set()  # never answered
        assert keep.tokens == alone(model, "full", prompt(5, 30), 60)
    finally:
        engine.stop()
    assert engine.gauges()["kv_bytes_reserved"] == 0


# ------------------------------------------------------------------------------------------- prefix reuse
def shared(i: int, prefix: list[int], n: int) -> list[int]:
    return prefix + prompt(100 + i, n)


@pytest.mark.parametrize("spec", ["full", "snapkv:0.5", "+h2o:24", "kvzip:0.5", "tova:0.5+quest[page=4]:0.5"])
def test_prefix_reuse_equals_no_reuse(model, spec):
    prefix = prompt(7, 50)
    work = [(spec, shared(i, prefix, 10 + 7 * i), 8) for i in range(3)]
    engine = Engine(model, TOK, step_tokens=16, prefix_block=8)
    jobs = run(engine, work, serial=True)
    assert [j.reused for j in jobs] == [0, 48, 48]  # whole blocks of the shared 50 tokens
    assert [ENDS[j.id].info["prefill"]["prefix_tokens_reused"] for j in jobs] == [0, 48, 48]
    assert engine.counters.prefix_hit_tokens == 96
    assert "tokensieve_prefix_hit_tokens_total 96" in prometheus(engine)
    for (s, ids, n), job in zip(work, jobs):
        assert job.tokens == alone(model, s, ids, n), s


def test_a_compressing_spec_reuses_only_blocks_stored_with_their_queries(model):
    """A full-cache request stores keys and values only; a compressing spec scores with every prompt query, so it
    computes the prompt again (and stores its blocks with queries), and the next one reuses them."""
    prefix = prompt(8, 40)
    work = [("full", shared(0, prefix, 5), 4), ("snapkv:0.5", shared(1, prefix, 9), 6),
            ("snapkv:0.5", shared(2, prefix, 12), 6), ("full", shared(3, prefix, 3), 4)]  # fmt: skip
    engine = Engine(model, TOK, step_tokens=None, prefix_block=8)
    jobs = run(engine, work, serial=True)
    assert [j.reused for j in jobs] == [0, 0, 40, 40]
    for (s, ids, n), job in zip(work, jobs):
        assert job.tokens == alone(model, s, ids, n), s


def test_prefix_blocks_stay_within_the_budget_and_leave_least_recently_used_first(model):
    engine = Engine(model, TOK, prefix_block=8)
    token_bytes = engine.token_bytes
    budget = 3 * 60 * token_bytes
    engine = Engine(model, TOK, kv_memory=budget, prefix_block=8, step_tokens=16)
    work = [("full", prompt(20 + i, 48), 4) for i in range(6)]
    run(engine, work, serial=True)
    assert engine.counters.peak_held <= budget
    assert engine.prefix is not None
    assert engine.counters.prefix_blocks_evicted > 0
    assert engine.prefix.bytes <= engine.prefix_memory
    # the newest prompt's blocks are the ones kept
    assert engine.prefix.match([*prompt(25, 48), 5], queries=False)
    assert not engine.prefix.match([*prompt(20, 48), 5], queries=False)


def test_prefix_cache_match_insert_and_eviction_order():
    cache = PrefixCache(4)
    k = [torch.randn(1, 2, 12, 8)]
    ids = list(range(12))
    added = cache.insert(ids, k, k, None, None, limit=10**9)
    assert len(cache.blocks) == 3
    assert added == cache.bytes == 3 * 2 * 2 * 4 * 8 * 4
    assert [b.tokens for b in cache.match(ids, queries=False)] == [(0, 1, 2, 3), (4, 5, 6, 7)]  # last token computed
    assert len(cache.match([*ids, 99], queries=False)) == 3
    assert cache.match([*ids, 99], queries=True) == []  # no queries stored
    assert [b.tokens for b in cache.match([0, 1, 2, 3, 4, 9, 6, 7, 8], queries=False)] == [(0, 1, 2, 3)]
    assert torch.equal(cache.match([*ids, 1], queries=False)[1].keys[0], k[0][:, :, 4:8])
    cache.evict_one()  # a leaf goes first: the prefix stays reusable
    assert len(cache.match([*ids, 99], queries=False)) == 2
    # another prompt within the same bytes: the least recently used blocks of the first make room
    other = list(range(100, 112))
    assert cache.insert(other, k, k, None, None, limit=cache.bytes) == cache.bytes == 2 * 512
    assert len(cache.match([*other, 1], queries=False)) == 2
    assert cache.match([*ids, 99], queries=False) == []
    assert cache.insert(list(range(200, 212)), k, k, None, None, limit=100) == 0  # a block never fits


# ------------------------------------------------------------------------------------------- stored contexts
@pytest.fixture(scope="module")
def bpe():
    from transformers import AutoTokenizer

    from tokensieve.adapters.models import embedded_dir, is_pulled

    if not is_pulled():
        pytest.skip("the embedded model's tokenizer is not provisioned (make setup)")
    tok = AutoTokenizer.from_pretrained(embedded_dir())
    return tok, make_tiny_model(seed=4, vocab_size=len(tok))


@pytest.mark.parametrize("mode", ["chat", "text"])
def test_a_question_on_a_stored_context_equals_the_whole_conversation(bpe, mode):
    """The document is stored once; each question then gives exactly the tokens (and the answer) of the whole
    conversation sent alone — including questions whose first characters a BPE tokenizer would merge with the blank
    line before them."""
    from fastapi.testclient import TestClient

    from tokensieve.serve.app import create_app

    tok, tiny = bpe
    engine = Engine(tiny, tok, spec="full", max_tokens=6, model_name="tiny", prefix_cache=False)
    engine.eos = set()
    document = "The passkey is 4417. Grass is green and the sky is blue.\n"
    questions = ["What is the passkey?", "\nWhat colour is grass?", " 12 + 3 =", "(answer briefly) sky?"]
    with TestClient(create_app(engine)) as client:
        r = client.post("/v1/contexts", json={"document": document, "mode": mode})
        assert r.status_code == 200, r.text
        cid = r.json()["id"]
        for q in questions:
            if mode == "chat":
                whole = {"messages": [{"role": "user", "content": f"{document}\n\n{q}"}], "max_tokens": 6}
                on_ctx = {"messages": [{"role": "user", "content": q}], "context_id": cid, "max_tokens": 6}
                a = client.post("/v1/chat/completions", json=whole).json()
                b = client.post("/v1/chat/completions", json=on_ctx).json()
                assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"], q
                want = engine.encode_chat(whole["messages"])
            else:
                a = client.post("/v1/completions", json={"prompt": document + q, "max_tokens": 6}).json()
                b = client.post("/v1/completions", json={"prompt": q, "context_id": cid, "max_tokens": 6}).json()
                assert b["choices"][0]["text"] == a["choices"][0]["text"], q
                want = engine.encode_prompt(document + q)
            assert b["usage"]["prompt_tokens"] == a["usage"]["prompt_tokens"] == len(want)
            stored = engine.contexts[cid]
            assert stored.ids + engine.question_ids(stored, q) == want


# ------------------------------------------------------------------------------------------- disconnects
@pytest.fixture(scope="module")
def server(model):
    pytest.importorskip("uvicorn")
    from tokensieve.serve.app import create_app
    from tokensieve.serve.bench import running_server

    engine = Engine(model, TOK, spec="full", max_tokens=8, model_name="tiny", max_batch=8, step_tokens=8)
    engine.eos = set()
    with running_server(create_app(engine)) as url:
        yield engine, url


def raw_post(url: str, path: str, body: bytes) -> socket.socket:
    """Send a POST on a raw socket and return it unread (the test closes it: a client that goes away)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + body)
    return sock


def wait_for(cond, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_mid_generation_is_dropped_and_freed(server, stream):
    """Non-streaming (and streaming) completion of 450 tokens; the client closes its socket once tokens are being
    generated. The job is cancelled, leaves the batch, its reservation is released and generation stops."""
    import json

    engine, url = server
    cancelled, generated = engine.counters.cancelled, engine.counters.generated_tokens
    body = json.dumps({"model": "tiny", "prompt": "x" * 40, "max_tokens": 450, "stream": stream}).encode()
    sock = raw_post(url, "/v1/completions", body)
    assert wait_for(lambda: engine.counters.generated_tokens >= generated + 5)
    assert engine.gauges()["kv_bytes_reserved"] > 0
    sock.close()
    assert wait_for(lambda: engine.counters.cancelled == cancelled + 1, 30)
    assert wait_for(lambda: engine.gauges()["running"] == 0 and engine.gauges()["kv_bytes_reserved"] == 0, 5)
    stopped_at = engine.counters.generated_tokens
    time.sleep(0.3)
    assert engine.counters.generated_tokens == stopped_at  # generation stopped
    assert stopped_at - generated < 450


def test_a_client_that_disconnects_during_its_prefill_is_dropped_before_its_first_token(server):
    """While another client's answer is decoding (so the prompt is chunked), a client sends a 400-token prompt and
    goes away during its prefill: it is dropped before its first token; then the other client goes away too."""
    import json

    engine, url = server
    cancelled, generated = engine.counters.cancelled, engine.counters.generated_tokens
    other = raw_post(url, "/v1/completions", json.dumps({"model": "tiny", "prompt": "z" * 20, "max_tokens": 480,
                                                          "stream": True}).encode())  # fmt: skip
    assert wait_for(lambda: engine.counters.generated_tokens >= generated + 3)
    chunks = engine.counters.prefill_chunks
    body = json.dumps({"model": "tiny", "prompt": "y" * 400, "max_tokens": 4}).encode()
    sock = raw_post(url, "/v1/completions", body)
    assert wait_for(lambda: engine.counters.prefill_chunks >= chunks + 3)
    sock.close()
    assert wait_for(lambda: engine.counters.cancelled == cancelled + 1, 30)
    assert wait_for(lambda: engine.gauges()["prefilling"] == 0, 5)
    assert engine.counters.prefill_chunks < chunks + 400 // 7  # it never finished its prefill
    assert engine.gauges()["running"] == 1  # the other client's answer goes on
    other.close()
    assert wait_for(lambda: engine.counters.cancelled == cancelled + 2, 30)
    assert wait_for(lambda: engine.gauges()["running"] == 0 and engine.gauges()["kv_bytes_reserved"] == 0, 5)


# ------------------------------------------------------------------------------------------- command line
def test_scheduling_flags_reach_the_engine_and_serve_bench_takes_its_scenarios():
    from tokensieve.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "--step-tokens", "0", "--no-prefix-cache", "--prefix-block", "16"])
    assert (args.step_tokens, args.no_prefix_cache, args.prefix_block) == (0, True, 16)
    args = parser.parse_args(["serve"])
    assert (args.step_tokens, args.no_prefix_cache, args.prefix_block, args.prefix_memory) == (256, False, 32, None)
    args = parser.parse_args(["serve-bench", "--scenario", "arrival", "--step-tokens", "64, 0", "--arrivals", "4"])
    assert (args.scenario, args.step_tokens, args.arrivals) == ("arrival", [64, 0], 4)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve-bench", "--step-tokens", "-1"])
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--step-tokens", "many"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own pydantic-v1 style fields
def test_the_serving_flags_reach_the_engine_from_the_command_line_and_through_ray(model, monkeypatch):
    """--compress-min-tokens and the scheduling flags, together, reach the Engine that ``tokensieve serve`` builds and
    the one each Ray replica builds from its settings."""
    import dataclasses

    from tokensieve.adapters import models as adapters_models
    from tokensieve.cli import build_parser
    from tokensieve.serve import cli as serve_cli
    from tokensieve.serve import ray_serve

    monkeypatch.setattr(adapters_models, "load_model", lambda name: (model, TOK))
    parser = build_parser()
    engine = serve_cli.build_engine(parser.parse_args(["serve", "--kv-memory", "64MB"]))
    assert (engine.compress_min_tokens, engine.step_tokens, engine.prefix is not None) == (128, 256, True)
    flags = ["serve", "--kv-memory", "64MB", "--compress-min-tokens", "64", "--step-tokens", "32", "--prefix-block",
             "16", "--prefix-memory", "1MB"]  # fmt: skip
    engine = serve_cli.build_engine(parser.parse_args(flags))
    assert engine.prefix is not None
    assert (engine.compress_min_tokens, engine.step_tokens, engine.prefix.block, engine.prefix_memory) == (
        64, 32, 16, 10**6)  # fmt: skip

    settings: list[ray_serve.ReplicaSettings] = []
    monkeypatch.setattr(ray_serve, "import_serve", lambda: None)
    monkeypatch.setattr(ray_serve, "run", lambda s, n, **kw: settings.append(s))
    assert serve_cli._serve_ray(parser.parse_args([*flags, "--no-prefix-cache", "--ray-replicas", "2"])) == 0
    replica = ray_serve.Replica(dataclasses.asdict(settings[0]))
    try:
        e = replica.engine
        assert (e.compress_min_tokens, e.step_tokens, e.prefix, e.kv_memory) == (64, 32, None, 64 * 10**6)
    finally:
        replica.engine.stop()


def test_engine_refuses_bad_scheduling_settings(model):
    from tokensieve.errors import ConfigError

    for bad in ({"step_tokens": -1}, {"step_tokens": 2.5}, {"prefix_block": 0}):
        with pytest.raises(ConfigError):
            Engine(model, TOK, **bad)


@pytest.mark.parametrize("victim", ["chunk", "decode row"])
def test_a_failure_in_one_segment_of_a_packed_step_fails_that_request_alone(model, monkeypatch, victim):
    """A step packs a decode row and a prompt's chunk; one of them fails inside its own cache's attention (layer 1 of
    3, the third packed step): that request fails alone, the other's answer equals the library's one-pass answer."""
    from tokensieve.cache.sieve_cache import SieveCache

    engine = Engine(model, TOK, spec="full", step_tokens=8, prefix_cache=False)
    engine.eos = set()
    decoding, chunked = prompt(30, 20), prompt(31, 80)
    real, hits = SieveCache.attend, {"n": 0}
    jobs: dict[str, Job] = {}

    def attend(self, layer_idx, q, *args, **kwargs):
        staged = jobs["chunk"].staged if "chunk" in jobs else None
        if layer_idx == 1 and staged is not None and staged.done > 0:  # packed steps: the prompt is being chunked
            row = jobs["decode row"].ctx
            target = staged.cache if victim == "chunk" else row.cache if row is not None else None
            if self is target:
                hits["n"] += 1
                if hits["n"] == 3:
                    raise RuntimeError("injected failure in one segment")
        return real(self, layer_idx, q, *args, **kwargs)

    monkeypatch.setattr(SieveCache, "attend", attend)
    engine.start()
    try:
        jobs["decode row"], c_row = submit(engine, decoding, "snapkv:0.5", 40)
        c_row.first.wait(60)
        jobs["chunk"], c_chunk = submit(engine, chunked, "tova:0.5", 6)
        for c in (c_row, c_chunk):
            assert c.done.wait(240)
        cs = {"decode row": c_row, "chunk": c_chunk}
        failed, ok = cs[victim], cs["chunk" if victim == "decode row" else "decode row"]
        assert isinstance(failed.events[-1], Failed)
        assert "injected failure" in failed.events[-1].message
        assert isinstance(ok.events[-1], Done)
        survivor = jobs["chunk" if victim == "decode row" else "decode row"]
        spec, ids = ("tova:0.5", chunked) if victim == "decode row" else ("snapkv:0.5", decoding)
        assert survivor.tokens == alone(model, spec, ids, survivor.max_tokens)
        assert engine.counters.requests["failed"] == 1
    finally:
        engine.stop()
    assert engine.gauges()["kv_bytes_reserved"] == 0


@pytest.mark.parametrize("spec", ["full", "snapkv:0.5"])
def test_a_document_stored_in_chunks_equals_one_stored_in_one_pass(model, spec):
    """A document is prefilled a chunk per step while another sequence decodes, then stored: its cache keeps the
    entries a one-pass prefill keeps (same positions, same keys up to rounding)."""
    from concurrent.futures import Future

    engine = Engine(model, TOK, step_tokens=8, prefix_cache=False)
    engine.eos = set()
    document = "The passkey is 4417. " + "Grass is green and the sky is blue. " * 5
    ids = engine.encode_document(document, "text")
    engine.start()
    try:
        _, c = submit(engine, prompt(40, 20), "full", 100)  # decoding while the whole document is chunked
        c.first.wait(60)
        result: Future = Future()
        press = engine.compressor(spec)
        engine.submit(Job(ids, press, lambda e: None, 0, kind="context", document=document, mode="text", result=result))
        stored = result.result(timeout=240)
        c.end  # noqa: B018
    finally:
        engine.stop()
    assert engine.counters.prefill_chunks >= len(ids) // 8
    want = ts.compress(model, spec).prefill(torch.tensor([ids]))
    got_stores, want_stores = stored.ctx.cache.stores(), want.cache.stores()
    for g, w in zip(got_stores, want_stores, strict=True):
        assert torch.equal(g.positions, w.positions)
        assert torch.allclose(g.keys, w.keys, atol=1e-5)
        assert torch.allclose(g.values, w.values, atol=1e-5)
    assert torch.allclose(stored.ctx.logits, want.logits, atol=1e-4)
    assert stored.tokens == len(ids)


def test_without_a_chat_template_a_question_on_a_context_is_the_whole_conversation_too(model):
    engine = Engine(model, TOK)
    document = "Grass is green."
    for mode in ("chat", "text"):
        ids = engine.encode_document(document, mode)
        stored = StoredContext("c", document, mode, engine.default, None, ids, 0.0, 0.0)  # type: ignore[arg-type]
        for q in ("What colour?", " 1 + 1", "\nNext"):
            want = (engine.encode_chat([{"role": "user", "content": f"{document}\n\n{q}"}]) if mode == "chat"
                    else engine.encode_prompt(document + q))  # fmt: skip
            assert ids + engine.question_ids(stored, q) == want


def test_a_prompt_keeps_its_prefix_blocks_when_its_admission_evicts_them(model):
    """The budget holds one request or the stored blocks of the last one, not both: admitting the next request with
    the same prefix evicts the blocks, and it still reuses them (taken before the eviction), equal to no reuse."""
    tb = Engine(model, TOK).token_bytes
    engine = Engine(model, TOK, kv_memory=100 * tb, prefix_block=8, step_tokens=16)
    prefix = prompt(50, 48)
    work = [("full", prefix, 4), ("full", [*prefix, *prompt(51, 8)], 4)]
    jobs = run(engine, work, serial=True)
    assert [j.reused for j in jobs] == [0, 48]
    assert engine.counters.prefix_blocks_evicted > 0
    assert engine.counters.peak_held <= 100 * tb
    for (s, ids, n), job in zip(work, jobs):
        assert job.tokens == alone(model, s, ids, n)


@pytest.mark.parametrize("spec", ["full", "snapkv:0.5", "snapkv:0.5+quest[page=4]:0.5"])
def test_a_long_question_on_a_stored_context_is_appended_a_chunk_per_step(model, spec):
    """A 60-token question on a stored context, appended to its fork 8 tokens per step while another sequence
    decodes, gives the library's answer (prefill the document, fork, extend with the question, decode); a context
    whose spec runs a decode method gets its question in one pass."""
    from concurrent.futures import Future

    engine = Engine(model, TOK, step_tokens=8, prefix_cache=False)
    engine.eos = set()
    document = "The passkey is 4417. " + "Grass is green and the sky is blue. " * 3
    question = " Now tell me, after reading all of that carefully, what is the passkey? Answer:"
    engine.start()
    try:
        result: Future = Future()
        doc_ids = engine.encode_document(document, "text")
        engine.submit(Job(doc_ids, engine.compressor(spec), lambda e: None, 0, kind="context", document=document,
                          mode="text", result=result))  # fmt: skip
        stored = result.result(timeout=240)
        _, c = submit(engine, prompt(60, 20), "full", 40)
        c.first.wait(60)
        q_ids = engine.question_ids(stored, question)
        qc = Collector()
        job = Job(q_ids, stored.press, qc, 8, context_id=stored.id)
        engine.submit(job)
        end = qc.end
        c.end  # noqa: B018
    finally:
        engine.stop()
    press = ts.compress(model, spec)
    base = press.prefill(torch.tensor([doc_ids]))
    press.extend(base, torch.tensor([q_ids]))
    assert job.tokens == press.decode(base, 8).tokens[0]
    assert end.prompt_tokens == len(doc_ids) + len(q_ids)
    chunked = "quest" not in spec
    assert (end.info["prefill"]["chunks"] >= len(q_ids) // 8) == chunked
    assert engine.reserved_jobs == 0  # only the stored context is held
    assert engine.gauges()["kv_bytes_reserved"] == stored.bytes


def test_an_idle_server_prefills_the_oldest_prompt_whole_and_chunks_the_next_beside_it(model):
    engine = Engine(model, TOK, step_tokens=12, prefix_cache=False)
    work = [("snapkv:0.5", prompt(70, 70), 30), ("snapkv:0.5", prompt(71, 70), 4), ("full", prompt(72, 40), 4)]
    jobs = run(engine, work)  # submitted together to an idle server
    assert ENDS[jobs[0].id].info["prefill"]["mode"] == "one-pass"  # the first went in whole
    assert ENDS[jobs[1].id].info["prefill"]["chunks"] >= 70 // 12  # the next, beside the first's decoding
    for (s, ids, n), job in zip(work, jobs):
        assert job.tokens == alone(model, s, ids, n)


# ------------------------------------------------------------------------------------------- request fields
def answer(engine: Engine, work: list[tuple[str, list[int], int, Sampling]], *, first_decodes: bool = False
           ) -> list[Job]:  # fmt: skip
    """Serve ``work`` (spec, prompt, max_tokens, sampling); the rest once the first decodes (``first_decodes``)."""
    engine.eos = {33}
    engine.start()
    try:
        jobs = []
        for spec, ids, n, sampling in work:
            c = Collector()
            job = Job(ids, engine.compressor(spec), c, n, sampling)
            engine.submit(job)
            jobs.append((job, c))
            if first_decodes and len(jobs) == 1:
                assert c.first.wait(60)
        for job, c in jobs:
            ENDS[job.id] = c.end
        return [j for j, _ in jobs]
    finally:
        engine.stop()


def test_logits_processor_fields_on_a_prompt_prefilled_in_chunks_beside_decoding_equal_alone(model):
    """Penalties, a logit bias, min_tokens, stop_token_ids, seeded sampling and log-probabilities: a request whose
    prompt is prefilled a chunk per step (packed with another request's decode rows, which carry their own fields)
    gets the tokens and log-probabilities it gets alone, prefilled in one pass; so does the decoding one."""
    busy = Sampling(temperature=0.9, seed=7, top_k=20, presence_penalty=1.5, frequency_penalty=0.5, logprobs=1)
    asked = Sampling(repetition_penalty=1.4, logit_bias=((40, 0.5), (41, 0.5)), min_tokens=4,
                     stop_token_ids=frozenset({50}), logprobs=3)  # fmt: skip
    work = [("full", prompt(80, 20), 30, busy), ("snapkv:0.5", prompt(81, 70), 10, asked),
            ("full", prompt(82, 50), 10, Sampling(repetition_penalty=1.2, logprobs=0))]  # fmt: skip
    jobs = answer(Engine(model, TOK, step_tokens=12, prefix_cache=False), work, first_decodes=True)
    assert ENDS[jobs[1].id].info["prefill"]["mode"] == ENDS[jobs[2].id].info["prefill"]["mode"] == "chunked"
    for item, job in zip(work, jobs):
        (single,) = answer(Engine(model, TOK, step_tokens=0, prefix_cache=False), [item])
        assert ENDS[single.id].info["prefill"]["mode"] == "one-pass"
        assert job.tokens == single.tokens, item[3]
        assert ENDS[job.id].finish_reason == ENDS[single.id].finish_reason
        assert len(job.logprobs) == len(job.tokens)
        for a, b in zip(job.logprobs, single.logprobs, strict=True):
            assert (a.token, [t for t, _ in a.top]) == (b.token, [t for t, _ in b.top])
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_a_spec_not_applied_to_short_prompts_shares_prefix_blocks_correctly_and_keeps_logprobs(model):
    """compress_min_tokens: prompts sharing a prefix, short ones run with the full cache (their blocks hold no
    queries), long ones with the spec (they recompute the prefix and store it with queries); prefix reuse changes no
    answer, no log-probability and no echoed prompt log-probability (those of a full forward pass)."""
    from fastapi.testclient import TestClient

    from tokensieve.serve.app import create_app

    def serve(**kw: object) -> list[dict]:
        engine = Engine(model, TOK, spec="snapkv:0.5", max_tokens=6, compress_min_tokens=100, step_tokens=16,
                        prefix_block=8, **kw)  # type: ignore[arg-type]  # fmt: skip
        engine.eos = set()
        with TestClient(create_app(engine)) as c:
            out = []
            for text in texts:
                r = c.post("/v1/completions", json={"prompt": text, "logprobs": 2, "echo": True})
                assert r.status_code == 200, r.text
                out.append(r.json())
            return out

    head = "The opening words every prompt of this test shares: "  # 53 tokens with the BOS
    long = "and then a long middle part that makes the prompt longer than the minimum, " * 2
    texts = [head + "first", head + "second one", head + long + "end", head + long + "fin", head + "third"]
    reused, plain = serve(), serve(prefix_cache=False)
    assert [r["tokensieve"]["spec"] for r in reused] == ["full", "full", "snapkv:0.5", "snapkv:0.5", "full"]
    hits = [r["tokensieve"]["prefill"]["prefix_tokens_reused"] for r in reused]
    # the second reuses the first's full-cache blocks of the shared head (6 blocks); the third, which runs its spec,
    # cannot (no queries stored) and stores its blocks with queries; the fourth reuses them over head and middle (205
    # shared tokens: 25 blocks); the last, with the full cache again, reuses the head's blocks stored with queries
    assert hits == [0, 48, 0, 200, 48]
    for a, b in zip(reused, plain, strict=True):
        assert a["choices"][0]["text"] == b["choices"][0]["text"]
        la, lb = a["choices"][0]["logprobs"], b["choices"][0]["logprobs"]
        assert la["tokens"] == lb["tokens"]
        assert la["token_logprobs"][0] is None
        assert la["token_logprobs"][1:] == pytest.approx(lb["token_logprobs"][1:], abs=1e-4)


def test_a_penalised_question_appended_in_chunks_to_a_stored_context_equals_the_whole_prompt(model):
    """With the full cache, a question on a stored context appended a chunk per step is the whole prompt token for
    token, and so is its answer under repetition_penalty (which reads the context's ids too) and logit_bias."""
    from concurrent.futures import Future

    engine = Engine(model, TOK, step_tokens=8, prefix_cache=False)
    document = "The passkey is 4417. " + "Grass is green and the sky is blue. " * 2
    question = " What is the passkey, after all of that? Answer:"
    sampling = Sampling(repetition_penalty=1.8, logit_bias=((40, 0.5),), logprobs=2)
    engine.eos = {33}
    engine.start()
    try:
        result: Future = Future()
        doc_ids = engine.encode_document(document, "text")
        engine.submit(Job(doc_ids, engine.compressor("full"), lambda e: None, 0, kind="context", document=document,
                          mode="text", result=result))  # fmt: skip
        stored = result.result(timeout=240)
        q_ids = engine.question_ids(stored, question)
        on_ctx, whole = Collector(), Collector()
        job = Job(q_ids, stored.press, on_ctx, 12, sampling, context_id=stored.id)
        engine.submit(job)
        end = on_ctx.end
        alone_job = Job(doc_ids + q_ids, engine.compressor("full"), whole, 12, sampling)
        engine.submit(alone_job)
        whole.end  # noqa: B018
    finally:
        engine.stop()
    assert end.info["prefill"]["chunks"] >= 1
    assert job.tokens == alone_job.tokens
    plain = answer(Engine(model, TOK, step_tokens=0, prefix_cache=False),
                   [("full", doc_ids + q_ids, 12, Sampling(logit_bias=((40, 0.5),)))])[0].tokens  # fmt: skip
    assert job.tokens != plain  # the penalty changed the answer
    for a, b in zip(job.logprobs, alone_job.logprobs, strict=True):
        assert a.token == b.token
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
