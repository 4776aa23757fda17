"""KVzip: score every cached entry by how much the model needs it to repeat the context — query-agnostic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ...core.capabilities import Apply, Capabilities, Phase
from ...core.context import LayerContext
from ...core.method import AuxPass, PrefillMethod, PromptText
from ...core.registry import register
from ...errors import CapabilityError, ConfigError
from ...scorers.reconstruction import reconstruction_scores
from ...selection.allocation import pooled_counts

FIRST = "\n\nRepeat the previous context exactly."
NEXT = "\n\nRepeat the part of the previous context exactly, starting with "
OVERLAP = 8  # tokens of the previous chunk quoted in the instruction of the next one


@register
@dataclass(frozen=True)
class KVzip(PrefillMethod):
    """KVzip: after the context is prefilled, the model is made to repeat it (teacher-forced, chunk by chunk, over the
    full cache); an entry's importance is the largest attention any reconstruction query pays it. What the model needs
    to rebuild the context is what any later question will need (Kim et al., "KVzip: Query-Agnostic KV Cache
    Compression with Context Reconstruction", arXiv:2505.23416).

    Score: ``s_{l,h,j} = max_{i ∈ repeat pass, g ∈ group(h)} softmax(q_i Kᵀ/√D)_j`` with the softmax over the sinks,
    the chunk being repeated and the pass's own tokens (causal) only. Select: the ``L · H_kv · b`` highest scores of
    the whole model, pooled over layers, heads and tokens (``allocation="global"``, the paper's; ``"uniform"``: the
    top ``b`` of each head).

    Choices: the repeat pass of chunk 0 is ``"\\n\\nRepeat the previous context exactly."`` + the chat template's reply
    header + the chunk, of chunk ``i > 0`` ``"…, starting with "`` + the last 8 tokens of chunk ``i − 1`` + header +
    the chunk (the official code's); chunks of 2048 tokens (kvpress; the official uses 2000); one forward pass per
    chunk over the prompt's full cache, positions following the prompt, forgotten afterwards. The whole prompt after
    its first ``sink`` tokens is reconstructed — the sinks (4, as kvpress; the official code protects the system
    prompt, which a method cannot tell from the ids) are kept and are the only other keys in the softmax. Without a
    tokenizer (a model built in memory) the instruction and header cannot be written, and each pass is the previous
    chunk's last 8 tokens (none for the first) and the chunk. Float32 softmax (the official code uses the model's
    dtype). Needs :meth:`tokensieve.Compressor.prefill`, which runs the passes (2–3× the prefill's cost); inside
    ``model.generate`` it raises.
    """

    name: ClassVar[str] = "kvzip"
    paper: ClassVar[str] = "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction (arXiv:2505.23416)"
    rule: ClassVar[str] = "s_j = max over repeat-pass queries and the group of softmax(q K^T/sqrt(D))_j; global top-k"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}),
        apply=Apply.EVICT,
        needs_attention=True,
        head_adaptive=True,
        layer_adaptive=True,
        deferred=True,
        passes=True,
        rescorable=False,
    )
    sink: int = 4
    chunk: int = 2048
    allocation: Literal["global", "uniform"] = "global"

    def __post_init__(self) -> None:
        if self.sink < 0 or self.chunk < 1:
            raise ConfigError(f"kvzip: sink must be >= 0 and chunk >= 1; got {self.sink}, {self.chunk}.")

    def protected(self) -> tuple[int, int]:
        return self.sink, 0

    # -- the reconstruction passes ----------------------------------------------------------------------------------
    def prefill_passes(self, input_ids: Tensor, attention_mask: Tensor, text: PromptText | None) -> list[AuxPass]:
        first = text.encode(FIRST) if text is not None else None
        nxt = text.encode(NEXT) if text is not None else None
        header = (text.reply_header() if text is not None else None) or []
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
        spans = [[(s, min(s + self.chunk, len(r))) for s in range(self.sink, len(r), self.chunk)] for r in rows]
        passes = []
        for c in range(max((len(s) for s in spans), default=0)):
            seqs: list[list[int]] = []
            info: list[tuple[int, int] | None] = []
            for r, sp in zip(rows, spans):
                if c >= len(sp):  # this sequence has no chunk c: one throw-away token, never observed
                    seqs.append(r[-1:])
                    info.append(None)
                    continue
                s, e = sp[c]
                if c == 0:
                    lead = first or []
                else:
                    quote = r[max(s - OVERLAP, sp[c - 1][0]) : s]
                    lead = (nxt or []) + quote
                seqs.append(lead + header + r[s:e])
                info.append((s, e))
            n = max(len(x) for x in seqs)
            ids = input_ids.new_zeros(len(seqs), n)
            mask = attention_mask.new_zeros(len(seqs), n)
            for b, x in enumerate(seqs):
                ids[b, n - len(x) :] = torch.tensor(x, dtype=ids.dtype)
                mask[b, n - len(x) :] = 1
            passes.append(AuxPass(ids, mask, tuple(info)))
        return passes

    def observe_pass(
        self, ctx: LayerContext, scores: Tensor, aux: AuxPass, queries: Tensor, keys: Tensor, valid: Tensor
    ) -> None:
        for b, span in enumerate(aux.info):
            if span is None:
                continue
            s, e = span
            real = ctx.valid[b].nonzero().flatten()  # the prompt's real tokens, in order
            cols = real[s:e]
            sinks = real[: min(self.sink, s)]
            mine = valid[b].bool()
            q = queries[b][:, mine]  # (H_q, N, D)
            scores[b][:, cols] = reconstruction_scores(
                q, ctx.keys[b][:, sinks], ctx.keys[b][:, cols], keys[b][:, mine], ctx.scaling
            ).to(scores.dtype)
        ctx.run.scratch[("kvzip", "observed")] = True

    # -- score, allocate ----------------------------------------------------------------------------------------------
    def score(self, ctx: LayerContext) -> Tensor:
        scores = torch.zeros(ctx.batch, ctx.num_kv_heads, ctx.length)
        ctx.run.scratch[("kvzip", ctx.layer_idx)] = scores  # filled in place by the passes
        if bool((ctx.selectable.sum(-1) > self.sink).any()):
            ctx.run.scratch[("kvzip", "needs passes")] = True
        return scores

    def layer_counts(self, ctx: LayerContext) -> Tensor:
        if ctx.run.scratch.get(("kvzip", "needs passes")) and not ctx.run.scratch.get(("kvzip", "observed")):
            raise CapabilityError(
                "kvzip scores the context by making the model repeat it, in passes that tokensieve.Compressor.prefill "
                "runs; it cannot run inside model.generate. Use press.prefill / press.decode (or the CLI)."
            )
        if self.allocation == "uniform":
            return super().layer_counts(ctx)
        key = ("kvzip", "plan")
        if key not in ctx.run.scratch:
            L, H, T = ctx.num_layers, ctx.num_kv_heads, ctx.length
            first = ctx.valid.long().cumsum(-1)
            rows = []
            for b in range(ctx.batch):
                s = torch.stack([ctx.run.scratch[("kvzip", layer)][b] for layer in range(L)]).float()  # (L, H, T)
                s = s.masked_fill((first[b] <= ctx.run.sink) & ctx.valid[b], float("inf"))  # sinks first
                s = s.masked_fill(~ctx.selectable[b], float("-inf"))
                rows.append(pooled_counts(s.reshape(L * H, T), L * H * int(ctx.run.budget_tokens[b])).reshape(L, H))
            ctx.run.scratch[key] = torch.stack(rows)  # (B, L, H)
        return ctx.run.scratch[key][:, ctx.layer_idx].clone()
