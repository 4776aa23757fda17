"""TokenSelect: per-head q·k votes choose the tokens every head attends to; selections are reused while the
query stays similar."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ...attention.sparse import attend_slots
from ...cache.decode import DecodeLayer, DecodeMethod
from ...cache.storage import RowPaddedKV
from ...core.capabilities import Apply, Capabilities, Granularity, Phase
from ...core.context import LayerContext, ModelShape
from ...core.registry import register
from ...errors import ConfigError


@register
@dataclass(frozen=True)
class TokenSelect(DecodeMethod):
    """TokenSelect: every query head scores the candidate tokens with ``q·k``, the per-head softmaxes are summed
    (soft voting) into one ranking, and all heads of the layer attend to the first ``n_init`` tokens, the winners
    and the last ``n_local`` tokens (Wu et al., arXiv:2411.02886).

    Score: ``S_j = Σ_h softmax_j(q_h · K̃ᵀ)`` over candidates ``j ∈ [n_init, n − n_local)`` — raw ``q·k`` logits,
    without the ``1/√D`` of attention, as the official code; keep the top ``budget − n_init − n_local``. Selection
    cache (``reuse``, off by default as in the official release): the selection is recomputed only when the cosine
    similarity between the layer's mean query and the mean query at the last selection drops below ``theta`` (0.9,
    as the official code) — decided per sequence — when the cache changed by more than one appended token, or when
    the budget changed.

    Choices: query head ``h`` reads KV head ``h // G`` (transformers' order; the official kernel's ``h % H_kv`` is
    wrong for it); ``n_init`` = 16 and ``n_local`` = 64 (the paper's 128/512 are sized for 128K contexts), shrunk
    to at most 1/8 and 1/4 of the budget when the budget is small. Tokens
    that leave the local window between re-selections are attended again only after the next re-selection, as in
    the paper. The budget counts attended tokens, a ratio meaning a share of the current cache. Two departures we
    keep: tokens keep their true positions (the official code scores without positions and renumbers the selected
    tokens — our keys carry RoPE from the prefill, which cannot be undone cheaply); the prefill is dense (the official
    prefill is sparse, in 512-token chunks — sparse prefill is a separate concern of ours, not part of this method).
    After a head-adaptive prefill (AdaKV, RazorAttention, …) the KV heads of a layer may hold different tokens, so
    there is no position every head holds to rank layer-wide: each (sequence, KV head) row then ranks its own entries
    by the soft votes of its own query heads, with ``n_init`` / ``n_local`` and the budget taken of its own length
    (a sequence whose heads hold the same number of entries in a layer keeps the layer-wide vote there).
    """

    name: ClassVar[str] = "tokenselect"
    paper: ClassVar[str] = (
        "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs via Dynamic Token-Level "
        "KV Cache Selection (arXiv:2411.02886)"
    )
    rule: ClassVar[str] = "S_j = sum_h softmax(q_h K^T)_j, one ranking per layer; reuse while cos(q, q_sel) >= theta"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.DECODE}), apply=Apply.SPARSE, granularity=Granularity.LAYER, head_adaptive=True
    )
    n_init: int = 16
    n_local: int = 64
    theta: float = 0.9
    reuse: bool = False

    def __post_init__(self) -> None:
        if self.n_init < 0 or self.n_local < 1 or not -1.0 <= self.theta <= 1.0:
            raise ConfigError("tokenselect: n_init >= 0, n_local >= 1 and -1 <= theta <= 1 are required.")

    def refusal(self, shape: ModelShape) -> str | None:
        limit = shape.max_positions
        if limit and self.n_init + self.n_local >= limit:
            return (
                f"tokenselect always attends to the first n_init={self.n_init} and the last n_local={self.n_local} "
                f"tokens, which cover the model's whole context ({limit}), so it would never be sparse; keep "
                f"n_init + n_local well below {limit}."
            )
        return super().refusal(shape)

    def setup(self, layer: DecodeLayer, ctx: LayerContext | None) -> dict[str, Any]:
        return {"rows": {}, "recomputed": 0, "reused": 0}

    def on_append(self, layer: DecodeLayer, n_new: int) -> None:
        if n_new != 1:
            layer.state["rows"].clear()  # a chunk (e.g. a question) arrived: select again

    def step(self, layer: DecodeLayer, q: Tensor) -> Tensor:
        store = layer.store
        if isinstance(store, RowPaddedKV):  # head-adaptive rows: each row selects within its own entries
            G = q.shape[1] // store.keys.shape[1]
            outs = []
            for b, row in enumerate(store.row_pad.tolist()):
                if len(set(row)) == 1:  # this sequence's heads are even here: the layer-wide vote, as alone
                    outs.append(self._step(layer, q[b : b + 1], slice(b, b + 1), row[0]))
                    continue
                outs.append(torch.cat([self._step(layer, q[b : b + 1, h * G : (h + 1) * G], slice(b, b + 1), pad, h)
                                       for h, pad in enumerate(row)], 1))  # fmt: skip
            return torch.cat(outs, 0)
        if store.valid is None:  # every sequence starts at slot 0: one batched selection
            return self._step(layer, q, slice(None), 0)
        # left padding: each sequence selects among its own tokens, from its own first token, with its own budget
        pads = (~store.valid).sum(-1).tolist()
        return torch.cat([self._step(layer, q[b : b + 1], slice(b, b + 1), pads[b]) for b in range(len(pads))], 0)

    def _step(self, layer: DecodeLayer, q: Tensor, rows: slice, pad: int, h: int | None = None) -> Tensor:
        """One decode step for the sequences ``rows`` of the store (only KV head ``h`` of them, if given), whose
        real tokens are slots ``[pad, n)``."""
        store, run, scaling = layer.store, layer.run, layer.scaling
        state = layer.state["rows"].setdefault((rows.start, pad, h), {"q": None, "sel": None, "n": -1, "k": -1})
        n = store.n - pad  # real tokens of these sequences
        B, Hq, _, D = q.shape
        hs = slice(None) if h is None else slice(h, h + 1)
        kbuf, vbuf = store.buffers
        kbuf, vbuf = kbuf[rows, hs], vbuf[rows, hs]
        H = kbuf.shape[1]
        G = Hq // H
        # bytes of one entry in every head of B rows
        per_entry = store.entry_bytes(1) * B // store.keys.shape[0] * H // store.keys.shape[1]
        budget = run.tokens_for(n)
        qg = q.reshape(B, H, G, D)
        dev = q.device
        if budget >= n:  # the budget covers the cache: every real token, exactly dense attention
            run.bytes_read += per_entry * n
            if store.valid is None and h is None and rows.start is None:  # the whole store
                return store.attend(q, scaling)
            slots = (pad + torch.arange(n, device=dev)).expand(B, H, n)
            bias = store.bias
            mask = None if bias is None else bias[rows, hs].gather(2, slots)[:, :, None, :]
            return attend_slots(qg, kbuf, vbuf, slots, scaling, mask).reshape(B, Hq, 1, D)
        n_init = min(self.n_init, budget // 8)  # small budgets shrink the fixed windows, the vote keeps the rest
        n_local = max(1, min(self.n_local, budget // 4))
        k = budget - n_init - n_local
        cand_end = n - n_local
        q_mean = q[:, :, 0].mean(1)  # (B, D)
        valid_cache = self.reuse and state["sel"] is not None and state["k"] == k and state["n"] == n - 1
        if valid_cache:  # each sequence keeps its selection while its query stays similar
            stale = F.cosine_similarity(q_mean, state["q"], dim=-1) < self.theta  # (B,)
        else:
            stale = torch.ones(B, dtype=torch.bool, device=dev)
        if not bool(stale.any()):
            layer.state["reused"] += 1
        else:
            cand = kbuf[:, :, pad + n_init : pad + cand_end]  # (B, H, c, D)
            logits = torch.matmul(qg, cand.transpose(-1, -2))  # (B, H, G, c): raw q·k, as the official vote
            votes = torch.softmax(logits, dim=-1).sum(dim=(1, 2))  # (B, c): soft vote of every query head
            sel = votes.topk(k, dim=-1, sorted=False).indices + n_init  # (B, k), relative to the first real token
            if valid_cache:
                sel = torch.where(stale[:, None], sel, state["sel"])
                q_mean = torch.where(stale[:, None], q_mean, state["q"])
            state["sel"], state["q"], state["k"] = sel, q_mean, k
            layer.state["recomputed"] += 1
            run.bytes_read += per_entry * (cand_end - n_init) // 2  # keys only
        state["n"] = n
        run.bytes_read += per_entry * budget
        slots = pad + torch.cat(
            [
                torch.arange(n_init, device=dev).expand(B, -1),
                state["sel"],
                torch.arange(cand_end, n, device=dev).expand(B, -1),
            ],
            dim=1,
        )  # (B, budget), shared by every head
        slots = slots[:, None, :].expand(B, H, -1)
        bias = store.bias
        mask = None if bias is None else bias[rows, hs].gather(2, slots)[:, :, None, :]  # merged entries' logit bias
        out = attend_slots(qg, kbuf, vbuf, slots, scaling, mask)
        return out.reshape(B, Hq, 1, D)
