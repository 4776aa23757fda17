"""The HTTP face of the engine: an OpenAI-compatible API (FastAPI), streamed with server-sent events.

Endpoints:

* ``POST /v1/chat/completions``, ``POST /v1/completions`` — OpenAI's request and response bodies, ``stream: true``
  for server-sent events in OpenAI's chunk format (``data: {...}`` lines, then ``data: [DONE]``). Extra body fields:
  ``spec`` (what to run for this request, e.g. ``"snapkv:0.25+quest:0.125"``; default: the server's ``--spec``) and
  ``context_id`` (answer from a stored context, see below). Greedy unless ``temperature > 0``.
* ``POST /v1/contexts`` ``{"document": ..., "mode": "chat"|"text", "spec": ...}`` — prefill and compress a document
  once (query-agnostically) and get its id; ``GET /v1/contexts``, ``GET /v1/contexts/{id}``,
  ``DELETE /v1/contexts/{id}``.
* ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

Every refused request gets an OpenAI-style error body, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx
status; the server never dies on a bad request.

Guards, before a request reaches the engine: an API key (``Authorization: Bearer …``, compared in constant time),
the ``Host`` header (a server bound to a loopback address answers only requests addressed to it by such a name, so a
web page on a DNS-rebinding domain cannot read it), ``Content-Type: application/json`` on every request with a body
(a cross-site "simple" form post is refused with 415), and the body's size (413) and depth. A request's text is
tokenised on a worker thread, never on the event loop, after its length was checked.
"""

import asyncio
import contextlib
import hmac
import ipaddress
import json
import time
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import Future
from typing import Any

from ..errors import TokensieveError
from . import require
from .engine import Delta, Done, Engine, Event, Failed, Job, RequestError, Sampling, StoredContext

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def error_body(message: str, status: int = 400, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}  # fmt: skip


# ---------------------------------------------------------------------------------------------- validation
def _get(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """``body[key]`` checked to be of ``kind`` (a bool is not a number), or ``default`` when absent or null."""
    value = body.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
                             dict: "an object"}[k] for k in kinds)  # fmt: skip
        raise RequestError(f"'{key}' must be {names}; got {json.dumps(value)[:60]}.", param=key, code="invalid_type")
    return value


def _max_tokens(body: dict[str, Any], engine: Engine, *keys: str) -> int:
    for key in keys:
        n = _get(body, key, int)
        if n is not None:
            if n < 0:
                raise RequestError(f"'{key}' must be >= 0; got {n}.", param=key, code="invalid_value")
            return int(n)
    return engine.default_max_tokens


def _sampling(body: dict[str, Any]) -> Sampling:
    temperature = float(_get(body, "temperature", float, 0.0))
    top_p = float(_get(body, "top_p", float, 1.0))
    seed = _get(body, "seed", int)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise RequestError(f"'seed' must be in [-2**63, 2**64 - 1]; got {seed}.", param="seed", code="invalid_value")
    if not 0.0 <= temperature <= 2.0:
        raise RequestError(f"'temperature' must be in [0, 2]; got {temperature}.", param="temperature")
    if not 0.0 < top_p <= 1.0:
        raise RequestError(f"'top_p' must be in (0, 1]; got {top_p}.", param="top_p")
    n = _get(body, "n", int, 1)
    if n != 1:
        raise RequestError("Only n = 1 is supported.", param="n")
    return Sampling(temperature, top_p, seed)


