"""``tokensieve serve`` (the OpenAI-compatible server) and ``tokensieve serve-bench`` (its load and capacity
measurements): argument parsing only; the work is in :mod:`.engine`, :mod:`.app` and :mod:`.bench`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..results.threads import whole_number


def _memory(text: str) -> int:
    from ..errors import ConfigError
    from .engine import parse_bytes

    try:
        return parse_bytes(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in 0 … 65535, got {text!r}")
    return n


def build_engine(args: argparse.Namespace) -> Any:
    """Load the model and build the engine (the spec is checked before the model is loaded)."""
    from ..adapters.models import load_model
    from ..spec import Spec
    from .engine import Engine

    Spec.parse(args.spec)  # a malformed spec fails before the model loads
    model, tok = load_model(args.model)
    return Engine(
        model,
        tok,
        spec=args.spec,
        kv_memory=args.kv_memory,
        max_batch=args.max_batch,
        model_name=args.served_model_name or args.model,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from ..results.threads import use_threads
    from . import require
    from .app import create_app

    uvicorn = require("uvicorn", "serve")
    require("fastapi", "serve")
    if args.ray_replicas is not None:
        return _serve_ray(args)
    use_threads(args.threads)
    engine = build_engine(args)
    budget = "unlimited" if engine.kv_memory is None else f"{engine.kv_memory / 1e6:.1f} MB"
    print(
        f"tokensieve serve: {engine.model_name} · spec {engine.default.spec.label} · KV memory {budget} · "
        f"max batch {engine.max_batch} · http://{args.host}:{args.port}/v1",
        file=sys.stderr,
    )
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _serve_ray(args: argparse.Namespace) -> int:
    """``--ray-replicas N``: the same app as N Ray Serve replicas behind one endpoint (docs/SCALING.md)."""
    from ..results.threads import resolve_threads
    from ..spec import Spec
    from .ray_serve import ReplicaSettings, import_serve, run

    Spec.parse(args.spec)
    import_serve()
    settings = ReplicaSettings(model=args.model, spec=args.spec, kv_memory=args.kv_memory, max_batch=args.max_batch,
                               max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                               served_model_name=args.served_model_name,
                               threads=resolve_threads(args.threads) if args.threads else 1)  # fmt: skip
    run(settings, args.ray_replicas, address=args.ray_address, host=args.host, port=args.port)
    return 0


def cmd_serve_bench(args: argparse.Namespace) -> int:
    from ..results.threads import use_threads
    from ..spec import split_specs
    from .bench import run_bench

    use_threads(args.threads)
    run_bench(
        model_name=args.model,
        specs=split_specs(args.specs),
        kv_memory=args.kv_memory,
        length=args.length,
        max_tokens=args.max_tokens,
        clients=args.clients,
        requests=args.requests,
        max_batch=args.max_batch,
        out=args.out,
    )
    return 0


def add_commands(sub: Any) -> None:
    from ..adapters.models import DEFAULT_MODEL
    from ..results.threads import add_threads_argument

    sp = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over compressed KV caches (docs/SERVING.md)")
    sp.add_argument("--model", default=DEFAULT_MODEL, help="embedded model name, local HF directory or hub id")
    add_threads_argument(sp)
    sp.add_argument("--spec", default="full", help="default spec of requests that name none, e.g. "
                    "snapkv:0.25+quest:0.125 (a request may set its own in the body field 'spec')")  # fmt: skip
    sp.add_argument(
        "--kv-memory",
        type=_memory,
        default=None,
        metavar="SIZE",
        help="KV cache memory budget, e.g. 1GB or 256MiB; requests beyond it wait (default: unlimited)",
    )
    sp.add_argument("--max-batch", type=whole_number(1), default=16, help="most sequences decoded together")
    sp.add_argument("--max-tokens", type=whole_number(1), default=256, help="default max_tokens of a request")
    sp.add_argument("--max-prompt-tokens", type=whole_number(1), default=None,
                    help="longest prompt accepted (default: the model's context)")  # fmt: skip
    sp.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=_port, default=8000)
    sp.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sp.add_argument("--ray-replicas", type=whole_number(1), default=None, metavar="N",
                    help="serve as N Ray Serve replicas (one model and engine each) behind one endpoint; --threads is "
                    "per replica (default 1); docs/SCALING.md")  # fmt: skip
    sp.add_argument("--ray-address", default=None, metavar="ADDRESS",
                    help="with --ray-replicas: the Ray cluster (default: this machine's, or a new one)")  # fmt: skip
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("serve-bench", help="measure the server: concurrency under a KV budget, TTFT, inter-token "
                        "latency, throughput — full cache vs compressed")  # fmt: skip
    sp.add_argument("--model", default=DEFAULT_MODEL, help="embedded model name, local HF directory or hub id")
    add_threads_argument(sp)
    sp.add_argument("--specs", default="full,snapkv:0.25,snapkv:0.1", help="comma-separated specs to compare")
    sp.add_argument("--kv-memory", type=_memory, default=_memory("64MB"), metavar="SIZE", help="KV budget")
    sp.add_argument("--length", type=whole_number(1), default=1024, help="prompt length in tokens")
    sp.add_argument("--max-tokens", type=whole_number(1), default=32, help="tokens generated per request")
    sp.add_argument("--clients", type=whole_number(1), default=8, help="concurrent clients")
    sp.add_argument("--requests", type=whole_number(1), default=16, help="requests in all")
    sp.add_argument("--max-batch", type=whole_number(1), default=64, help="the server's largest decode batch")
    sp.add_argument("--out", default=None, help="write the measurements as JSON to this file")
    sp.set_defaults(func=cmd_serve_bench)
