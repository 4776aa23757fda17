"""TidalDecode: a few full-attention layers choose the positions every other layer attends to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...attention.decode import attention_with_probs
from ...attention.sparse import attend_slots
from ...cache.decode import DecodeLayer, DecodeMethod
from ...cache.storage import DenseKV, RowPaddedKV
from ...core.capabilities import Apply, Capabilities, Granularity, Phase
from ...core.context import ModelShape
from ...core.registry import register
from ...errors import ConfigError


@register
@dataclass(frozen=True)
class TidalDecode(DecodeMethod):
    """TidalDecode: position-persistent sparse attention — layers 0–1 are dense, a *selection layer* attends fully
    and picks the top tokens, and the following layers attend only to the tokens at those positions, with their own
    keys and values; a *re-selection layer* part-way up refreshes the positions (Yang et al., arXiv:2410.05076).

    Score (selection layers): ``s_j = Σ_{g ∈ group} softmax(q_g Kᵀ/√D)_j`` — top ``budget`` per KV head, kept as
    true positions; other layers map the positions to their own entries. Dense layers: ``0 … select_layer − 1``.

    Choices: positions are chosen per KV head from the group's summed attention (one gather per KV head); the
    re-selection layer defaults to 40 % of the depth (the scripts use layer 13 of 32); a layer that evicted some
    of the chosen positions at prefill attends to those it still holds. The budget counts attended tokens, a ratio
    meaning a share of the current cache. After a head-adaptive prefill (AdaKV, RazorAttention, …) each (sequence,
    KV head) row has its own length and its own budget (a ratio of its own length): the selection layer keeps the
    top ``budget`` of each row's own entries, and the other layers attend to the positions each of their rows holds.
    """

    name: ClassVar[str] = "tidaldecode"
    paper: ClassVar[str] = (
        "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse Attention (arXiv:2410.05076)"
    )
    rule: ClassVar[str] = "selection layers: top-k of sum_g softmax(q_g K^T); other layers reuse those positions"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.DECODE}), apply=Apply.SPARSE, granularity=Granularity.TOKEN, head_adaptive=True
    )
    select_layer: int = 2
    reselect_layer: int = -1  # -1: 40 % of the depth

    def __post_init__(self) -> None:
        if self.select_layer < 0:
            raise ConfigError("tidaldecode: select_layer must be >= 0.")

    def refusal(self, shape: ModelShape) -> str | None:
        if self.select_layer >= shape.num_layers:
            return (
                f"tidaldecode selects at layer select_layer={self.select_layer} and keeps the layers before it dense; "
                f"the model has {shape.num_layers} layers, so none would be sparse; use select_layer < "
                f"{shape.num_layers}."
            )
        if self.reselect_layer >= shape.num_layers:
            return (
                f"tidaldecode's reselect_layer={self.reselect_layer} is not a layer of the model (it has "
                f"{shape.num_layers}); use a layer index below {shape.num_layers}, or -1 (40 % of the depth)."
            )
        return super().refusal(shape)

    def reselect_at(self, num_layers: int) -> int:
        r = round(0.4 * num_layers) if self.reselect_layer < 0 else self.reselect_layer
        return max(r, self.select_layer)

    def step(self, layer: DecodeLayer, q: Tensor) -> Tensor:
        store, run, scaling, layer_idx = layer.store, layer.run, layer.scaling, layer.index
        n = store.n
        budget = run.tokens_for(n)
        row_budget: Tensor | None = None  # (B, H) per-row budgets of a head-adaptive store
        if isinstance(store, RowPaddedKV):
            lengths = store.lengths()
            row_budget = torch.tensor([[run.tokens_for(int(m)) for m in row] for row in lengths.tolist()])
            budget = int(row_budget.max())
            if bool((row_budget >= lengths).all()):
                budget = n  # every row's budget covers it: dense
        selecting = layer_idx in (self.select_layer, self.reselect_at(run.shape.num_layers))
        # a head-adaptive store's layers have different lengths: a selection layer that covers its own rows still
        # selects, for the layers after it that do not
        covered = budget >= n and not (selecting and row_budget is not None)
        if layer_idx < self.select_layer or covered:
            run.bytes_read += store.kv_bytes()
            return store.attend(q, scaling)
        B, Hq, _, D = q.shape
        H = store.keys.shape[1]
        qg = q.reshape(B, H, Hq // H, D)
        if selecting:
            out, probs = attention_with_probs(q, store.keys, store.values, store.attention_mask(1, Hq // H), scaling)
            run.bytes_read += store.kv_bytes()
            ranked = row_budget is not None
            top = probs.sum(2).topk(budget, dim=-1, sorted=ranked).indices  # (B, H, k) slots of this layer
            shared = top if store.identity_positions and not ranked else None  # slot = position in full caches
            chosen = store.positions.gather(2, top)
            if row_budget is not None:  # a row keeps its own top row_budget; -2 is a position no layer holds
                beyond = torch.arange(budget)[None, None, :] >= row_budget[..., None]
                chosen = chosen.masked_fill(beyond, -2)
            run.scratch["tidal"] = (run.step, chosen, shared, n)
            return out
        step, positions, shared, n_sel = run.scratch.get("tidal", (-1, None, None, 0))
        if step != run.step or positions is None:  # pragma: no cover - the selection layer always runs first
            raise RuntimeError("tidaldecode: no selection for this step")
        if shared is not None and store.identity_positions and n == n_sel:
            slots, found = shared, torch.ones_like(shared, dtype=torch.bool)
        else:
            slots, found = self._slots(store, positions)
        if isinstance(store, RowPaddedKV) and row_budget is not None:
            slots, found = self._covered_rows(store, row_budget, slots, found)
        newest = torch.full_like(slots[..., :1], n - 1)  # the current token is always attended
        has_newest = ((slots == n - 1) & found).any(-1, keepdim=True)
        slots = torch.cat([slots, newest], -1)
        keep = torch.cat([found, ~has_newest], -1)
        run.bytes_read += store.entry_bytes(slots.shape[-1])
        kbuf, vbuf = store.buffers
        return attend_slots(qg, kbuf, vbuf, slots, scaling, store.slot_mask(slots, keep)).reshape(B, Hq, 1, D)

    @staticmethod
    def _covered_rows(store: RowPaddedKV, row_budget: Tensor, slots: Tensor, found: Tensor) -> tuple[Tensor, Tensor]:
        """Rows of a head-adaptive store whose own budget covers their own length attend to all their entries (as
        they would in a batch of their sequence alone), whatever the other rows do."""
        lengths = store.lengths()
        covered = row_budget >= lengths  # (B, H)
        if not bool(covered.any()):
            return slots, found
        w = max(slots.shape[-1], int(lengths[covered].max()))
        if w > slots.shape[-1]:
            extra = w - slots.shape[-1]
            slots = torch.cat([slots, slots.new_zeros(*slots.shape[:-1], extra)], -1)
            found = torch.cat([found, found.new_zeros(*found.shape[:-1], extra)], -1)
        j = torch.arange(w, device=slots.device)
        own = (store.row_pad[..., None] + j).clamp(max=store.n - 1)
        slots = torch.where(covered[..., None], own, slots)
        found = torch.where(covered[..., None], j < lengths[..., None], found)
        return slots, found

    @staticmethod
    def _slots(store: DenseKV, positions: Tensor) -> tuple[Tensor, Tensor]:
        """This layer's slots holding ``positions`` ``(B, H, k)``, and whether it holds them (a layer may have
        evicted a position at prefill)."""
        pos = store.positions.long()  # (B, H, n)
        n = pos.shape[-1]
        if bool((pos[..., 1:] >= pos[..., :-1]).all()):  # ascending: the usual case, a binary search
            idx = torch.searchsorted(pos.contiguous(), positions.long().contiguous()).clamp(max=n - 1)
        else:
            order = pos.argsort(-1)
            sorted_pos = pos.gather(-1, order)
            idx = order.gather(-1, torch.searchsorted(sorted_pos, positions.long().contiguous()).clamp(max=n - 1))
        return idx, pos.gather(-1, idx) == positions.long()
