"""The OpenAI request fields of tokensieve serve, on a tiny random Llama: each one works (and a request batched with
others gets what it gets alone) or is refused with a 400 naming it; unknown fields are accepted with a warning;
log-probabilities equal the model's own; grammar-constrained JSON and forced tool calls; the safe default for short
prompts; /tokenize, /detokenize and /v1/models."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from tests.conftest import make_tiny_model
from tokensieve.data.testing import CharTokenizer
from tokensieve.serve.engine import Done, Engine, Failed, Job
from tokensieve.serve.logits import Row, Sampling, choose, process

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from tests.unit.lab.serve_helpers import one_thread  # noqa: E402, F401 (an autouse fixture)
from tokensieve.serve.app import create_app  # noqa: E402

TOK = CharTokenizer()
V = 97


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=3)


def ids_of(text: str) -> list[int]:
    return TOK(text)["input_ids"]


# ------------------------------------------------------------------------------------------ the processor chain
def test_each_processor_does_what_its_field_says():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, V, generator=g) * 3
    prompt, out = [5, 6, 7], [8, 8, 9]
    base = logits[0]

    got = process(logits, [Row(Sampling(logit_bias=((10, 5.0), (11, -100.0))), prompt, out)])[0]
    assert got[10] == pytest.approx(base[10] + 5)
    assert got[11] == pytest.approx(base[11] - 100)
    assert torch.equal(got[:10], base[:10])

    got = process(logits, [Row(Sampling(min_tokens=4), prompt, out, end_ids=frozenset({2, 30}))])[0]
    assert got[2] == -torch.inf
    assert got[30] == -torch.inf
    assert torch.equal(got[:2], base[:2])
    got = process(logits, [Row(Sampling(min_tokens=3), prompt, out, end_ids=frozenset({2}))])[0]
    assert torch.equal(got, base)  # three tokens exist: the end ids are free again

    got = process(logits, [Row(Sampling(repetition_penalty=2.0), prompt, out)])[0]
    for t in (5, 6, 7, 8, 9):
        want = base[t] / 2 if base[t] > 0 else base[t] * 2
        assert got[t] == pytest.approx(want)
    assert got[20] == base[20]

    got = process(logits, [Row(Sampling(frequency_penalty=0.5, presence_penalty=1.5), prompt, out)])[0]
    assert got[8] == pytest.approx(base[8] - 2 * 0.5 - 1.5)
    assert got[9] == pytest.approx(base[9] - 0.5 - 1.5)
    assert got[5] == base[5]  # the prompt's tokens are not penalised by OpenAI's penalties


def test_the_chain_on_a_batch_equals_each_row_alone():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, V, generator=g) * 2
    rows = [
        Row(Sampling(), [3, 4], [5]),
        Row(Sampling(logit_bias=((7, 3.0),), repetition_penalty=1.3), [3, 4, 7], [7, 8]),
        Row(Sampling(frequency_penalty=-1.0, presence_penalty=0.7, min_tokens=9), [9], [10, 10, 11], frozenset({2})),
        Row(Sampling(repetition_penalty=0.8), [12], [13], allowed=lambda n: torch.arange(n) % 3 == 0),
        Row(Sampling(presence_penalty=2.0, logit_bias=((1, -50.0),)), [], [1, 1, 1]),
    ]
    batched = process(logits, rows)
    for b, row in enumerate(rows):
        assert torch.equal(batched[b], process(logits[b : b + 1], [row])[0]), b


def test_top_k_and_min_p_filter_before_the_draw():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(V, generator=g)
    best = int(logits.argmax())
    for s in (Sampling(temperature=2.0, top_k=1), Sampling(temperature=2.0, min_p=1.0)):
        assert {choose(logits, s, torch.Generator().manual_seed(i)) for i in range(30)} == {best}
    top3 = set(logits.topk(3).indices.tolist())
    drawn = {choose(logits, Sampling(temperature=2.0, top_k=3), torch.Generator().manual_seed(i)) for i in range(200)}
    assert drawn == top3
    with pytest.raises(RuntimeError, match="every token is forbidden"):
        choose(torch.full((V,), -torch.inf), Sampling())


# ------------------------------------------------------------------------------------------ engine: batched = alone
class Collector:
    def __init__(self) -> None:
        self.events: list[object] = []
        self.done = threading.Event()

    def __call__(self, event: object) -> None:
        self.events.append(event)
        if isinstance(event, (Done, Failed)):
            self.done.set()

    @property
    def end(self) -> Done:
        assert self.done.wait(240)
        assert isinstance(self.events[-1], Done), self.events[-1]
        return self.events[-1]


SETTINGS = [
    Sampling(),
    Sampling(logit_bias=((40, 4.0), (41, 3.0)), repetition_penalty=1.4),
    Sampling(presence_penalty=1.5, frequency_penalty=0.8),
    Sampling(temperature=0.8, top_k=5, seed=11),
    Sampling(temperature=1.0, min_p=0.1, top_p=0.9, seed=12, frequency_penalty=-0.5),
    Sampling(min_tokens=6, stop_token_ids=frozenset({50, 51}), logprobs=3),
]


def run_jobs(model, settings: list[Sampling], eos: set[int], first: int = 0, jobs_out: list | None = None
             ) -> list[list[int]]:  # fmt: skip
    """Each setting's answer to its own prompt, all queued before the scheduler starts (so they share steps)."""
    engine = Engine(model, TOK, spec="snapkv:0.5", max_batch=8)
    engine.eos = eos
    jobs = []
    for i, s in enumerate(settings, start=first):
        c = Collector()
        ids = ids_of(f"request number {i}: the quick brown fox {i * 3}")
        jobs.append((Job(ids, engine.compressor(None), c, 12, s), c))
        engine.submit(jobs[-1][0])
    engine.start()
    try:
        for _, c in jobs:
            c.end  # noqa: B018
    finally:
        engine.stop()
    if len(settings) > 1:
        assert engine.counters.max_batch == len(settings)  # they really were decoded together
    if jobs_out is not None:
        jobs_out += [job for job, _ in jobs]
    return [job.tokens for job, _ in jobs]


