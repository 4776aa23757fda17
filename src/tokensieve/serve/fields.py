"""What a completion request asks for beyond its prompt, read field by field from OpenAI's (and vLLM's) request
bodies: every field is either honoured or refused with a 400 naming it; a field this server does not know is
accepted with a logged warning (as vLLM does), and the warning is also returned in the response's ``tokensieve``
object. The table of fields is in docs/SERVING.md.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .engine import RequestError
from .logits import MAX_LOGPROBS, Sampling, TokenLogprob

log = logging.getLogger("tokensieve.serve")

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_STOP_CHARS = 256  # a stop string is held back while it may be starting: its length bounds the work per token
MAX_LOGIT_BIAS = 300  # entries of logit_bias
MAX_STOP_TOKEN_IDS = 64
MAX_TOOLS = 128

# the fields each endpoint reads (anything else is unknown: accepted with a warning)
COMMON = {
    "model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "presence_penalty",
    "frequency_penalty", "logit_bias", "user", "response_format",
    # vLLM's sampling extras
    "top_k", "min_p", "min_tokens", "repetition_penalty", "stop_token_ids", "ignore_eos",
    # tokensieve's
    "spec", "context_id",
}  # fmt: skip
CHAT = COMMON | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "functions", "function_call", "store", "metadata", "service_tier", "modalities", "audio", "prediction",
    "reasoning_effort", "web_search_options",
}  # fmt: skip
COMPLETIONS = COMMON | {"prompt", "suffix", "logprobs", "echo", "best_of"}


def get(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
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


def _in_range(body: dict[str, Any], key: str, default: float, low: float, high: float, *, open_low: bool = False
              ) -> float:  # fmt: skip
    value = float(get(body, key, float, default))
    if not (low < value if open_low else low <= value) or not value <= high or not math.isfinite(value):
        interval = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g}]"
        raise RequestError(f"'{key}' must be in {interval}; got {value:g}.", param=key, code="invalid_value")
    return value


def refuse(name: str, why: str) -> RequestError:
    return RequestError(f"'{name}' {why}", param=name, code="unsupported_parameter")


@dataclass
class Options:
    """A completion request's settings, validated (the prompt is read elsewhere)."""

    sampling: Sampling
    max_tokens: int
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    prompt_logprobs: int | None = None  # completions with echo and logprobs: k alternatives per prompt token
    grammar: str | None = None  # llguidance grammar the answer follows
    tools: list[dict[str, Any]] | None = None  # given to the chat template
    tool_call: str | None = None  # "named" (the answer is one function's arguments) or "required" (a list of calls)
    tool_name: str | None = None
    ignore_eos: bool = False
    warnings: list[str] = field(default_factory=list)


def unknown_fields(body: dict[str, Any], known: set[str], endpoint: str) -> list[str]:
    """Warnings for the fields ``endpoint`` does not know (each also logged)."""
    out = []
    for name in sorted(set(body) - known):
        message = f"Unknown field {name!r} was ignored: this server does not implement it on {endpoint}."
        log.warning("%s", message)
        out.append(message)
    return out


def max_tokens(body: dict[str, Any], default: int, *keys: str) -> int:
    for key in keys:
        n = get(body, key, int)
        if n is not None:
            if n < 1:
                raise RequestError(f"'{key}' must be at least 1; got {n}.", param=key, code="invalid_value")
            return int(n)
    return default


def stop_strings(body: dict[str, Any]) -> tuple[str, ...]:
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


