"""Quest: query-aware page selection from per-page key bounds, the cache kept whole."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..attention.sparse import attend_pages, page_bounds, quest_upper_bounds
from ..cache.storage import DenseKV, KVStore, as_dense
from ..core.capabilities import Apply, Capabilities, Granularity, Phase
from ..core.context import DecodeRun, LayerContext
from ..core.method import DecodeMethod
from ..core.registry import register
from ..errors import ConfigError


@register
@dataclass(frozen=True)
class Quest(DecodeMethod):
    """Quest: keys are stored in pages of ``page`` tokens with per-channel min and max; each decode step attends
    exactly over the pages whose upper bound on ``q·k`` is highest (Tang et al., arXiv:2406.10774).

    Score: ``U_p = Σ_d max(q_d · M_{p,d}, q_d · m_{p,d})`` — computed as ``clamp(q, min=0) @ Mᵀ + clamp(q, max=0)
    @ mᵀ``. Select: the top ``max(min_pages, budget / page)`` pages, the current (partial) last page always among
    them; attend exactly over every token of those pages. The first ``dense_layers`` layers (2, as in the paper)
    and prefill stay dense. Nothing is evicted; metadata is 2 vectors per page (1/8 of the keys at 16 tokens).

    Choices: GQA — one page set per KV head, from the maximum of its query heads' bounds (each page is read once
    for the whole group); no forced first page (the sink page is chosen when its bound is high, which it
    normally is). The budget counts attended tokens, a ratio meaning a share of the current cache.
    """

    name: ClassVar[str] = "quest"
    paper: ClassVar[str] = "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference (arXiv:2406.10774)"
    rule: ClassVar[str] = "U_p = sum_d max(q_d M_pd, q_d m_pd); attend the top pages"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.DECODE}), apply=Apply.SPARSE, granularity=Granularity.PAGE
    )
    page: int = 16
    min_pages: int = 3
    dense_layers: int = 2

    def __post_init__(self) -> None:
        if self.page < 1 or self.min_pages < 1 or self.dense_layers < 0:
            raise ConfigError("quest: page and min_pages must be >= 1, dense_layers >= 0.")

    def prepare(self, layer_idx: int, store: KVStore, run: DecodeRun) -> DenseKV:
        dense = as_dense(store, self.name)
        dense.align(self.page)
        return dense

    def init_state(self, layer_idx: int, ctx: LayerContext | None, store: Any, run: DecodeRun) -> dict[str, Any]:
        return {"pmax": None, "pmin": None, "n": 0}

    def on_append(self, layer_idx: int, store: DenseKV, state: dict[str, Any], n_new: int, run: DecodeRun) -> None:
        if layer_idx < self.dense_layers:
            return
        store.align(self.page)
        P, n = self.page, store.n
        if state["pmax"] is None or n_new > 1 or state["n"] != n - n_new:
            pmax, pmin = page_bounds(store.keys, n, P)
            cap_pages = store.capacity // P
            state["pmax"] = store.keys.new_zeros(*pmax.shape[:2], cap_pages, pmax.shape[-1])
            state["pmin"] = torch.zeros_like(state["pmax"])
            state["pmax"][:, :, : pmax.shape[2]] = pmax
            state["pmin"][:, :, : pmin.shape[2]] = pmin
        else:  # one token: update its page in place
            if state["pmax"].shape[2] < store.capacity // P:
                grow = store.capacity // P - state["pmax"].shape[2]
                for key in ("pmax", "pmin"):
                    a = state[key]
                    state[key] = torch.cat([a, a.new_zeros(*a.shape[:2], grow, a.shape[-1])], 2)
            s = n - 1
            p = s // P
            k = store.keys[:, :, s]  # (B, H, D)
            if s % P == 0:
                state["pmax"][:, :, p] = k
                state["pmin"][:, :, p] = k
            else:
                state["pmax"][:, :, p] = torch.maximum(state["pmax"][:, :, p], k)
                state["pmin"][:, :, p] = torch.minimum(state["pmin"][:, :, p], k)
        state["n"] = n

    def step(self, layer_idx: int, q: Tensor, store: DenseKV, state: Any, run: DecodeRun, scaling: float) -> Tensor:
        n = store.n
        P = self.page
        n_pages = -(-n // P)
        budget = run.budget.tokens_for(n) if run.budget is not None else int(run.budget_tokens.max())
        k = max(self.min_pages, -(-budget // P))
        if layer_idx < self.dense_layers or k >= n_pages:
            return store.attend(q, scaling)
        B, Hq, _, D = q.shape
        H = store.keys.shape[1]
        qg = q.reshape(B, H, Hq // H, D)
        bounds = quest_upper_bounds(qg, state["pmax"][:, :, :n_pages], state["pmin"][:, :, :n_pages]).amax(2)
        bounds[:, :, n_pages - 1] = float("inf")  # the current page is always attended
        pages = bounds.topk(k, dim=-1, sorted=False).indices  # (B, H, k)
        return attend_pages(qg, store, pages, P, scaling).reshape(B, Hq, 1, D)
