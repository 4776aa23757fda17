"""What a scorer sees: the per-layer context of one compression.

A :class:`LayerContext` is built by the attention hook for every layer while a prompt is compressed. It carries the
tensors the model already computed (post-RoPE queries and keys, values), the padding mask, and lazily computed,
memoised attention statistics that several scorers share (observation-window attention, accumulated attention).
None of it knows about budgets or the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..attention.dense import grouped_logits

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Rope:
    """One layer's rotary position embedding, as transformers applies it (the "rotate-half" layout).

    The first ``2 · len(inv_freq)`` channels of a query or key at position ``p`` are rotated:
    ``x' = scaling · (x ⊙ cos(p θ) + rotate_half(x) ⊙ sin(p θ))`` with ``θ = inv_freq`` repeated for both halves;
    the remaining channels (partial rotary) are left as they are.
    """

    inv_freq: tuple[float, ...]
    scaling: float = 1.0


class LayerWeights:
    """Read-only references to weights of the model's attention layers that some scorers read.

    Attributes:
        out_proj: per layer, the attention output projection as a ``(hidden, H_q · D)`` matrix (query head ``h``'s
            slice is columns ``h·D … (h+1)·D − 1``), or None where the adapter did not find it.

    Shared, never copied: a copied cache (``CachedContext.fork``) refers to the same weights.
    """

    def __init__(self, out_proj: tuple[Tensor | None, ...] = ()) -> None:
        self.out_proj = out_proj

    def __deepcopy__(self, memo: dict[int, Any]) -> LayerWeights:
        return self


@dataclass
class ModelShape:
    """The attention geometry of a model (what methods and profiles need to know about it)."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    key: str = "model"
    windows: tuple[int | None, ...] = ()  # each layer's sliding window (None: full attention); () = none anywhere
    softcap: float | None = None  # attention-logit soft-capping (Gemma-2)
    rope: tuple[Rope | None, ...] = ()  # each layer's rotary embedding (None: no rotation); () = not known
    hidden_size: int = 0  # width of the hidden state an attention layer reads (0 = not known)

    @property
    def modified(self) -> bool:
        """Some layer's attention is not plain causal softmax attention (a sliding window or soft-capping)."""
        return any(w is not None for w in self.windows) or self.softcap is not None

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def rope_of(self, layer: int) -> Rope | None:
        """Layer ``layer``'s rotary embedding (None: no rotation, or not known)."""
        return self.rope[layer] if self.rope else None


@dataclass
class RunState:
    """State of one compression run, shared by all layers (never stored on a method's config).

    Attributes:
        shape: the model's attention geometry.
        budget_tokens: ``(B,)`` average per-(layer, KV head) budget of each sequence, in tokens.
        n_tokens: ``(B,)`` number of real (non-padding) tokens being compressed per sequence.
        sink, recent: protected token counts resolved from the budget and the method.
        profile: a per-model profile the method asked for, if any.
        scratch: free space for methods that share results across layers.
        weights: weights of the model's attention layers some scorers read (CriticalKV), if the adapter found them.
    """

    shape: ModelShape
    budget_tokens: Tensor
    n_tokens: Tensor
    sink: int = 0
    recent: int = 0
    profile: Any = None
    scratch: dict[Any, Any] = field(default_factory=dict)
    weights: LayerWeights | None = None


