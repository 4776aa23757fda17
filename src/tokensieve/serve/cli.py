"""``tokensieve serve`` (the OpenAI-compatible server) and ``tokensieve serve-bench`` (its load and capacity
measurements): argument parsing only; the work is in :mod:`.engine`, :mod:`.app` and :mod:`.bench`."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from ..results.threads import whole_number

API_KEY_ENV = "TOKENSIEVE_API_KEY"
COMPRESS_MIN_TOKENS = 128  # prompts shorter than this keep the full cache (a spec keeps too little of them)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _memory(text: str) -> int:
    from ..errors import ConfigError
    from .limits import parse_bytes

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


def limit_values(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~tokensieve.serve.limits.Limits` given on the command line (None: the default)."""
    return {
        "max_body_bytes": args.max_body,
        "max_prompt_chars": args.max_prompt_chars,
        "request_timeout": args.request_timeout,
        "max_prefill_passes": args.max_prefill_passes,
        "max_contexts": args.max_contexts,
        "context_memory": args.context_memory,
        "context_ttl": args.context_ttl,
    }


def allowed_methods(args: argparse.Namespace) -> set[str] | None:
    """``--allow-methods``: the method names a request may use, each checked against the registry."""
    if args.allow_methods is None:
        return None
    from ..registry import get_method_class

    names = {n.strip() for n in args.allow_methods.split(",") if n.strip()}
    for n in names:
        get_method_class(n)  # an unknown name fails now, with the valid ones
    return names | {"full"}


def build_engine(args: argparse.Namespace) -> Any:
    """Load the model and build the engine (the spec and the limits are checked before the model is loaded)."""
    from ..adapters.models import load_model
    from ..engine import resolve_spec
    from .engine import Engine
    from .limits import Limits

    resolve_spec(args.spec, None, None, None, None, {})  # a malformed spec, or one without a budget, fails now
    limits = Limits.from_mapping(limit_values(args))
    methods = allowed_methods(args)
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
        limits=limits,
        allowed_methods=methods,
        compress_min_tokens=args.compress_min_tokens,
        step_tokens=args.step_tokens,
        prefix_cache=not args.no_prefix_cache,
        prefix_block=args.prefix_block,
        prefix_memory=args.prefix_memory,
    )


def guard_settings(args: argparse.Namespace) -> tuple[str | None, set[str] | None]:
    """The API key (``--api-key`` or ``$TOKENSIEVE_API_KEY``) and the Host header values answered: on a loopback
    bind, the loopback names (against DNS rebinding) and ``--allowed-host``; elsewhere ``--allowed-host`` if given,
    else any. Warns when a non-loopback bind has no API key."""
    from .app import is_loopback, loopback_hosts

    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    extra = {h.strip().lower() for h in args.allowed_host or [] if h.strip()}
    if is_loopback(args.host):
        hosts: set[str] | None = loopback_hosts(args.host, args.port) | extra
    else:
        hosts = extra or None
        if key is None:
            print(
                f"tokensieve serve: warning: listening on {args.host}, reachable from other machines, without an API "
                f"key: anyone who can reach it can use it. Set --api-key (or ${API_KEY_ENV}).",
                file=sys.stderr,
            )
    return key, hosts


