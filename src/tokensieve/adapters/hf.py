"""The only module that hooks into transformers' forward pass.

The one path from the model to our cache and back, for every attention layer of a forward call:

1. the model calls ``past_key_values.update(k, v, layer_idx)`` on our :class:`HFSieveCache` (a transformers
   ``Cache`` that is only a view of a :class:`~tokensieve.cache.sieve_cache.SieveCache`): it records which cache
   and layer the next attention call belongs to and returns the new keys/values untouched;
2. the model calls the attention function registered as ``"tokensieve"``, :func:`sieve_attention`, which takes
   that record and calls :meth:`SieveCache.attend` with the layer's queries, keys, values, padding mask, scale
   and the chunk's position ids;
3. ``attend`` compresses a prefilled chunk or appends to the layer's store and returns the attention output.

It uses public extension points only:

* ``AttentionInterface.register("tokensieve", ...)``: the attention function above;
* ``AttentionMaskInterface.register("tokensieve", ...)``: the mask "factory" for that implementation returns the
  plain 2-D padding mask (our kernels build their own causal masks against the *stored* lengths);
* ``model.set_attn_implementation(...)`` inside a context manager that restores the previous implementation, and
  an optional forward pre-hook (removed in ``finally``) that gives ``model.generate`` a SieveCache;
* while attention is routed, a forward pre-hook on each decoder attention module (removed with the routing) that
  hands the hidden state the layer reads (its ``hidden_states`` input, after the input normalisation) to the
  attention call that follows in the same layer, per thread — learned scorers (KVzap's surrogate) read it.

Registration happens the first time a context is entered, never at import time. No model code is copied and no
state is stored on the model's modules or config beyond the attention-implementation switch and the hidden-state
pre-hooks, both in place only while attention is routed.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from ..attention.dense import Modifiers, plain_attention
from ..cache.sieve_cache import SieveCache
from ..compat import check_versions
from ..errors import CapabilityError

IMPLEMENTATION = "tokensieve"
_REGISTERED = False

# (cache, layer) recorded by HFSieveCache.update for the attention call that follows it in the same layer.
_PENDING: contextvars.ContextVar[tuple[SieveCache, int] | None] = contextvars.ContextVar(
    "tokensieve_pending", default=None
)
# How many tokensieve blocks this thread (context) is inside; models routed to tokensieve and their previous
# attention implementation, with the number of blocks using each.
_IN_CALL: contextvars.ContextVar[int] = contextvars.ContextVar("tokensieve_in_call", default=0)
_INJECTING: contextvars.ContextVar[object | None] = contextvars.ContextVar("tokensieve_injecting", default=None)
_ROUTING_LOCK = threading.Lock()
_ROUTED: dict[int, list[Any]] = {}
# (layer, hidden states) the attention module of that layer is about to read, set by its forward pre-hook.
_HIDDEN: contextvars.ContextVar[tuple[int, Tensor] | None] = contextvars.ContextVar("tokensieve_hidden", default=None)
# Called before every layer's attention of this thread's tokensieve forward passes (see before_each_layer).
_ON_LAYER: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "tokensieve_on_layer", default=None
)


@contextlib.contextmanager
def before_each_layer(check: Callable[[], None]) -> Iterator[None]:
    """Call ``check()`` before the attention of every layer of the tokensieve forward passes this thread runs inside
    the block (a prefill, its auxiliary passes, a decode step); an exception it raises stops the forward pass there.
    Per thread, nothing is set on the model: a server stops a request that ran past its time limit this way."""
    token = _ON_LAYER.set(check)
    try:
        yield
    finally:
        _ON_LAYER.reset(token)


def take_pending(layer_idx: int) -> SieveCache | None:
    """The SieveCache whose ``update`` ran just before this layer's attention call, or None for a forward pass
    that is not ours (another thread's plain use of the model). Inside a tokensieve block, no cache is an error."""
    pending = _PENDING.get()
    _PENDING.set(None)
    if pending is None or pending[1] != layer_idx:
        if _IN_CALL.get() == 0:
            return None
        raise RuntimeError(
            "tokensieve attention was called without a SieveCache. Use the Compressor's prefill/extend/decode, or "
            "call model.generate inside `with tokensieve.compress(model, ...)`, and keep use_cache=True."
        )
    return pending[0]


class _LayerView(CacheLayerMixin):
    """One layer of an :class:`HFSieveCache`: transformers only asks it for lengths."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, sieve: SieveCache, layer_idx: int) -> None:
        super().__init__()
        self.sieve = sieve
        self.layer_idx = layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.sieve.seq_length(self.layer_idx) + query_length, 0

    def get_seq_length(self) -> int:
        return self.sieve.seq_length(self.layer_idx)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("A tokensieve cache cannot be reset by transformers; start a new one.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.layer_idx == 0:  # the whole cache reorders once, when transformers asks its first layer
            self.sieve.reorder(beam_idx.to(torch.long))


class HFSieveCache(Cache):
    """The transformers ``Cache`` face of a :class:`SieveCache` (``.sieve``): it stores nothing itself."""

    def __init__(self, sieve: SieveCache) -> None:
        super().__init__(layers=[_LayerView(sieve, i) for i in range(len(sieve.layers))])
        self.sieve = sieve

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if _PENDING.get() is not None:  # the previous layer's attention did not take its record
            _PENDING.set(None)
            raise RuntimeError(
                "The model's attention is not routed through tokensieve, so it would attend to the new tokens only. "
                "Use the Compressor's prefill/extend/decode, or run the model inside `with tokensieve.compress(...)`."
            )
        _PENDING.set((self.sieve, layer_idx))
        return key_states, value_states


def hf_cache(sieve: SieveCache) -> HFSieveCache:
    """The (one) transformers view of a SieveCache, created on first use."""
    if not isinstance(sieve.front, HFSieveCache) or sieve.front.sieve is not sieve:
        sieve.front = HFSieveCache(sieve)
    return sieve.front


def sieve_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention function registered under ``"tokensieve"`` (signature of transformers' attention interface).

    query ``(B, H_q, L, D)``, key/value ``(B, H_kv, L, D)`` (the chunk's new states, post-RoPE). Returns the
    output as ``(B, L, H_q, D)`` and no attention weights.
    """
    layer_idx = int(getattr(module, "layer_idx", -1))
    cache = take_pending(layer_idx)
    seen = _HIDDEN.get()
    _HIDDEN.set(None)
    hidden = seen[1] if seen is not None and seen[0] == layer_idx else None
    check = _ON_LAYER.get()
    if check is not None and cache is not None:
        check()
    if scaling is None:
        scaling = float(getattr(module, "scaling", query.shape[-1] ** -0.5))
    mods = modifiers(module, kwargs)
    if cache is None:  # not ours: the model's own attention over its own cache's keys and values
        return plain_attention(query, key, value, attention_mask, scaling, mods).transpose(1, 2).contiguous(), None
    positions = kwargs.get("position_ids")  # (B|1, L) as the model rotated the chunk, when the model passes them
    out = cache.attend(layer_idx, query, key, value, attention_mask, scaling, positions, mods, hidden)  # (B,H_q,L,D)
    return out.transpose(1, 2).contiguous(), None


def modifiers(module: torch.nn.Module, kwargs: dict[str, Any]) -> Modifiers:
    """The per-layer attention modifiers a model passes to its attention function, or an error for one we do not
    honour (so that nothing is silently computed differently from the model's own attention)."""
    if getattr(module, "is_causal", True) is False:
        raise CapabilityError("This model's attention is bidirectional; tokensieve supports causal attention only.")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise CapabilityError("This model's attention has learned sink logits, which tokensieve does not support yet.")
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    return Modifiers(
        window=int(window) if window else None,
        softcap=float(softcap) if softcap else None,
    )


def padding_mask_only(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] | None = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor | None:
    """Mask "factory" for the tokensieve implementation: the 2-D padding mask itself (None if nothing is padded)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2 and bool(attention_mask.all()):
        return None
    return attention_mask


def register() -> None:
    """Register the attention function and its mask factory with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    check_versions()
    AttentionInterface.register(IMPLEMENTATION, sieve_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, padding_mask_only)
    _REGISTERED = True


@contextlib.contextmanager
def sieve_attention_enabled(model: Any) -> Iterator[None]:
    """Route the model's attention through tokensieve for the duration of the block.

    Safe from several threads at once: the model's attention implementation is switched when the first block
    enters and restored when the last one leaves (a count per model, under a lock); which cache a layer attends
    to is per thread (:data:`_PENDING`). A forward pass of the same model that is not ours (another thread using
    the plain model meanwhile) is computed by :func:`~tokensieve.attention.dense.plain_attention`, exactly as the
    model's own attention would.
    """
    register()
    key = id(model)
    with _ROUTING_LOCK:
        entry = _ROUTED.get(key)
        if entry is None:
            entry = _ROUTED[key] = [0, model.config._attn_implementation, _hidden_hooks(model)]
            if entry[1] != IMPLEMENTATION:
                model.set_attn_implementation(IMPLEMENTATION)
        entry[0] += 1
    token = _IN_CALL.set(_IN_CALL.get() + 1)
    try:
        yield
    finally:
        _IN_CALL.reset(token)
        with _ROUTING_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                del _ROUTED[key]
                for handle in entry[2]:
                    handle.remove()
                if entry[1] != IMPLEMENTATION:
                    model.set_attn_implementation(entry[1])


def attention_modules(model: Any) -> dict[int, torch.nn.Module]:
    """The decoder's attention modules by layer index: the text model's modules with a ``layer_idx`` and an output
    projection (``o_proj``, ``dense`` or ``c_proj``), as :func:`tokensieve.adapters.models.layer_weights` finds
    them."""
    text_model = model.get_decoder() if hasattr(model, "get_decoder") else model
    found: dict[int, torch.nn.Module] = {}
    for module in text_model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and idx not in found and any(hasattr(module, n) for n in ("o_proj", "dense", "c_proj")):
            found[idx] = module
    return found


def _hidden_hooks(model: Any) -> list[Any]:
    """Forward pre-hooks that hand each attention module's input hidden state to the attention call of the same
    layer (in the thread that runs the forward pass); removed when the routing ends."""

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = kwargs.get("hidden_states", args[0] if args else None)
        _HIDDEN.set((int(module.layer_idx), h) if isinstance(h, Tensor) else None)  # type: ignore[arg-type]

    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention_modules(model).values()]


