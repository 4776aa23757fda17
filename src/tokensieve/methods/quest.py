"""Quest: query-aware page selection from per-page key bounds, the cache kept whole."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention.sparse import page_bounds, slot_mask
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

    Score: ``U_p = Σ_d max(q_d · M_{p,d}, q_d · m_{p,d})`` — one matmul of ``[relu(q), −relu(−q)]`` with the
    page metadata ``[M, m]``. Select: the current (partial) last page plus the top ``max(min_pages, budget/page) − 1``
    other pages; attend exactly over every token of those pages. The first ``dense_layers`` layers (2, as in the
    paper) and prefill stay dense. Nothing is evicted; the metadata is 2 vectors per page (1/8 of the keys at 16
    tokens per page), counted by the benchmark as bytes read.

    Choices: GQA — one page set per KV head, from the maximum of its query heads' bounds, so each page is read
    once for the whole group; no forced first page (the sink page wins on its bound). The budget counts attended
    tokens; a ratio means a share of the current cache. Padding slots of a left-padded batch are never attended
    but count in the budget.
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
        return {"meta": None, "n": 0}

    # -- page metadata: meta[..., :D] = per-channel max, meta[..., D:] = per-channel min ---------------------------
    def on_append(self, layer_idx: int, store: DenseKV, state: dict[str, Any], n_new: int, run: DecodeRun) -> None:
        if layer_idx < self.dense_layers:
            return
        store.align(self.page)
        P, n = self.page, store.n
        cap_pages = store.capacity // P
        meta = state["meta"]
        if meta is None or n_new > 1 or state["n"] != n - n_new or meta.shape[2] != cap_pages:
            pmax, pmin = page_bounds(store.keys, n, P)  # (B, H, pages, D) each
            B, H, np_, D = pmax.shape
            meta = store.keys.new_zeros(B, H, cap_pages, 2 * D)
            meta[:, :, :np_] = torch.cat([pmax, pmin], -1)
            state["meta"] = meta
        else:  # one new token: fold it into its page
            s = n - 1
            k = store.keys[:, :, s]  # (B, H, D)
            kk = torch.cat([k, k], -1)
            if s % P == 0:
                meta[:, :, s // P] = kk
            else:
                cur = meta[:, :, s // P]
                D = k.shape[-1]
                meta[:, :, s // P] = torch.cat([torch.maximum(cur[..., :D], k), torch.minimum(cur[..., D:], k)], -1)
        state["n"] = n

    def step(self, layer_idx: int, q: Tensor, store: DenseKV, state: Any, run: DecodeRun, scaling: float) -> Tensor:
        n, P = store.n, self.page
        n_pages = -(-n // P)
        budget = run.budget.tokens_for(n) if run.budget is not None else int(run.budget_tokens.max())
        k = max(self.min_pages, -(-budget // P))
        if layer_idx < self.dense_layers or k >= n_pages:
            run.bytes_read += store.kv_bytes()
            return store.attend(q, scaling)
        B, Hq, _, D = q.shape
        H = store.keys.shape[1]
        qg = q.view(B, H, Hq // H, D)
        qq = torch.cat([F.relu(qg), -F.relu(-qg)], -1)  # (B, H, G, 2D)
        meta = state["meta"][:, :, : n_pages - 1]  # complete pages only
        bounds = torch.matmul(qq, meta.transpose(-1, -2)).amax(2)  # (B, H, pages-1)
        top = bounds.topk(k - 1, dim=-1, sorted=False).indices  # (B, H, k-1)
        pages = torch.cat([top, top.new_full((B, H, 1), n_pages - 1)], -1)  # the current page last
        base, mask = self._layout(store, run, B, H, k, n)
        if store.valid is not None or store.bias is not None:  # padding or merged entries: the general mask
            slots = (pages[..., None] * P + torch.arange(P, device=q.device)).view(B, H, k * P)
            mask = slot_mask(store, slots)
        flat = pages.view(B * H, k).add(base).view(-1)
        kp, vp = store.pages(P)
        K = kp.index_select(0, flat).view(B, H, k * P, D)
        V = vp.index_select(0, flat).view(B, H, k * P, D)
        out = F.scaled_dot_product_attention(qg, K, V, attn_mask=mask, scale=scaling)
        run.bytes_read += store.entry_bytes(k * P) + store.entry_bytes(n_pages - 1)  # pages + [M, m] metadata
        return out.view(B, Hq, 1, D)

    def _layout(self, store: DenseKV, run: DecodeRun, B: int, H: int, k: int, n: int) -> tuple[Tensor, Tensor | None]:
        """Row offsets into the page view and the mask of the gathered tokens, shared by every layer of a step."""
        key = ("quest", run.step, store.capacity, k, n, store.valid is None and store.bias is None)
        cached = run.scratch.get("quest")
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        P = self.page
        base = (torch.arange(B * H, device=store.keys.device) * (store.capacity // P))[:, None]
        tail = n - (-(-n // P) - 1) * P  # tokens in the last (current) page
        mask: Tensor | None = None
        if tail < P:
            m = torch.ones(k * P, dtype=torch.bool, device=store.keys.device)
            m[(k - 1) * P + tail :] = False
            mask = m.view(1, 1, 1, k * P)
        run.scratch["quest"] = (key, base, mask)
        return base, mask
