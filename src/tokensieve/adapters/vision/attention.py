"""Attention rows on demand: the probabilities of a few query rows (CLS, the last prompt token) in chosen layers,
computed for those rows only, while every attention call still runs through SDPA (or tokensieve's cache).

:func:`rows_routed` switches the attention implementation of the given attention modules' configs to
``"tokensieve_rows"`` for the duration of a block and restores it afterwards; :func:`rows_attention`, registered
under that name, looks up the request of the current context (:class:`RowRequest`), records
``softmax(q_rows · Kᵀ · scale + mask_rows)`` (and, if asked, the keys) for the modules it names, and hands the call to
the delegate (transformers' SDPA function, or tokensieve's cache attention for a language model on a SieveCache).

The switch changes the model's configs for the duration of the block: another thread running the same model's plain
forward meanwhile would also go through :func:`rows_attention` (which then only delegates to SDPA, so its results do
not change beyond SDPA-vs-eager rounding).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

IMPLEMENTATION = "tokensieve_rows"
_REQUEST: contextvars.ContextVar[RowRequest | None] = contextvars.ContextVar("tokensieve_rows", default=None)
_REGISTERED = False


@dataclass
class RowRequest:
    """Which rows to record, per attention module (``id(module)`` → ``"first"`` or ``"last"``), what was recorded,
    and which modules attend through a delegate other than SDPA."""

    rows: dict[int, str] = field(default_factory=dict)
    keys: set[int] = field(default_factory=set)
    probs: dict[int, Tensor] = field(default_factory=dict)  # (B, H_q, S) per module
    recorded_keys: dict[int, Tensor] = field(default_factory=dict)  # (B, H_kv, S, D)
    delegates: dict[int, Callable[..., Any]] = field(default_factory=dict)
    #: modules whose last ``q`` query rows to record as ``(B, H_q, q, S)`` (``tail_probs``)
    tails: dict[int, int] = field(default_factory=dict)
    tail_probs: dict[int, Tensor] = field(default_factory=dict)
    #: modules whose attention averaged over every query row to record as ``(B, H_q, S)`` (``mean_probs``)
    means: set[int] = field(default_factory=set)
    mean_probs: dict[int, Tensor] = field(default_factory=dict)
    values: set[int] = field(default_factory=set)
    recorded_values: dict[int, Tensor] = field(default_factory=dict)  # (B, H_kv, S, D)


def _sdpa(*args: Any, **kwargs: Any) -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


def span_probs(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    i0: int,
    i1: int,
) -> Tensor:
    """``(B, H_q, i1 − i0, S)`` attention probabilities of the query rows ``[i0, i1)`` of the chunk over all keys,
    with the mask the attention call was given (4-D additive/boolean, 2-D padding, or None: causal if the module is
    causal)."""
    B, Hq, L = query.shape[:3]
    Hkv, S = key.shape[1], key.shape[2]
    q = query[:, :, i0:i1].float()  # (B, Hq, R, D)
    k = key.float().repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, S, D)
    logits = (q @ k.transpose(-1, -2)) * scaling  # (B, Hq, R, S)
    if attention_mask is not None and attention_mask.dim() == 4:
        m = attention_mask[:, :, i0:i1] if attention_mask.shape[2] > 1 else attention_mask
        m = m[..., -S:]  # (B, 1|H, R|1, S)
        if m.dtype == torch.bool:
            logits = logits.masked_fill(~m, float("-inf"))
        else:
            logits = logits + m.float()
    else:
        allowed = torch.ones(B, 1, i1 - i0, S, dtype=torch.bool, device=query.device)
        if attention_mask is not None and attention_mask.dim() == 2:
            allowed &= attention_mask[:, None, None, -S:].to(torch.bool)
        if getattr(module, "is_causal", False):
            rows = torch.arange(i0, i1, device=query.device)[:, None] + (S - L)
            allowed &= (torch.arange(S, device=query.device)[None, :] <= rows)[None, None]
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1)


def row_probs(
    module: torch.nn.Module, query: Tensor, key: Tensor, attention_mask: Tensor | None, scaling: float, which: str
) -> Tensor:
    """``(B, H_q, S)`` attention probabilities of one query row (``"first"`` or ``"last"`` of the chunk)."""
    L = int(query.shape[2])
    i = 0 if which == "first" else L - 1
    return span_probs(module, query, key, attention_mask, scaling, i, i + 1)[:, :, 0]


def mean_probs(
    module: torch.nn.Module, query: Tensor, key: Tensor, attention_mask: Tensor | None, scaling: float
) -> Tensor:
    """``(B, H_q, S)`` the attention every key receives, averaged over all query rows (computed in blocks of rows)."""
    L = int(query.shape[2])
    total: Tensor | None = None
    for i0 in range(0, L, 256):
        part = span_probs(module, query, key, attention_mask, scaling, i0, min(L, i0 + 256)).sum(2)
        total = part if total is None else total + part
    assert total is not None
    return total / L


def rows_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Any]:
    """The attention function registered as ``"tokensieve_rows"`` (transformers' attention-interface signature)."""
    req = _REQUEST.get()
    if scaling is None:
        scaling = float(getattr(module, "scaling", query.shape[-1] ** -0.5))
    delegate: Callable[..., Any] = _sdpa
    if req is not None:
        key_id = id(module)
        which = req.rows.get(key_id)
        if which is not None:
            req.probs[key_id] = row_probs(module, query, key, attention_mask, scaling, which)
        tail = req.tails.get(key_id)
        if tail is not None:
            L = int(query.shape[2])
            req.tail_probs[key_id] = span_probs(module, query, key, attention_mask, scaling, L - min(tail, L), L)
        if key_id in req.means:
            req.mean_probs[key_id] = mean_probs(module, query, key, attention_mask, scaling)
        if key_id in req.keys:
            req.recorded_keys[key_id] = key.detach()
        if key_id in req.values:
            req.recorded_values[key_id] = value.detach()
        delegate = req.delegates.get(key_id, _sdpa)
    return delegate(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, rows_attention)
    _REGISTERED = True


@contextlib.contextmanager
def rows_routed(modules: list[torch.nn.Module], request: RowRequest) -> Iterator[RowRequest]:
    """Route the attention of ``modules`` (attention modules with a ``config``) through :func:`rows_attention` with
    ``request`` for the block; the configs' implementations are restored afterwards."""
    register()
    configs: dict[int, Any] = {}
    for m in modules:
        cfg = getattr(m, "config", None)
        if cfg is not None:
            configs[id(cfg)] = cfg
    saved = {k: cfg._attn_implementation_internal for k, cfg in configs.items()}
    token = _REQUEST.set(request)
    try:
        for cfg in configs.values():
            cfg._attn_implementation_internal = IMPLEMENTATION
        yield request
    finally:
        for k, cfg in configs.items():
            cfg._attn_implementation_internal = saved[k]
        _REQUEST.reset(token)


@contextlib.contextmanager
def scoped_request(request: RowRequest) -> Iterator[RowRequest]:
    """Make ``request`` the current one for the block (inside :func:`rows_routed`, which switched the modules)."""
    token = _REQUEST.set(request)
    try:
        yield request
    finally:
        _REQUEST.reset(token)
