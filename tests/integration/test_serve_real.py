"""tokensieve serve on the embedded model: the chat template, a compressed request equal to the library's answer,
two concurrent requests equal to each alone, a stored chat context answering a question about it, and, with the full
cache, a question on a stored context equal to the whole conversation sent alone."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from tokensieve.data.prompts import chat_ids, chat_split

pytestmark = pytest.mark.integration
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from tests.unit.lab.serve_helpers import one_thread  # noqa: E402, F401 (an autouse fixture)
from tokensieve.serve.app import create_app  # noqa: E402
from tokensieve.serve.engine import Engine  # noqa: E402

DOC = (
    "Mira keeps bees on the roof of the old library. The hives are painted blue, and the passkey to the roof door "
    "is 7261. In autumn she sells the honey at the market on Saturdays."
)


def library_answer(model, tok, spec: str, ids: torch.Tensor, n: int) -> str:
    press = ts.compress(model, spec)
    ctx = press.prefill(ids, reserve=n)
    gen = press.decode(ctx, n, eos_token_ids=[tok.eos_token_id])
    return tok.decode(gen.tokens[0], skip_special_tokens=True)


def test_embedded_model_served(real_model):
    model, tok = real_model
    engine = Engine(model, tok, spec="snapkv:0.5", model_name="smollm2-135m", max_tokens=12)
    questions = ["Name three colours of the rainbow.", "What is the capital of France?"]
    with TestClient(create_app(engine)) as client:
        import concurrent.futures as cf

        def ask(q: str) -> dict:
            body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": q}], "max_tokens": 12}
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()

        with cf.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(ask, questions))
        for q, a in zip(questions, answers):
            want = library_answer(model, tok, "snapkv:0.5", chat_ids(tok, q), 12)
            assert a["choices"][0]["message"]["content"] == want
            assert a["usage"]["prompt_tokens"] == chat_ids(tok, q).shape[1]

        r = client.post("/v1/contexts", json={"document": DOC, "spec": "snapkv:0.5"})
        assert r.status_code == 200, r.text
        cid = r.json()["id"]
        q = "What is the passkey to the roof door?"
        body = {"messages": [{"role": "user", "content": q}], "context_id": cid, "max_tokens": 12}
        a = client.post("/v1/chat/completions", json=body).json()
        # the whole conversation tokenised at once; the context holds its ids up to the document's end (the blank
        # line before the question is tokenised with the question, as in the whole conversation)
        whole = chat_ids(tok, f"{DOC}\n\n{q}")[0].tolist()
        k = r.json()["prompt_tokens"]
        assert len(chat_split(tok, DOC, q).context) - 1 <= k < len(whole)
        press = ts.compress(model, "snapkv:0.5")
        ctx = press.prefill(torch.tensor([whole[:k]]))
        press.extend(ctx, torch.tensor([whole[k:]]))
        want = tok.decode(press.decode(ctx, 12, eos_token_ids=[tok.eos_token_id]).tokens[0], skip_special_tokens=True)
        assert a["choices"][0]["message"]["content"] == want
        assert a["usage"]["prompt_tokens"] == len(whole)

        # with the full cache, a question on a stored context is the whole conversation, token for token
        r = client.post("/v1/contexts", json={"document": DOC, "spec": "full"})
        assert r.status_code == 200, r.text
        cid = r.json()["id"]
        for q in ("What is the passkey to the roof door?", "What colour are the hives?"):
            on_ctx = {"messages": [{"role": "user", "content": q}], "context_id": cid, "max_tokens": 12}
            alone = {"messages": [{"role": "user", "content": f"{DOC}\n\n{q}"}], "max_tokens": 12, "spec": "full"}
            a = client.post("/v1/chat/completions", json=on_ctx).json()
            b = client.post("/v1/chat/completions", json=alone).json()
            assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"], q
            assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]


def test_embedded_model_json_schema_logprobs_and_tools(real_model):
    """The embedded model's fast tokenizer under a grammar: the answer is JSON of the schema; log-probabilities of
    its tokens; its chat template has no tool support, so tools are refused with a 400 naming them."""
    import json

    pytest.importorskip("llguidance")
    model, tok = real_model
    engine = Engine(model, tok, spec="full", model_name="smollm2-135m", max_tokens=40)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"enum": [
        "France", "Spain", "Italy"]}}, "required": ["city", "country"], "additionalProperties": False}  # fmt: skip
    with TestClient(create_app(engine)) as client:
        body = {"messages": [{"role": "user", "content": "Which city is the capital of France? Answer in JSON."}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}},
                "logprobs": True, "top_logprobs": 2}  # fmt: skip
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        value = json.loads(choice["message"]["content"])
        assert set(value) == {"city", "country"}
        assert value["country"] in ("France", "Spain", "Italy")
        assert choice["finish_reason"] == "stop"
        content = choice["logprobs"]["content"]
        assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in content)
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        r = client.post("/v1/chat/completions", json={"messages": body["messages"], "tools": tools,
                                                      "tool_choice": "required"})  # fmt: skip
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "tools"