def test_every_sampling_field_batched_equals_alone(model):
    eos = {33}
    batched: list[Job] = []
    together = run_jobs(model, SETTINGS, eos, jobs_out=batched)
    for i, s in enumerate(SETTINGS):
        single: list[Job] = []
        assert together[i] == run_jobs(model, [s], eos, first=i, jobs_out=single)[0], s
        assert len(batched[i].logprobs) == (len(together[i]) if s.logprobs is not None else 0)
        for a, b in zip(batched[i].logprobs, single[0].logprobs):  # the log-probabilities too
            assert (a.token, [t for t, _ in a.top]) == (b.token, [t for t, _ in b.top])
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
    assert len({tuple(t) for t in together}) == len(together)  # the settings change the answers


def test_stop_token_ids_min_tokens_and_logit_bias_change_the_answer_as_asked(model):
    (plain,) = run_jobs(model, [Sampling()], set())
    assert len(plain) == 12
    stop_at = plain[4]
    first = plain.index(stop_at)
    (stopped,) = run_jobs(model, [Sampling(stop_token_ids=frozenset({stop_at}))], set())
    assert stopped == plain[:first]  # the stop token ends the answer and is not part of it
    # min_tokens holds an end token back: with the first answer token as EOS, the answer is empty without it
    (ended,) = run_jobs(model, [Sampling()], {plain[0]})
    assert ended == []
    (held,) = run_jobs(model, [Sampling(min_tokens=5)], {plain[0]})
    assert len(held) >= 5
    assert plain[0] not in held[:5]
    (biased,) = run_jobs(model, [Sampling(logit_bias=((77, 100.0),))], set())
    assert biased == [77] * 12


