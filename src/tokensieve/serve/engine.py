"""The serving engine: a queue, memory-aware admission, continuous batching and stored contexts, on one thread.

Every request becomes a :class:`Job`. One scheduler thread owns the model and loops:

1. take new jobs into a first-come-first-served queue; drop the ones whose client went away (running, prefilling or
   waiting: their caches and reservations are freed now);
2. **admit** from the head of the queue while the job's KV bytes fit the memory budget (``kv_memory``), reserving
   them; when the head does not fit, least recently used prefix blocks, then stored contexts, are evicted, and if
   it still does not fit it waits for running sequences to finish;
3. **prefill** admitted prompts within the step's token budget (``step_tokens``, shared with the decode rows): a
   prompt that can be staged (:mod:`~tokensieve.serve.staging`) gets the next chunk of what is left, starting from
   the stored prefix blocks it begins with, and a question on a stored context the next chunk appended to a fork of
   it; any other is prefilled in one pass. A prompt that is in is compressed with the job's spec and joins the
   batch;
4. choose every running sequence's next token with its request's logits-processor chain, on the whole batch
   (:mod:`~tokensieve.serve.logits`), and run **one decode step for every running sequence** in a single forward pass
   (:func:`~tokensieve.serve.batching.decode_step`), or, when prompt chunks run in this step, one packed pass of the
   decode rows and the chunks (:func:`~tokensieve.serve.batching.packed_step`); finished sequences leave the batch
   and free their caches.

Memory is counted in exact cache bytes: a job is admitted on an estimate (the entries its spec keeps of the
prompt, plus ``max_tokens``, times the bytes one token takes in every layer and KV head) and, once prefilled, holds
its cache's real :meth:`~tokensieve.cache.sieve_cache.SieveCache.allocated_bytes` (kept entries plus the headroom
reserved for the answer). Stored contexts hold their real bytes too.

One request never fails another: a failure while one sequence is sampled, or while its own cache attends or scores
inside the batched decode step, fails that request alone (the other rows of the step are independent of it), and a
prefill that fails fails its own request. Every cost a request can choose is bounded (:class:`~.limits.Limits`):
its text before it is tokenised, its prompt in tokens, its KV bytes, the forward passes of its prefill and the time
it computes; stored contexts by count, bytes and idle time.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import re
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.hf import before_each_layer
from ..adapters.models import model_shape, model_text, special_token_texts, text_tokenizer
from ..core.method import Method, PrefillMethod
from ..data.prompts import TextStream, encode
from ..engine import CachedContext, Compressor
from ..errors import ConfigError, TokensieveError, TokensieveWarning
from ..spec import Spec
from .batching import Segment, decode_step, packed_step
from .limits import CHARS_PER_TOKEN, Limits, default_kv_memory, parse_bytes, release_memory
from .logits import Row, Sampling, TokenLogprob, choose, process, prompt_logprobs, token_logprobs
from .staging import Block, Extending, PrefixCache, Staged, needs_record, staging_refusal

MIN_PREFILL_TOKENS = 16  # prompt tokens a step prefills however many sequences it decodes
# first characters of a question, one of each kind a tokenizer splits text at (letters, digits, spaces, line breaks,
# punctuation, other scripts): a stored context keeps the ids that do not change whichever of them follows
QUESTION_STARTS = ("a", "A", "1", " ", "  ", "\n", "\t", ".", "?", "(", '"', "-", "é", "\u4e00", "\U0001f600")


class RequestError(TokensieveError):
    """A request the server refuses, with the HTTP status and the OpenAI-style error fields to answer with."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