def _token_id(value: Any, vocab: int, param: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise RequestError(f"'{param}' holds {json.dumps(value)[:40]}, not a token id in [0, {vocab}).", param=param,
                           code="invalid_value")  # fmt: skip
    return value


def sampling(body: dict[str, Any], chat: bool, vocab: int, max_new: int) -> Sampling:
    """The decoding settings of a request (temperature, filters, penalties, bias, logprobs)."""
    temperature = _in_range(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _in_range(body, "top_p", 1.0, 0.0, 1.0, open_low=True)
    seed = get(body, "seed", int)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise RequestError(f"'seed' must be in [-2**63, 2**64 - 1]; got {seed}.", param="seed", code="invalid_value")
    n = get(body, "n", int, 1)
    if n != 1:
        raise refuse("n", f"must be 1: this server returns one answer per request (got {n}).")
    if not chat:
        best_of = get(body, "best_of", int, 1)
        if best_of != 1:
            raise refuse("best_of", f"must be 1: this server generates one answer per request (got {best_of}).")
    top_k = get(body, "top_k", int, 0)
    if top_k < -1:
        raise RequestError(f"'top_k' must be -1 or 0 (off) or at least 1; got {top_k}.", param="top_k",
                           code="invalid_value")  # fmt: skip
    min_p = _in_range(body, "min_p", 0.0, 0.0, 1.0)
    presence = _in_range(body, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = _in_range(body, "frequency_penalty", 0.0, -2.0, 2.0)
    repetition = float(get(body, "repetition_penalty", float, 1.0))
    if not 0 < repetition <= 100 or not math.isfinite(repetition):
        raise RequestError(f"'repetition_penalty' must be in (0, 100]; got {repetition:g}.",
                           param="repetition_penalty", code="invalid_value")  # fmt: skip
    raw_bias = get(body, "logit_bias", dict, {})
    if len(raw_bias) > MAX_LOGIT_BIAS:
        raise RequestError(f"'logit_bias' may name at most {MAX_LOGIT_BIAS} tokens.", param="logit_bias",
                           code="invalid_value")  # fmt: skip
    bias = []
    for key, value in raw_bias.items():
        token = _token_id(key, vocab, "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise RequestError(f"'logit_bias' values must be numbers in [-100, 100]; got {json.dumps(value)[:40]}.",
                               param="logit_bias", code="invalid_value")  # fmt: skip
        bias.append((token, float(value)))
    min_tokens = get(body, "min_tokens", int, 0)
    if not 0 <= min_tokens <= max_new:
        raise RequestError(f"'min_tokens' must be in [0, max_tokens = {max_new}]; got {min_tokens}.",
                           param="min_tokens", code="invalid_value")  # fmt: skip
    stop_ids = get(body, "stop_token_ids", list, [])
    if len(stop_ids) > MAX_STOP_TOKEN_IDS:
        raise RequestError(f"'stop_token_ids' may hold at most {MAX_STOP_TOKEN_IDS} ids.", param="stop_token_ids",
                           code="invalid_value")  # fmt: skip
    if any(isinstance(t, str) for t in stop_ids):
        raise RequestError("'stop_token_ids' must be an array of integer token ids.", param="stop_token_ids",
                           code="invalid_type")  # fmt: skip
    stop_token_ids = frozenset(_token_id(t, vocab, "stop_token_ids") for t in stop_ids)
    logprobs: int | None = None
    if chat:
        if get(body, "logprobs", bool, False):
            logprobs = get(body, "top_logprobs", int, 0)
            if not 0 <= logprobs <= MAX_LOGPROBS:
                raise RequestError(f"'top_logprobs' must be in [0, {MAX_LOGPROBS}]; got {logprobs}.",
                                   param="top_logprobs", code="invalid_value")  # fmt: skip
        elif get(body, "top_logprobs", int, 0):
            raise RequestError("'top_logprobs' needs 'logprobs': true.", param="top_logprobs", code="invalid_value")
    else:
        logprobs = get(body, "logprobs", int)
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise RequestError(f"'logprobs' must be in [0, {MAX_LOGPROBS}]; got {logprobs}.", param="logprobs",
                               code="invalid_value")  # fmt: skip
    return Sampling(temperature, top_p, seed, top_k=max(0, top_k), min_p=min_p, presence_penalty=presence,
                    frequency_penalty=frequency, repetition_penalty=repetition, logit_bias=tuple(bias),
                    min_tokens=min_tokens, stop_token_ids=stop_token_ids, logprobs=logprobs)  # fmt: skip


def _openai_only(body: dict[str, Any]) -> None:
    """OpenAI platform fields with no meaning here: accepted only with the value that asks for nothing."""
    if get(body, "store", bool, False):
        raise refuse("store", "is not supported: this server keeps no completions (leave it out or false).")
    if get(body, "metadata", dict, {}):
        raise refuse("metadata", "is only for stored completions, which this server does not keep.")
    tier = get(body, "service_tier", str, "auto")
    if tier not in ("auto", "default"):
        raise refuse("service_tier", f"has one tier here, 'default' (got {tier!r}).")
    modalities = get(body, "modalities", list, ["text"])
    if modalities != ["text"]:
        raise refuse("modalities", 'must be ["text"]: this server generates text only.')
    for name, why in (
        ("audio", "is not supported: this server generates text only."),
        ("prediction", "(predicted outputs) is not supported."),
        ("web_search_options", "is not supported: this server never fetches anything."),
        ("reasoning_effort", "is not supported: the served model has no reasoning-effort setting."),
    ):
        if body.get(name) is not None:
            raise refuse(name, why)
    if get(body, "functions", list, []):
        raise refuse("functions", "(deprecated) is not supported: send 'tools'.")
    call = body.get("function_call")
    if call is not None and call not in ("none", "auto"):
        raise refuse("function_call", "(deprecated) is not supported: send 'tools' and 'tool_choice'.")


def response_format(body: dict[str, Any]) -> dict[str, Any] | bool | None:
    """The JSON schema the answer must match (``{}``-like for ``json_object``), or None for free text."""
    fmt = get(body, "response_format", dict)
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str):
            raise RequestError("'response_format.json_schema' must be an object with a 'name' and a 'schema'.",
                               param="response_format", code="invalid_value")  # fmt: skip
        schema = spec.get("schema", {})
        if not isinstance(schema, (dict, bool)):
            raise RequestError("'response_format.json_schema.schema' must be a JSON schema (an object).",
                               param="response_format", code="invalid_value")  # fmt: skip
        return schema
    raise RequestError(f"'response_format.type' must be 'text', 'json_object' or 'json_schema'; got {kind!r}.",
                       param="response_format", code="invalid_value")  # fmt: skip


def tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, str | None, str | None, dict[str, Any] | None]:
    """The request's tools (for the chat template), how a call is forced (None, "named", "required"), the named
    function, and the JSON schema the answer then follows."""
    given = get(body, "tools", list, [])
    choice = body.get("tool_choice")
    if not given:
        if choice not in (None, "none"):
            raise RequestError("'tool_choice' needs 'tools'.", param="tool_choice", code="invalid_value")
        return None, None, None, None
    if len(given) > MAX_TOOLS:
        raise RequestError(f"'tools' may hold at most {MAX_TOOLS} functions.", param="tools", code="invalid_value")
    functions: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(given):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:  # fmt: skip
            raise RequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': "
                               "...}}.", param="tools", code="invalid_value")  # fmt: skip
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON schema.", param="tools",
                               code="invalid_value")  # fmt: skip
        functions[fn["name"]] = params
    if choice is None or choice == "auto":
        raise refuse(
            "tool_choice",
            "'auto' (the default when 'tools' are given) is not supported: telling a tool call from text needs a "
            "parser of the served model's own call format, which this server does not have. Send 'required' (the "
            "model must call one or more of the tools), a named function ({'type': 'function', 'function': "
            "{'name': ...}}) or 'none'.",
        )
    tool_list = list(given)
    if choice == "none":
        return tool_list, None, None, None
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": params},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, params in functions.items()]  # fmt: skip
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not get(body, "parallel_tool_calls", bool, True):
            schema["maxItems"] = 1
        return tool_list, "required", None, schema
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise RequestError(f"'tool_choice' names {name!r}, which is not one of the tools.", param="tool_choice",
                               code="invalid_value")  # fmt: skip
        return tool_list, "named", name, functions[name]
    raise RequestError("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                       "{'name': ...}}.", param="tool_choice", code="invalid_value")  # fmt: skip


