"""The HTTP face of the engine: an OpenAI-compatible API (FastAPI), streamed with server-sent events.

Endpoints:

* ``POST /v1/chat/completions``, ``POST /v1/completions`` — OpenAI's request and response bodies, ``stream: true``
  for server-sent events in OpenAI's chunk format (``data: {...}`` lines, then ``data: [DONE]``). Extra body fields:
  ``spec`` (what to run for this request, e.g. ``"snapkv:0.25+quest:0.125"``; default: the server's ``--spec``) and
  ``context_id`` (answer from a stored context, see below). Greedy unless ``temperature > 0``.
* ``POST /v1/contexts`` ``{"document": ..., "mode": "chat"|"text", "spec": ...}`` — prefill and compress a document
  once (query-agnostically) and get its id; ``GET /v1/contexts``, ``GET /v1/contexts/{id}``,
  ``DELETE /v1/contexts/{id}``.
* ``GET /v1/models`` (with ``max_model_len``), ``GET /health``, ``GET /metrics`` (Prometheus text format).
* ``POST /tokenize``, ``POST /detokenize`` — as vLLM's.

Every request field is honoured or refused with a 400 naming it (:mod:`.fields` reads and checks them; the table is in
docs/SERVING.md); a field this server does not know is accepted with a warning, logged and returned in the
response's ``tokensieve`` object.

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
import uuid
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import Future
from typing import Any

from ..errors import TokensieveError
from . import fields, require
from .engine import Delta, Done, Engine, Event, Failed, Job, RequestError, StoredContext

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
_get = fields.get


def error_body(message: str, status: int = 400, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}  # fmt: skip


# ---------------------------------------------------------------------------------------------- validation
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


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation for the chat template: text contents; an assistant turn's ``tool_calls`` (arguments as
    objects, as templates render them) and a ``tool`` turn's result with its ``tool_call_id``."""
    messages = _get(body, "messages", list)
    if not messages:
        raise RequestError("'messages' must be a non-empty array.", param="messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise RequestError(
                f"messages[{i}] must be an object with a role of system, user, assistant or tool.", param="messages"
            )
        role = "system" if m["role"] == "developer" else m["role"]
        calls = m.get("tool_calls") if role == "assistant" else None
        content = "" if calls and m.get("content") is None else _content(m, i)
        item: dict[str, Any] = {"role": role, "content": content}
        if calls:
            item["tool_calls"] = _tool_calls(calls, i)
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise RequestError(f"messages[{i}] (a tool result) needs its 'tool_call_id'.", param="messages")
            item["tool_call_id"] = call_id
        out.append(item)
    return out