def cmd_serve(args: argparse.Namespace) -> int:
    from ..results.threads import use_threads
    from . import require
    from .app import create_app

    uvicorn = require("uvicorn", "serve")
    require("fastapi", "serve")
    if args.ray_replicas is not None:
        return _serve_ray(args)
    use_threads(args.threads)
    key, hosts = guard_settings(args)
    engine = build_engine(args)
    print(
        f"tokensieve serve: {engine.model_name} · spec {engine.default.spec.label} · KV memory "
        f"{engine.kv_memory / 1e6:.1f} MB · max batch {engine.max_batch} · "
        f"{'API key required' if key else 'no API key'} · http://{args.host}:{args.port}/v1",
        file=sys.stderr,
    )
    app = create_app(engine, api_key=key, allowed_hosts=hosts)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _serve_ray(args: argparse.Namespace) -> int:
    """``--ray-replicas N``: the same app as N Ray Serve replicas behind one endpoint (docs/SCALING.md)."""
    from ..results.threads import resolve_threads
    from ..spec import Spec
    from .ray_serve import ReplicaSettings, import_serve, run

    Spec.parse(args.spec)
    import_serve()
    key, hosts = guard_settings(args)
    methods = allowed_methods(args)
    settings = ReplicaSettings(model=args.model, spec=args.spec, kv_memory=args.kv_memory, max_batch=args.max_batch,
                               max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                               served_model_name=args.served_model_name,
                               threads=resolve_threads(args.threads) if args.threads else 1,
                               limits=limit_values(args), api_key=key,
                               allowed_hosts=None if hosts is None else sorted(hosts),
                               allowed_methods=None if methods is None else sorted(methods),
                               compress_min_tokens=args.compress_min_tokens,
                               step_tokens=args.step_tokens, prefix_cache=not args.no_prefix_cache,
                               prefix_block=args.prefix_block, prefix_memory=args.prefix_memory)  # fmt: skip
    run(settings, args.ray_replicas, address=args.ray_address, host=args.host, port=args.port)
    return 0