@dataclass
class LayerContext:
    """Per-layer inputs of a scorer.

    Attributes:
        layer_idx: index of the decoder layer.
        queries: ``(B, H_q, Lq, D)`` post-RoPE queries of the **last** ``Lq <= T`` tokens (``Lq = T`` at prefill;
            a decode-time re-compression only has the queries of recent steps).
        keys: ``(B, H_kv, T, D)`` post-RoPE keys.
        values: ``(B, H_kv, T, D)`` values.
        valid: ``(B, T)`` bool, False at left padding.
        scaling: the softmax scale (usually ``D ** -0.5``).
        run: the run-wide state.
        tail: number of trailing *auxiliary* tokens in the chunk (e.g. DapQ's pseudo queries): they take part in
            attention but are never kept (see :attr:`selectable`).
        hidden: ``(B, T, d)`` the hidden state the attention layer read for each token of the chunk (its input, after
            the layer's input normalisation), or None where the adapter could not capture it (a learned scorer such
            as KVzap's surrogate reads it).
    """

    layer_idx: int
    queries: Tensor
    keys: Tensor
    values: Tensor
    valid: Tensor
    scaling: float
    run: RunState
    tail: int = 0
    hidden: Tensor | None = None
    _memo: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------------------ geometry
    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def num_q_heads(self) -> int:
        return self.queries.shape[1]

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def num_layers(self) -> int:
        return self.run.shape.num_layers

    @property
    def selectable(self) -> Tensor:
        """``(B, T)`` bool: tokens that may be kept — real tokens that are not auxiliary tail tokens."""
        if self.tail <= 0:
            return self.valid
        sel = self.valid.clone()
        sel[:, self.length - self.tail :] = False
        return sel

    @property
    def n_valid(self) -> Tensor:
        """``(B,)`` number of real tokens per sequence."""
        return self.valid.sum(-1)

    @property
    def positions(self) -> Tensor:
        """``(B, T)`` true positions (0 at each sequence's first real token), -1 at padding."""
        pos = self.valid.long().cumsum(-1) - 1
        return torch.where(self.valid, pos, torch.full_like(pos, -1))

    # ----------------------------------------------------------------------------------------------- reducers
    def to_kv_heads(self, x: Tensor, reduce: str = "mean") -> Tensor:
        """Aggregate query-head statistics per KV head: ``(B, H_q, ...) -> (B, H_kv, ...)``.

        Query head ``h`` belongs to KV head ``h // G`` (the order of transformers' ``repeat_kv``).
        """
        B = x.shape[0]
        grouped = x.reshape(B, self.num_kv_heads, self.group, *x.shape[2:])  # (B, H_kv, G, ...)
        if reduce == "mean":
            return grouped.mean(2)
        if reduce == "max":
            return grouped.amax(2)
        if reduce == "sum":
            return grouped.sum(2)
        raise ValueError(f"Unknown reduction {reduce!r}; use mean, max or sum.")

    # ------------------------------------------------------------------------------------------ attention stats
    def window_attention(self, window: int) -> Tensor:
        """Attention probabilities of the last ``window`` queries over all keys: ``(B, H_q, W, T)``.

        Causal inside the window and padding-masked; softmax over all keys (window keys included). Rows of padding
        queries (a sequence shorter than the window) are all zero. Memoised.
        """
        W = max(1, min(int(window), self.queries.shape[2]))
        key = ("window", W)
        if key not in self._memo:
            T = self.length
            q = self.queries[:, :, self.queries.shape[2] - W :]  # (B, H_q, W, D)
            logits = grouped_logits(q, self.keys, self.scaling)  # (B, H_q, W, T)
            qpos = torch.arange(T - W, T, device=q.device)
            kpos = torch.arange(T, device=q.device)
            allowed = (kpos[None, :] <= qpos[:, None])[None, None] & self.valid[:, None, None, :]
            logits = logits.masked_fill(~allowed, NEG_INF)
            # padding queries (a sequence shorter than the window) see no key: their rows are 0, not NaN
            self._memo[key] = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
        return self._memo[key]

    def accumulated_attention(self, chunk: int = 512) -> Tensor:
        """Attention each key receives, summed over every query that can see it: ``(B, H_q, T)``.

        Computed in query chunks so that no ``T x T`` tensor per head is ever allocated. Memoised.
        """
        key = ("accumulated", 0)
        if key not in self._memo:
            B, Hq, Lq, _ = self.queries.shape
            T = self.length
            off = T - Lq  # the queries belong to the last Lq tokens
            total = torch.zeros(B, Hq, T, dtype=torch.float32, device=self.queries.device)
            kpos = torch.arange(T, device=self.queries.device)
            for s in range(0, Lq, chunk):
                e = min(Lq, s + chunk)
                logits = grouped_logits(self.queries[:, :, s:e], self.keys[:, :, : off + e], self.scaling)
                qpos = torch.arange(off + s, off + e, device=self.queries.device)
                allowed = (kpos[None, : off + e] <= qpos[:, None])[None, None] & self.valid[:, None, None, : off + e]
                probs = torch.softmax(logits.masked_fill(~allowed, NEG_INF), dim=-1)
                probs = torch.nan_to_num(probs, nan=0.0)  # padding queries see no key and contribute nothing
                total[..., : off + e] += probs.sum(2).float()
            self._memo[key] = total
        return self._memo[key]