def _tool_calls(calls: Any, i: int) -> list[dict[str, Any]]:
    bad = RequestError(f"messages[{i}].tool_calls must be an array of calls, each with a 'function' holding a "
                       "'name' and its 'arguments' (a JSON object in a string).", param="messages")  # fmt: skip
    if not isinstance(calls, list):
        raise bad
    out = []
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise bad
        try:
            arguments = json.loads(fn["arguments"], parse_constant=_no_constant)
        except ValueError:
            raise bad from None
        out.append({"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": arguments}})
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

    def prepare(body: dict[str, Any], chat: bool, emit: Any) -> tuple[Job, fields.Options, str]:
        """Validate a completion request, tokenise it and queue its job (on a worker thread: tokenising a long text
        must not hold the event loop). Returns the job, its options and the prompt's text (for ``echo``)."""
        check_model(body)
        opts = fields.options(body, chat, vocab=engine.vocab_size or 2**31,
                              default_max_tokens=engine.default_max_tokens)  # fmt: skip
        context_id = _get(body, "context_id", str)
        spec = _get(body, "spec", str)
        stored: StoredContext | None = None
        if context_id is not None:
            if opts.echo:
                raise RequestError("'echo' is not supported on a stored context (its text is not resent).",
                                   param="echo", code="unsupported_parameter")  # fmt: skip
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
        prompt_text = ""
        if chat:
            messages = _messages(body)
            if stored is not None:
                if stored.mode != "chat" or len(messages) != 1 or messages[0]["role"] != "user" or opts.tools:
                    raise RequestError(
                        "A chat question on a stored context is one user message (without tools), on a context "
                        "registered with mode 'chat'.",
                        param="messages",
                    )
                ids = engine.question_ids(stored, messages[0]["content"])
            else:
                ids = engine.encode_chat(messages, opts.tools)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                if stored is not None:
                    raise RequestError("A question on a stored context is text.", param="prompt")
                ids = engine.encode_prompt(prompt)
                prompt_text = engine.tokenizer.decode(ids, skip_special_tokens=True) if opts.echo else ""
            elif isinstance(prompt, str):
                prompt_text = prompt
                if stored is not None:
                    if stored.mode != "text":
                        raise RequestError("Completions on a stored context need one registered with mode 'text'.",
                                           param="context_id")  # fmt: skip
                    ids = engine.question_ids(stored, prompt)
                else:
                    ids = engine.encode_prompt(prompt)
            else:
                raise RequestError("'prompt' must be a string (or an array of token ids).", param="prompt")
        warnings = list(opts.warnings)
        if stored is None:
            press, told = engine.applied(press, len(ids))
            warnings += told
        constraint = None
        if opts.grammar is not None:
            from .constrained import GrammarError

            try:
                constraint = engine.grammars().compile(opts.grammar)
            except GrammarError as exc:
                raise RequestError(f"The JSON schema cannot be used: {exc}", code="invalid_schema",
                                   param="tools" if opts.tool_call else "response_format") from None  # fmt: skip
        job = Job(ids, press, emit, opts.max_tokens, opts.sampling, opts.stop, context_id, opts.ignore_eos,
                  constraint=constraint, prompt_logprobs=opts.prompt_logprobs, warnings=warnings)  # fmt: skip
        engine.submit(job)
        return job, opts, prompt_text

    async def run(request: Any, body: dict[str, Any], chat: bool) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:  # from the scheduler thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        job, opts, prompt_text = await run_in_threadpool(prepare, body, chat, emit)
        rid = ("chatcmpl-" if chat else "cmpl-") + job.id
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        tok = engine.tokenizer
        if opts.stream:
            sse = _sse(job, events, rid, created, engine.model_name, chat, opts, prompt_text, tok)
            return StreamingResponse(
                _watched(request, job, events, sse),
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
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if opts.tool_call is not None and event.finish_reason == "stop":
                message = {"role": "assistant", "content": None,
                           "tool_calls": fields.tool_calls(text, opts.tool_call, opts.tool_name, _call_id)}  # fmt: skip
                choice["finish_reason"] = "tool_calls"
            choice["message"] = message
            if opts.sampling.logprobs is not None:
                choice["logprobs"] = fields.chat_logprobs(tok, event.logprobs)
        else:
            choice["text"] = prompt_text + text if opts.echo else text
            if opts.sampling.logprobs is not None:
                lp: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                offset = 0
                if opts.echo and event.prompt_logprobs is not None:
                    lp = fields.completion_logprobs(tok, event.prompt_logprobs, job.ids)
                    offset = sum(len(t) for t in lp["tokens"])  # offsets run over the tokens' texts
                gen = fields.completion_logprobs(tok, event.logprobs, list(event.tokens), offset)
                choice["logprobs"] = {k: lp[k] + gen[k] for k in lp}
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
                "root": engine.model_name, "parent": None, "max_model_len": engine.max_model_len,
                "spec": engine.default.spec.label}  # fmt: skip
        return {"object": "list", "data": [card]}

    def tokenize(body: dict[str, Any]) -> dict[str, Any]:
        check_model(body)
        add_special = bool(_get(body, "add_special_tokens", bool, True))
        if body.get("messages") is not None:
            if body.get("prompt") is not None:
                raise RequestError("Send 'prompt' or 'messages', not both.", param="prompt")
            if not _get(body, "add_generation_prompt", bool, True):
                raise RequestError("'add_generation_prompt': false is not supported; the server always renders the "
                                   "assistant's turn start.", param="add_generation_prompt")  # fmt: skip
            tools, *_ = fields.tools({"tools": body.get("tools"), "tool_choice": "none"}) if body.get("tools") \
                else (None,)  # fmt: skip
            ids = engine.encode_chat(_messages(body), tools)
        else:
            prompt = _get(body, "prompt", str)
            if prompt is None:
                raise RequestError("'prompt' (text) or 'messages' is required.", param="prompt")
            engine.check_text(prompt, "prompt")
            ids = [int(i) for i in engine.tokenizer(prompt, add_special_tokens=add_special)["input_ids"]]
        out: dict[str, Any] = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids,
                               "token_strs": None}  # fmt: skip
        if _get(body, "return_token_strs", bool, False):
            out["token_strs"] = [fields.token_text(engine.tokenizer, t) for t in ids]
        return out

    def detokenize(body: dict[str, Any]) -> dict[str, Any]:
        check_model(body)
        tokens = _get(body, "tokens", list)
        if tokens is None:
            raise RequestError("'tokens' (an array of token ids) is required.", param="tokens")
        if len(tokens) > engine.max_model_len:
            raise RequestError(f"'tokens' holds more than {engine.max_model_len} ids.", param="tokens",
                               code="context_length_exceeded")  # fmt: skip
        vocab = engine.vocab_size or 2**31
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in tokens):
            raise RequestError(f"'tokens' must hold token ids in [0, {vocab}).", param="tokens")
        return {"prompt": engine.tokenizer.decode(tokens, skip_special_tokens=False)}

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> Any:
        return await run_in_threadpool(tokenize, await read_json(request))

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> Any:
        return await run_in_threadpool(detokenize, await read_json(request))

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


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


