"""The only module that hooks into transformers' forward pass.

It uses public extension points only:

* ``AttentionInterface.register("tokensieve", ...)``: our attention function, which hands the layer's queries,
  keys and values to the :class:`~tokensieve.cache.SieveCache` that was just updated;
* ``AttentionMaskInterface.register("tokensieve", ...)``: the mask "factory" for that implementation returns the
  plain 2-D padding mask (our kernels build their own causal masks against the *stored* lengths);
* ``model.set_attn_implementation(...)`` inside a context manager that restores the previous implementation, and
  an optional forward pre-hook (removed in ``finally``) that gives ``model.generate`` a SieveCache.

Registration happens the first time a context is entered, never at import time. No model code is copied and no
state is stored on the model's modules or config beyond the attention-implementation switch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..cache.sieve_cache import SieveCache, take_pending
from ..compat import check_versions

IMPLEMENTATION = "tokensieve"
_REGISTERED = False


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
    if scaling is None:
        scaling = float(getattr(module, "scaling", query.shape[-1] ** -0.5))
    out = cache.attend(layer_idx, query, key, value, attention_mask, scaling)  # (B, H_q, L, D)
    return out.transpose(1, 2).contiguous(), None


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
    """Route the model's attention through tokensieve for the duration of the block."""
    register()
    previous = model.config._attn_implementation
    if previous == IMPLEMENTATION:  # nested use
        yield
        return
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def inject_cache(model: Any, new_cache: Callable[[], SieveCache]) -> Iterator[None]:
    """Give every forward call that starts without a cache (e.g. inside ``model.generate``) a fresh SieveCache.

    A forward pre-hook replaces a missing or empty, non-tokensieve ``past_key_values`` with ``new_cache()``;
    ``generate`` then keeps using the cache the model returns. The hook is removed when the block exits.
    """

    def hook(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        pkv = kwargs.get("past_key_values")
        if kwargs.get("use_cache") is False or isinstance(pkv, SieveCache):
            return args, kwargs
        if pkv is None or (hasattr(pkv, "get_seq_length") and pkv.get_seq_length() == 0):
            kwargs["past_key_values"] = new_cache()
            kwargs["use_cache"] = True
        return args, kwargs

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