MAX_STOP_CHARS = 256  # a stop string is held back while it may be starting: its length bounds the work per token


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("'stop' must be a non-empty string or an array of up to 4 of them.", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise RequestError(f"A stop string may have at most {MAX_STOP_CHARS} characters.", param="stop")
    return tuple(stop)


def _zero(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0


# OpenAI fields this server does not implement, each with what its unused values look like: any other value is
# refused rather than silently ignored (the answer would not be what was asked for).
UNSUPPORTED: dict[str, Any] = {
    "logprobs": lambda v: v is False or _zero(v),
    "top_logprobs": _zero,
    "presence_penalty": _zero,
    "frequency_penalty": _zero,
    "logit_bias": lambda v: v == {},
    "tools": lambda v: v == [],
    "functions": lambda v: v == [],
    "tool_choice": lambda v: v in ("none", "auto"),
    "function_call": lambda v: v in ("none", "auto"),
    "response_format": lambda v: v == {"type": "text"},
    "echo": lambda v: v is False,
    "best_of": lambda v: v == 1 and not isinstance(v, bool),
    "suffix": lambda v: v == "",
}


def _unsupported(body: dict[str, Any]) -> None:
    for name, unused in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not unused(value):
            raise RequestError(
                f"'{name}' is not supported by this server (got {json.dumps(value)[:60]}); leave it out.",
                param=name,
                code="unsupported_parameter",
            )


def _content(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(
                    f"messages[{i}].content: only text parts are supported (this server takes no images, and "
                    "never fetches or opens anything a message names).",
                    param="messages",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"messages[{i}].content must be a string or an array of text parts.", param="messages")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = _get(body, "messages", list)
    if not messages:
        raise RequestError("'messages' must be a non-empty array.", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError(
                f"messages[{i}] must be an object with a role of system, user or assistant.", param="messages"
            )
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m, i)})
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def _json(request: Any, max_bytes: int, max_depth: int) -> dict[str, Any]:
    """The request's JSON object: ``Content-Type: application/json`` (415 otherwise), at most ``max_bytes`` (413,
    counted as the body arrives, whatever ``Content-Length`` claims), nested at most ``max_depth`` deep, without
    ``NaN``/``Infinity`` (400)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise RequestError(
            f"The request body must be JSON, sent with 'Content-Type: application/json' (got {kind or 'none'!r}).",
            status=415,
            code="unsupported_media_type",
        )
    too_large = RequestError(
        f"The request body is larger than this server accepts ({max_bytes} bytes, --max-body).",
        status=413,
        code="request_too_large",
    )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise RequestError(f"The request body nests deeper than {max_depth} levels.", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.", code="invalid_json")
    if _depth(body) > max_depth:
        raise RequestError(f"The request body nests deeper than {max_depth} levels.", code="invalid_json")
    return body


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (iteratively: no recursion limit to hit)."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        item, d = todo.pop()
        if isinstance(item, dict):
            deepest = max(deepest, d)
            todo.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, d)
            todo.extend((v, d + 1) for v in item)
    return deepest


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def loopback_hosts(host: str, port: int) -> set[str]:
    """The ``Host`` header values a server bound to ``host:port`` answers when ``host`` is a loopback address (None
    of them otherwise: see :func:`is_loopback`): every loopback name, with and without the port."""
    names = {*LOOPBACK_NAMES, host}
    out = set()
    for n in names:
        shown = f"[{n}]" if ":" in n else n
        out |= {shown, f"{shown}:{port}"}
    return out


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -------------------------------------------------------------------------------------------------- app
def create_app(
    engine: Engine, *, start: bool = True, api_key: str | None = None, allowed_hosts: Iterable[str] | None = None
) -> Any:
    """The FastAPI application serving ``engine`` (its scheduler thread runs while the app is up).

    ``api_key``: every request must carry ``Authorization: Bearer <api_key>`` (401 otherwise). ``allowed_hosts``:
    the ``Host`` header values answered (403 otherwise; :func:`loopback_hosts` for a loopback bind); None: any."""
    fastapi = require("fastapi", "serve")
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import Request

    key = api_key.encode("utf-8") if api_key else None
    hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
    limits = engine.limits

    async def guard(request: Request) -> None:
        """Host header, then API key: before anything else of a request is read."""
        if hosts is not None:
            host = request.headers.get("host", "").lower()
            if host not in hosts:
                raise RequestError(
                    f"This server does not answer requests for host {host!r} (it is bound to a loopback address; "
                    "use --allowed-host to add a name).",
                    status=403,
                    code="host_not_allowed",
                )
        if key is not None:
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8"), key):
                raise RequestError(
                    "Missing or wrong API key: send 'Authorization: Bearer <key>'.", status=401, code="invalid_api_key"
                )

    async def read_json(request: Request) -> dict[str, Any]:
        return await _json(request, limits.max_body_bytes, limits.max_json_depth)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        if start:
            engine.start()
        try:
            yield
        finally:
            if start:
                engine.stop()

    app = fastapi.FastAPI(title="tokensieve", lifespan=lifespan, dependencies=[fastapi.Depends(guard)],
                          docs_url=None, redoc_url=None, openapi_url=None)  # fmt: skip
    app.state.engine = engine

    @app.exception_handler(RequestError)
    async def _request_error(request: Any, exc: RequestError) -> Any:
        return JSONResponse(error_body(str(exc), exc.status, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Any, exc: Any) -> Any:
        status = int(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), status), status_code=status)

    @app.exception_handler(Exception)
    async def _internal(request: Any, exc: Exception) -> Any:
        return JSONResponse(error_body(f"Internal error: {type(exc).__name__}: {exc}", 500), status_code=500)

    def check_model(body: dict[str, Any]) -> None:
        name = _get(body, "model", str)
        if name is not None and name != engine.model_name:
            raise RequestError(
                f"The model '{name}' does not exist on this server; it serves '{engine.model_name}'.",
                status=404,
                param="model",
                code="model_not_found",
            )

    def prepare(body: dict[str, Any], chat: bool, emit: Any) -> tuple[Job, bool, bool]:
        """Validate a completion request, tokenise it and queue its job (on a worker thread: tokenising a long text
        must not hold the event loop). Returns the job, whether it streams and whether usage is streamed."""
        check_model(body)
        _unsupported(body)
        max_tokens = _max_tokens(body, engine, *(("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)))
        sampling = _sampling(body)
        stop = _stop(body)
        stream = bool(_get(body, "stream", bool, False))
        options = _get(body, "stream_options", dict, {})
        include_usage = bool(options.get("include_usage", False))
        context_id = _get(body, "context_id", str)
        spec = _get(body, "spec", str)
        stored: StoredContext | None = None
        if context_id is not None:
            stored = engine.context(context_id)
            if spec is not None and spec != stored.press.spec.label:
                raise RequestError(
                    f"Context {context_id} was compressed with '{stored.press.spec.label}'; its spec is fixed when it "
                    "is registered (leave out 'spec').",
                    param="spec",
                )
            press = stored.press
        else:
            press = engine.compressor(spec)
        if chat:
            messages = _messages(body)
            if stored is not None:
                if stored.mode != "chat" or len(messages) != 1 or messages[0]["role"] != "user":
                    raise RequestError(
                        "A chat question on a stored context is one user message, on a context registered with "
                        "mode 'chat'.",
                        param="messages",
                    )
                ids = engine.question_ids(stored, messages[0]["content"])
            else:
                ids = engine.encode_chat(messages)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                if stored is not None:
                    raise RequestError("A question on a stored context is text.", param="prompt")
                ids = engine.encode_prompt(prompt)
            elif isinstance(prompt, str):
                if stored is not None:
                    if stored.mode != "text":
                        raise RequestError("Completions on a stored context need one registered with mode 'text'.",
                                           param="context_id")  # fmt: skip
                    ids = engine.question_ids(stored, prompt)
                else:
                    ids = engine.encode_prompt(prompt)
            else:
                raise RequestError("'prompt' must be a string (or an array of token ids).", param="prompt")
        job = Job(ids, press, emit, max_tokens, sampling, stop, context_id, bool(_get(body, "ignore_eos", bool, False)))
        engine.submit(job)
        return job, stream, include_usage

    async def run(request: Any, body: dict[str, Any], chat: bool) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:  # from the scheduler thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        job, stream, include_usage = await run_in_threadpool(prepare, body, chat, emit)
        rid = ("chatcmpl-" if chat else "cmpl-") + job.id
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if stream:
            return StreamingResponse(
                _watched(request, job, events, _sse(job, events, rid, created, engine.model_name, chat, include_usage)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        parts: list[str] = []
        done: Done | None = None
        try:
            async with _watch_disconnect(request, job, events.put_nowait):
                while done is None:
                    event = await events.get()
                    if event is _GONE:  # nobody to answer: the job is cancelled, its cache freed at the next step
                        return JSONResponse(error_body("The client disconnected.", 499), status_code=499)
                    if isinstance(event, Delta):
                        parts.append(event.text)
                    elif isinstance(event, Failed):
                        return JSONResponse(error_body(event.message, event.status, code=event.code),
                                            status_code=event.status)  # fmt: skip
                    else:
                        done = event
        finally:
            if done is None:
                job.cancel()
        event = done
        text = "".join(parts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": event.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {
            "id": rid,
            "object": obj,
            "created": created,
            "model": engine.model_name,
            "choices": [choice],
            "usage": _usage(event),
            "tokensieve": event.info,
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await run(request, await read_json(request), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await run(request, await read_json(request), chat=False)

    def prepare_context(body: dict[str, Any], result: Future[StoredContext]) -> None:
        check_model(body)
        document = _get(body, "document", str)
        if not document or not document.strip():
            raise RequestError("'document' must be a non-empty string.", param="document")
        mode = _get(body, "mode", str, "chat")
        if mode not in ("chat", "text"):
            raise RequestError("'mode' must be 'chat' (for chat completions) or 'text' (for completions).",
                               param="mode")  # fmt: skip
        press = engine.compressor(_get(body, "spec", str))
        ids = engine.encode_document(document, mode)
        engine.submit(Job(ids, press, lambda e: None, 0, kind="context", document=document, mode=mode, result=result))

    @app.post("/v1/contexts")
    async def register_context(request: Request) -> Any:
        body = await read_json(request)
        result: Future[StoredContext] = Future()
        await run_in_threadpool(prepare_context, body, result)
        try:
            stored = await asyncio.wrap_future(result)
        except RequestError:
            raise
        except TokensieveError as exc:
            raise RequestError(str(exc)) from exc
        return stored.describe()

    @app.get("/v1/contexts")
    async def list_contexts() -> Any:
        return {"object": "list", "data": engine.list_contexts()}

    @app.get("/v1/contexts/{context_id}")
    async def get_context(context_id: str) -> Any:
        return engine.context(context_id).describe()

    @app.delete("/v1/contexts/{context_id}")
    async def delete_context(context_id: str) -> Any:
        if not engine.delete_context(context_id):
            engine.context(context_id)  # raises the 404
        return {"id": context_id, "object": "context.deleted", "deleted": True}

    @app.get("/v1/models")
    async def models() -> Any:
        card = {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "tokensieve",
                "spec": engine.default.spec.label}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "model": engine.model_name, **engine.gauges()}

    @app.get("/metrics")
    async def metrics() -> Any:
        return PlainTextResponse(prometheus(engine), media_type="text/plain; version=0.0.4")

    return app


_GONE: Any = object()  # put in a request's event queue when its client disconnects


@contextlib.asynccontextmanager
async def _watch_disconnect(request: Any, job: Job, notify: Any) -> AsyncIterator[None]:
    """While an answer is generated, wait for the client's disconnect message (its body was read, so the next ASGI
    message is the disconnect): cancel the job at once — the scheduler frees its cache or its prefill at its next
    step — and ``notify(_GONE)`` so the handler stops waiting for events."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                job.cancel()
                notify(_GONE)
                return

    task = asyncio.ensure_future(watch())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def _watched(request: Any, job: Job, events: Any, body: AsyncIterator[str]) -> AsyncIterator[str]:
    """A streamed answer whose client is watched for a disconnect while it waits for tokens (a long prefill sends
    nothing): the stream then ends and the job is cancelled."""
    async with _watch_disconnect(request, job, events.put_nowait):
        try:
            async for part in body:
                yield part
        finally:
            await body.aclose()  # type: ignore[attr-defined]


