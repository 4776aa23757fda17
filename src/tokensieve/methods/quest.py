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
        P, n = self.page, store.n
        if store.capacity % P:
            store.align(P)
        cap_pages = store.capacity // P
        meta = state["meta"]
        if meta is None or n_new > 1 or state["n"] != n - n_new or meta.shape[2] != cap_pages:
            pmax, pmin = page_bounds(store.keys, n, P)  # (B, H, pages, D) each
            B, H, np_, D = pmax.shape
            meta = store.keys.new_zeros(B, H, cap_pages, 2 * D)
            meta[:, :, :np_] = torch.cat([pmax, pmin], -1)
            state["meta"] = meta
        else:  # one new token: fold it into its page, in place
            s = n - 1
            k = store.buffers[0][:, :, s]  # (B, H, D)
            page = meta[:, :, s // P]  # (B, H, 2D) view
            D = k.shape[-1]
            if s % P == 0:
                page[..., :D] = k
                page[..., D:] = k
            else:
                hi, lo = page[..., :D], page[..., D:]
                torch.maximum(hi, k, out=hi)
                torch.minimum(lo, k, out=lo)
        state["n"] = n

    def step(self, layer_idx: int, q: Tensor, store: DenseKV, state: Any, run: DecodeRun, scaling: float) -> Tensor:
        plan = self._step_plan(store, run)
        if layer_idx < self.dense_layers or plan is None:
            run.bytes_read += store.kv_bytes()
            return store.attend(q, scaling)
        n_pages, k, base, last, mask, read = plan
        B, Hq, _, D = q.shape
        H = base.shape[0] // B
        qg = q.view(B, H, Hq // H, D)
        qq = torch.cat([F.relu(qg), qg.clamp(max=0)], -1)  # (B, H, G, 2D)
        bounds = torch.matmul(qq, state["meta"][:, :, : n_pages - 1].transpose(-1, -2))  # (B, H, G, pages-1)
        top = bounds.amax(2).topk(k - 1, dim=-1, sorted=False).indices.view(B * H, k - 1)
        flat = torch.cat([top + base, last], 1).view(-1)  # the chosen pages, then the current one
        kp, vp = store.pages(self.page)
        K = kp.index_select(0, flat).view(B, H, k * self.page, D)
        V = vp.index_select(0, flat).view(B, H, k * self.page, D)
        if store.has_padding or store.has_bias:  # padding or merged entries: the general mask
            pages = flat.view(B, H, k) - base.view(B, H, 1)
            slots = (pages[..., None] * self.page + torch.arange(self.page, device=q.device)).view(B, H, -1)
            mask = slot_mask(store, slots)
        out = F.scaled_dot_product_attention(qg, K, V, attn_mask=mask, scale=scaling)
        run.bytes_read += read
        return out.view(B, Hq, 1, D)

    def _step_plan(self, store: DenseKV, run: DecodeRun) -> tuple[int, int, Tensor, Tensor, Tensor | None, int] | None:
        """Per-step constants shared by every layer with the same cache length: page count, pages to read, row
        offsets into the page view, the current page's flat index, the mask of the gathered tokens, bytes read."""
        n, P = store.n, self.page
        key = (run.step, n, store.capacity)
        cached = run.scratch.get("quest")
        if cached is not None and cached[0] == key:
            return cached[1]
        n_pages = -(-n // P)
        budget = run.budget.tokens_for(n) if run.budget is not None else int(run.budget_tokens.max())
        k = max(self.min_pages, -(-budget // P))
        plan = None
        if k < n_pages:
            rows = store.buffers[0].shape[0] * store.buffers[0].shape[1]
            base = torch.arange(rows, device=store.buffers[0].device)[:, None] * (store.capacity // P)
            last = base + (n_pages - 1)
            tail = n - (n_pages - 1) * P  # tokens in the current page
            mask = None
            if tail < P:
                m = torch.ones(k * P, dtype=torch.bool, device=base.device)
                m[(k - 1) * P + tail :] = False
                mask = m.view(1, 1, 1, k * P)
            read = store.entry_bytes(k * P) + store.entry_bytes(n_pages - 1)  # pages + [M, m] metadata
            plan = (n_pages, k, base, last, mask, read)
        run.scratch["quest"] = (key, plan)
        return plan