def options(body: dict[str, Any], chat: bool, *, vocab: int, default_max_tokens: int) -> Options:
    """Every field of a completion request but its prompt, validated."""
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    warnings = unknown_fields(body, CHAT if chat else COMPLETIONS, endpoint)
    keys = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    n_max = max_tokens(body, default_max_tokens, *keys)
    samp = sampling(body, chat, vocab, n_max)
    stream = bool(get(body, "stream", bool, False))
    stream_options = get(body, "stream_options", dict)
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise RequestError("'stream_options' is only allowed with 'stream': true.", param="stream_options",
                               code="invalid_value")  # fmt: skip
        extra = set(stream_options) - {"include_usage"}
        if extra:
            raise refuse("stream_options", f"takes only 'include_usage' here (got {sorted(extra)}).")
        include_usage = bool(get(stream_options, "include_usage", bool, False))
    opts = Options(samp, n_max, stop_strings(body), stream, include_usage,
                   ignore_eos=bool(get(body, "ignore_eos", bool, False)), warnings=warnings)  # fmt: skip
    schema = response_format(body)
    if chat:
        _openai_only(body)
        opts.tools, opts.tool_call, opts.tool_name, tool_schema = tools(body)
        if tool_schema is not None:
            if schema is not None:
                raise RequestError("'response_format' and a forced tool call cannot both shape one answer.",
                                   param="response_format", code="invalid_value")  # fmt: skip
            schema = tool_schema
    else:
        suffix = get(body, "suffix", str, "")
        if suffix:
            raise refuse("suffix", "(fill-in-the-middle) is not supported: the served model has no infilling "
                                   "format this server knows.")  # fmt: skip
        opts.echo = bool(get(body, "echo", bool, False))
        if opts.echo and samp.logprobs is not None:
            if stream:
                raise refuse("echo", "with 'logprobs' is not supported when streaming (the prompt's log-probabilities "
                                     "are computed with the answer): send 'stream': false.")  # fmt: skip
            opts.prompt_logprobs = samp.logprobs
    get(body, "user", str)  # an end-user label for the client's own bookkeeping: checked, it changes no answer
    if schema is not None:
        from .constrained import GrammarError, json_schema_grammar

        try:
            opts.grammar = json_schema_grammar(schema)
        except ConfigError as exc:  # the constrained extra is not installed: say which
            raise RequestError(str(exc), param="tools" if opts.tool_call else "response_format",
                               code="unsupported_parameter") from None  # fmt: skip
        except GrammarError as exc:
            raise RequestError(f"The JSON schema cannot be used: {exc}", param="tools" if opts.tool_call else
                               "response_format", code="invalid_schema") from None  # fmt: skip
    return opts