def _usage(done: Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


async def _sse(
    job: Job, events: asyncio.Queue[Event], rid: str, created: int, model: str, chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    """OpenAI's streaming format: one ``data:`` line per chunk, a last chunk with the finish reason, ``[DONE]``.
    If the client goes away the generator is closed, and the job is cancelled (its cache freed)."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None = None, first: bool = False) -> str:
        if chat:
            d: dict[str, Any] = {} if delta is None else {"content": delta}
            if first:
                d = {"role": "assistant", "content": ""}
            choice: dict[str, Any] = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    finished = False
    try:
        if chat:
            yield chunk(None, first=True)
        while True:
            event = await events.get()
            if event is _GONE:
                return
            if isinstance(event, Delta):
                yield chunk(event.text)
            elif isinstance(event, Failed):
                finished = True
                yield f"data: {json.dumps(error_body(event.message, event.status, code=event.code))}\n\n"
                yield "data: [DONE]\n\n"
                return
            else:
                finished = True
                yield chunk(None, event.finish_reason)
                if include_usage:
                    body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                            "usage": _usage(event), "tokensieve": event.info}  # fmt: skip
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
                return
    finally:
        if not finished:
            job.cancel()


def prometheus(engine: Engine) -> str:
    """The engine's counters and gauges in Prometheus' text exposition format."""
    c = engine.counters
    g = engine.gauges()
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP tokensieve_{name} {help_}")
        lines.append(f"# TYPE tokensieve_{name} {kind}")
        for labels, value in samples:
            lines.append(f"tokensieve_{name}{labels} {value:g}" if isinstance(value, float) else
                         f"tokensieve_{name}{labels} {value}")  # fmt: skip

    outcomes = sorted(set(c.requests) | {"stop", "length", "failed", "context"})
    metric("requests_total", "counter", "Requests finished, by outcome (stop, length, failed; context = stored).",
           [(f'{{outcome="{o}"}}', c.requests[o]) for o in outcomes])  # fmt: skip
    metric("requests_cancelled_total", "counter", "Requests whose client went away.", [("", c.cancelled)])
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", c.prompt_tokens)])
    metric("generated_tokens_total", "counter", "Tokens generated.", [("", c.generated_tokens)])
    metric("decode_steps_total", "counter", "Batched decode forward passes.", [("", c.decode_steps)])
    metric("decode_rows_total", "counter", "Sequences stepped, summed over decode steps.", [("", c.batched_rows)])
    metric("batch_size_max", "gauge", "Largest decode batch so far.", [("", c.max_batch)])
    metric("contexts_evicted_total", "counter", "Stored contexts evicted under memory pressure or the count limit.",
           [("", c.contexts_evicted)])  # fmt: skip
    metric("contexts_expired_total", "counter", "Stored contexts deleted after --context-ttl unused.",
           [("", c.contexts_expired)])  # fmt: skip
    metric("prefill_chunks_total", "counter", "Forward passes of prompts prefilled a chunk per scheduler step.",
           [("", c.prefill_chunks)])  # fmt: skip
    metric("prefix_hit_tokens_total", "counter", "Prompt tokens taken from stored prefix blocks instead of computed.",
           [("", c.prefix_hit_tokens)])  # fmt: skip
    metric("prefix_blocks_evicted_total", "counter", "Stored prefix blocks evicted (least recently used first).",
           [("", c.prefix_blocks_evicted)])  # fmt: skip
    metric("prefix_bytes", "gauge", "Bytes held by stored prefix blocks.", [("", g["prefix_bytes"])])
    metric("prefilling_sequences", "gauge", "Admitted requests whose prompt is being prefilled.",
           [("", g["prefilling"])])  # fmt: skip
    metric("queue_length", "gauge", "Requests waiting for admission.", [("", g["queue_length"])])
    metric("running_sequences", "gauge", "Sequences in the decode batch.", [("", g["running"])])
    metric("kv_bytes_in_use", "gauge", "Exact KV bytes stored by running sequences and stored contexts.",
           [("", g["kv_bytes_in_use"])])  # fmt: skip
    metric("kv_bytes_reserved", "gauge", "KV bytes held (stored entries plus reserved answer headroom).",
           [("", g["kv_bytes_reserved"])])  # fmt: skip
    metric("kv_bytes_budget", "gauge", "The KV memory budget.", [("", g["kv_bytes_budget"])])
    metric("contexts", "gauge", "Stored contexts.", [("", g["contexts"])])
    metric("context_bytes", "gauge", "Bytes held by stored contexts.", [("", g["context_bytes"])])
    return "\n".join(lines) + "\n"