@contextlib.contextmanager
def inject_cache(model: Any, new_cache: Callable[[], SieveCache]) -> Iterator[None]:
    """Give every forward call that starts without a cache (e.g. inside ``model.generate``) a fresh SieveCache.

    A forward pre-hook replaces a missing or empty, non-tokensieve ``past_key_values`` with the transformers view
    of ``new_cache()`` (and a SieveCache passed as ``past_key_values`` with its view); ``generate`` then keeps
    using the cache the model returns. The hook is removed when the block exits.
    """

    owner = object()  # forward calls of this thread (context) only: another thread's block has its own hook

    def hook(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if _INJECTING.get() is not owner:
            return args, kwargs
        pkv = kwargs.get("past_key_values")
        if isinstance(pkv, SieveCache):
            kwargs["past_key_values"] = hf_cache(pkv)
            return args, kwargs
        if kwargs.get("use_cache") is False or isinstance(pkv, HFSieveCache):
            return args, kwargs
        if pkv is None or (hasattr(pkv, "get_seq_length") and pkv.get_seq_length() == 0):
            kwargs["past_key_values"] = hf_cache(new_cache())
            kwargs["use_cache"] = True
        return args, kwargs

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    token = _INJECTING.set(owner)
    try:
        yield
    finally:
        _INJECTING.reset(token)
        handle.remove()
