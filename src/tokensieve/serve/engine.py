"""The serving engine: a queue, memory-aware admission, continuous batching and stored contexts, on one thread.

Every request becomes a :class:`Job`. One scheduler thread owns the model and loops:

1. take new jobs into a first-come-first-served queue; drop the ones whose client went away;
2. **admit** from the head of the queue while the job's KV bytes fit the memory budget (``kv_memory``): the prompt
   is prefilled — and compressed with the job's spec — as soon as it is admitted (a question on a stored context is
   appended to a fork of it); when the head does not fit, least recently used stored contexts are evicted, and if
   it still does not fit it waits for running sequences to finish;
3. run **one decode step for every running sequence** in a single forward pass
   (:func:`~tokensieve.serve.batching.decode_step`); finished sequences leave the batch and free their caches.

Memory is counted in exact cache bytes: a job is admitted on an estimate (the entries its spec keeps of the
prompt, plus ``max_tokens``, times the bytes one token takes in every layer and KV head) and, once prefilled, holds
its cache's real :meth:`~tokensieve.cache.sieve_cache.SieveCache.allocated_bytes` (kept entries plus the headroom
reserved for the answer). Stored contexts hold their real bytes too.
"""

from __future__ import annotations

import collections
import itertools
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.models import model_shape
from ..data.prompts import TextStream, chat_split, encode
from ..errors import ConfigError, TokensieveError
from ..pipeline import CachedContext, Compressor
from ..spec import Spec
from .batching import decode_step

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str | int) -> int:
    """``"1GB"``, ``"512MiB"``, ``"2.5GB"`` or a number of bytes → bytes (decimal KB/MB/GB, binary KiB/MiB/GiB)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value: float = text
        unit = ""
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
        if m is None or m.group(2).upper() not in _UNITS:
            raise ConfigError(f"Cannot read a memory size from {text!r}: write e.g. 1GB, 512MB, 256MiB or 1000000.")
        value, unit = float(m.group(1)), m.group(2).upper()
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise ConfigError(f"A memory size must be positive; got {text!r}.")
    return n


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
    """New text of a running answer."""

    text: str


@dataclass(frozen=True)
class Done:
    """The answer is complete."""

    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    info: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    """The request failed after it was accepted."""

    message: str
    status: int = 500
    code: str | None = None


Event = Delta | Done | Failed


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when ``temperature == 0`` (the default), else sampled with nucleus
    ``top_p`` from a generator seeded per request (so a seeded request does not depend on the batch either)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


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
    sent: str = ""  # text emitted so far
    pending: str = ""  # text decoded but held back (it may be the start of a stop string)
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    prompt_tokens: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

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
    cancelled: int = 0
    peak_held: int = 0  # most KV bytes held at once (running sequences and stored contexts)
    peak_request_bytes: int = 0  # most KV bytes one request held


class Engine:
    """Serve one model: queue, admission by KV bytes, continuous batching, stored contexts.

    Args:
        model, tokenizer: a causal LM and its tokenizer (``tokensieve.load_model``).
        spec: the default spec of requests that name none (``"snapkv:0.25+quest:0.125"``; ``"full"``).
        kv_memory: the KV memory budget in bytes (or ``"1GB"``); None: unlimited.
        max_batch: most sequences decoded together.
        model_name: the id clients use in ``model``.
        max_prompt_tokens: longest prompt accepted (default: the model's context).
        max_tokens: default ``max_tokens`` of a request that gives none.
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
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.shape = model_shape(model)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a whole number >= 1; got {max_batch!r}.")
        self.max_batch = max_batch
        self.kv_memory = None if kv_memory is None else parse_bytes(kv_memory)
        self.context_limit = self.shape.max_positions or 10**9
        self.max_prompt_tokens = min(max_prompt_tokens or self.context_limit, self.context_limit)
        self.default_max_tokens = max_tokens
        dtype = next(model.parameters()).dtype
        s = self.shape
        self.token_bytes = 2 * s.num_layers * s.num_kv_heads * s.head_dim * dtype.itemsize  # K and V, every layer
        self.eos = _eos_ids(model, tokenizer)
        self._presses: dict[str, Compressor] = {}
        self._press_lock = threading.Lock()
        self.default = self.compressor(spec)
        self.contexts: collections.OrderedDict[str, StoredContext] = collections.OrderedDict()  # LRU order
        self.counters = Counters()
        self._inbox: collections.deque[Job] = collections.deque()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._lock = threading.Lock()  # guards inbox, contexts (for readers) and the gauges
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.reserved_jobs = 0  # bytes held by running jobs
        self.kv_in_use = 0  # kv_bytes of running caches and stored contexts (updated every iteration)

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
        try:
            parsed = Spec.parse(spec)
            key = parsed.label
            with self._press_lock:
                press = self._presses.get(key)
                if press is None:
                    press = self._presses[key] = Compressor(self.model, parsed)
            return press
        except TokensieveError as exc:
            raise RequestError(f"Invalid spec {str(spec)!r}: {exc}", param="spec", code="invalid_spec") from exc

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a completion prompt (text with the tokenizer's special tokens, or ids as given)."""
        if isinstance(prompt, str):
            return [int(i) for i in self.tokenizer(prompt)["input_ids"]]
        vocab = getattr(self.model.config.get_text_config(), "vocab_size", None)
        if vocab is not None and any(not 0 <= t < vocab for t in prompt):
            raise RequestError(f"Token ids must be in [0, {vocab}).", param="prompt")
        return list(prompt)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation, rendered with the model's chat template (plain lines without one)."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return encode(tok, text)
        text = "\n".join(m["content"] for m in messages) + "\n"
        return [int(i) for i in tok(text)["input_ids"]]

    def question_ids(self, stored: StoredContext, text: str) -> list[int]:
        """A question's ids after a stored context: the chat turn's rest (chat mode) or the text as it is."""
        if stored.mode == "text":
            return encode(self.tokenizer, text)
        split = chat_split(self.tokenizer, stored.document, text)
        if split.context != stored.ids:
            raise RequestError("The chat template renders this context differently; register it again.")
        return split.question

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
                if press.decode_method is not None:
                    press.decode_method.check_batch(press.decode_budget, [n])
            except TokensieveError as exc:
                raise RequestError(f"Spec {press.spec.label!r} cannot run on this prompt: {exc}", param="spec") from exc
        need = self.estimate(job)
        if self.kv_memory is not None and need > self.kv_memory:
            raise RequestError(
                f"This request needs about {need} bytes of KV cache, more than the server's whole budget of "
                f"{self.kv_memory} bytes; shorten the prompt, lower max_tokens or use a compressing spec.",
                code="kv_memory_exceeded",
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
        with self._lock:
            return self.contexts.pop(context_id, None) is not None

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
                "kv_bytes_in_use": self.kv_in_use,
                "kv_bytes_reserved": self.reserved_jobs + ctx_bytes,
                "kv_bytes_budget": self.kv_memory or 0,
                "contexts": len(self.contexts),
                "context_bytes": ctx_bytes,
            }

    # ------------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._stop and not self._inbox and not self._waiting and not self._running:
                    self._wake.wait(timeout=1.0)
                if self._stop:
                    break
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            try:
                self._drop_cancelled()
                self._admit()
                self._step()
            except Exception as exc:  # never die: fail what was running, keep serving
                self._fail_all(f"Internal error while generating: {type(exc).__name__}: {exc}")
            self._update_gauges()
        for job in [*self._running, *self._waiting, *self._inbox]:
            job.emit(Failed("The server is shutting down.", 503))

    def _held(self) -> int:
        with self._lock:  # a handler thread may delete a context meanwhile
            return self.reserved_jobs + sum(c.bytes for c in self.contexts.values())

    def _update_gauges(self) -> None:
        with self._lock:
            caches = [j.ctx.cache for j in self._running if j.ctx is not None]
            caches += [c.ctx.cache for c in self.contexts.values()]
            self.kv_in_use = sum(c.kv_bytes() for c in caches)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
            self.counters.cancelled += 1
        for job in [j for j in self._running if j.cancelled]:
            self._leave(job)
            self.counters.cancelled += 1

    def _leave(self, job: Job) -> None:
        with self._lock:
            self._running.remove(job)
            self.reserved_jobs -= job.reserved
        job.reserved = 0
        job.ctx = None  # the cache is freed with its last reference

    def _fits(self, need: int, keep: str | None) -> bool:
        """Whether ``need`` more bytes fit, evicting least recently used contexts (except ``keep``) if needed."""
        if self.kv_memory is None:
            return True
        while self._held() + need > self.kv_memory:
            with self._lock:
                victim = next((cid for cid in self.contexts if cid != keep), None)
                if victim is None:
                    return False
                del self.contexts[victim]
            self.counters.contexts_evicted += 1
        return True

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch:
            job = self._waiting[0]
            if job.context_id is not None and job.context_id not in self.contexts:
                self._waiting.popleft()
                self._reject(job, f"Context {job.context_id!r} was deleted or evicted before this request ran.", 404)
                continue
            need = self.estimate(job)
            if not self._fits(need, job.context_id):
                if not self._running:  # nothing will free memory: it cannot run now
                    self._waiting.popleft()
                    self._reject(job, "Not enough KV memory for this request.", 503)
                    continue
                return  # wait for running sequences to finish
            self._waiting.popleft()
            try:
                self._prefill(job)
            except TokensieveError as exc:
                self._reject(job, str(exc), getattr(exc, "status", 400))
            except Exception as exc:  # this request failed; the others keep running
                self._reject(job, f"Internal error while prefilling: {type(exc).__name__}: {exc}", 500)

    def _reject(self, job: Job, message: str, status: int) -> None:
        self.counters.requests["failed"] += 1
        if job.result is not None:
            job.result.set_exception(RequestError(message, status=status))
        else:
            job.emit(Failed(message, status))

    def _prefill(self, job: Job) -> None:
        press = job.press
        if job.kind == "context":
            ids = torch.tensor([job.ids], dtype=torch.long)
            ctx = press.prefill(ids)
            now = time.time()
            cid = f"ctx-{uuid.uuid4().hex[:16]}"
            stored = StoredContext(cid, job.document, job.mode, press, ctx, list(job.ids), now, now)
            with self._lock:
                self.contexts[stored.id] = stored
            self.counters.peak_held = max(self.counters.peak_held, self._held())
            self.counters.prefills += 1
            self.counters.prompt_tokens += len(job.ids)
            self.counters.requests["context"] += 1
            assert job.result is not None
            job.result.set_result(stored)
            return
        if job.context_id is not None:
            with self._lock:
                stored_or_none = self.contexts.get(job.context_id)
            if stored_or_none is None:  # deleted by a client since the admission check
                raise RequestError(f"Context {job.context_id!r} was deleted before this request ran.", status=404)
            stored = stored_or_none
            with self._lock:
                self.contexts.move_to_end(job.context_id)  # most recently used
            stored.uses += 1
            stored.last_used = time.time()
            ctx = stored.ctx.fork()  # the stored context is never modified
            ctx.cache.reserve(len(job.ids) + job.max_tokens)
            if job.ids:
                stored.press.extend(ctx, torch.tensor([job.ids], dtype=torch.long))
            job.prompt_tokens = stored.tokens + len(job.ids)
        else:
            ctx = press.prefill(torch.tensor([job.ids], dtype=torch.long), reserve=job.max_tokens)
            job.prompt_tokens = len(job.ids)
        self.counters.prefills += 1
        self.counters.prompt_tokens += len(job.ids)
        job.ctx = ctx
        job.stream = TextStream(self.tokenizer)
        if job.sampling.temperature > 0:
            job.generator = torch.Generator().manual_seed(
                job.sampling.seed if job.sampling.seed is not None else int.from_bytes(uuid.uuid4().bytes[:6], "big")
            )
        job.reserved = int(ctx.cache.allocated_bytes())
        with self._lock:
            self.reserved_jobs += job.reserved
            self._running.append(job)
        self.counters.peak_request_bytes = max(self.counters.peak_request_bytes, job.reserved)
        self.counters.peak_held = max(self.counters.peak_held, self._held())
        if job.max_tokens == 0:
            self._finish(job, "length")

    def _choose(self, job: Job) -> int:
        assert job.ctx is not None
        logits = job.ctx.logits[0]  # (V,)
        s = job.sampling
        if s.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < s.top_p  # the smallest set whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=job.generator))

    def _step(self) -> None:
        live: list[Job] = []
        tokens: list[int] = []
        for job in list(self._running):
            t = self._choose(job)
            if job.first_token is None:
                job.first_token = time.perf_counter()
            if t in self.eos and not job.ignore_eos:
                self._finish(job, "stop")
                continue
            job.tokens.append(t)
            self.counters.generated_tokens += 1
            assert job.stream is not None
            job.pending += job.stream.push(t)
            if self._release(job):
                self._finish(job, "stop")
            elif len(job.tokens) >= job.max_tokens:
                self._finish(job, "length")
            else:
                live.append(job)
                tokens.append(t)
        if not live:
            return
        decode_step(self.model, [j.ctx for j in live if j.ctx is not None], tokens)
        self.counters.decode_steps += 1
        self.counters.batched_rows += len(live)
        self.counters.max_batch = max(self.counters.max_batch, len(live))

    def _release(self, job: Job, final: bool = False) -> bool:
        """Emit the text that cannot be the start of a stop string; True when a stop string was reached."""
        text = job.pending
        # Text already sent never ends with the start of a stop string (it is held back), so a stop string lies
        # wholly in the pending text: cut before the earliest one.
        found = [j for j in (text.find(stop) for stop in job.stop) if j >= 0]
        if found:
            cut = min(found)
            if cut:
                job.emit(Delta(text[:cut]))
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
            job.emit(Delta(out))
            job.sent += out
        job.pending = text[len(text) - hold :]
        return False

    def _finish(self, job: Job, reason: str) -> None:
        assert job.stream is not None
        job.pending += job.stream.flush()
        if job.pending and self._release(job, final=True):
            reason = "stop"
        info = {
            "spec": job.press.spec.label,
            "kv_bytes": int(job.ctx.cache.kv_bytes()) if job.ctx is not None else 0,
            "allocated_bytes": job.reserved,
            "context_id": job.context_id,
            "ttft_seconds": None if job.first_token is None else job.first_token - job.submitted,
        }
        self.counters.requests[reason] += 1
        job.emit(Done(reason, job.prompt_tokens, len(job.tokens), info))
        self._leave(job)

    def _fail_all(self, message: str) -> None:
        for job in list(self._running):
            job.emit(Failed(message, 500))
            self._leave(job)
            self.counters.requests["failed"] += 1


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
]