async def _sse(
    job: Job, events: asyncio.Queue[Event], rid: str, created: int, model: str, chat: bool, opts: fields.Options,
    prompt_text: str, tok: Any,
) -> AsyncIterator[str]:  # fmt: skip
    """OpenAI's streaming format: one ``data:`` line per chunk, a last chunk with the finish reason, ``[DONE]``.
    If the client goes away the generator is closed, and the job is cancelled (its cache freed)."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    want_logprobs = opts.sampling.logprobs is not None
    offset = 0  # completions: where the next token's text starts in the answer (echo included)

    def chunk(delta: str | None, finish: str | None = None, first: bool = False, logprobs: Any = None,
              info: dict[str, Any] | None = None) -> str:  # fmt: skip
        if chat:
            d: dict[str, Any] = {} if delta is None else {"content": delta}
            if first:
                d = {"role": "assistant", "content": ""}
            choice: dict[str, Any] = {"index": 0, "delta": d, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        if info is not None:  # the last chunk: what the server did (spec, bytes, warnings)
            body["tokensieve"] = info
        return f"data: {json.dumps(body)}\n\n"

    def tool_chunk(call: dict[str, Any]) -> str:
        choice = {"index": 0, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    def logprobs_of(entries: tuple[Any, ...], ids: list[int]) -> Any:
        nonlocal offset
        if not want_logprobs:
            return None
        if chat:
            return fields.chat_logprobs(tok, entries)
        out = fields.completion_logprobs(tok, entries, ids, offset)
        offset += sum(len(t) for t in out["tokens"])
        return out

    finished = False
    try:
        if chat:
            yield chunk(None, first=True)
        elif opts.echo:  # (with logprobs refused when streaming: the prompt's are known only at the end)
            offset = len(prompt_text)
            yield chunk(prompt_text)
        carried = 0  # tokens whose log-probabilities a chunk carried
        held: list[Delta] = []  # a forced tool call's text: sent as tool_calls once complete
        while True:
            event = await events.get()
            if event is _GONE:
                return
            if isinstance(event, Delta) and opts.tool_call is not None:
                held.append(event)
            elif isinstance(event, Delta):
                carried += len(event.logprobs)
                yield chunk(event.text, logprobs=logprobs_of(event.logprobs, [e.token for e in event.logprobs]))
            elif isinstance(event, Failed):
                finished = True
                yield f"data: {json.dumps(error_body(event.message, event.status, code=event.code))}\n\n"
                yield "data: [DONE]\n\n"
                return
            else:
                finished = True
                finish = event.finish_reason
                if opts.tool_call is not None:
                    text = "".join(d.text for d in held)
                    if finish == "stop":  # complete: the calls, each in one chunk, as OpenAI's deltas
                        calls = fields.tool_calls(text, opts.tool_call, opts.tool_name, _call_id)
                        for i, call in enumerate(calls):
                            yield tool_chunk({"index": i, **call})
                        finish = "tool_calls"
                    elif text:  # cut by max_tokens: the text as it is, as the non-streamed answer gives it
                        yield chunk(text)
                rest = event.logprobs[carried:]  # tokens no delta carried (text held back, then cut by a stop string)
                lp_last = logprobs_of(tuple(rest), [e.token for e in rest]) if rest else None
                yield chunk(None, finish, logprobs=lp_last, info=event.info)
                if opts.include_usage:
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
