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

The ``arrival`` scenario (:func:`run_arrival`) measures what a long prompt does to the streams already running: for
each spec and each ``step_tokens`` setting (the scheduler's token budget per step; 0 prefills a prompt in one pass) a
server is started, ``arrivals`` prompts of ``arrival_length`` tokens are first sent alone (their TTFT alone), then
``streams`` clients start streaming answers and, once every stream is decoding, the same number of new prompts of the
same length arrive together. Reported per setting: each stream's longest inter-token gap over its median gap (the
worst stream's ratio), and each arrival's TTFT over its TTFT alone (the worst). Stored prefix reuse is off in this
scenario, so an arrival is never served from an earlier one's blocks.

The ``prefix`` scenario (:func:`run_prefix`) measures automatic prefix reuse: for each spec, ``requests`` prompts
that share their first ``length`` tokens (each followed by ``suffix`` tokens of its own) are sent one after another to
a server with prefix reuse and to one without; reported: the TTFT of the first prompt (nothing stored yet) and the
median TTFT of the others, with and without reuse, and the tokens reused.
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
    return {"text": "".join(text), "finish_reason": finish, "times": times, "start": t0}


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


def measure_arrival(
    engine: Any,
    streams: Sequence[list[int]],
    arrivals_alone: Sequence[list[int]],
    arrivals: Sequence[list[int]],
    *,
    stream_tokens: int,
) -> dict[str, Any]:
    """The arrival scenario on one engine (see the module's docstring); the prompts are token ids."""
    httpx = require("httpx", "serve")
    from .app import create_app

    name = engine.model_name
    with running_server(create_app(engine)) as url:
        with httpx.Client(timeout=600) as client:  # warm up, then each arrival alone
            stream_completion(client, url, {"model": name, "prompt": streams[0][:8], "max_tokens": 2})
            alone = []
            for p in arrivals_alone:
                body = {"model": name, "prompt": p, "max_tokens": 1, "stop": None, "ignore_eos": True}
                alone.append(stream_completion(client, url, body)["times"][0])
        runs: list[dict[str, Any] | None] = [None] * len(streams)
        loaded: list[dict[str, Any] | None] = [None] * len(arrivals)
        errors: list[str] = []

        def send(out: list[Any], i: int, prompt: list[int], max_tokens: int) -> None:
            body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "stop": None, "ignore_eos": True}
            try:
                with httpx.Client(timeout=600) as client:
                    out[i] = stream_completion(client, url, body)
            except Exception as exc:  # recorded, reported
                errors.append(f"{type(exc).__name__}: {exc}")

        generated = engine.counters.generated_tokens
        threads = [threading.Thread(target=send, args=(runs, i, p, stream_tokens)) for i, p in enumerate(streams)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 600
        while engine.counters.generated_tokens < generated + 8 * len(streams) and time.monotonic() < deadline:
            time.sleep(0.01)  # every stream is decoding
        arriving = [threading.Thread(target=send, args=(loaded, i, p, 1)) for i, p in enumerate(arrivals)]
        for t in arriving:
            t.start()
        for t in [*arriving, *threads]:
            t.join()
    ratios, medians, longest = [], [], []
    for r in runs:
        if r is None or len(r["times"]) < 3:
            continue
        gaps = [b - a for a, b in zip(r["times"], r["times"][1:])]
        med = _percentile(gaps, 0.5)
        medians.append(med)
        longest.append(max(gaps))
        ratios.append(max(gaps) / med if med > 0 else float("nan"))
    ttft = [r["times"][0] for r in loaded if r is not None and r["times"]]
    ttft_ratios = [a / b for a, b in zip(ttft, alone) if b > 0]
    return {
        "spec": engine.default.spec.label,
        "step_tokens": engine.step_tokens or 0,
        "streams": len(streams),
        "arrivals": len(arrivals),
        "errors": errors[:3],
        "gap_ratio": max(ratios) if ratios else float("nan"),  # worst stream: longest gap / its median gap
        "gap_median_ms": 1e3 * _percentile(medians, 0.5),
        "gap_longest_ms": 1e3 * max(longest) if longest else float("nan"),
        "ttft_alone": alone,
        "ttft_loaded": ttft,
        "ttft_ratio": max(ttft_ratios) if ttft_ratios else float("nan"),  # worst arrival
        "prefill_chunks": engine.counters.prefill_chunks,
    }


def run_arrival(
    *,
    model_name: str,
    specs: Sequence[str],
    step_tokens: Sequence[int],
    kv_memory: int,
    streams: int,
    stream_length: int,
    stream_tokens: int,
    arrivals: int,
    arrival_length: int,
    max_batch: int,
    out: str | None = None,
) -> list[dict[str, Any]]:
    """The arrival scenario for every spec and step budget; prints a table (and writes JSON to ``out``)."""
    import torch

    from ..adapters.models import load_model
    from ..spec import Spec
    from .engine import Engine

    for s in specs:
        Spec.parse(s)
    model, tok = load_model(model_name)
    long = prompts_of(tok, arrival_length, 2 * arrivals)
    short = prompts_of(tok, stream_length, streams + 2 * arrivals)[2 * arrivals :]
    rows = []
    for s in specs:
        for budget in step_tokens:
            engine = Engine(model, tok, spec=s, kv_memory=kv_memory, max_batch=max_batch, model_name=model_name,
                            max_tokens=stream_tokens, step_tokens=budget, prefix_cache=False)  # fmt: skip
            row = measure_arrival(engine, short, long[:arrivals], long[arrivals:], stream_tokens=stream_tokens)
            rows.append(row)
            print(format_arrival_row(row), flush=True)
    meta = {
        "scenario": "arrival",
        "model": model_name,
        "kv_memory": kv_memory,
        "streams": streams,
        "stream_length": stream_length,
        "stream_tokens": stream_tokens,
        "arrivals": arrivals,
        "arrival_length": arrival_length,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print("\n" + format_arrival_table(rows, meta))
    if out:
        Path(out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


def format_arrival_row(r: dict[str, Any]) -> str:
    return (
        f"{r['spec']} step_tokens={r['step_tokens']}: longest gap {r['gap_ratio']:.1f}x the median, "
        f"TTFT {r['ttft_ratio']:.2f}x alone" + (f", errors: {r['errors']}" if r["errors"] else "")
    )


def format_arrival_table(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"{meta['streams']} streams of {meta['stream_length']}-token prompts ({meta['stream_tokens']} tokens each) · "
        f"{meta['arrivals']} arrival(s) of {meta['arrival_length']} tokens · {meta['threads']} threads",
        "",
        "| spec | step tokens | longest gap / median (worst stream) | median gap (ms) | longest gap (ms) "
        "| TTFT loaded / alone (worst arrival) | TTFT alone (s) | TTFT loaded (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        alone = ", ".join(f"{t:.2f}" for t in r["ttft_alone"])
        loaded = ", ".join(f"{t:.2f}" for t in r["ttft_loaded"])
        lines.append(
            f"| `{r['spec']}` | {r['step_tokens'] or 'off (one pass)'} | {r['gap_ratio']:.1f} | "
            f"{r['gap_median_ms']:.0f} | {r['gap_longest_ms']:.0f} | {r['ttft_ratio']:.2f} | {alone} | {loaded} |"
        )
    return "\n".join(lines)


def measure_prefix(engine: Any, prompts: Sequence[list[int]]) -> dict[str, Any]:
    """TTFT of ``prompts`` sent one after another (the prefix scenario, see the module's docstring)."""
    httpx = require("httpx", "serve")
    from .app import create_app

    name = engine.model_name
    with running_server(create_app(engine)) as url, httpx.Client(timeout=600) as client:
        stream_completion(client, url, {"model": name, "prompt": prompts[0][-8:], "max_tokens": 2})
        ttft = []
        for p in prompts:
            body = {"model": name, "prompt": p, "max_tokens": 1, "stop": None, "ignore_eos": True}
            ttft.append(stream_completion(client, url, body)["times"][0])
    return {
        "spec": engine.default.spec.label,
        "reuse": engine.prefix is not None,
        "ttft_first": ttft[0],
        "ttft_rest_p50": _percentile(ttft[1:], 0.5),
        "reused_tokens": engine.counters.prefix_hit_tokens,
    }


def run_prefix(
    *,
    model_name: str,
    specs: Sequence[str],
    kv_memory: int,
    length: int,
    suffix: int,
    requests: int,
    step_tokens: int,
    out: str | None = None,
) -> list[dict[str, Any]]:
    """The prefix scenario for every spec, with and without reuse; prints a table (and writes JSON to ``out``)."""
    import torch

    from ..adapters.models import load_model
    from ..spec import Spec
    from .engine import Engine

    for s in specs:
        Spec.parse(s)
    model, tok = load_model(model_name)
    shared = prompts_of(tok, length, 1)[0]
    tails = prompts_of(tok, suffix, requests + 1)[1:]
    prompts = [shared + t for t in tails]
    rows = []
    for s in specs:
        for reuse in (True, False):
            engine = Engine(model, tok, spec=s, kv_memory=kv_memory, model_name=model_name, max_tokens=1,
                            step_tokens=step_tokens, prefix_cache=reuse)  # fmt: skip
            rows.append(measure_prefix(engine, prompts))
            r = rows[-1]
            print(f"{s} reuse={reuse}: TTFT first {r['ttft_first']:.2f} s, then {r['ttft_rest_p50']:.2f} s "
                  f"({r['reused_tokens']} tokens reused)", flush=True)  # fmt: skip
    meta = {"scenario": "prefix", "model": model_name, "kv_memory": kv_memory, "length": length, "suffix": suffix,
            "requests": requests, "step_tokens": step_tokens, "threads": torch.get_num_threads(),
            "torch": torch.__version__}  # fmt: skip
    lines = [
        f"{requests} prompts sharing {length} tokens (+{suffix} of their own) · {meta['threads']} threads",
        "",
        "| spec | reuse | TTFT first (s) | TTFT others p50 (s) | tokens reused |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['spec']}` | {'on' if r['reuse'] else 'off'} | {r['ttft_first']:.2f} | "
                     f"{r['ttft_rest_p50']:.2f} | {r['reused_tokens']} |")  # fmt: skip
    print("\n" + "\n".join(lines))
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


__all__ = [
    "format_arrival_table",
    "format_table",
    "measure",
    "measure_arrival",
    "prompts_of",
    "run_arrival",
    "run_bench",
    "run_prefix",
    "running_server",
    "stream_completion",
]
