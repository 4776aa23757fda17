"""Quest: query-aware page selection from per-page key bounds, the cache kept whole."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ...attention import fused
from ...attention.sparse import attend_pages, attend_slots, page_bounds, page_meta, write_page_meta
from ...cache.decode import DecodeLayer, DecodeMethod, DecodeRun
from ...cache.storage import DenseKV, RowPaddedKV
from ...core.capabilities import Apply, Capabilities, Granularity, Phase
from ...core.context import LayerContext, ModelShape
from ...core.method import dense_layers_refusal
from ...core.registry import register
from ...errors import ConfigError


@register
@dataclass(frozen=True)
class Quest(DecodeMethod):
    """Quest: keys are stored in pages of ``page`` tokens with per-channel min and max; each decode step attends
    exactly over the pages whose upper bound on ``q·k`` is highest (Tang et al., arXiv:2406.10774).

    Score: ``U_p = Σ_d max(q_d · M_{p,d}, q_d · m_{p,d}) = relu(q)·(M_p − m_p) + q·m_p`` — one matmul of
    ``[relu(q), q]`` with the page metadata ``[M − m, m]``, written once per page when it fills. Select: the
    current (possibly partial) page plus the top ``max(min_pages, budget/page) − 1`` complete pages; attend
    exactly over every token of those pages. The first ``dense_layers`` layers (2, as in the
    paper) and prefill stay dense. Nothing is evicted; the metadata is 2 vectors per page (1/8 of the keys at 16
    tokens per page), counted by the benchmark as bytes read.

    Choices: GQA — ``group="per_head"`` (default, as the reference, which was written for multi-head models):
    every query head picks its own pages from its own bounds and attends over them, so a KV head's pages may be
    read for several of its query heads (the bytes read count each distinct page once); ``group="max"``: one page
    set per KV head from the maximum of its query heads' bounds, each page read once for the group (cheaper; the
    query with the largest norm then picks for the whole group). No forced first page (the sink page wins on its
    bound). The budget counts attended tokens; a ratio means a share of the current cache. In a left-padded batch
    each sequence's pages start at its first real token and its budget counts its real tokens only; after a
    head-adaptive prefill (AdaKV, RazorAttention, …: a :class:`~tokensieve.cache.storage.RowPaddedKV`) each
    (sequence, KV head) row pages its own entries from its first one, with a budget of its own length.
    """

    name: ClassVar[str] = "quest"
    paper: ClassVar[str] = "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference (arXiv:2406.10774)"
    rule: ClassVar[str] = "U_p = sum_d max(q_d M_pd, q_d m_pd); attend the top pages"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.DECODE}), apply=Apply.SPARSE, granularity=Granularity.PAGE, head_adaptive=True
    )
    page: int = 16
    min_pages: int = 3
    dense_layers: int = 2
    group: Literal["per_head", "max"] = "per_head"

    def __post_init__(self) -> None:
        if self.page < 1 or self.min_pages < 1 or self.dense_layers < 0:
            raise ConfigError("quest: page and min_pages must be >= 1, dense_layers >= 0.")

    def refusal(self, shape: ModelShape) -> str | None:
        why = dense_layers_refusal(self.name, self.dense_layers, shape)
        if why is not None:
            return why
        if shape.max_positions and self.page >= shape.max_positions:
            return (
                f"quest's pages of {self.page} tokens are as long as the model's whole context "
                f"({shape.max_positions}), so every step would attend to the whole cache; use a page of a few tokens "
                "(16, 32)."
            )
        return super().refusal(shape)

    def setup(self, layer: DecodeLayer, ctx: LayerContext | None) -> dict[str, Any]:
        layer.store.align(self.page)
        return {"meta": None, "complete": -1, "rows": {}}

    # -- page metadata: [M − m, m] of every *complete* page (attention.sparse.page_meta). The page holding the
    # newest token is always attended and needs no metadata; a page's column is written once, when it fills.
    def on_append(self, layer: DecodeLayer, n_new: int) -> None:
        if layer.index < self.dense_layers or layer.store.valid is not None or isinstance(layer.store, RowPaddedKV):
            # padded batches and head-adaptive rows: metadata per sequence / row, in step
            return
        store, state, P = layer.store, layer.state, self.page
        if store.capacity % P:
            store.align(P)
        complete = store.n // P
        meta = state["meta"]
        kbuf = store.buffers[0]
        if meta is None or meta.shape[-1] != store.capacity // P or complete - state["complete"] not in (0, 1):
            state["meta"] = page_meta(kbuf, complete, P)
        elif complete > state["complete"]:  # a page just filled
            write_page_meta(meta, kbuf, complete - 1, P)
        state["complete"] = complete

    def step(self, layer: DecodeLayer, q: Tensor) -> Tensor:
        store, run = layer.store, layer.run
        if isinstance(store, RowPaddedKV) and layer.index >= self.dense_layers:
            # head-adaptive rows: each (sequence, KV head) row pages its own entries, with its own budget
            pads = store.row_pad.tolist()
            G = q.shape[1] // store.keys.shape[1]
            return torch.cat([
                torch.cat([self._padded_row(layer, q[b : b + 1, h * G : (h + 1) * G], b, pad, h)
                           for h, pad in enumerate(row)], 1)
                for b, row in enumerate(pads)
            ], 0)  # fmt: skip
        if store.valid is not None and layer.index >= self.dense_layers:
            # left padding: each sequence pages its own tokens from its first one, with its own budget
            pads = (~store.valid).sum(-1).tolist()
            return torch.cat([self._padded_row(layer, q[b : b + 1], b, pads[b]) for b in range(len(pads))], 0)
        plan = self._step_plan(store, run)
        if layer.index < self.dense_layers or plan is None:
            run.bytes_read += store.kv_bytes()
            return store.attend(q, layer.scaling)
        cur, k, base, idx, mask, read = plan
        B, Hq, _, D = q.shape
        H = base.shape[0] // B
        qg = q.view(B, H, Hq // H, D)
        bounds = fused.page_bounds(qg, layer.state["meta"], cur)  # (B, H, G, cur): complete pages only
        if self.group == "per_head":
            if store.has_padding or store.has_bias:
                return self._per_head(layer, q, bounds, cur, k, 0)
            return self._per_head_pages(layer, q, bounds, cur, k)
        top = bounds.amax(2).topk(k - 1, dim=-1, sorted=False).indices.view(B * H, k - 1)
        torch.add(top, base, out=idx[:, : k - 1])  # the chosen pages; the current one sits in the last column
        if not (store.has_padding or store.has_bias) and fused.kernels() is not None:  # pages read in place
            kp, vp = store.pages(self.page)
            out, _ = fused.paged_attention(q.view(B * H, Hq // H, D), kp, vp, idx.view(B * H, 1, k), layer.scaling,
                                           per_row=store.capacity // self.page, limit=store.n)  # fmt: skip
            run.bytes_read += read
            return out.view(B, Hq, 1, D)
        if store.has_padding or store.has_bias:  # padding or merged entries: the general mask
            pages = idx.view(B, H, k) - base.view(B, H, 1)
            slots = (pages[..., None] * self.page + torch.arange(self.page, device=q.device)).view(B, H, -1)
            mask = store.slot_mask(slots)
        kbuf, vbuf = store.buffers
        out = attend_pages(qg, kbuf, vbuf, idx, self.page, layer.scaling, mask)
        run.bytes_read += read
        return out.view(B, Hq, 1, D)

    def _padded_row(self, layer: DecodeLayer, q: Tensor, b: int, pad: int, h: int | None = None) -> Tensor:
        """Sequence ``b`` of a left-padded batch (or only its KV head ``h``, for a head-adaptive store), whose real
        tokens are slots ``[pad, n)``: pages start at its first real token, so it reads exactly what it reads
        alone."""
        store, run, P = layer.store, layer.run, self.page
        n = store.n - pad
        _, Hq, _, D = q.shape
        hs = slice(None) if h is None else slice(h, h + 1)
        kbuf, vbuf = (x[b : b + 1, hs] for x in store.buffers)
        H = kbuf.shape[1]
        qg = q.view(1, H, Hq // H, D)
        per_entry = store.entry_bytes(1) // store.keys.shape[0] * H // store.keys.shape[1]  # one entry, H heads
        cur = (n - 1) // P  # the page of the newest token
        k = max(self.min_pages, -(-run.tokens_for(n) // P))
        if k > cur:  # the budget covers every page: dense over the sequence's own tokens
            slots = (pad + torch.arange(n, device=q.device)).expand(1, H, n)
            run.bytes_read += per_entry * n
        else:
            rs = layer.state["rows"].get((b, h))
            complete = n // P
            if rs is None or rs[0] != (pad, complete):  # a page filled: metadata of the sequence's complete pages
                meta = page_meta(kbuf[:, :, pad : pad + complete * P], complete, P)
                rs = layer.state["rows"][(b, h)] = ((pad, complete), meta)
            bounds = page_bounds(qg, rs[1][..., :cur])  # (1, H, G, cur)
            if self.group == "per_head":
                return self._per_head(layer, q, bounds, cur, k, pad, b, h)
            top = bounds.amax(2).topk(k - 1, dim=-1, sorted=False).indices  # (1, H, k-1)
            pages = torch.cat([top, torch.full_like(top[..., :1], cur)], -1)  # (1, H, k)
            slots = (pad + pages[..., None] * P + torch.arange(P, device=q.device)).view(1, H, k * P)
            run.bytes_read += per_entry * (k * P + cur)  # pages + [M − m, m] metadata
        keep = slots < store.n  # the current page may be partial
        slots = slots.clamp(max=store.n - 1)
        bias = store.bias
        mask: Tensor | None = None if bool(keep.all()) else keep[:, :, None, :]
        if bias is not None:
            bb = bias[b : b + 1, hs].gather(2, slots)[:, :, None, :]
            mask = bb if mask is None else torch.where(mask, bb, float("-inf"))
        return attend_slots(qg, kbuf, vbuf, slots, layer.scaling, mask).view(1, Hq, 1, D)

    def _per_head_pages(self, layer: DecodeLayer, q: Tensor, bounds: Tensor, cur: int, k: int) -> Tensor:
        """``group="per_head"`` over whole pages, each page read once per KV head: every query head picks its top
        pages. With the fused kernels (:mod:`tokensieve.attention.fused`) the union of the group's picks is read in
        place; otherwise it is gathered page by page (one ``index_select`` per K and V on the page view) and one
        SDPA attends each query head to its own pages (a mask over the union). The same attention as gathering every
        query head's pages separately, with fewer and larger copies."""
        store, run, P = layer.store, layer.run, self.page
        B, H, G, _ = bounds.shape
        D = q.shape[-1]
        top = bounds.topk(k - 1, dim=-1, sorted=False).indices  # (B, H, G, k-1) complete pages
        per_row_head = store.entry_bytes(1) // (store.keys.shape[0] * store.keys.shape[1])  # one entry of one row
        per_row = store.capacity // P
        if fused.kernels() is not None:  # the union of the group's pages read in place, each page once
            pages = torch.cat([top, torch.full_like(top[..., :1], cur)], -1)  # (B, H, G, k): + the current page
            pages += (torch.arange(B * H, device=q.device) * per_row).view(B, H, 1, 1)
            out, counts = fused.paged_attention(q.view(B * H, G, D), *store.pages(P), pages.view(B * H, G, k),
                                                layer.scaling, per_row=per_row, limit=store.n)  # fmt: skip
            run.bytes_read += per_row_head * (int(counts.sum()) * P + B * H * cur)  # distinct pages + metadata
            return out.reshape(B, H * G, 1, D)
        chosen = torch.zeros(B, H, G, cur + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(3, top, True)
        chosen[..., cur] = True  # the current (possibly partial) page, for every query head
        union = chosen.any(2)  # (B, H, cur+1): pages some query head of the group reads
        counts = union.sum(-1)  # (B, H)
        U = int(counts.max())
        order = union.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[..., :U]  # (B, H, U) page ids
        picked = chosen.gather(3, order[:, :, None, :].expand(B, H, G, U))  # (B, H, G, U)
        picked &= (torch.arange(U, device=q.device) < counts[..., None])[:, :, None, :]  # padding of the union
        slots = order[..., None] * P + torch.arange(P, device=q.device)  # (B, H, U, P)
        mask = (picked[..., None] & (slots < store.n)[:, :, None]).view(B, H, G, U * P)  # partial current page
        flat = (torch.arange(B * H, device=q.device)[:, None] * per_row + order.view(B * H, U)).view(-1)
        kp, vp = store.pages(P)
        K = kp.index_select(0, flat).view(B, H, U * P, D)
        V = vp.index_select(0, flat).view(B, H, U * P, D)
        run.bytes_read += per_row_head * (int(counts.sum()) * P + B * H * cur)  # distinct pages + metadata
        out = F.scaled_dot_product_attention(q.view(B, H, G, D), K, V, attn_mask=mask, scale=layer.scaling)
        return out.reshape(B, H * G, 1, D)

    def _per_head(
        self,
        layer: DecodeLayer,
        q: Tensor,
        bounds: Tensor,
        cur: int,
        k: int,
        pad: int,
        b: int | None = None,
        h: int | None = None,
    ) -> Tensor:
        """Each query head attends over its own top pages: bounds ``(B, H, G, cur)`` → output ``(B, H_q, 1, D)``.
        ``b`` selects one sequence of a padded batch (its real tokens start at slot ``pad``), ``h`` one KV head."""
        store, run, P = layer.store, layer.run, self.page
        B, H, G, _ = bounds.shape
        D = q.shape[-1]
        top = bounds.topk(k - 1, dim=-1, sorted=False).indices  # (B, H, G, k-1)
        pages = torch.cat([top, torch.full_like(top[..., :1], cur)], -1)  # (B, H, G, k): + the current page
        slots = (pad + pages[..., None] * P + torch.arange(P, device=q.device)).view(B, H, G * k * P)
        kbuf, vbuf = store.buffers
        rows = slice(None) if b is None else slice(b, b + 1)
        hs = slice(None) if h is None else slice(h, h + 1)
        kbuf, vbuf = kbuf[rows, hs], vbuf[rows, hs]
        keep = slots < store.n  # the current page may be partial
        slots = slots.clamp(max=store.n - 1)
        cap = kbuf.shape[2]
        flat = (torch.arange(B * H, device=q.device)[:, None] * cap + slots.view(B * H, -1)).view(-1)
        K = kbuf.reshape(-1, D).index_select(0, flat).view(B, H * G, k * P, D)
        V = vbuf.reshape(-1, D).index_select(0, flat).view(B, H * G, k * P, D)
        mask: Tensor | None = None if bool(keep.all()) else keep.view(B, H * G, 1, k * P)
        if store.bias is not None:
            bias = store.bias[rows, hs].gather(2, slots).view(B, H * G, 1, k * P)
            mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
        distinct = torch.zeros(B, H, cur + 1, dtype=torch.bool, device=q.device)
        distinct.scatter_(2, pages.view(B, H, G * k), True)
        per_row_head = store.entry_bytes(1) // (store.keys.shape[0] * store.keys.shape[1])  # one entry of one row
        run.bytes_read += per_row_head * int(distinct.sum()) * P + per_row_head * B * H * cur  # pages + metadata
        out = F.scaled_dot_product_attention(q.view(B, H * G, 1, D), K, V, attn_mask=mask, scale=layer.scaling)
        return out.view(B, H * G, 1, D)

    def _step_plan(self, store: DenseKV, run: DecodeRun) -> tuple[int, int, Tensor, Tensor, Tensor | None, int] | None:
        """Per-step constants shared by every layer with the same cache length: the current page, pages to read,
        row offsets into the page view, the index buffer (current page preset), the mask of the gathered tokens
        and the bytes read."""
        n, P = store.n, self.page
        key = (run.step, n, store.capacity)
        cached = run.scratch.get("quest")
        if cached is not None and cached[0] == key:
            return cached[1]
        cur = (n - 1) // P  # the page of the newest token
        budget = run.tokens_for(n)
        k = max(self.min_pages, -(-budget // P))
        plan = None
        if k <= cur:
            rows = store.buffers[0].shape[0] * store.buffers[0].shape[1]
            base = torch.arange(rows, device=store.buffers[0].device)[:, None] * (store.capacity // P)
            idx = torch.empty(rows, k, dtype=torch.long, device=base.device)
            idx[:, k - 1 :] = base + cur
            tail = n - cur * P  # tokens in the current page
            mask = None
            if tail < P:
                m = torch.ones(k * P, dtype=torch.bool, device=base.device)
                m[(k - 1) * P + tail :] = False
                mask = m.view(1, 1, 1, k * P)
            read = store.entry_bytes(k * P) + store.entry_bytes(cur)  # pages + [M − m, m] metadata
            plan = (cur, k, base, idx, mask, read)
        run.scratch["quest"] = (key, plan)
        return plan