# ------------------------------------------------------------------------------------------ HTTP
@pytest.fixture(scope="module")
def client(model):
    engine = Engine(model, TOK, spec="full", max_tokens=10, model_name="tiny")
    engine.eos = set()
    with TestClient(create_app(engine)) as c:
        c.engine = engine
        yield c


def chat(client, content: str = "hello there", **kw):
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], **kw})


def complete(client, prompt: str = "hello there", **kw):
    return client.post("/v1/completions", json={"prompt": prompt, **kw})


REFUSED_CHAT = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"presence_penalty": 9}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"logit_bias": {"5000": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 50, "max_tokens": 5}, "min_tokens"),
    ({"stop_token_ids": [1, 999]}, "stop_token_ids"),
    ({"stop_token_ids": ["1"]}, "stop_token_ids"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
        "response_format",
    ),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),  # 'auto'
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tools"),  # no template
    ({"tool_choice": "required"}, "tool_choice"),
    ({"n": 2}, "n"),
    ({"store": True}, "store"),
    ({"audio": {"voice": "x"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
]
REFUSED_COMPLETIONS = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"suffix": "and then"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"logprobs": 21}, "logprobs"),
    ({"echo": True, "logprobs": 2, "stream": True}, "echo"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
]


@pytest.mark.parametrize(("fields", "param"), REFUSED_CHAT)
def test_chat_fields_refused_with_a_400_naming_them(client, fields, param):
    r = chat(client, **fields)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["message"]


