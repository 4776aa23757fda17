"""The server as 2 Ray Serve replicas behind one HTTP endpoint, on a local 2-CPU Ray cluster: OpenAI-style requests
are answered by both replicas with the same greedy completions as the in-process server; streaming works."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import sys

import pytest

from tests.conftest import make_tiny_model
from tests.unit.lab.test_cli_lab import byte_level_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own pydantic-v1 style fields
PROMPTS = ["The cat sat on", "Hello there, how", "One two three four", "A quick brown fox"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rayserve") / "tiny"
    make_tiny_model(vocab_size=256).save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def endpoint(model_dir):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'tokensieve[ray]')")
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from ray import serve

    from tokensieve.serve.ray_serve import ReplicaSettings, run

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        settings = ReplicaSettings(model=model_dir, served_model_name="tiny", max_tokens=8, threads=1)
        run(settings, 2, port=port, blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _local_answers(model_dir) -> dict[str, str]:
    from fastapi.testclient import TestClient

    from tokensieve.adapters.models import load_model
    from tokensieve.serve.app import create_app
    from tokensieve.serve.engine import Engine

    model, tok = load_model(model_dir)
    engine = Engine(model, tok, spec="full", max_tokens=8, model_name="tiny")
    with TestClient(create_app(engine)) as c:
        return {p: c.post("/v1/completions", json={"model": "tiny", "prompt": p}).json()["choices"][0]["text"]
                for p in PROMPTS}  # fmt: skip


def test_two_replicas_answer_like_the_local_server(endpoint, model_dir):
    import httpx

    expected = _local_answers(model_dir)

    def ask(prompt: str) -> tuple[str, str, str]:
        r = httpx.post(f"{endpoint}/v1/completions", json={"model": "tiny", "prompt": prompt}, timeout=120)
        assert r.status_code == 200, r.text
        return prompt, r.json()["choices"][0]["text"], r.headers["x-tokensieve-replica"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, PROMPTS * 6))
    for prompt, text, _ in answers:
        assert text == expected[prompt]
    assert len({replica for *_, replica in answers}) == 2  # both replicas served

    models = httpx.get(f"{endpoint}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    bad = httpx.post(f"{endpoint}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": -1}, timeout=30)
    assert bad.status_code == 400
    assert "error" in bad.json()


def test_streaming_through_the_proxy_adds_up_to_the_answer(endpoint, model_dir):
    import httpx

    body = {"model": "tiny", "prompt": PROMPTS[0]}
    whole = httpx.post(f"{endpoint}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    with httpx.stream("POST", f"{endpoint}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    assert "".join(json.loads(ln)["choices"][0]["text"] for ln in lines[:-1]) == whole


def test_without_ray_the_cli_names_the_extra(monkeypatch, capsys):
    from tokensieve.cli import main

    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code = main(["serve", "--model", "no-such-model-needed", "--ray-replicas", "2"])
    err = capsys.readouterr().err
    assert code != 0
    assert "pip install 'tokensieve[ray]'" in err
    assert "Traceback" not in err