# ----------------------------------------------------------------------------------------------- responses
def token_text(tokenizer: Any, token: int) -> str:
    return str(tokenizer.decode([int(token)], skip_special_tokens=False))


def chat_logprobs(tokenizer: Any, entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}, ...]}``."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, p) for t, p in e.top]} for e in entries]}


def completion_logprobs(
    tokenizer: Any, entries: list[TokenLogprob | None] | tuple[TokenLogprob | None, ...], ids: list[int],
    offset: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """OpenAI's completions ``logprobs`` object for tokens ``ids`` (their entries, None for a token nothing predicts):
    ``tokens``, ``token_logprobs``, ``top_logprobs`` (token text → log-probability), ``text_offset``."""
    tokens, values, tops, offsets = [], [], [], []
    for token, e in zip(ids, entries):
        text = token_text(tokenizer, token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        values.append(None if e is None else e.logprob)
        tops.append(None if e is None else {token_text(tokenizer, t): p for t, p in e.top})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def tool_calls(text: str, mode: str, name: str | None, call_id: Any) -> list[dict[str, Any]]:
    """The OpenAI ``tool_calls`` of a grammar-forced answer: one call with the text as its arguments ("named"), or
    the calls of the JSON array ("required")."""
    if mode == "named":
        return [{"id": call_id(), "type": "function", "function": {"name": name, "arguments": text}}]
    calls = json.loads(text)
    return [{"id": call_id(), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["parameters"], ensure_ascii=False)}}
            for c in calls]  # fmt: skip


__all__ = ["CHAT", "COMPLETIONS", "Options", "chat_logprobs", "completion_logprobs", "get", "options", "tool_calls"]