@pytest.mark.parametrize(("fields", "param"), REFUSED_COMPLETIONS)
def test_completion_fields_refused_with_a_400_naming_them(client, fields, param):
    r = complete(client, **fields)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_fields_are_accepted_with_a_warning_told_to_the_client(client, caplog):
    with caplog.at_level("WARNING", logger="tokensieve.serve"):
        r = chat(client, max_tokens=3, guided_choice=["a"], frobnicate=1)
    assert r.status_code == 200
    warnings = r.json()["tokensieve"]["warnings"]
    assert any("'frobnicate'" in w for w in warnings)
    assert any("'guided_choice'" in w for w in warnings)
    assert "frobnicate" in caplog.text
    # known fields with the values that ask for nothing are fine, and warn of nothing
    r = chat(client, max_tokens=3, user="u1", store=False, service_tier="auto", n=1, logprobs=False, top_k=-1,
             response_format={"type": "text"}, tool_choice="none", presence_penalty=0, top_logprobs=0)  # fmt: skip
    assert r.status_code == 200
    assert r.json()["tokensieve"]["warnings"] == []


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """The model's own log-probabilities at every position of ``ids`` (one plain forward pass)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def test_chat_logprobs_are_the_models_own(client, model):
    r = chat(client, "what is next: abcabcab", max_tokens=6, logprobs=True, top_logprobs=3)
    body = r.json()
    content = body["choices"][0]["logprobs"]["content"]
    answer = body["choices"][0]["message"]["content"]
    assert "".join(e["token"] for e in content) == answer
    assert len(content) == 6
    prompt = client.engine.encode_chat([{"role": "user", "content": "what is next: abcabcab"}])
    answer_ids = TOK(answer, add_special_tokens=False)["input_ids"]
    ref = full_logprobs(model, prompt + answer_ids)  # spec full: the served logits are the plain model's
    for i, e in enumerate(content):
        row = ref[len(prompt) - 1 + i]
        assert e["logprob"] == pytest.approx(float(row[answer_ids[i]]), abs=1e-4)
        assert len(e["top_logprobs"]) == 3
        assert e["top_logprobs"][0]["logprob"] == pytest.approx(float(row.max()), abs=1e-4)
        assert e["top_logprobs"][0]["token"] == e["token"]  # greedy chose the most likely
        assert e["bytes"] == list(e["token"].encode())
    # streamed: the chunks carry the same log-probabilities
    r = chat(client, "what is next: abcabcab", max_tokens=6, logprobs=True, top_logprobs=3, stream=True)
    chunks = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
    streamed = [e for c in chunks for e in ((c["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert streamed == content


def test_completions_echo_with_prompt_logprobs_from_the_uncompressed_forward(client, model):
    prompt = "one two three four five six seven"
    r = complete(client, prompt, max_tokens=4, echo=True, logprobs=2, spec="snapkv:0.25")
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    plain = complete(client, prompt, max_tokens=4, spec="snapkv:0.25").json()["choices"][0]["text"]
    assert choice["text"] == prompt + plain
    ids = ids_of(prompt)
    assert len(lp["tokens"]) == len(ids) + 4
    assert lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None
    ref = full_logprobs(model, ids)
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        assert max(lp["top_logprobs"][i].values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
    assert "".join(lp["tokens"][len(ids) :]) == plain
    assert lp["text_offset"][len(ids)] == len(TOK.decode(ids))
    # without echo: the answer's tokens only
    lp2 = complete(client, prompt, max_tokens=4, logprobs=0, spec="snapkv:0.25").json()["choices"][0]["logprobs"]
    assert lp2["tokens"] == lp["tokens"][len(ids) :]
    assert lp2["token_logprobs"] == pytest.approx(lp["token_logprobs"][len(ids) :])


SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
    "required": ["colour", "ok"],
    "additionalProperties": False,
}


def test_response_format_json_schema_gives_json_matching_the_schema(client):
    pytest.importorskip("llguidance")
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}
    r = chat(client, "give me a colour", max_tokens=40, response_format=fmt)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    value = json.loads(choice["message"]["content"])
    assert set(value) == {"colour", "ok"}
    assert value["colour"] in ("red", "green", "blue")
    assert isinstance(value["ok"], bool)
    assert choice["finish_reason"] == "stop"  # the grammar completed the answer
    r = complete(client, "a json object:", max_tokens=60, response_format={"type": "json_object"}, ignore_eos=False)
    text = r.json()["choices"][0]["text"]
    assert text.startswith("{")
    if r.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut at max_tokens: the client is told
        assert r.json()["tokensieve"]["warnings"]


def test_constrained_answers_batched_equal_alone(client):
    pytest.importorskip("llguidance")
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}
    questions = [f"colour number {i}" for i in range(4)]
    alone = [chat(client, q, max_tokens=40, response_format=fmt).json()["choices"][0]["message"]["content"]
             for q in questions]  # fmt: skip
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        kw = {"response_format": fmt} if i < 4 else {"presence_penalty": 1.0}
        body = chat(client, questions[i % 4], max_tokens=40, **kw).json()
        results[i] = body["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(4)] == alone


class ToolTokenizer(CharTokenizer):
    """The character tokenizer with a chat template that renders tools (as Jinja, like a Hugging Face template)."""

    chat_template = (
        "{% if tools %}tools: {% for t in tools %}{{ t.function.name }} {% endfor %}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    )

    def apply_chat_template(self, messages, tools=None, tokenize=False, add_generation_prompt=True, **_):
        import jinja2

        return jinja2.Template(self.chat_template).render(messages=messages, tools=tools)


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
        "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"],
        "additionalProperties": False}}},
]  # fmt: skip


def test_forced_tool_calls_through_the_chat_template(model):
    pytest.importorskip("llguidance")
    engine = Engine(model, ToolTokenizer(), spec="full", max_tokens=10, model_name="tiny")
    engine.eos = set()
    messages = [{"role": "user", "content": "weather in paris?"}]
    with_tools = engine.encode_chat(messages, TOOLS)
    assert TOK.decode(with_tools).startswith("tools: get_weather get_time")
    with TestClient(create_app(engine)) as c:
        named = {"type": "function", "function": {"name": "get_weather"}}
        r = c.post("/v1/chat/completions", json={"messages": messages, "tools": TOOLS, "tool_choice": named,
                                                 "max_tokens": 40})  # fmt: skip
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert call["id"].startswith("call_")
        assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Oslo")
        named_args = call["function"]["arguments"]
        assert choice["message"]["content"] is None
        r = c.post("/v1/chat/completions", json={"messages": messages, "tools": TOOLS, "tool_choice": "required",
                                                 "parallel_tool_calls": False, "max_tokens": 60})  # fmt: skip
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        (call,) = choice["message"]["tool_calls"]
        args = json.loads(call["function"]["arguments"])
        assert (call["function"]["name"], set(args)) in (("get_weather", {"city"}), ("get_time", {"utc"}))
        # the call and its result go back to the model through the template
        follow = [
            *messages,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
        ]
        r = c.post("/v1/chat/completions", json={"messages": follow, "tools": TOOLS, "tool_choice": "none",
                                                 "max_tokens": 3})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "length"
        # streamed: the complete call arrives as OpenAI's tool_calls delta, then finish_reason tool_calls
        r = c.post("/v1/chat/completions", json={"messages": messages, "tools": TOOLS, "tool_choice": named,
                                                 "max_tokens": 40, "stream": True})  # fmt: skip
        chunks = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
        (streamed,) = [d for ch in chunks for d in ch["choices"][0]["delta"].get("tool_calls", [])]
        assert streamed["index"] == 0
        assert streamed["function"] == {"name": "get_weather", "arguments": named_args}
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        assert not any(ch["choices"][0]["delta"].get("content") for ch in chunks)


def test_a_grammar_without_the_constrained_extra_is_a_400_naming_it(client, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if it were not installed
    r = chat(client, response_format={"type": "json_object"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "response_format"
    assert "tokensieve[constrained]" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------ safe defaults
def test_a_spec_that_would_keep_less_than_its_window_is_not_applied_and_the_client_is_told(model):
    engine = Engine(model, TOK, spec="snapkv:0.25", max_tokens=4, model_name="tiny", compress_min_tokens=100)
    engine.eos = set()
    with TestClient(create_app(engine)) as c:
        short = c.post("/v1/completions", json={"prompt": "a short prompt of some words"}).json()
        assert short["tokensieve"]["spec"] == "full"
        assert any("snapkv:0.25" in w and "full cache" in w for w in short["tokensieve"]["warnings"])
        full = c.post("/v1/completions", json={"prompt": "a short prompt of some words", "spec": "full"}).json()
        assert short["choices"][0]["text"] == full["choices"][0]["text"]
        long_prompt = "x y z " * 30 + "the end"  # 188 tokens: 25 % keeps 47, above SnapKV's window of 32
        applied = c.post("/v1/completions", json={"prompt": long_prompt}).json()
        assert applied["tokensieve"]["spec"] == "snapkv:0.25"
        assert applied["tokensieve"]["warnings"] == []
        tight = c.post("/v1/completions", json={"prompt": long_prompt, "spec": "snapkv:0.1"}).json()
        assert tight["tokensieve"]["spec"] == "full"  # 10 % keeps 19 < 32
        assert any("fewer than the 32" in w for w in tight["tokensieve"]["warnings"])
        # a streaming client is told too, in the last chunk
        r = c.post("/v1/completions", json={"prompt": "a short prompt of some words", "stream": True})
        chunks = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["tokensieve"]["spec"] == "full"
        assert chunks[-1]["tokensieve"]["warnings"] == short["tokensieve"]["warnings"]


def test_library_warnings_reach_the_client(model):
    engine = Engine(model, TOK, spec="snapkv:0.5", max_tokens=2, model_name="tiny")  # compress_min_tokens=0
    engine.eos = set()
    with TestClient(create_app(engine)) as c:
        body = c.post("/v1/completions", json={"prompt": "twenty characters ok"}).json()
        assert body["tokensieve"]["spec"] == "snapkv:0.5"
        assert any("protects 0 sink + 32 recent" in w for w in body["tokensieve"]["warnings"])


# ------------------------------------------------------------------------------------------ endpoints
def test_models_tokenize_and_detokenize(client):
    card = client.get("/v1/models").json()["data"][0]
    assert card["max_model_len"] == 512  # the tiny model's positions
    r = client.post("/tokenize", json={"prompt": "hi you"}).json()
    assert r["tokens"] == ids_of("hi you")
    assert r["count"] == 7
    assert r["max_model_len"] == 512
    r = client.post("/tokenize", json={"prompt": "hi you", "add_special_tokens": False, "return_token_strs": True})
    assert r.json()["token_strs"] == list("hi you")
    r = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hey"}]}).json()
    assert r["tokens"] == client.engine.encode_chat([{"role": "user", "content": "hey"}])
    assert client.post("/detokenize", json={"tokens": ids_of("hi you")[1:]}).json() == {"prompt": "hi you"}
    bad = client.post("/detokenize", json={"tokens": [1, 500]})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "tokens"
    assert client.post("/tokenize", json={}).status_code == 400


# ------------------------------------------------------------------------------------------ the openai client
def test_the_openai_client_sees_every_field_work_or_refused(model):
    """The probe a vLLM user runs, with the official client over real HTTP: no field is silently ignored."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from tokensieve.serve.bench import running_server

    engine = Engine(model, TOK, spec="full", max_tokens=6, model_name="tiny")
    engine.eos = set()
    with running_server(create_app(engine)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "say something"}]
        r = client.chat.completions.create(model="tiny", messages=messages, logprobs=True, top_logprobs=2)
        assert len(r.choices[0].logprobs.content) == 6
        assert all(len(e.top_logprobs) == 2 for e in r.choices[0].logprobs.content)
        plain = client.chat.completions.create(model="tiny", messages=messages).choices[0].message.content
        biased = (
            client.chat.completions.create(model="tiny", messages=messages, logit_bias={str(ids_of("Q")[1]): 100})
            .choices[0]
            .message.content
        )
        assert biased == "Q" * 6 != plain
        penalised = client.chat.completions.create(model="tiny", messages=messages, frequency_penalty=2.0,
                                                   presence_penalty=2.0)  # fmt: skip
        assert len(set(penalised.choices[0].message.content)) == 6  # no token twice
        c = client.completions.create(model="tiny", prompt="abc", echo=True, logprobs=1, max_tokens=2)
        assert c.choices[0].text.startswith("abc")
        assert c.choices[0].logprobs.token_logprobs[0] is None
        extra = client.chat.completions.create(model="tiny", messages=messages,
                                               extra_body={"top_k": 3, "min_tokens": 2, "repetition_penalty": 1.2,
                                                           "stop_token_ids": [2]})  # fmt: skip
        assert extra.choices[0].message.content
        for kw, param in (({"max_tokens": 0}, "max_tokens"), ({"presence_penalty": 9}, "presence_penalty"),
                          ({"stream_options": {"include_usage": True}}, "stream_options")):  # fmt: skip
            with pytest.raises(openai.BadRequestError) as exc:
                client.chat.completions.create(model="tiny", messages=messages, **kw)
            assert exc.value.body["param"] == param
        with pytest.raises(openai.BadRequestError) as exc:
            client.completions.create(model="tiny", prompt="abc", suffix="def")
        assert exc.value.body["param"] == "suffix"
        assert client.models.list().data[0].model_extra["max_model_len"] == 512


def test_echo_on_a_stored_context_is_refused_and_penalties_work_there(client):
    ctx = client.post("/v1/contexts", json={"document": "a stored text about bees", "mode": "text"}).json()
    r = complete(client, " and", context_id=ctx["id"], echo=True)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "echo"
    plain = complete(client, " and", context_id=ctx["id"], max_tokens=8).json()["choices"][0]["text"]
    biased = complete(client, " and", context_id=ctx["id"], max_tokens=8, logit_bias={str(ids_of("z")[1]): 100})
    assert biased.json()["choices"][0]["text"] == "z" * 8 != plain
    client.delete(f"/v1/contexts/{ctx['id']}")