def cmd_serve_bench(args: argparse.Namespace) -> int:
    from ..results.threads import use_threads
    from ..spec import split_specs
    from .bench import run_bench

    use_threads(args.threads)
    if args.scenario == "arrival":
        from .bench import run_arrival

        run_arrival(
            model_name=args.model,
            specs=split_specs(args.specs),
            step_tokens=args.step_tokens,
            kv_memory=args.kv_memory,
            streams=args.clients,
            stream_length=args.stream_length,
            stream_tokens=args.stream_tokens,
            arrivals=args.arrivals,
            arrival_length=args.length,
            max_batch=args.max_batch,
            out=args.out,
        )
        return 0
    if args.scenario == "prefix":
        from .bench import run_prefix

        run_prefix(
            model_name=args.model,
            specs=split_specs(args.specs),
            kv_memory=args.kv_memory,
            length=args.length,
            suffix=args.suffix_length,
            requests=args.requests,
            step_tokens=args.step_tokens[0],
            out=args.out,
        )
        return 0
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
        help="KV cache memory budget, e.g. 1GB or 256MiB; requests beyond it wait (default: a quarter of the memory "
        "available at start)",
    )
    sp.add_argument("--compress-min-tokens", type=whole_number(0), default=COMPRESS_MIN_TOKENS, metavar="N",
                    help="apply a request's spec only to prompts of at least N tokens, and only when it keeps at "
                    "least its method's sinks and window; shorter prompts get the full cache and the response says "
                    f"so (default {COMPRESS_MIN_TOKENS}; 0: apply every spec as given)")  # fmt: skip
    sp.add_argument("--max-batch", type=whole_number(1), default=16, help="most sequences decoded together")
    sp.add_argument("--max-tokens", type=whole_number(1), default=256, help="default max_tokens of a request")
    sp.add_argument("--max-prompt-tokens", type=whole_number(1), default=None,
                    help="longest prompt accepted (default: the model's context)")  # fmt: skip
    sp.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    sp.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only; another address warns without "
                    "--api-key)")  # fmt: skip
    sp.add_argument("--port", type=_port, default=8000)
    g = sp.add_argument_group("scheduling (docs/SERVING.md)")
    g.add_argument("--step-tokens", type=whole_number(0), default=256, metavar="N",
                   help="tokens one scheduler step runs, shared by the decode rows (one each) and the prompts being "
                   "prefilled, a chunk per step (default 256; 0: each prompt in one pass when admitted)")  # fmt: skip
    g.add_argument("--no-prefix-cache", action="store_true",
                   help="do not reuse the KV of prompt prefixes seen before (default: reuse them)")  # fmt: skip
    g.add_argument("--prefix-block", type=whole_number(1), default=32, metavar="N",
                   help="tokens per stored prefix block (default 32)")  # fmt: skip
    g.add_argument("--prefix-memory", type=_memory, default=None, metavar="SIZE",
                   help="bytes stored prefix blocks may hold (default: half of --kv-memory); they are evicted, least "
                   "recently used first, whenever a request needs the room")  # fmt: skip
    g = sp.add_argument_group("security and limits (docs/SERVING.md)")
    g.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on every request (default: ${API_KEY_ENV}, else none)",
    )
    g.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="also answer requests with this Host header (repeatable); a loopback bind answers only "
                   "localhost, 127.0.0.1 and ::1 otherwise")  # fmt: skip
    g.add_argument(
        "--allow-methods",
        default=None,
        metavar="NAMES",
        help="comma-separated methods a request's spec may use (default: every registered method)",
    )
    g.add_argument("--max-body", type=_memory, default=None, metavar="SIZE", help="largest request body (default 1MB)")
    g.add_argument(
        "--max-prompt-chars",
        type=whole_number(1),
        default=None,
        metavar="N",
        help="longest prompt text, checked before tokenising (default: 16 per token of --max-prompt-tokens)",
    )
    g.add_argument(
        "--request-timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="longest a request may compute, prefill and decoding (default 300)",
    )
    g.add_argument(
        "--max-prefill-passes",
        type=whole_number(1),
        default=None,
        metavar="N",
        help="most forward passes a prefill may run over a prompt, e.g. KVzip's (default 64)",
    )
    g.add_argument(
        "--max-contexts",
        type=whole_number(1),
        default=None,
        metavar="N",
        help="stored contexts held at once; the least recently used is evicted (default 64)",
    )
    g.add_argument(
        "--context-memory",
        type=_memory,
        default=None,
        metavar="SIZE",
        help="bytes all stored contexts may hold together (default: half of --kv-memory)",
    )
    g.add_argument(
        "--context-ttl",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="delete a stored context unused this long (default 3600)",
    )
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
    sp.add_argument("--scenario", choices=["capacity", "arrival", "prefix"], default="capacity",
                    help="capacity: concurrency, TTFT and throughput under the budget (default); arrival: long prompts "
                    "(--length tokens) arriving while --clients streams decode — the streams' longest inter-token gap "
                    "over their median and the arrivals' TTFT over their TTFT alone, per --step-tokens; prefix: "
                    "--requests prompts sharing their first --length tokens, TTFT with and without prefix "
                    "reuse")  # fmt: skip
    g = sp.add_argument_group("arrival scenario")
    g.add_argument("--step-tokens", type=_token_budgets, default=[256, 0], metavar="N,N",
                   help="the scheduler's token budgets per step to compare (0: one-pass prefill; "
                   "default 256,0)")  # fmt: skip
    g.add_argument("--arrivals", type=whole_number(1), default=1, help="long prompts arriving together (default 1)")
    g.add_argument("--stream-length", type=whole_number(1), default=64, help="prompt tokens of each running stream")
    g.add_argument("--stream-tokens", type=whole_number(1), default=200, help="tokens each running stream generates")
    g = sp.add_argument_group("prefix scenario")
    g.add_argument("--suffix-length", type=whole_number(1), default=32,
                   help="tokens each prompt adds after the shared --length tokens (default 32)")  # fmt: skip
    sp.set_defaults(func=cmd_serve_bench)


def _token_budgets(text: str) -> list[int]:
    """``--step-tokens`` of serve-bench: comma-separated whole numbers >= 0."""
    parse = whole_number(0)
    budgets = [parse(t.strip()) for t in text.split(",") if t.strip()]
    if not budgets:
        raise argparse.ArgumentTypeError("expected at least one whole number, e.g. 256,0")
    return budgets
