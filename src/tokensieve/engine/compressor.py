"""The public compression API: compress a context once, answer from the compressed cache, measure what it cost.

Two ways in:

* ``with tokensieve.compress(model, "snapkv", budget=0.25): model.generate(...)`` — transformers' own ``generate``
  runs on a compressed cache (the prompt is compressed when it is prefilled);
* ``press = tokensieve.compress(model, ...)`` then ``press.prefill`` / ``press.extend`` / ``press.decode`` — a lean
  greedy loop with timings, used by the CLI, the evaluation harness and the benchmarks. It supports the
  query-agnostic setting (compress a context, then append questions uncompressed, each on a fork of the cache).

A vision-language model takes the same calls: ``press = tokensieve.compress(vlm, "todre:0.1/snapkv:0.25")`` then
``press.prefill(processor_output)`` (pixel values included) prunes each image's visual tokens with the spec's visual
methods and compresses the rest of the cache with its KV method; ``extend`` and ``decode`` continue from there.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..adapters.hf import hf_cache, inject_cache, sieve_attention_enabled
from ..adapters.models import layer_weights, model_shape, model_text
from ..adapters.profiles import Profile, profile_for
from ..cache.decode import DecodeMethod
from ..cache.prefill import Plan
from ..cache.sieve_cache import SieveCache
from ..core.budget import Budget
from ..core.capabilities import Phase, Request
from ..core.decoding import Generation, greedy
from ..core.method import AuxPass, Method, PrefillMethod
from ..errors import CapabilityError, ConfigError, PromptError
from ..registry import check_fields, create_method
from ..spec import Spec, visual_plan
from .context import CachedContext
from .prefill import CHUNKED, PrefillRecord, Recording, make, pick
from .prefill import replay as replay_into
from .prefill.chunked import run_chunks
from .prefill.deferred import Deferred, run_passes
from .prefill.one_pass import forward_with_suffix

F = TypeVar("F", bound=Callable[..., Any])


def _routed(fn: F) -> F:
    """Run a Compressor call with the model's attention routed through tokensieve — switched once per call (a whole
    prefill, extend or decode loop), not per forward pass. A vision-language prompt with images (the processor's
    output, or its context) is not switched here: its adapter routes the language model's layers itself, and the
    vision encoder keeps its own attention."""

    @functools.wraps(fn)
    def wrapper(self: Compressor, *args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else None
        if isinstance(first, Mapping) or (isinstance(first, CachedContext) and first.vision is not None):
            return fn(self, *args, **kwargs)
        with sieve_attention_enabled(self.model):
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def resolve_spec(
    method: str | Method | Spec,
    budget: Budget | str | float | int | None,
    decode: str | Method | None,
    decode_budget: Budget | str | float | int | None,
    decode_params: dict[str, Any] | None,
    params: dict[str, Any],
    visual: Any = None,
) -> Spec:
    """One :class:`Spec` from the Compressor's arguments: a spec (string or object) or a method, completed by the
    keyword arguments (which may not contradict it)."""
    spec = Spec.parse(method)
    if visual is not None:
        plan = visual_plan(visual)
        if not spec.visual.is_empty and plan != spec.visual:
            raise ConfigError(f"Two visual plans: '{spec.label}' already names visual methods; drop visual=.")
        spec = replace(spec, visual=plan)
    named_decode_only = _names_decode_only(method)
    if params:  # parameters of the method the caller named
        if named_decode_only:
            assert spec.decode is not None
            spec = replace(spec, decode=create_method(spec.decode, **params))
        else:
            spec = replace(spec, method=create_method(spec.method, **params))
    if decode is None and decode_params:
        raise ConfigError("decode_params given without a decode method.")
    if decode is not None:
        if spec.decode is not None:
            raise ConfigError(
                f"Two decode methods: '{spec.label}' already names '{spec.decode.name}'; drop decode={decode!r}."
            )
        spec = replace(spec, decode=_decode_method(decode, decode_params or {}), decode_budget=None)
    fallback: Budget | None = None  # the decode method's budget when neither the spec nor decode_budget gives one
    if budget is not None:
        b = Budget.parse(budget)
        own = spec.decode_budget if named_decode_only else spec.budget
        if own is not None and own != b:
            raise ConfigError(f"Two budgets: '{spec.label}' already has one; drop budget={budget!r}.")
        if named_decode_only:
            spec = replace(spec, decode_budget=b)
        elif spec.method.compresses:
            spec = replace(spec, budget=b)
        elif spec.decode is not None or decode is not None:
            fallback = b  # `compress(model, "full", 0.3, decode="quest")`: the budget is the decode method's
        elif not b.is_full:
            raise ConfigError(
                f"Method '{spec.method.name}' keeps every prompt token: it takes no budget (drop budget={budget!r}, "
                "or name a method that compresses)."
            )
    if decode_budget is not None:
        if spec.decode is None:
            raise ConfigError("decode_budget given without a decode method.")
        b = Budget.parse(decode_budget)
        if decode is None and spec.decode_budget is not None and spec.decode_budget != b:  # the spec named both
            raise ConfigError(f"Two decode budgets: '{spec.label}' already has one; drop decode_budget.")
        spec = replace(spec, decode_budget=b)
    for m in (spec.method, spec.decode):
        if m is not None:
            check_fields(m)
    if spec.decode is not None and spec.decode_budget is None and (spec.budget or fallback) is not None:
        spec = replace(spec, decode_budget=spec.budget or fallback)
    # A method without a budget would silently keep everything: refused, saying what to write — unless a parameter
    # decides what it keeps instead (spkv[tau=0.5]), when the whole-prompt budget stands in.
    if spec.method.compresses and spec.budget is None and not spec.method.uses_budget:
        spec = replace(spec, budget=Budget.ratio(1.0))
    if spec.decode is not None and spec.decode_budget is None and not spec.decode.uses_budget:
        spec = replace(spec, decode_budget=Budget.ratio(1.0))
    spec.compressor_kwargs()
    return spec


def _profiles(profile: Any) -> dict[str, Profile]:
    """Profiles given to a Compressor (one, or several for a prefill and a decode method), by kind."""
    items = [] if profile is None else list(profile) if isinstance(profile, (list, tuple)) else [profile]
    for p in items:
        if not isinstance(p, Profile):
            raise ConfigError(f"profile must be a tokensieve Profile (see tokensieve.adapters.profiles), not {p!r}.")
    return {p.kind: p for p in items}


def _names_decode_only(method: str | Method | Spec) -> bool:
    """The caller named one method that acts only while decoding (``"quest"``), which a spec reads as ``+quest``."""
    if isinstance(method, Spec) or (isinstance(method, str) and "+" in method):
        return False
    return Spec.parse(method).decode is not None


class Compressor:
    """Compress a model's KV cache with a registered method and a budget.

    Args:
        model: a causal LM from transformers (Llama-family attention).
        method: what to run — a spec string (``"snapkv:0.25+quest[page=32]:0.125"``, see docs/CONCEPTS.md), a
            :class:`~tokensieve.spec.Spec`, a registered method name or a :class:`Method` instance (``"full"`` = no
            compression). A method that acts only while decoding (``"quest"``) means a full prefill, then it.
        budget: a ratio in (0, 1], a token count, or a :class:`Budget` — for the method that has none in the spec
            (a compressing method needs one: without any, the Compressor is refused rather than silently keeping
            the whole prompt).
        reserve: headroom per cache row for tokens that will follow the compressed context.
        profile: a per-model profile to use instead of the installed one (methods that need one).
        decode: a method that acts at every decode step — a bounded cache (``streaming_llm``, ``h2o``, ``tova``,
            ``recompress``) or sparse attention over the whole cache (``quest``, ``tokenselect``, ``tidaldecode``).
            Composes with ``method``: evict at prefill, then bound or sparsify while decoding.
        decode_budget: its budget (default: ``budget``); a ratio is taken of each prompt's length for eviction
            policies and of the current cache length for sparse methods.
        decode_params: parameters of the decode method.
        chunk: prefill prompts longer than this many tokens in chunks of at most ``chunk`` tokens, re-compressing
            the cache to the budget after every chunk, so that a layer never holds more than its budget plus one
            chunk (see :meth:`prefill`; docs/PREFILL.md "Chunked prefill"). None (default): one pass.
        visual: visual-token methods for a vision-language model's images (a :class:`~tokensieve.spec.VisualPlan`
            or its text, ``"todre:0.1"``), when ``method`` does not name them (``"todre:0.1/snapkv:0.25"`` does).
        **params: method parameters (e.g. ``window=64``).
    """

    def __init__(
        self,
        model: Any,
        method: str | Method | Spec = "full",
        budget: Budget | str | float | int | None = None,
        *,
        reserve: int = 0,
        profile: Any = None,
        decode: str | Method | None = None,
        decode_budget: Budget | str | float | int | None = None,
        decode_params: dict[str, Any] | None = None,
        chunk: int | None = None,
        visual: Any = None,
        **params: Any,
    ) -> None:
        self.model = model
        self.spec = resolve_spec(method, budget, decode, decode_budget, decode_params, params, visual)
        self.method: Method = self.spec.method
        self.budget: Budget = self.spec.budget if self.spec.budget is not None else Budget.ratio(1.0)
        # the method that acts while decoding: the decode method, or a prefill method that decodes itself (SP-KV)
        self.decode_method: DecodeMethod | None = self.spec.decoder  # type: ignore[assignment]
        self.decode_budget = self.spec.decode_budget if self.spec.decode_budget is not None else self.budget
        self.shape = model_shape(model)
        self.weights = layer_weights(model)  # references only: what scorers such as CriticalKV's read
        self.chunk = None if chunk is None else check_chunk(chunk)
        # how a prompt gets into the cache (engine.prefill), picked once; a prompt longer than chunk is chunked
        self.mode = pick(self.method)
        # cannot run here, or would do nothing / less than asked: refused before any work (Spec.why_not)
        self.spec.check(self.request())
        given = _profiles(profile)
        wanted = {k for m in (self.method, self.decode_method) if m is not None and (k := m.capabilities.profile)}
        for kind in given:
            if kind not in wanted:
                raise ConfigError(
                    f"A '{kind}' profile was given, but {self.spec.label} needs "
                    + (f"only {', '.join(repr(k) for k in sorted(wanted))}." if wanted else "no profile.")
                )
        self.profile = given.get(self.method.capabilities.profile or "") or profile_for(self.method, self.shape)
        self.decode_profile = None
        if self.decode_method is not None:
            dk = self.decode_method.capabilities.profile or ""
            self.decode_profile = given.get(dk) or profile_for(self.decode_method, self.shape)
        # what the methods read, validated now (a malformed file fails before any work)
        self.profile_data = None if self.profile is None else self.profile.content(self.shape)
        self.decode_profile_data = None if self.decode_profile is None else self.decode_profile.content(self.shape)
        self.reserve = reserve
        self.vocab: int | None = getattr(model.config.get_text_config(), "vocab_size", None)
        self._stack: contextlib.ExitStack | None = None
        self._vision: Any = None  # the model's visual-token adapter, made on first use (a VLM's prompt with images)
        if not self.spec.visual.is_empty:
            self._vision_adapter(self.spec.label).check_plan(self.spec.visual, "official")

    def request(self, lengths: Sequence[int] = (), *, chunk: int | None = None, replay: bool = False,
                images: bool | None = None) -> Request:  # fmt: skip
        """The :class:`Request` this Compressor makes of its spec: its model, and (for one prefill) the batch's
        lengths, a chunked (default: the Compressor's chunk) or replayed prefill, a prompt with or without images (a
        spec with visual methods is built for prompts with images)."""
        if images is None and not self.spec.visual.is_empty:
            images = True
        return Request(self.shape, tuple(int(n) for n in lengths), chunk if chunk is not None else self.chunk,
                       replay, images)  # fmt: skip

    def _vision_adapter(self, why: str) -> Any:
        """The model's visual-token adapter, or a CapabilityError saying that ``why`` needs a vision-language model."""
        if self._vision is None:
            from ..adapters.vision import vision_adapter

            try:
                self._vision = vision_adapter(self.model)
            except CapabilityError as exc:
                raise CapabilityError(
                    f"'{why}' needs a vision-language model with images; {type(self.model).__name__} is not one "
                    f"tokensieve can prune ({exc})"
                ) from None
        return self._vision

    # ------------------------------------------------------------------------------------------------- caches
    def plan(self, reserve: int | None = None) -> Plan:
        return Plan(
            method=self.method,
            budget=self.budget,
            shape=self.shape,
            profile=self.profile_data,
            decode_profile=self.decode_profile_data,
            reserve=self.reserve if reserve is None else reserve,
            decode=self.decode_method,
            decode_budget=self.decode_budget if self.decode_method is not None else None,
            weights=self.weights,
        )

    def new_cache(
        self, *, reserve: int | None = None, compress: bool = True, tail: int = 0, passes: bool = False
    ) -> SieveCache:
        """A fresh cache that compresses the next prefilled chunk (``compress=False``: keeps everything and runs
        no decode method); ``tail`` auxiliary tokens end that chunk (attended to, never kept); ``passes``: auxiliary
        passes follow it, and the deferred method selects after them."""
        plan = self.plan(reserve) if compress else None
        return SieveCache(self.shape.num_layers, plan, make(self.mode, plan, tail=tail, passes=passes))

    # ---------------------------------------------------------------------------------------- context manager
    def __enter__(self) -> Compressor:
        if self.chunk is not None:
            raise ConfigError(
                "chunk= applies to Compressor.prefill; transformers' generate() prefills the prompt in one pass. "
                "Use press.prefill(ids) then press.decode(ctx, n), or build the Compressor without chunk."
            )
        stack = contextlib.ExitStack()
        stack.enter_context(sieve_attention_enabled(self.model))
        stack.enter_context(inject_cache(self.model, self.new_cache))
        self._stack = stack
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    # ------------------------------------------------------------------------------------------------ lean API
    def _check_length(self, total: int) -> None:
        limit = self.shape.max_positions
        if limit and total > limit:
            raise PromptError(
                f"The sequence would reach {total} tokens, beyond the model's context of {limit} tokens. "
                "Shorten the prompt or lower max_new_tokens."
            )

    def _forward(
        self,
        ids: Tensor,
        mask: Tensor,
        positions: Tensor,
        cache: SieveCache,
        *,
        all_logits: bool = False,
        keep: int = 1,
    ) -> Tensor:
        """One forward pass through the cache.

        Returns the last logits ``(B, V)``; with ``all_logits`` every position's ``(B, L, V)``; with ``keep > 1``
        the last ``keep`` positions' ``(B, keep, V)``.
        """
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=hf_cache(cache),
            use_cache=True,
            logits_to_keep=0 if all_logits else keep,
        )
        if all_logits or keep > 1:
            return out.logits.float()
        return out.logits[:, -1].float()

    @torch.inference_mode()
    @_routed
    def prefill(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        compress: bool = True,
        reserve: int | None = None,
        chunk: int | None = None,
        replay: PrefillRecord | None = None,
    ) -> CachedContext:
        """Prefill a (left-padded) batch and compress it with the method and budget.

        input_ids ``(B, T)``; attention_mask ``(B, T)`` with 0 at left padding (default: no padding).

        ``chunk`` (default: the Compressor's): a prompt longer than ``chunk`` tokens is prefilled in chunks of
        ``chunk`` tokens counted from its end (the first chunk holds the remainder). Each chunk attends to what the
        earlier chunks kept and causally to itself, at its true positions; then every layer's cache is re-compressed
        to the budget of the whole prompt, scored with that chunk's queries. Peak memory is the budget plus one
        chunk's keys, values and activations instead of the whole prompt's. With ``compress=False`` (or the
        ``full`` method) the chunks are only appended. A method that cannot score a chunk
        (:meth:`PrefillMethod.chunk_refusal`) is refused before any work. A prompt of at most ``chunk`` tokens is
        prefilled exactly as without ``chunk``.

        ``replay``: a :class:`PrefillRecord` of the same prompt (:meth:`record_prefill`); instead of running the
        model, every layer's recorded queries, keys and values are compressed as this prefill would compress them
        (auxiliary passes, such as KVzip's, still run). The cache and logits are the ones a plain prefill gives, since
        the forward pass of a prompt does not depend on the method — except for methods that change it, which are
        refused (:meth:`replay_refusal`). ``prefill_seconds`` is then the recording's forward time plus this
        replay's.

        A vision-language model's prompt with images is given as its processor's output (a mapping with
        ``input_ids``, ``attention_mask``, ``pixel_values`` and the family's image metadata): :meth:`prefill_images`.
        """
        if isinstance(input_ids, Mapping):
            if attention_mask is not None or chunk is not None or replay is not None:
                raise CapabilityError(
                    "A prompt with images (the processor's output) is prefilled in one pass: attention_mask belongs "
                    "in the mapping, and chunk= and replay= do not apply."
                )
            return self.prefill_images(input_ids, compress=compress, reserve=reserve)
        ids, mask = _as_batch(input_ids, attention_mask, self.vocab)
        if bool((mask.sum(-1) == 0).any()):
            raise PromptError("A prompt is empty: nothing to prefill.")
        chunk = self.chunk if chunk is None else check_chunk(chunk)
        chunked = chunk if chunk is not None and int(ids.shape[1]) > chunk else None
        self._check_prefill(ids, mask, compress=compress, reserve=reserve, chunk=chunked, replay=replay)
        if chunked is not None:  # the chunked mode (engine.prefill.chunked)
            return self._prefill_chunked(ids, mask, chunked, compress=compress, reserve=reserve)
        caps = self.method.declared()
        suffix = self.method.prefill_suffix(ids, mask) if compress and caps.suffix else None
        n_aux = 0 if suffix is None else int(suffix.shape[1])
        passes: list[AuxPass] = []
        if compress and isinstance(self.method, PrefillMethod) and caps.passes:
            passes = self.method.prefill_passes(ids, mask, model_text(self.model))
            for aux in passes:
                self._check_length(int(ids.shape[1]) + int(aux.input_ids.shape[1]))
        # the Compressor's mode (full, one-pass, deferred or sparse) holds this prefill's state in its cache
        cache = self.new_cache(reserve=reserve, compress=compress, tail=n_aux, passes=bool(passes))
        t0 = time.perf_counter()
        if replay is not None:  # engine.prefill.replay: the recorded layers instead of the model
            replay_into(cache, replay)
            logits = replay.logits.clone()
            t0 -= replay.seconds
        elif suffix is not None:  # engine.prefill.one_pass: the auxiliary tokens ride along, then are dropped
            self._check_length(int(ids.shape[1]) + n_aux)
            logits = forward_with_suffix(lambda i, m, p, k: self._forward(i, m, p, cache, keep=k), ids, mask, suffix)
        else:
            logits = self._forward(ids, mask, (mask.cumsum(-1) - 1).clamp_min(0), cache)
        if passes:  # engine.prefill.deferred: the method's passes over the full cache, then its selection
            assert isinstance(cache.mode, Deferred)
            run_passes(cache, cache.mode, lambda i, m, p: self._forward(i, m, p, cache), mask, passes)
        return CachedContext(cache, mask, logits, time.perf_counter() - t0, cache.stats.compress_seconds)

    def _check_prefill(
        self, ids: Tensor, mask: Tensor, *, compress: bool, reserve: int | None, chunk: int | None,
        replay: PrefillRecord | None,
    ) -> None:  # fmt: skip
        """Refuse, before any work, a prefill this Compressor cannot run: what it asks of the spec (Spec.why_not of
        its lengths, chunks, replay), a headroom or a budget that does not fit, a recording of another prompt."""
        if chunk is not None and replay is not None:
            raise CapabilityError("A recorded prefill replays a prefill in one pass, not in chunks (chunk=).")
        lengths = [int(v) for v in mask.sum(-1).tolist()]
        if compress:
            req = self.request(lengths, replay=replay is not None, images=False)
            self.spec.check(
                replace(req, chunk=chunk if chunk is not None else req.chunk if replay is not None else None)
            )
        headroom = self.reserve if reserve is None else reserve
        if isinstance(headroom, bool) or not isinstance(headroom, int) or headroom < 0:
            raise ConfigError(f"reserve must be a whole number >= 0; got {headroom!r}.")
        self._check_length(int(ids.shape[1]) + headroom)  # before the headroom is allocated
        if compress and self.method.compresses:
            for v in lengths:
                self.budget.tokens_for(v)  # fail before any work if the budget does not fit
        if replay is not None and (
            replay.ids.shape != ids.shape or not (torch.equal(replay.ids, ids) and torch.equal(replay.mask, mask))
        ):
            raise ConfigError("The recorded prefill is of another prompt (or padding); record this one.")

    @torch.inference_mode()
    def prefill_images(
        self,
        inputs: Mapping[str, Any],
        *,
        compress: bool = True,
        reserve: int | None = None,
        positions: str = "official",
        seeds: Sequence[int] | None = None,
        all_logits: bool = False,
        forced: Sequence[Tensor] | None = None,
    ) -> CachedContext:
        """Prefill a (left-padded) batch of a vision-language model's prompts with their images: the spec's visual
        methods prune each image's tokens at their stages, and the kept tokens' cache is compressed by its KV method.

        ``inputs``: the processor's output (``input_ids``, ``attention_mask``, ``pixel_values`` and the family's image
        metadata such as ``image_sizes`` or ``image_grid_thw``). ``positions``: the language model's positions after
        pruning — ``"official"`` (each method's own choice), ``"keep"`` or ``"renumber"`` (docs/VLM_PRUNING.md).
        ``seeds``: one per sample, for methods that draw random numbers. ``forced``: per sample, the visual tokens to
        keep at the first llm-stage step instead of the method's choice. ``all_logits``: keep every position's logits
        (``ctx.vision.all_logits``). ``compress=False``: no visual method and the full cache. The context's
        :attr:`CachedContext.kept` and :attr:`CachedContext.visual_tokens` say what each stage kept."""
        from ..spec import VisualPlan

        adapter = self._vision_adapter(self.spec.label if not self.spec.visual.is_empty else "a prompt with images")
        headroom = self.reserve if reserve is None else reserve
        if isinstance(headroom, bool) or not isinstance(headroom, int) or headroom < 0:
            raise ConfigError(f"reserve must be a whole number >= 0; got {headroom!r}.")
        ids = inputs.get("input_ids")
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ConfigError("The processor's output needs input_ids of shape (batch, tokens).")
        mask = inputs.get("attention_mask")
        lengths = [int(ids.shape[1])] * int(ids.shape[0]) if mask is None else [int(v) for v in mask.sum(-1).tolist()]
        if compress:
            self.spec.check(self.request(lengths, images=True))
        cache = self.new_cache(reserve=headroom, compress=compress)
        plan = self.spec.visual if compress else VisualPlan()
        t0 = time.perf_counter()
        state = adapter.prefill(
            inputs, plan, positions=positions, cache=cache, seeds=seeds, all_logits=all_logits, forced=forced
        )  # the adapter routes the language model's attention through the cache itself
        dt = time.perf_counter() - t0
        return CachedContext(cache, state.segments[-1].valid.long(), state.logits, dt, cache.stats.compress_seconds,
                             vision=state)  # fmt: skip

    def replay_refusal(self) -> str | None:
        """Why this Compressor's prefill cannot be replayed from a :class:`PrefillRecord` (None: it can) — a method
        that computes its own prefill attention (sparse prefill) or adds auxiliary tokens to the prompt changes the
        forward pass (its capabilities' ``forward_change``), and a chunked prefill is a different forward pass
        (:meth:`Spec.why_not` of a replayed request)."""
        return self.spec.why_not(self.request(replay=True, images=False))

    @torch.inference_mode()
    @_routed
    def record_prefill(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> PrefillRecord:
        """Prefill a prompt with the full cache once and record what every layer saw, for :meth:`prefill`'s
        ``replay`` (of this or another Compressor on the same model)."""
        ids, mask = _as_batch(input_ids, attention_mask, self.vocab)
        if bool((mask.sum(-1) == 0).any()):
            raise PromptError("A prompt is empty: nothing to prefill.")
        self._check_length(int(ids.shape[1]))
        recording = Recording()
        cache = SieveCache(self.shape.num_layers, None, recording)
        t0 = time.perf_counter()
        logits = self._forward(ids, mask, (mask.cumsum(-1) - 1).clamp_min(0), cache)
        seconds = time.perf_counter() - t0
        layers = recording.layers
        if sorted(r.layer_idx for r in layers) != list(range(self.shape.num_layers)):
            raise CapabilityError("Not every layer's attention went through tokensieve: this prefill cannot replay.")
        return PrefillRecord(ids, mask, logits, seconds, layers)

    def _prefill_chunked(
        self, ids: Tensor, mask: Tensor, chunk: int, *, compress: bool, reserve: int | None
    ) -> CachedContext:
        """:meth:`prefill` in chunks of at most ``chunk`` tokens (checked by the caller)."""
        headroom = self.reserve if reserve is None else reserve
        plan = replace(self.plan(reserve=headroom), decode=None, decode_budget=None) if compress else None
        cache = SieveCache(self.shape.num_layers, plan, make(CHUNKED, plan, n_tokens=mask.sum(-1)))
        t0 = time.perf_counter()
        logits = run_chunks(lambda i, m, p: self._forward(i, m, p, cache), ids, mask, chunk)
        cache.finish_prefill()
        if compress and self.decode_method is not None:  # it starts on the compressed prompt at the first step
            cache.set_decode(self.decode_method, self.decode_budget)
        dt = time.perf_counter() - t0
        return CachedContext(cache, mask, logits, dt, cache.stats.compress_seconds)

    @torch.inference_mode()
    @_routed
    def extend(
        self,
        ctx: CachedContext,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        return_logits: bool = False,
    ) -> Tensor | None:
        """Append a chunk (e.g. a question, or a teacher-forced continuation) to a prefilled context, uncompressed.

        Modifies ``ctx`` in place (its cache, mask and next-token logits). With ``return_logits=True`` returns the
        logits at every position of the chunk, ``(B, L, V)`` — position ``i`` predicts token ``i + 1`` of the chunk
        (and the last one the token after it); otherwise returns None.

        A single-token chunk is a decode step: the cache's decode method (bounded cache or sparse attention) acts
        on it exactly as in :meth:`decode`, so teacher-forcing one token at a time measures a decode method. A
        longer chunk is attended to densely and appended (decode methods update their metadata).
        """
        _check_context(ctx, "extend")
        if ctx.vision is not None:
            return self._extend_images(ctx, input_ids, attention_mask, return_logits)
        ids, mask = _as_batch(input_ids, attention_mask, self.vocab)
        if ids.shape[0] != ctx.batch:
            raise ConfigError(f"Batch mismatch: context has {ctx.batch} rows, the chunk {ids.shape[0]}.")
        self._check_length(int(ctx.next_positions().max()) + int(ids.shape[1]))
        positions = ctx.next_positions()[:, None] + (mask.cumsum(-1) - 1).clamp_min(0)
        full_mask = torch.cat([ctx.mask, mask], dim=1)
        t0 = time.perf_counter()
        logits = self._forward(ids, full_mask, positions, ctx.cache, all_logits=return_logits)
        ctx.prefill_seconds += time.perf_counter() - t0
        ctx.mask = full_mask
        ctx.logits = logits[:, -1] if return_logits else logits
        return logits if return_logits else None

    def _extend_images(
        self, ctx: CachedContext, input_ids: Tensor, attention_mask: Tensor | None, return_logits: bool
    ) -> Tensor | None:
        """:meth:`extend` of a VLM prompt's context: every segment of decoder layers continues at its own positions
        (a follow-up turn attends to what the prompt kept; images cannot be appended)."""
        ids, mask = _as_batch(input_ids, attention_mask, self.vocab)
        if not bool(mask.all()):
            raise PromptError("A chunk appended to a prompt with images has no padding (every token is real).")
        if ids.shape[0] != ctx.batch:
            raise ConfigError(f"Batch mismatch: context has {ctx.batch} rows, the chunk {ids.shape[0]}.")
        adapter = self._vision_adapter("a prompt with images")
        t0 = time.perf_counter()
        logits = adapter.extend(ctx.vision, ids, all_logits=return_logits)
        ctx.prefill_seconds += time.perf_counter() - t0
        ctx.mask = ctx.vision.segments[-1].valid.long()
        ctx.logits = ctx.vision.logits if return_logits else logits
        return logits if return_logits else None

    def attach_decode(
        self,
        ctx: CachedContext,
        decode: str | Method | None,
        decode_budget: Budget | str | float | int | None = None,
        **decode_params: Any,
    ) -> CachedContext:
        """Run a (different) decode method on an already prefilled context, e.g. a fork of one prefill."""
        dm = _decode_method(decode, decode_params)
        budget = Budget.parse(decode_budget) if decode_budget is not None else self.budget
        if dm is not None:  # the spec this context then runs, refused before any work as any other (Spec.why_not)
            replace(self.spec, decode=dm, decode_budget=budget).check(Request(self.shape))
        _check_context(ctx, "attach_decode")
        ctx.cache.set_decode(dm, budget)
        return ctx

    @torch.inference_mode()
    @_routed
    def decode(
        self,
        ctx: CachedContext,
        max_new_tokens: int,
        *,
        eos_token_ids: Sequence[int] | int | None = (),
        on_token: Callable[[int, int], None] | None = None,
    ) -> Generation:
        """Greedy decoding from a prefilled context. Modifies ``ctx`` in place.

        ``on_token(row, token_id)`` is called for every generated token (for streaming).
        """
        _check_context(ctx, "decode")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be a whole number >= 0; got {max_new_tokens!r}.")
        eos = _token_ids(eos_token_ids, "eos_token_ids")
        if ctx.vision is None:
            self._check_length(int(ctx.next_positions().max()) + max_new_tokens)

        def step(nxt: Tensor) -> Tensor:
            """One decode step: the picked tokens ``(B,)`` through the model and the cache."""
            if ctx.vision is not None:
                logits = self._vision_adapter("a prompt with images").extend(ctx.vision, nxt[:, None])
                ctx.mask = ctx.vision.segments[-1].valid.long()
                return logits
            positions = ctx.next_positions()[:, None]
            ctx.mask = torch.cat([ctx.mask, ctx.mask.new_ones(ctx.batch, 1)], dim=1)
            return self._forward(nxt[:, None], ctx.mask, positions, ctx.cache)

        gen, ctx.logits = greedy(ctx.logits, step, max_new_tokens, eos, on_token)
        return gen


def _check_context(ctx: Any, call: str) -> None:
    if not isinstance(ctx, CachedContext):
        raise ConfigError(
            f"{call}() takes the CachedContext that prefill() returned (ctx = press.prefill(ids)); got {ctx!r:.60}."
        )


def _token_ids(value: Any, name: str) -> set[int]:
    """A set of token ids from None, one id, or a sequence of ids (each a whole number >= 0)."""
    if value is None:
        return set()
    items = [value] if isinstance(value, int) or (isinstance(value, Tensor) and value.dim() == 0) else value
    try:
        items = [v for v in items if v is not None]  # [tokenizer.eos_token_id] of a tokenizer without one
        out = {int(v) for v in items}
        whole = all(not isinstance(v, (bool, float, str)) for v in items)
    except (TypeError, ValueError):
        out, whole = set(), False
    if not whole or any(v < 0 for v in out):
        raise ConfigError(f"{name} must be a token id or a sequence of token ids (whole numbers >= 0); got {value!r}.")
    return out


def check_chunk(chunk: Any) -> int:
    """A valid chunk size for a chunked prefill (a whole number >= 2)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 2:
        raise ConfigError(f"chunk must be a whole number of tokens >= 2 (e.g. 512); got {chunk!r}.")
    return chunk


def _decode_method(decode: str | Method | None, params: dict[str, Any]) -> DecodeMethod | None:
    """A registered method that acts while decoding, checked for that phase (None stays None)."""
    if decode is None:
        return None
    method = create_method(decode, **params)
    method.capabilities.check(method=method.name, phase=Phase.DECODE)
    if not isinstance(method, DecodeMethod):  # pragma: no cover - capabilities and classes agree
        raise ConfigError(f"Method '{method.name}' cannot act while decoding.")
    return method


def compress(
    model: Any,
    method: str | Method | Spec = "full",
    budget: Budget | str | float | int | None = None,
    **kwargs: Any,
) -> Compressor:
    """Create a :class:`Compressor` from a spec (``compress(model, "snapkv:0.25+quest:0.125")``) or a method, a
    budget and keyword arguments; use it as a context manager around ``model.generate`` or call its methods."""
    return Compressor(model, method, budget, **kwargs)


def _as_batch(input_ids: Tensor, attention_mask: Tensor | None, vocab: int | None = None) -> tuple[Tensor, Tensor]:
    """Validated ``(B, T)`` ids and 0/1 mask (a 1-D tensor is one sequence); left padding only."""
    if not isinstance(input_ids, Tensor) or (attention_mask is not None and not isinstance(attention_mask, Tensor)):
        raise ConfigError("input_ids (and attention_mask) must be torch tensors, e.g. torch.tensor([[1, 2, 3]]).")
    ids = input_ids if input_ids.dim() != 1 else input_ids[None]
    if attention_mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = attention_mask if attention_mask.dim() == 2 else attention_mask[None]
        if mask.shape != ids.shape:
            raise ConfigError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}.")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ConfigError("attention_mask must hold only 0 (padding) and 1 (a real token).")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.dim() != 2:
        raise ConfigError(
            f"input_ids must be integer token ids of shape (batch, tokens); got {ids.dtype} {tuple(ids.shape)}."
        )
    if ids.numel() and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
        lo, hi = int(ids.min()), int(ids.max())
        raise ConfigError(f"input_ids must be token ids in [0, {vocab}); got values in [{lo}, {hi}].")
    if ids.shape[1] == 0:
        raise PromptError("The prompt is empty.")
    if bool((mask[:, -1] == 0).any()):
        raise PromptError("Padding must be on the left (the last position of every row must be a real token).")
    return ids, mask.long()
