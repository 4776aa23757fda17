"""FASA: at every decode step, a few dominant RoPE frequency chunks per head predict which cached tokens matter;
full attention then runs over those tokens only. Nothing is evicted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...attention.sparse import attend_slots
from ...cache.decode import DecodeLayer, DecodeMethod
from ...core.capabilities import Apply, Capabilities, Granularity, Phase
from ...core.context import LayerContext, ModelShape
from ...core.method import dense_layers_refusal
from ...core.profiles import FrequencyChunks
from ...core.registry import register
from ...errors import ConfigError
from .fasa_prefill import chunk_dim_mask


@register
@dataclass(frozen=True)
class FASA(DecodeMethod):
    """FASA: Token Importance Prediction with each head's dominant RoPE frequency chunks, then Focused Attention over
    the top tokens, at every decode step (Wang et al., arXiv:2602.03152, ICLR 2026).

    Score (per decode step, per layer ≥ ``dense_layers``): ``S_j = Σ_{i ∈ I_dom(l, h)} q^{[i]} · k_j^{[i]}`` — the raw
    partial dot product (no scaling, no softmax) over the dominant chunks ``I_dom`` of the KV head, summed over the
    query heads of its group. Select: the top ``budget`` cached tokens per KV head (no forced sinks or window; the
    whole cache when it has no more than ``budget`` tokens). Apply: sparse — full-dimension attention over the
    selected tokens; the cache keeps every token (the paper's FASA-C).

    Profile (``tokensieve profile fasa``, shared with ``fasa_prefill``): the contextual agreement of every chunk per
    (layer, KV head); the dominant chunks are those with CA ≥ the head's ``quantile`` (0.8), clamped to
    ``[min_chunks, max_chunks]`` (8 of 32 chunks here, the paper's 16-of-64 ratio), from the CA slice whose K is
    nearest the step's budget.

    Choices: a frequency chunk is the RoPE rotation pair ``(i, i + D/2)`` of transformers' layout (the paper's
    definition; the official code pairs adjacent dimensions); tokens are selected per KV head from its query heads'
    summed partial scores, so each cached head is read once (the official code copies keys to every query head and
    lets each select alone, multiplying the cache by the group size); layer 0 (``dense_layers = 1``, as the code)
    attends densely. The budget counts attended tokens; a ratio means a share of the current cache. The bytes read
    per step are the dominant dimensions of every key plus the selected tokens' keys and values.
    """

    name: ClassVar[str] = "fasa"
    paper: ClassVar[str] = "FASA: Frequency-Aware Sparse Attention (arXiv:2602.03152)"
    rule: ClassVar[str] = "each step: S_j = sum over dominant RoPE chunks i of q^[i].k_j^[i]; attend the top tokens"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.DECODE}), apply=Apply.SPARSE, granularity=Granularity.TOKEN, profile="fasa"
    )
    quantile: float = 0.8
    min_chunks: int = 8
    max_chunks: int = 8
    dense_layers: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.quantile < 1 or not 1 <= self.min_chunks <= self.max_chunks or self.dense_layers < 0:
            raise ConfigError("fasa: 0 < quantile < 1, 1 <= min_chunks <= max_chunks and dense_layers >= 0.")

    def refusal(self, shape: ModelShape) -> str | None:
        return dense_layers_refusal(self.name, self.dense_layers, shape) or super().refusal(shape)

    def setup(self, layer: DecodeLayer, ctx: LayerContext | None) -> dict[str, Any]:
        return {"masks": {}}

    def _dims(self, layer: DecodeLayer, budget: int) -> Tensor:
        """``(H_kv, D)`` 0/1 mask of the dominant dimensions of this layer's KV heads for a budget."""
        masks = layer.run.scratch.setdefault("fasa", {})
        if budget not in masks:
            profile: FrequencyChunks = layer.run.profile
            D = layer.store.keys.shape[-1]
            masks[budget] = chunk_dim_mask(profile, budget, D, self.quantile, self.min_chunks, self.max_chunks)
        return masks[budget][layer.index]

    def step(self, layer: DecodeLayer, q: Tensor) -> Tensor:
        store, run = layer.store, layer.run
        B, Hq, _, D = q.shape
        H = store.keys.shape[1]
        n = store.n
        valid = store.valid  # (B, n) or None: left padding of a batch
        real = valid.sum(-1) if valid is not None else torch.full((B,), n)
        budgets = [run.tokens_for(int(r)) for r in real.tolist()]
        if layer.index < self.dense_layers or all(b >= int(r) for b, r in zip(budgets, real.tolist())):
            run.bytes_read += store.kv_bytes()
            return store.attend(q, layer.scaling)
        k = max(budgets)
        dims = self._dims(layer, k)  # (H_kv, D)
        qg = q.view(B, H, Hq // H, D)
        qs = qg.sum(2) * dims  # (B, H_kv, D): the group's query on the dominant dimensions only
        scores = torch.einsum("bhd,bhnd->bhn", qs, store.keys)  # (B, H_kv, n) partial logits, raw
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        slots = scores.topk(k, dim=-1).indices  # (B, H_kv, k), best first
        keep = torch.arange(k)[None, None, :] < torch.tensor(budgets)[:, None, None]  # each sequence's own budget
        keep = keep.expand(B, H, k)
        kbuf, vbuf = store.buffers
        out = attend_slots(qg, kbuf, vbuf, slots, layer.scaling, store.slot_mask(slots, keep))
        per_entry = store.entry_bytes(1) // 2  # keys of one entry in every row
        run.bytes_read += per_entry * n * int(dims[0].sum()) // D + 2 * per_entry * k  # dominant dims + K, V read
        return out.reshape(B, Hq, 1, D)
