"""Measure the server (``tokensieve serve-bench``): how many long conversations run at once under one KV memory
budget, and the latency and throughput clients see — full cache against compressed specs, in one run.

For each spec a server is started in this process (uvicorn on 127.0.0.1, a free port) with the budget; ``clients``
threads send ``requests`` streaming completions of ``length`` prompt tokens each (different stretches of the
standard library's docstrings, given as token ids so every prompt has exactly ``length`` tokens) and read the
server-sent events. Reported per spec:

* ``peak_batch``: the most sequences decoded together (the server's own counter) — the concurrency that fit;
* ``fits``: the budget divided by the bytes one request holds (its compressed prompt plus the answer's headroom);
* TTFT (time from sending to the first token; queueing and prefill included) and inter-token latency p50/p95;
* throughput: generated tokens per second of wall time over the whole run.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import require


@contextlib.contextmanager
def running_server(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yields its base URL (``http://host:port``), stops on exit."""
    uvicorn = require("uvicorn", "serve")
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="tokensieve-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("The server did not start.")
        time.sleep(0.02)
    sock = server.servers[0].sockets[0]
    bound_port = sock.getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def stream_completion(client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """Send one streaming completion; returns its text, finish reason and the arrival time of every chunk."""
    t0 = time.perf_counter()
    times: list[float] = []
    text: list[str] = []
    finish = None
    with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            choice = chunk["choices"][0]
            if choice["text"]:
                times.append(time.perf_counter() - t0)
                text.append(choice["text"])
            finish = choice["finish_reason"] or finish
    return {"text": "".join(text), "finish_reason": finish, "times": times}


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q * (len(s) - 1))))
    return s[k]


def prompts_of(tokenizer: Any, length: int, count: int) -> list[list[int]]:
    """``count`` prompts of exactly ``length`` token ids, from different stretches of the stdlib docstrings."""
    from ..data.prompts import encode
    from ..data.text import calibration_text

    ids = encode(tokenizer, calibration_text(min_chars=8 * (length + 64 * count)))
    if len(ids) < length + count:
        ids = ids * (1 + (length + count) // max(1, len(ids)))
    stride = max(1, (len(ids) - length) // max(1, count))
    return [ids[i * stride : i * stride + length] for i in range(count)]


def measure(engine: Any, prompts: Sequence[list[int]], *, max_tokens: int, clients: int) -> dict[str, Any]:
    """Serve ``prompts`` to ``clients`` concurrent streaming clients over HTTP; the measurements of one spec."""
    httpx = require("httpx", "serve")
    from .app import create_app

    results: list[dict[str, Any] | None] = [None] * len(prompts)
    errors: list[str] = []
    todo = list(range(len(prompts)))
    lock = threading.Lock()
    with running_server(create_app(engine)) as url:

        def client_loop() -> None:
            with httpx.Client(timeout=600) as client:
                while True:
                    with lock:
                        if not todo:
                            return
                        i = todo.pop(0)
                    body = {"model": engine.model_name, "prompt": prompts[i], "max_tokens": max_tokens,
                            "stop": None, "ignore_eos": True}  # fmt: skip
                    try:
                        results[i] = stream_completion(client, url, body)
                    except Exception as exc:  # recorded, reported
                        errors.append(f"{type(exc).__name__}: {exc}")

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client_loop) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    done = [r for r in results if r is not None]
    ttft = [r["times"][0] for r in done if r["times"]]
    itl = [b - a for r in done for a, b in zip(r["times"], r["times"][1:])]
    tokens = engine.counters.generated_tokens
    c = engine.counters
    return {
        "spec": engine.default.spec.label,
        "requests": len(prompts),
        "completed": len(done),
        "errors": errors[:3],
        "peak_batch": c.max_batch,
        "peak_kv_bytes_held": c.peak_held,
        "bytes_per_request": c.peak_request_bytes,
        "fits": (engine.kv_memory // c.peak_request_bytes) if engine.kv_memory and c.peak_request_bytes else None,
        "ttft_p50": _percentile(ttft, 0.5),
        "ttft_p95": _percentile(ttft, 0.95),
        "itl_p50": _percentile(itl, 0.5),
        "itl_p95": _percentile(itl, 0.95),
        "tokens": tokens,
        "wall_seconds": wall,
        "tokens_per_second": tokens / wall if wall > 0 else float("nan"),
    }


def run_bench(
    *,
    model_name: str,
    specs: Sequence[str],
    kv_memory: int,
    length: int,
    max_tokens: int,
    clients: int,
    requests: int,
    max_batch: int,
    out: str | None = None,
) -> list[dict[str, Any]]:
    """Measure every spec under the same budget and load; prints a table (and writes JSON to ``out``)."""
    import torch

    from ..adapters.models import load_model
    from ..spec import Spec
    from .engine import Engine

    for s in specs:
        Spec.parse(s)  # fail before the model loads
    model, tok = load_model(model_name)
    prompts = prompts_of(tok, length, requests)
    rows = []
    for s in specs:
        engine = Engine(model, tok, spec=s, kv_memory=kv_memory, max_batch=max_batch, model_name=model_name,
                        max_tokens=max_tokens)  # fmt: skip
        rows.append(measure(engine, prompts, max_tokens=max_tokens, clients=clients))
        print(format_row(rows[-1]), flush=True)
    meta = {
        "model": model_name,
        "kv_memory": kv_memory,
        "length": length,
        "max_tokens": max_tokens,
        "clients": clients,
        "requests": requests,
        "max_batch": max_batch,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print("\n" + format_table(rows, meta))
    if out:
        Path(out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


def format_row(r: dict[str, Any]) -> str:
    return (
        f"{r['spec']}: {r['completed']}/{r['requests']} done, peak batch {r['peak_batch']}, "
        f"{r['tokens_per_second']:.1f} tok/s" + (f", errors: {r['errors']}" if r["errors"] else "")
    )


def format_table(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"KV budget {meta['kv_memory'] / 1e6:.0f} MB · prompts {meta['length']} tokens · {meta['max_tokens']} tokens "
        f"generated · {meta['clients']} clients · {meta['requests']} requests · {meta['threads']} threads",
        "",
        "| spec | KV per request (MB) | fit the budget | peak concurrent | TTFT p50 / p95 (s) "
        "| inter-token p50 / p95 (ms) | throughput (tok/s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['spec']}` | {r['bytes_per_request'] / 1e6:.1f} | {r['fits']} | {r['peak_batch']} | "
            f"{r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | {1e3 * r['itl_p50']:.0f} / {1e3 * r['itl_p95']:.0f} | "
            f"{r['tokens_per_second']:.1f} |"
        )
    return "\n".join(lines)


__all__ = ["format_table", "measure", "prompts_of", "run_bench", "running_server", "stream_completion"]