# ------------------------------------------------------------------------------------------------------ events
@dataclass(frozen=True)
class Delta:
    """New text of a running answer (and, when the request asked for them, the log-probabilities of the tokens
    generated since the last delta)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Done:
    """The answer is complete."""

    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    info: dict[str, Any]
    logprobs: tuple[TokenLogprob, ...] = ()  # every generated token's (when asked for)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # every prompt token's (echo with logprobs)
    tokens: tuple[int, ...] = ()  # the answer's token ids


@dataclass(frozen=True)
class Failed:
    """The request failed after it was accepted."""

    message: str
    status: int = 500
    code: str | None = None


Event = Delta | Done | Failed


@dataclass
class StoredContext:
    """A document prefilled (and compressed, query-agnostically) once, answered from on forks."""

    id: str
    document: str
    mode: str  # "chat": the start of a user turn (chat completions); "text": a plain prefix (completions)
    press: Compressor
    ctx: CachedContext
    ids: list[int]  # the context's token ids (a question's ids follow them)
    created: float
    last_used: float
    uses: int = 0

    @property
    def tokens(self) -> int:
        return int(self.ctx.mask.shape[1])

    @property
    def bytes(self) -> int:
        return int(self.ctx.cache.allocated_bytes())

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "context",
            "created": int(self.created),
            "mode": self.mode,
            "spec": self.press.spec.label,
            "prompt_tokens": self.tokens,
            "kv_bytes": int(self.ctx.cache.kv_bytes()),
            "allocated_bytes": self.bytes,
            "uses": self.uses,
        }


_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """One request: a prompt to answer (``kind="generate"``) or a document to store (``kind="context"``)."""

    ids: list[int]  # the prompt's token ids (a question's only, when answering from a stored context)
    press: Compressor
    emit: Callable[[Event], None]  # called from the scheduler thread; must be thread-safe
    max_tokens: int = 16
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    context_id: str | None = None
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)
    constraint: Any = None  # a grammar the answer follows (serve.constrained.Constraint)
    prompt_logprobs: int | None = None  # k: every prompt token's log-probability with k alternatives
    warnings: list[str] = field(default_factory=list)  # told to the client in the response's tokensieve object
    kind: str = "generate"
    document: str = ""  # kind="context": the document and its mode
    mode: str = "chat"
    result: Future[Any] | None = None  # kind="context": resolved with the StoredContext
    id: str = field(default_factory=lambda: f"{next(_ids)}-{uuid.uuid4().hex[:12]}")
    # runtime state (scheduler thread only)
    cancelled: bool = False
    ctx: CachedContext | None = None
    reserved: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the generated tokens, when asked for
    unsent_logprobs: int = 0  # how many of them no delta has carried yet
    prompt_lp: list[TokenLogprob | None] | None = None
    context_ids: list[int] = field(default_factory=list)  # a stored context's ids before the question's
    sent: str = ""  # text emitted so far
    pending: str = ""  # text decoded but held back (it may be the start of a stop string)
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    prompt_tokens: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    deadline: float | None = None  # time.monotonic() after which the job is stopped (set when admitted)
    stage: bool = False  # prefilled in chunks across steps (and from stored prefix blocks); else in one pass
    staged: Staged | Extending | None = None  # the prefill under way
    prefix_blocks: list[Block] = field(default_factory=list)  # stored blocks that begin the prompt (until staged)
    reused: int = 0  # prompt tokens taken from stored prefix blocks
    chunks: int = 0  # forward passes its prompt was prefilled in, across steps (0: one pass)
    note: str = ""  # why a prompt that could have been chunked was prefilled in one pass

    def prefill_info(self) -> dict[str, Any]:
        """How the prompt was prefilled, for the response: in chunks across steps or in one pass (and why), and the
        prompt tokens taken from stored prefix blocks."""
        return {"mode": "chunked" if self.chunks > 1 else "one-pass", "chunks": self.chunks,
                "prefix_tokens_reused": self.reused, **({"note": self.note} if self.note else {})}  # fmt: skip

    def cancel(self) -> None:
        """The client went away: the scheduler drops the job and frees its cache at its next iteration."""
        self.cancelled = True


@dataclass
class Counters:
    """What /metrics reports (Prometheus text format)."""

    requests: collections.Counter[str] = field(default_factory=collections.Counter)  # by outcome
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    batched_rows: int = 0  # sum over decode steps of the batch size
    max_batch: int = 0
    prefills: int = 0
    contexts_evicted: int = 0
    contexts_expired: int = 0
    cancelled: int = 0
    peak_held: int = 0  # most KV bytes held at once (running sequences and stored contexts)
    peak_request_bytes: int = 0  # most KV bytes one request held
    prefill_chunks: int = 0  # forward passes of prompts prefilled in chunks across steps
    prefix_hit_tokens: int = 0  # prompt tokens taken from stored prefix blocks instead of computed
    prefix_blocks_evicted: int = 0


class Engine:
    """Serve one model: queue, admission by KV bytes, continuous batching, stored contexts.

    Args:
        model, tokenizer: a causal LM and its tokenizer or processor (``tokensieve.load_model``); text always goes
            through the text tokenizer (:func:`~tokensieve.adapters.models.text_tokenizer`), never a processor's
            image input.
        spec: the default spec of requests that name none (``"snapkv:0.25+quest:0.125"``; ``"full"``).
        kv_memory: the KV memory budget in bytes (or ``"1GB"``); None: a share of the memory available now
            (:func:`~tokensieve.serve.limits.default_kv_memory`).
        max_batch: most sequences decoded together.
        model_name: the id clients use in ``model``.
        max_prompt_tokens: longest prompt accepted (default: the model's context).
        max_tokens: default ``max_tokens`` of a request that gives none.
        limits: the other limits of a request and of stored contexts (default :class:`Limits`).
        allowed_methods: method names a request's spec may use (nested ones included); None: every registered one.
        step_tokens: the token budget of one scheduler step, shared by the running sequences' decode rows (one token
            each) and the prompts being prefilled (the rest, at least :data:`MIN_PREFILL_TOKENS`): a longer prompt is
            prefilled a chunk per step, interleaved with decoding (:mod:`~tokensieve.serve.staging`). None or 0:
            every prompt is prefilled in one pass when it is admitted.
        prefix_cache: reuse stored prompt prefixes (blocks of ``prefix_block`` tokens) instead of recomputing them.
        prefix_block: tokens per stored prefix block.
        prefix_memory: most bytes the stored prefix blocks hold (default: half the KV budget); they share the KV
            budget and are evicted, least recently used first, whenever a request needs the room.
        compress_min_tokens: a request's spec is applied only to prompts of at least this many tokens, and only
            when it keeps at least its method's protected window (sink + observation window) of every (layer, KV
            head); other prompts get the full cache, and the response says so (:meth:`applied`). 0: every spec is
            applied as given.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        spec: str | Spec = "full",
        kv_memory: int | str | None = None,
        max_batch: int = 16,
        model_name: str = "tokensieve",
        max_prompt_tokens: int | None = None,
        max_tokens: int = 256,
        limits: Limits | None = None,
        allowed_methods: set[str] | None = None,
        step_tokens: int | None = 256,
        prefix_cache: bool = True,
        prefix_block: int = 32,
        prefix_memory: int | str | None = None,
        compress_min_tokens: int = 0,
    ) -> None:
        self.model = model
        self.tokenizer = text_tokenizer(tokenizer)  # a processor's call would read text as images (URLs, paths)
        self.model_name = model_name
        self.shape = model_shape(model)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a whole number >= 1; got {max_batch!r}.")
        self.max_batch = max_batch
        if step_tokens is not None and (isinstance(step_tokens, bool) or not isinstance(step_tokens, int)
                                        or step_tokens < 0):  # fmt: skip
            raise ConfigError(f"step_tokens must be a whole number >= 0 (0: no chunked prefill); got {step_tokens!r}.")
        self.step_tokens: int | None = step_tokens or None
        if isinstance(prefix_block, bool) or not isinstance(prefix_block, int) or prefix_block < 1:
            raise ConfigError(f"prefix_block must be a whole number of tokens >= 1; got {prefix_block!r}.")
        if isinstance(compress_min_tokens, bool) or not isinstance(compress_min_tokens, int) or compress_min_tokens < 0:
            raise ConfigError(f"compress_min_tokens must be a whole number >= 0; got {compress_min_tokens!r}.")
        self.compress_min_tokens = compress_min_tokens
        self.limits = limits if limits is not None else Limits()
        self.kv_memory: int = default_kv_memory() if kv_memory is None else parse_bytes(kv_memory)
        self.context_limit = self.shape.max_positions or 10**9
        self.max_prompt_tokens = min(max_prompt_tokens or self.context_limit, self.context_limit)
        self.max_prompt_chars = self.limits.max_prompt_chars or CHARS_PER_TOKEN * self.max_prompt_tokens
        self.context_memory = min(self.limits.context_memory or self.kv_memory // 2, self.kv_memory)
        self.prefix: PrefixCache | None = PrefixCache(prefix_block) if prefix_cache else None
        self.prefix_memory = min(self.kv_memory // 2 if prefix_memory is None else parse_bytes(prefix_memory),
                                 self.kv_memory)  # fmt: skip
        self.allowed_methods = None if allowed_methods is None else {m.strip().lower() for m in allowed_methods}
        self.default_max_tokens = max_tokens
        specials = special_token_texts(tokenizer)
        self._specials = re.compile("|".join(re.escape(t) for t in specials)) if specials else None
        dtype = next(model.parameters()).dtype
        s = self.shape
        self.token_bytes = 2 * s.num_layers * s.num_kv_heads * s.head_dim * dtype.itemsize  # K and V, every layer
        # what a recorded staged prefill holds per token besides its keys and values: queries and hidden states
        hidden = s.hidden_size or int(getattr(model.config.get_text_config(), "hidden_size", 0) or 0)
        self.record_bytes = s.num_layers * (s.num_q_heads * s.head_dim + hidden) * dtype.itemsize
        self.eos = _eos_ids(model, tokenizer)
        self.vocab_size = int(getattr(model.config.get_text_config(), "vocab_size", 0) or 0)
        self._grammars: Any = None  # serve.constrained.Grammars, built at the first request with a grammar
        self._presses: dict[str, Compressor] = {}
        self._press_lock = threading.Lock()
        self.default = self.compressor(spec)
        self.contexts: collections.OrderedDict[str, StoredContext] = collections.OrderedDict()  # LRU order
        self.counters = Counters()
        self._inbox: collections.deque[Job] = collections.deque()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._prefilling: list[Job] = []  # admitted, memory reserved, prompt not (wholly) in yet; FCFS
        self._lock = threading.Lock()  # guards inbox, contexts (for readers) and the gauges
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.reserved_jobs = 0  # bytes held by running jobs
        self.kv_in_use = 0  # kv_bytes of running caches and stored contexts (updated every iteration)
        self._last_expiry = time.monotonic()

    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt plus answer) this server runs: the model's context, or the prompt limit when
        the model declares none."""
        return int(self.shape.max_positions or self.max_prompt_tokens)

    # ------------------------------------------------------------------------------------------- life cycle
    def start(self) -> Engine:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="tokensieve-serve", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # ------------------------------------------------------------------------------------------- requests
    def compressor(self, spec: str | Spec | None) -> Compressor:
        """The Compressor of a spec (validated against the model; built once per spec label)."""
        if spec is None:
            return self.default
        if isinstance(spec, str) and len(spec) > 1000:
            raise RequestError("'spec' is longer than 1000 characters.", param="spec", code="invalid_spec")
        try:
            parsed = Spec.parse(spec)
            self._check_allowed(parsed)
            key = parsed.label
            with self._press_lock:
                press = self._presses.get(key)
                if press is None:
                    press = self._presses[key] = Compressor(self.model, parsed)
            return press
        except RequestError:
            raise
        except TokensieveError as exc:
            raise RequestError(f"Invalid spec {str(spec)!r}: {exc}", param="spec", code="invalid_spec") from exc

    def _check_allowed(self, spec: Spec) -> None:
        if self.allowed_methods is None:
            return
        for method in (spec.method, spec.decode):
            for name in _method_names(method):
                if name not in self.allowed_methods and name != "full":
                    raise RequestError(
                        f"Method '{name}' is not allowed on this server (--allow-methods: "
                        f"{', '.join(sorted(self.allowed_methods))}).",
                        param="spec",
                        code="method_not_allowed",
                    )

    def applied(self, press: Compressor, n: int) -> tuple[Compressor, list[str]]:
        """The Compressor a prompt of ``n`` tokens really gets, and what the client is told about it.

        With ``compress_min_tokens`` > 0 a spec is not applied (the prompt keeps the full cache) when the prompt is
        shorter than ``compress_min_tokens``, or when the spec's budget keeps fewer entries per (layer, KV head)
        than its method protects anyway (its attention sinks and observation window: SnapKV's 32-token window
        under ``snapkv:0.25`` of a 37-token prompt would keep 9 entries, fewer than its own window, and the answer
        degenerates). An absolute budget larger than the prompt stays an error (:meth:`check`)."""
        if self.compress_min_tokens == 0 or press.spec.label == "full":
            return press, []
        budget = press.budget
        if press.method.compresses and budget.kind != "ratio" and budget.value > n:
            return press, []  # refused by check() with its own message
        label = press.spec.label
        if n < self.compress_min_tokens:
            return self.compressor("full"), [
                f"The spec {label!r} was not applied: the prompt has {n} tokens, fewer than this server compresses "
                f"({self.compress_min_tokens}, --compress-min-tokens); it ran with the full cache."
            ]
        if press.method.compresses:
            kept = budget.tokens_for(n, larger="clip")
            protected = _protected(press)
            if kept < protected:
                return self.compressor("full"), [
                    f"The spec {label!r} was not applied: it would keep {kept} of the {n} prompt tokens per layer and "
                    f"head, fewer than the {protected} its method always keeps (sinks and window); it ran with the "
                    "full cache."
                ]
        return press, []

    def grammars(self) -> Any:
        """The engine's grammar support (the ``constrained`` extra), built at first use."""
        if self._grammars is None:
            from .constrained import Grammars, llguidance

            llguidance()  # a missing extra fails here, with its name
            with self._press_lock:
                if self._grammars is None:
                    self._grammars = Grammars(self.tokenizer, self.vocab_size, self.eos)
        return self._grammars

    def check_text(self, text: str, param: str) -> None:
        """Refuse, before it is tokenised, text that is too long (:attr:`max_prompt_chars`), that is not valid
        Unicode (a lone surrogate), or that holds the text of one of the model's special tokens: that text would be
        tokenised as the control token itself, so a user could forge a system or assistant turn. (The choice is to
        refuse, not to escape; a completion that needs control tokens sends token ids.)"""
        if len(text) > self.max_prompt_chars:
            raise RequestError(
                f"'{param}' has {len(text)} characters; this server reads at most {self.max_prompt_chars} "
                "(--max-prompt-chars).",
                param=param,
                code="context_length_exceeded",
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestError(
                f"'{param}' is not valid Unicode text (a lone surrogate at character {exc.start}).",
                param=param,
                code="invalid_text",
            ) from None
        found = self._specials.search(text) if self._specials is not None else None
        if found is not None:
            raise RequestError(
                f"'{param}' contains {found.group(0)!r}, the text of one of the model's special tokens, which would "
                "be read as that control token; remove it (a completion may send token ids instead).",
                param=param,
                code="special_token_in_text",
            )

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a completion prompt (text, or ids as given: ids may hold control tokens, text may not)."""
        if isinstance(prompt, str):
            self.check_text(prompt, "prompt")
            return [int(i) for i in self.tokenizer(prompt)["input_ids"]]
        if len(prompt) > self.max_prompt_tokens:
            raise RequestError(
                f"The prompt has {len(prompt)} tokens; this server accepts at most {self.max_prompt_tokens}.",
                param="prompt",
                code="context_length_exceeded",
            )
        vocab = getattr(self.model.config.get_text_config(), "vocab_size", None)
        if vocab is not None and any(not 0 <= t < vocab for t in prompt):
            raise RequestError(f"Token ids must be in [0, {vocab}).", param="prompt")
        return list(prompt)

    def supports_tools(self) -> bool:
        """Whether the model's chat template renders tools (it reads a ``tools`` variable)."""
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = " ".join(str(t) for t in template.values())
        return isinstance(template, str) and re.search(r"\btools\b", template) is not None

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation, rendered with the model's chat template (plain lines without one); ``tools``
        (OpenAI's function list) are handed to the template, which must support them."""
        if tools is not None and not self.supports_tools():
            raise RequestError(
                "The served model's chat template has no tool support (it never reads 'tools'), so the model cannot "
                "be told about them; leave out 'tools'.",
                param="tools",
                code="unsupported_parameter",
            )
        extra = [json.dumps(m["tool_calls"]) for m in messages if m.get("tool_calls")]
        if tools is not None:
            extra.append(json.dumps(tools))
        for text in extra:
            self.check_text(text, "tools" if tools is not None else "messages")
        total = sum(len(m["content"]) for m in messages) + sum(len(t) for t in extra)
        if total > self.max_prompt_chars:
            raise RequestError(
                f"The messages have {total} characters; this server reads at most {self.max_prompt_chars} "
                "(--max-prompt-chars).",
                param="messages",
                code="context_length_exceeded",
            )
        for m in messages:
            self.check_text(m["content"], "messages")
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            kw = {} if tools is None else {"tools": tools}
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)
            return encode(tok, text)
        if any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            raise RequestError("Tool messages need a chat template with tool support; this model has no chat "
                               "template.", param="messages")  # fmt: skip
        text = "\n".join(m["content"] for m in messages) + "\n"
        return [int(i) for i in tok(text)["input_ids"]]

    def _turn(self, document: str, question: str) -> str:
        """The text of a one-turn conversation whose user message is ``document``, a blank line and ``question``,
        with the generation prompt (the model's chat template; plain text without one), as
        :func:`~tokensieve.data.prompts.chat_split` renders it."""
        content = f"{document}\n\n{question}"
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return str(tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True))  # fmt: skip
        return content + "\n"

    def _turn_ids(self, text: str) -> list[int]:
        """Token ids of a rendered conversation, as :meth:`encode_chat` tokenises one (no special tokens added to a
        chat template's text; the tokenizer's own without a template)."""
        if getattr(self.tokenizer, "chat_template", None):
            return encode(self.tokenizer, text)
        return [int(i) for i in self.tokenizer(text)["input_ids"]]

    def _whole(self, document: str, question: str, mode: str) -> list[int]:
        """Token ids of a stored document followed by a question, tokenised as one text (never at the split)."""
        if mode == "chat":
            return self._turn_ids(self._turn(document, question))
        return [int(i) for i in self.tokenizer(document + question)["input_ids"]]

    def encode_document(self, document: str, mode: str) -> list[int]:
        """Token ids of a document to store: the start of a user turn (``mode="chat"``) or plain text.

        A question on it must give the ids the whole conversation gives when tokenised as one text, so the stored
        ids are those that do not depend on what follows: the longest common start of the document's tokenisation
        followed by each of :data:`QUESTION_STARTS` (a tokenizer merges characters across the boundary, such as
        the blank line before the question with the question's first character). The rest of the document's ids
        are computed with the question's (:meth:`question_ids`)."""
        self.check_text(document, "document")
        if mode == "chat":
            marker = "\x00QUESTION\x00"
            head = self._turn(document, marker).split(marker)[0]
            ids = self._turn_ids(head)
        else:
            ids = [int(i) for i in self.tokenizer(document)["input_ids"]]
        stable = len(ids)
        for start in QUESTION_STARTS:
            other = self._whole(document, start, mode)
            stable = min(stable, _common_start(ids, other))
        if stable == 0:
            raise RequestError("The document is too short to store: none of its tokens is fixed before a question.",
                               param="document")  # fmt: skip
        return ids[:stable]

    def question_ids(self, stored: StoredContext, text: str) -> list[int]:
        """A question's ids after a stored context: the whole conversation (chat mode: one user turn holding the
        document, a blank line and the question; text mode: the document and the question as one text) tokenised at
        once, less the stored context's ids — so the tokens equal those of the whole conversation sent alone."""
        self.check_text(text, "messages" if stored.mode == "chat" else "prompt")
        whole = self._whole(stored.document, text, stored.mode)
        if whole[: len(stored.ids)] != stored.ids:
            raise RequestError(
                "This question's first characters are tokenised together with the end of the stored context, so it "
                "cannot be answered from it exactly; start the question with a letter or a space, or send the whole "
                "conversation without context_id.",
                param="messages" if stored.mode == "chat" else "prompt",
                code="context_boundary",
            )
        return whole[len(stored.ids) :]

    def context(self, context_id: str) -> StoredContext:
        with self._lock:
            stored = self.contexts.get(context_id)
        if stored is None:
            raise RequestError(
                f"No context {context_id!r} (never registered, deleted, or evicted under memory pressure).",
                status=404,
                param="context_id",
                code="context_not_found",
            )
        return stored

    def check(self, job: Job) -> None:
        """Refuse, before it is queued, a job that can never run: too long, or larger than the whole KV budget."""
        n = len(job.ids)
        base = 0
        if job.context_id is not None:
            base = self.context(job.context_id).tokens
        if n == 0 and job.kind == "generate" and base == 0:
            raise RequestError("The prompt is empty.", param="prompt")
        if base + n > self.max_prompt_tokens:
            raise RequestError(
                f"The prompt has {base + n} tokens; this server accepts at most {self.max_prompt_tokens}.",
                code="context_length_exceeded",
            )
        if base + n + job.max_tokens > self.context_limit:
            raise RequestError(
                f"The prompt ({base + n} tokens) plus max_tokens ({job.max_tokens}) exceed the model's context of "
                f"{self.context_limit} tokens; lower max_tokens to {max(0, self.context_limit - base - n)} or less.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        press = job.press
        if job.context_id is None:
            try:
                if press.method.compresses:
                    press.budget.tokens_for(n)
                press.spec.check(press.request([n], images=False))
            except TokensieveError as exc:
                raise RequestError(f"Spec {press.spec.label!r} cannot run on this prompt: {exc}", param="spec") from exc
            self._check_passes(job)
        need = self.estimate(job)
        if need > self.kv_memory:
            raise RequestError(
                f"This request needs about {need} bytes of KV cache, more than the server's whole budget of "
                f"{self.kv_memory} bytes (--kv-memory); shorten the prompt, lower max_tokens or use a compressing "
                "spec.",
                code="kv_memory_exceeded",
            )
        if job.kind == "context" and need > self.context_memory:
            raise RequestError(
                f"This context needs about {need} bytes of KV cache, more than stored contexts may hold together "
                f"({self.context_memory} bytes, --context-memory); shorten it or store it with a compressing spec.",
                param="document",
                code="context_memory_exceeded",
            )

    def _check_passes(self, job: Job) -> None:
        """Refuse a prefill that would run more forward passes over the prompt than ``max_prefill_passes`` (KVzip
        reconstructs the prompt in chunks of ``chunk`` tokens, one pass each: ``kvzip[chunk=1]`` would run one pass
        per token)."""
        method = job.press.method
        if not (isinstance(method, PrefillMethod) and method.declared().passes):
            return
        ids = torch.tensor([job.ids], dtype=torch.long)
        passes = 1 + len(method.prefill_passes(ids, torch.ones_like(ids), model_text(self.model)))
        limit = self.limits.max_prefill_passes
        if passes > limit:
            raise RequestError(
                f"Spec {job.press.spec.label!r} would run {passes} forward passes over this prompt; this server runs "
                f"at most {limit} per request (--max-prefill-passes). Use fewer, longer chunks.",
                param="spec",
                code="compute_limit_exceeded",
            )

    def estimate(self, job: Job) -> int:
        """Bytes a job will hold before it is prefilled: the entries its spec keeps, plus its answer's."""
        n = len(job.ids)
        if job.context_id is not None:
            stored = self.contexts.get(job.context_id)
            base = stored.bytes if stored is not None else 0
            return base + (n + job.max_tokens) * self.token_bytes
        press = job.press
        kept = n
        if press.method.compresses:
            with_suffix = press.budget.tokens_for(max(1, n), larger="clip")
            kept = min(n, with_suffix)
        return (kept + job.max_tokens) * self.token_bytes

    def submit(self, job: Job) -> Job:
        """Queue a checked job; its events arrive through ``job.emit``."""
        self.check(job)
        with self._wake:
            self._inbox.append(job)
            self._wake.notify_all()
        return job

    def delete_context(self, context_id: str) -> bool:
        """Delete a stored context and hand its memory back to the system; False if there is none of that id."""
        with self._lock:
            gone = self.contexts.pop(context_id, None)
        if gone is None:
            return False
        del gone
        release_memory()
        return True

    def list_contexts(self) -> list[dict[str, Any]]:
        with self._lock:
            return [c.describe() for c in self.contexts.values()]

    # ------------------------------------------------------------------------------------------- gauges
    def gauges(self) -> dict[str, int]:
        with self._lock:
            ctx_bytes = sum(c.bytes for c in self.contexts.values())
            return {
                "queue_length": len(self._waiting) + len(self._inbox),
                "running": len(self._running),
                "prefilling": len(self._prefilling),
                "kv_bytes_in_use": self.kv_in_use,
                "kv_bytes_reserved": self.reserved_jobs + ctx_bytes,
                "kv_bytes_budget": self.kv_memory,
                "contexts": len(self.contexts),
                "context_bytes": ctx_bytes,
                "prefix_bytes": self.prefix.bytes if self.prefix is not None else 0,
            }

    # ------------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                if not (self._stop or self._inbox or self._waiting or self._running or self._prefilling):
                    self._wake.wait(timeout=1.0)
                if self._stop:
                    break
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            try:
                self._expire_contexts()
                if not self._waiting and not self._running and not self._prefilling:
                    continue
                self._drop_cancelled()
                self._admit()
                self._step(self._prefill_some(self._prefill_room()))
            except Exception as exc:  # never die: what cannot be told apart fails, the server keeps serving
                self._fail_all(f"Internal error while generating: {type(exc).__name__}: {exc}")
            self._update_gauges()
        for job in [*self._running, *self._prefilling, *self._waiting, *self._inbox]:
            self._emit(job, Failed("The server is shutting down.", 503))

    def _held(self) -> int:
        with self._lock:  # a handler thread may delete a context meanwhile
            prefix = self.prefix.bytes if self.prefix is not None else 0
            return self.reserved_jobs + sum(c.bytes for c in self.contexts.values()) + prefix

    def _update_gauges(self) -> None:
        with self._lock:
            caches = [j.ctx.cache for j in self._running if j.ctx is not None]
            caches += [c.ctx.cache for c in self.contexts.values()]
            staging = sum(j.staged.nbytes() for j in self._prefilling if j.staged is not None)
            prefix = self.prefix.bytes if self.prefix is not None else 0
            self.kv_in_use = sum(c.kv_bytes() for c in caches) + staging + prefix

    def _drop_cancelled(self) -> None:
        """Forget every job whose client went away (checked once per step): a running or prefilling job's cache and
        its reservation are freed now."""
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
            self.counters.cancelled += 1
        for job in [j for j in (*self._running, *self._prefilling) if j.cancelled]:
            self._leave(job)
            self.counters.cancelled += 1

    def _leave(self, job: Job) -> None:
        """A job leaves the batch (or its prefill): its cache, staging and reservation are freed."""
        with self._lock:
            if job in self._running:
                self._running.remove(job)
            if job in self._prefilling:
                self._prefilling.remove(job)
            self.reserved_jobs -= job.reserved
        job.reserved = 0
        job.ctx = None  # the cache is freed with its last reference
        job.staged = None
        job.prefix_blocks = []

    def _hold(self, job: Job, nbytes: int) -> None:
        """Set the bytes a job holds (its reservation while it is prefilled, its cache's bytes after)."""
        with self._lock:
            self.reserved_jobs += nbytes - job.reserved
        job.reserved = nbytes
        self.counters.peak_held = max(self.counters.peak_held, self._held())

    def _fits(self, need: int, keep: str | None, *, contexts: bool = True) -> bool:
        """Whether ``need`` more bytes fit, evicting least recently used prefix blocks, then (``contexts``) least
        recently used stored contexts (except ``keep``), as needed."""
        evicted = 0
        try:
            while self._held() + need > self.kv_memory:
                if self._evict_prefix():
                    evicted += 1
                    continue
                if not contexts or not self._evict_one(keep):
                    return False
                evicted += 1
            return True
        finally:
            if evicted:
                release_memory()

    def _evict_prefix(self) -> bool:
        if self.prefix is None:
            return False
        with self._lock:
            gone = self.prefix.evict_one()
        self.counters.prefix_blocks_evicted = self.prefix.evicted
        return gone

    def _evict_one(self, keep: str | None) -> bool:
        """Evict the least recently used stored context other than ``keep``; False when there is none."""
        with self._lock:
            victim = next((cid for cid in self.contexts if cid != keep), None)
            if victim is None:
                return False
            del self.contexts[victim]
        self.counters.contexts_evicted += 1
        return True

    def _expire_contexts(self) -> None:
        """Delete stored contexts unused for longer than ``context_ttl`` seconds (checked about once a second)."""
        now = time.monotonic()
        if now - self._last_expiry < 1.0:
            return
        self._last_expiry = now
        oldest = time.time() - self.limits.context_ttl
        with self._lock:
            stale = [cid for cid, c in self.contexts.items() if c.last_used < oldest]
            for cid in stale:
                del self.contexts[cid]
        if stale:
            self.counters.contexts_expired += len(stale)
            release_memory()

    def _limit_contexts(self, keep: str) -> None:
        """After ``keep`` was stored: evict least recently used others while there are more than ``max_contexts``
        or they hold more than ``context_memory`` bytes together."""
        evicted = 0
        while True:
            with self._lock:
                count = len(self.contexts)
                held = sum(c.bytes for c in self.contexts.values())
            if count <= self.limits.max_contexts and held <= self.context_memory:
                break
            if not self._evict_one(keep):
                break
            evicted += 1
        if evicted:
            release_memory()

    def _admit(self) -> None:
        """Admit jobs from the head of the queue while their KV bytes fit: their memory is reserved now and their
        prompt is prefilled by the next steps (:meth:`_prefill_some`)."""
        while self._waiting and len(self._running) + len(self._prefilling) < self.max_batch:
            job = self._waiting[0]
            if job.context_id is not None and job.context_id not in self.contexts:
                self._waiting.popleft()
                self._reject(job, f"Context {job.context_id!r} was deleted or evicted before this request ran.", 404)
                continue
            need = self.estimate(job)
            stageable = self._stageable(job)
            if stageable and self.prefix is not None:
                # the stored blocks that begin the prompt, taken first: evicting blocks to make this job's room
                # cannot take them from it
                job.prefix_blocks = self.prefix.match(job.ids, queries=needs_record(job.press))
            if not self._fits(need, job.context_id):
                job.prefix_blocks = []
                if not self._running and not self._prefilling:  # nothing will free memory: it cannot run now
                    self._waiting.popleft()
                    self._reject(job, "Not enough KV memory for this request.", 503)
                    continue
                return  # wait for running sequences to finish
            self._waiting.popleft()
            job.deadline = time.monotonic() + self.limits.request_timeout
            job.stage = False
            if stageable:
                workspace = self._workspace(job)
                # staging is taken when its workspace fits beside what is held (prefix blocks may be evicted for
                # it, stored contexts are not); else the prompt is prefilled in one pass, as without chunking
                if workspace <= need or self._fits(workspace, job.context_id, contexts=False):
                    job.stage = True
                    need = max(need, workspace)
                else:
                    job.prefix_blocks = []
                    job.note = (f"prefilled in one pass: staging it needs {workspace} bytes, more than the KV budget "
                                "has free now")  # fmt: skip
            elif job.context_id is None and self.step_tokens is not None:
                why = staging_refusal(job.press)
                if why is not None:
                    job.note = f"prefilled in one pass: {why}"
            with self._lock:
                self._prefilling.append(job)
            self._hold(job, need)

    def _stageable(self, job: Job) -> bool:
        """Whether a job's prompt can be prefilled in chunks across steps and from stored prefix blocks: a prompt or a
        document to store (not a question on a stored context, which extends a fork of it) of a spec whose prefill
        does not change the forward pass (:func:`~tokensieve.serve.staging.staging_refusal`), on a server that
        chunks or reuses prefixes."""
        if job.context_id is not None:
            return False
        if self.step_tokens is None and self.prefix is None:
            return False
        return staging_refusal(job.press) is None

    def _workspace(self, job: Job) -> int:
        """Bytes a staged prefill holds until its last chunk: the prompt's keys and values uncompressed (with the
        answer's headroom when they become its cache), plus, for a spec that compresses, every layer's queries and
        hidden states, and the compressed cache built from them."""
        n = len(job.ids)
        if not needs_record(job.press):
            return (n + job.max_tokens) * self.token_bytes
        return n * (self.token_bytes + self.record_bytes) + self.estimate(job)

    def _prefill_room(self) -> int | None:
        """Prompt tokens this step may prefill: the step's token budget less one per running sequence, at least
        :data:`MIN_PREFILL_TOKENS`; None (no limit) without a budget, or when no sequence is decoding — there is
        nothing to interleave with, and a chunk per step would only add the fixed cost of a pass per chunk: the
        oldest prompt then goes in whole (:meth:`_prefill_some`), the others beside its decoding."""
        if self.step_tokens is None or not self._running:
            return None
        return max(self.step_tokens - len(self._running), min(MIN_PREFILL_TOKENS, self.step_tokens))

    def _prefill_some(self, room: int | None) -> list[tuple[Job, Segment]]:
        """Prefill admitted jobs, first come first served, within ``room`` tokens (None: each wholly). A staged
        prompt takes what room is left as its next chunk, returned to run in this step's forward pass with the decode
        rows (:meth:`_step`); a prompt prefilled in one pass runs now, when it fits the room or is first in line (so
        it cannot starve). A job that fails, fails alone."""
        spent = 0
        chunks: list[tuple[Job, Segment]] = []
        now = time.monotonic()
        idle = room is None and self.step_tokens is not None  # nothing decodes: the oldest prompt goes in whole
        for job in list(self._prefilling):
            if (room is not None and spent >= room) or (idle and (spent or chunks)):
                break  # (when idle, the next ones are chunked beside its decoding from the next step on)
            if job.cancelled:
                continue
            if job.deadline is not None and now > job.deadline:
                self._fail(job, _time_limit_error(self.limits.request_timeout))
                continue
            left = None if room is None else room - spent
            try:
                with self._time_limit(job):
                    ran = self._advance(job, left, first=spent == 0)
            except TokensieveError as exc:
                self._drop(job)
                self._reject(job, str(exc), getattr(exc, "status", 400), getattr(exc, "code", None))
                continue
            except Exception as exc:  # this request failed; the others keep running
                self._drop(job)
                self._reject(job, f"Internal error while prefilling: {type(exc).__name__}: {exc}", 500)
                continue
            if ran is None:
                break  # it waits for a step where it is first: later jobs wait behind it
            if isinstance(ran, Segment):
                chunks.append((job, ran))
                spent += len(ran.ids)
            else:
                spent += ran
        return chunks

    def _advance(self, job: Job, room: int | None, *, first: bool) -> int | Segment | None:
        """Prefill one job's prompt in one pass now (returns its tokens), or plan its next chunk within ``room``
        tokens (returns the chunk's segment), or neither (None: not now)."""
        n = len(job.ids)
        if job.context_id is not None and self.step_tokens is not None and job.ids:
            if job.staged is None:  # a question on a stored context: appended to its fork a chunk per step
                stored, ctx = self._fork(job)
                if stored.press.decode_method is not None:  # it may evict by chunk: the question goes in one pass
                    stored.press.extend(ctx, torch.tensor([job.ids], dtype=torch.long))
                    job.prompt_tokens = stored.tokens + n
                    self.counters.prefills += 1
                    self.counters.prompt_tokens += n
                    self._start(job, ctx)
                    return n
                job.staged = Extending(ctx, job.ids)
                job.prompt_tokens = stored.tokens + n
            return job.staged.segment(job.staged.remaining if room is None else room)
        fits = room is None or n <= room
        if job.stage and job.staged is None and not job.prefix_blocks and fits and self._no_blocks(n):
            job.stage = False  # the whole prompt fits this step, and it neither reuses nor stores prefix blocks
        if not job.stage:
            if room is not None and n > room and not first:
                return None
            self._prefill(job)
            return n
        if job.staged is None:
            if job.kind == "generate":
                self._prompt_logprobs(job)
            job.staged = Staged(job.press, job.ids, job.max_tokens, job.prefix_blocks)
            job.prefix_blocks = []
            job.reused = job.staged.reused
            self.counters.prefix_hit_tokens += job.reused
        return job.staged.segment(job.staged.remaining if room is None else room)

    def _complete(self, job: Job) -> None:
        """A staged prompt's last chunk ran: store its new prefix blocks, compress it with its spec (the recorded
        prefill replayed) and let it join the batch."""
        staged = job.staged
        assert staged is not None
        if isinstance(staged, Extending):  # a question on a stored context
            job.staged = None
            self.counters.prefills += 1
            self.counters.prompt_tokens += len(job.ids)
            self._start(job, staged.finish())
            return
        if self.prefix is not None:
            keys, values, queries, hidden = staged.tensors()
            with self._lock:
                free = self.kv_memory - (self.reserved_jobs + sum(c.bytes for c in self.contexts.values()))
                limit = min(self.prefix_memory, free)  # the blocks fit beside what is held
                self.prefix.insert(job.ids, keys, values, queries, hidden, limit=limit)
            self.counters.prefix_blocks_evicted = self.prefix.evicted
            self.counters.peak_held = max(self.counters.peak_held, self._held())
        with self._told(job):
            ctx = staged.finish()
        job.staged = None
        job.prompt_tokens = len(job.ids)
        self.counters.prefills += 1
        self.counters.prompt_tokens += len(job.ids)
        if job.kind == "context":
            self._store_context(job, ctx)
        else:
            self._start(job, ctx)

    def _no_blocks(self, n: int) -> bool:
        """A prompt of ``n`` tokens has no whole prefix block to store."""
        return self.prefix is None or n < self.prefix.block

    def _drop(self, job: Job) -> None:
        """Forget a job that failed while it was admitted (its cache or staging, if any, is freed)."""
        self._leave(job)
        job.ctx = None

    @contextlib.contextmanager
    def _time_limit(self, job: Job) -> Iterator[None]:
        """Stop ``job``'s forward passes (its prefill, a KVzip reconstruction pass …) once its deadline has passed:
        a check before every layer's attention of this thread's passes (nothing is set on the model)."""
        deadline, seconds = job.deadline, self.limits.request_timeout

        def check() -> None:
            if deadline is not None and time.monotonic() > deadline:
                raise _time_limit_error(seconds)

        with before_each_layer(check):
            yield

    def _reject(self, job: Job, message: str, status: int, code: str | None = None) -> None:
        self.counters.requests["failed"] += 1
        if job.result is not None:
            if not job.result.done():
                job.result.set_exception(RequestError(message, status=status, code=code))
        else:
            self._emit(job, Failed(message, status, code))

    def _emit(self, job: Job, event: Event) -> None:
        """Hand an event to a job's client; a client that cannot take it (its loop gone) is cancelled, alone."""
        try:
            job.emit(event)
        except Exception:
            job.cancelled = True

    def _prefill(self, job: Job) -> None:
        """Prefill a job's prompt in one pass: a document to store, a question on a fork of a stored context, or a
        prompt that is not staged."""
        press = job.press
        if job.kind == "context":
            self.counters.prefills += 1
            self.counters.prompt_tokens += len(job.ids)
            self._store_context(job, press.prefill(torch.tensor([job.ids], dtype=torch.long)))
            return
        if job.context_id is not None:
            stored, ctx = self._fork(job)
            if job.ids:
                stored.press.extend(ctx, torch.tensor([job.ids], dtype=torch.long))
            job.prompt_tokens = stored.tokens + len(job.ids)
        else:
            self._prompt_logprobs(job)
            with self._told(job):
                ctx = press.prefill(torch.tensor([job.ids], dtype=torch.long), reserve=job.max_tokens)
            job.prompt_tokens = len(job.ids)
        self.counters.prefills += 1
        self.counters.prompt_tokens += len(job.ids)
        self._start(job, ctx)

    def _prompt_logprobs(self, job: Job) -> None:
        """Every prompt token's log-probability, when the request asks for them (echo with logprobs): from a forward
        pass of the whole prompt with the full cache — never from the compressed cache, nor from stored prefix blocks
        (which hold no logits) — whether the prompt is then prefilled in one pass or in chunks."""
        if job.prompt_logprobs is None or job.prompt_lp is not None:
            return
        full = self.compressor("full")
        job.prompt_lp = prompt_logprobs(
            lambda ids: full.prefill(ids, reserve=len(job.ids)),
            lambda c, ids: _all_logits(full.extend(c, ids, return_logits=True)),
            job.ids,
            job.prompt_logprobs,
        )

    @contextlib.contextmanager
    def _told(self, job: Job) -> Iterator[None]:
        """The library's warnings while a job's prompt is compressed go to its client too (the response's
        ``tokensieve.warnings``)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TokensieveWarning)
            yield
        job.warnings += [str(w.message) for w in caught if issubclass(w.category, TokensieveWarning)]

    def _fork(self, job: Job) -> tuple[StoredContext, CachedContext]:
        """The stored context a question is on, and a fork of it with room for the question and the answer (the
        stored context is never modified)."""
        assert job.context_id is not None
        with self._lock:
            stored = self.contexts.get(job.context_id)
        if stored is None:  # deleted by a client since the admission check
            raise RequestError(f"Context {job.context_id!r} was deleted before this request ran.", status=404)
        with self._lock:
            self.contexts.move_to_end(job.context_id)  # most recently used
        stored.uses += 1
        stored.last_used = time.time()
        job.context_ids = list(stored.ids)  # the prompt before the question's ids (repetition penalty)
        ctx = stored.ctx.fork()
        ctx.cache.reserve(len(job.ids) + job.max_tokens)
        return stored, ctx

    def _store_context(self, job: Job, ctx: CachedContext) -> None:
        """A document's prefill is in: store it as a context (its reservation becomes the context's bytes)."""
        now = time.time()
        cid = f"ctx-{uuid.uuid4().hex[:16]}"
        stored = StoredContext(cid, job.document, job.mode, job.press, ctx, list(job.ids), now, now)
        self._leave(job)
        with self._lock:
            self.contexts[stored.id] = stored
        self._limit_contexts(stored.id)
        self.counters.peak_held = max(self.counters.peak_held, self._held())
        self.counters.requests["context"] += 1
        assert job.result is not None
        job.result.set_result(stored)

    def _start(self, job: Job, ctx: CachedContext) -> None:
        """A job's prompt is in: it holds its cache's real bytes from now on and joins the decode batch."""
        job.ctx = ctx
        job.stream = TextStream(self.tokenizer)
        if job.sampling.temperature > 0:
            job.generator = torch.Generator().manual_seed(
                job.sampling.seed if job.sampling.seed is not None else int.from_bytes(uuid.uuid4().bytes[:6], "big")
            )
        with self._lock:
            if job in self._prefilling:
                self._prefilling.remove(job)
            self._running.append(job)
        self._hold(job, int(ctx.cache.allocated_bytes()))
        self.counters.peak_request_bytes = max(self.counters.peak_request_bytes, job.reserved)
        if job.max_tokens == 0:
            self._finish(job, "length")

    def _step(self, chunks: Sequence[tuple[Job, Segment]] = ()) -> None:
        """One decode step for every running sequence, and the planned prompt chunks: in one batched decode pass
        when there are no chunks, else in one packed pass with them (:func:`~tokensieve.serve.batching.packed_step`).
        A sequence or a prompt whose own cache fails, fails alone. The decode rows' next tokens are chosen first, by
        the logits-processor chain on the whole batch (:meth:`_choose`), whichever pass then runs them."""
        now = time.monotonic()
        jobs: list[Job] = []
        rows: list[Row] = []
        for job in list(self._running):
            if job.deadline is not None and now > job.deadline:
                self._fail(job, _time_limit_error(self.limits.request_timeout))
                continue
            try:  # what the logits processors need of this sequence: a failure fails this request alone
                assert job.ctx is not None
                rows.append(self._row(job))
                jobs.append(job)
            except Exception as exc:
                self._fail(job, exc)
        live, tokens = self._choose(jobs, rows) if jobs else ([], [])
        chunks = [(job, seg) for job, seg in chunks if job.staged is not None and not job.cancelled]
        if chunks:
            self._packed(live, tokens, chunks)
        elif live:
            failed = decode_step(self.model, [j.ctx for j in live if j.ctx is not None], tokens)
            for row, error in failed.items():  # a row whose own cache failed: that request alone
                self._fail(live[row], error)
        if not live:
            return
        self.counters.decode_steps += 1
        self.counters.batched_rows += len(live)
        self.counters.max_batch = max(self.counters.max_batch, len(live))

    def _choose(self, jobs: list[Job], rows: list[Row]) -> tuple[list[Job], list[int]]:
        """Each running sequence's next token from its last logits after the logits-processor chain (each row with its
        own settings, as alone); its log-probabilities from the raw logits. Returns the sequences that go on and the
        tokens they are stepped with; the others finished (or failed, alone)."""
        live: list[Job] = []
        tokens: list[int] = []
        raw = torch.cat([j.ctx.logits[0:1].float() for j in jobs if j.ctx is not None])  # (B, V)
        processed = process(raw, rows)  # (B, V)
        for b, job in enumerate(jobs):
            try:  # sampling and text of one sequence: a failure fails this request alone
                t = sample_token(processed[b], job.sampling, job.generator)
                if job.first_token is None:
                    job.first_token = time.perf_counter()
                if (t in self.eos and not job.ignore_eos) or t in job.sampling.stop_token_ids:
                    self._finish(job, "stop")
                    continue
                if job.constraint is not None:
                    job.constraint.advance(t)
                job.tokens.append(t)
                if job.sampling.logprobs is not None:
                    job.logprobs += token_logprobs(raw[b : b + 1], [t], job.sampling.logprobs)
                    job.unsent_logprobs += 1
                self.counters.generated_tokens += 1
                assert job.stream is not None
                job.pending += job.stream.push(t)
                if self._release(job) or (job.constraint is not None and job.constraint.finished):
                    self._finish(job, "stop")
                elif len(job.tokens) >= job.max_tokens:
                    self._finish(job, "length")
                else:
                    live.append(job)
                    tokens.append(t)
            except Exception as exc:
                self._fail(job, exc)
        return live, tokens

    def _packed(self, live: list[Job], tokens: list[int], chunks: Sequence[tuple[Job, Segment]]) -> None:
        """The decode rows of ``live`` (their next ``tokens``) and the prompt ``chunks`` in one packed forward pass;
        a prompt whose last chunk ran is compressed and joins the batch."""
        segments = []
        for job, t in zip(live, tokens):
            assert job.ctx is not None
            segments.append(Segment(job.ctx.cache, [t], [int(job.ctx.next_positions()[0])]))
        segments += [seg for _, seg in chunks]
        t0 = time.perf_counter()
        logits, failed = packed_step(self.model, segments)
        seconds = time.perf_counter() - t0
        for i, job in enumerate(live):
            if i in failed:  # a row whose own cache failed: that request alone
                self._fail(job, failed[i])
                continue
            assert job.ctx is not None
            job.ctx.mask = torch.cat([job.ctx.mask, job.ctx.mask.new_ones(1, 1)], dim=1)
            job.ctx.logits = logits[i : i + 1]
        for k, (job, seg) in enumerate(chunks):
            i = len(live) + k
            if i in failed:
                self._fail(job, failed[i])
                continue
            try:
                assert job.staged is not None
                job.staged.absorb(seg, logits[i : i + 1], seconds)
                job.chunks += 1
                self.counters.prefill_chunks += 1
                if job.staged.finished:
                    with self._time_limit(job):
                        self._complete(job)
            except Exception as exc:  # this request failed; the others keep running
                self._fail(job, exc)

    def _row(self, job: Job) -> Row:
        """The logits processors' view of one running sequence (its grammar's mask computed now)."""
        allowed = None
        if job.constraint is not None:
            mask = job.constraint.allowed(int(job.ctx.logits.shape[-1]) if job.ctx is not None else self.vocab_size)
            allowed = lambda V, m=mask: m  # noqa: E731
        ends = frozenset(job.sampling.stop_token_ids | (set() if job.ignore_eos else self.eos))
        return Row(job.sampling, [*job.context_ids, *job.ids], job.tokens, ends, allowed)

    def _fail(self, job: Job, exc: BaseException) -> None:
        """Fail one admitted job (a limit it ran past, or an error of its own sequence) and free its cache."""
        if isinstance(exc, RequestError):
            self._reject(job, str(exc), exc.status, exc.code)
        else:
            self._reject(job, f"Internal error while generating this answer: {type(exc).__name__}: {exc}", 500)
        self._leave(job)

    def _release(self, job: Job, final: bool = False) -> bool:
        """Emit the text that cannot be the start of a stop string; True when a stop string was reached."""
        text = job.pending
        # Text already sent never ends with the start of a stop string (it is held back), so a stop string lies
        # wholly in the pending text: cut before the earliest one.
        found = [j for j in (text.find(stop) for stop in job.stop) if j >= 0]
        if found:
            cut = min(found)
            if cut:
                self._emit(job, Delta(text[:cut], self._take_logprobs(job)))
                job.sent += text[:cut]
            job.pending = ""
            return True
        hold = 0
        if not final:
            for stop in job.stop:
                for k in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:k]):
                        hold = max(hold, k)
                        break
        out = text[: len(text) - hold]
        if out:
            self._emit(job, Delta(out, self._take_logprobs(job)))
            job.sent += out
        job.pending = text[len(text) - hold :]
        return False

    def _take_logprobs(self, job: Job) -> tuple[TokenLogprob, ...]:
        """The log-probabilities of the tokens no delta has carried yet (for the next delta)."""
        if not job.unsent_logprobs:
            return ()
        out = tuple(job.logprobs[len(job.logprobs) - job.unsent_logprobs :])
        job.unsent_logprobs = 0
        return out

    def _finish(self, job: Job, reason: str) -> None:
        assert job.stream is not None
        job.pending += job.stream.flush()
        if job.pending and self._release(job, final=True):
            reason = "stop"
        info: dict[str, Any] = {
            "spec": job.press.spec.label,
            "kv_bytes": int(job.ctx.cache.kv_bytes()) if job.ctx is not None else 0,
            "allocated_bytes": job.reserved,
            "context_id": job.context_id,
            "ttft_seconds": None if job.first_token is None else job.first_token - job.submitted,
            "prefill": job.prefill_info(),
            "warnings": list(job.warnings),
        }
        if job.constraint is not None and reason == "length" and not job.constraint.accepting:
            info["warnings"].append("The answer reached max_tokens before its grammar was complete: it is cut short.")
        self.counters.requests[reason] += 1
        prompt_lp = None if job.prompt_lp is None else tuple(job.prompt_lp)
        self._emit(job, Done(reason, job.prompt_tokens, len(job.tokens), info, tuple(job.logprobs), prompt_lp,
                             tuple(job.tokens)))  # fmt: skip
        self._leave(job)

    def _fail_all(self, message: str) -> None:
        for job in [*self._running, *self._prefilling]:
            self._reject(job, message, 500)
            self._leave(job)


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> int:
    """The next token of one sequence from its logits ``(V,)`` with no logits processor: the argmax at temperature
    0, else a draw after the ``top_k``, ``min_p`` and ``top_p`` filters; not-finite logits fail this sequence
    alone."""
    return choose(logits, sampling, generator)


def _protected(press: Compressor) -> int:
    """Entries per (layer, KV head) a spec's method keeps whatever it scores: its attention sinks plus its recent
    (observation) window, as the method declares them, or as the budget overrides them."""
    sink, recent = press.method.protected()
    if press.budget.sink is not None:
        sink = press.budget.sink
    if press.budget.recent is not None:
        recent = press.budget.recent
    return int(sink) + int(recent)


def _all_logits(logits: torch.Tensor | None) -> torch.Tensor:
    assert logits is not None  # extend(return_logits=True) returns them
    return logits


def _time_limit_error(seconds: float) -> RequestError:
    return RequestError(
        f"The request ran past this server's time limit of {seconds:g} s per request (--request-timeout) and was "
        "stopped; send a shorter prompt, fewer max_tokens or a cheaper spec.",
        code="time_limit_exceeded",
    )


def _method_names(method: Any) -> list[str]:
    """A method's name and those of the methods nested in it (``adakv[base=snapkv]`` → adakv, snapkv)."""
    if method is None:
        return []
    names = [str(method.name)]
    for f in dataclasses.fields(method):
        inner = getattr(method, f.name)
        if isinstance(inner, Method):
            names += _method_names(inner)
    return names


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the model's generation config's."""
    ids: set[int] = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _common_start(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def kv_bytes_per_token(model: Any) -> int:
    """Bytes one token's keys and values take over every layer and KV head (the uncompressed cost)."""
    s = model_shape(model)
    dtype = next(model.parameters()).dtype
    return 2 * s.num_layers * s.num_kv_heads * s.head_dim * dtype.itemsize


__all__ = [
    "Delta",
    "Done",
    "Engine",
    "Event",
    "Failed",
    "Job",
    "RequestError",
    "Sampling",
    "StoredContext",
    "kv_bytes_per_token",
    "parse_bytes",
    "sample_token",
]
