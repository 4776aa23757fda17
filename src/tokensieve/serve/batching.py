"""Continuous batching over per-sequence compressed caches: one forward pass steps every running sequence.

Each sequence keeps its own :class:`~tokensieve.engine.CachedContext` (its own :class:`SieveCache`, compressed
with its own spec, at its own length). A decode step stacks the sequences' next tokens into one ``(B, 1)`` batch
and runs the model once; the linear layers, norms and MLPs — nearly all of a small model's decode work — run
batched, and each layer's attention is handed, row by row, to that row's own cache (:class:`BatchedCaches`). No
sequence is padded to another's length and no cache is merged or split, so sequences join and leave the batch
between any two steps at no cost, and a sequence's attention sees exactly what it would see alone.

Alternative considered: left-padding every running sequence into one shared cache. Joining would then mean
re-padding every layer's store, leaving would mean compacting it, and sequences compressed with different specs (a
per-request spec) could not share one plan. The per-row attention call costs one kernel launch per sequence and
layer, which is small next to the batched projections at the batch sizes a 2-core CPU serves.

A step that also prefills a chunk of a prompt packs everything into one row instead (:func:`packed_step`, as vLLM
flattens a step's tokens): the decode rows' tokens and the chunk's tokens follow each other in one ``(1, T)``
sequence with each token's own position, so the projections, norms and MLP — which act on each token alone — run
once for the whole step, and each layer's attention is handed, segment by segment, to that segment's own cache
(:class:`PackedCaches`): a decode row's one token to its sequence's cache, the chunk to its prompt's staging cache.
The step then reads the model's weights once, not once for the decode rows and once more for the chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..adapters.hf import hf_cache, sieve_attention_enabled
from ..attention.dense import PLAIN, Modifiers
from ..cache.sieve_cache import SieveCache
from ..engine import CachedContext


class _CacheGroup(SieveCache):
    """What :class:`BatchedCaches` and :class:`PackedCaches` share: several sequences' caches run in one forward
    pass, none of them storing anything here; a part whose cache fails is recorded in :attr:`failures` and gets zeros
    from then on."""

    def __init__(self, caches: Sequence[SieveCache]) -> None:
        n = len(caches[0].layers)
        if any(len(c.layers) != n for c in caches):
            raise ValueError("Every cache of a step must belong to the same model (same number of layers).")
        super().__init__(n, None)
        self.caches = list(caches)
        self.failures: dict[int, Exception] = {}  # part → what its cache raised

    def seq_length(self, layer_idx: int = 0) -> int:
        # Only used by transformers for mask sizes; our attention ignores it (every part has its own length).
        return max(c.seq_length(layer_idx) for c in self.caches)

    def kv_bytes(self) -> int:
        return sum(c.kv_bytes() for c in self.caches)

    def _attend_part(self, i: int, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                     scaling: float, pos: Tensor | None, mods: Modifiers, h: Tensor | None) -> Tensor:  # fmt: skip
        """Part ``i`` attends over its own cache; zeros once its cache has failed (then recorded)."""
        if i in self.failures:
            return torch.zeros_like(q)
        try:
            return self.caches[i].attend(layer_idx, q, k, v, mask, scaling, pos, mods, h)
        except Exception as exc:  # this part's own cache failed: fail its request alone
            self.failures[i] = exc
            return torch.zeros_like(q)


class BatchedCaches(_CacheGroup):
    """Several sequences' caches seen by the model as one batch: row ``b`` of every layer is ``caches[b]``.

    The model asks this object (through its transformers view) for lengths and hands it every layer's attention;
    it splits the batch and lets each sequence's cache store the new keys/values and attend. It stores nothing.

    A row whose cache fails (its decode method raises while it scores or selects) is recorded in :attr:`failures`
    and gets zeros from then on, in this layer and every later one: the other rows never read it (the projections,
    norms and MLP act on each row alone, and each row attends only to its own cache), so they run on unchanged.
    """

    def __init__(self, caches: Sequence[SieveCache]) -> None:
        if not caches:
            raise ValueError("BatchedCaches needs at least one cache.")
        super().__init__(caches)

    def attend(
        self,
        layer_idx: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        padding_mask: Tensor | None,
        scaling: float,
        positions: Tensor | None = None,
        mods: Modifiers = PLAIN,
        hidden: Tensor | None = None,
    ) -> Tensor:
        """q ``(B, H_q, L, D)``, k/v ``(B, H_kv, L, D)`` (hidden ``(B, L, d)`` or None) with ``B == len(caches)``;
        returns ``(B, H_q, L, D)``."""
        B = q.shape[0]
        if len(self.caches) != B:
            raise RuntimeError(f"A batch of {B} rows was run over {len(self.caches)} caches.")
        outs = []
        for b in range(B):
            pos = None if positions is None else positions[b : b + 1] if positions.shape[0] == B else positions
            mask = None if padding_mask is None else padding_mask[b : b + 1]
            h = None if hidden is None else hidden[b : b + 1]
            row = slice(b, b + 1)
            outs.append(self._attend_part(b, layer_idx, q[row], k[row], v[row], mask, scaling, pos, mods, h))
        return torch.cat(outs, dim=0)


class PackedCaches(_CacheGroup):
    """Several sequences' new tokens packed into one row: the chunk's tokens come in segments of ``lengths[i]``
    tokens, one per cache, in order. Like :class:`BatchedCaches` it stores nothing, and a segment whose cache
    fails is recorded in :attr:`failures` and gets zeros from then on (no other segment reads it: every operation
    but attention acts on each token alone)."""

    def __init__(self, caches: Sequence[SieveCache], lengths: Sequence[int]) -> None:
        if not caches or len(caches) != len(lengths) or any(n < 1 for n in lengths):
            raise ValueError("PackedCaches needs one cache per segment and at least one token in each.")
        super().__init__(caches)
        self.sizes = [int(v) for v in lengths]  # tokens of each segment

    def attend(
        self,
        layer_idx: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        padding_mask: Tensor | None,
        scaling: float,
        positions: Tensor | None = None,
        mods: Modifiers = PLAIN,
        hidden: Tensor | None = None,
    ) -> Tensor:
        """q ``(1, H_q, T, D)``, k/v ``(1, H_kv, T, D)``, positions ``(1, T)`` (hidden ``(1, T, d)`` or None) with
        ``T == sum(lengths)``; returns ``(1, H_q, T, D)``."""
        if q.shape[0] != 1 or int(q.shape[2]) != sum(self.sizes):
            raise RuntimeError(f"A packed step of {tuple(q.shape)} was run over segments of {self.sizes} tokens.")
        if padding_mask is not None:
            raise RuntimeError("A packed step has no padding.")
        outs = []
        start = 0
        for i, n in enumerate(self.sizes):
            s, e = start, start + n
            start = e
            pos = None if positions is None else positions[:, s:e]
            h = None if hidden is None else hidden[:, s:e]
            part = (slice(None), slice(None), slice(s, e))
            outs.append(self._attend_part(i, layer_idx, q[part], k[part], v[part], None, scaling, pos, mods, h))
        return torch.cat(outs, dim=2)


@dataclass(frozen=True)
class Segment:
    """The tokens one sequence adds in a packed step: ``ids`` at true ``positions``, attended over ``cache``."""

    cache: SieveCache
    ids: list[int]
    positions: list[int]


@torch.inference_mode()
def packed_step(model: Any, segments: Sequence[Segment]) -> tuple[Tensor, dict[int, Exception]]:
    """Run every segment's tokens (a decode row's one token, a prompt's chunk) through the model in one forward pass
    of one packed row (:class:`PackedCaches`); each segment's cache stores its tokens' keys and values exactly as a
    pass of that sequence alone would.

    Returns the next-token logits after each segment's last token ``(S, V)``, and the segments whose own cache failed
    with what it raised (their logits are meaningless; their caches are to be dropped)."""
    if not segments:
        raise ValueError("packed_step needs at least one segment")
    for seg in segments:
        if len(seg.ids) != len(seg.positions) or not seg.ids:
            raise ValueError("a segment needs one position per token and at least one token")
    ids = torch.tensor([[t for seg in segments for t in seg.ids]], dtype=torch.long)  # (1, T)
    positions = torch.tensor([[p for seg in segments for p in seg.positions]], dtype=torch.long)  # (1, T)
    lengths = [len(seg.ids) for seg in segments]
    last = torch.tensor(lengths).cumsum(0) - 1  # (S,) each segment's last token
    packed = PackedCaches([seg.cache for seg in segments], lengths)
    with sieve_attention_enabled(model):
        out = model(
            input_ids=ids,
            attention_mask=None,  # no padding: every segment attends to its own cache
            position_ids=positions,
            past_key_values=hf_cache(packed),
            use_cache=True,
            logits_to_keep=last,
        )
    return out.logits[0].float(), dict(packed.failures)  # (S, V)


@torch.inference_mode()
def decode_step(model: Any, contexts: Sequence[CachedContext], tokens: Sequence[int]) -> dict[int, Exception]:
    """Append ``tokens[i]`` to ``contexts[i]`` for every running sequence in one forward pass of the model.

    Each context's cache, padding mask and next-token logits are updated in place, exactly as
    :meth:`Compressor.decode` updates a context for one step (so a sequence's tokens do not depend on what else is
    in the batch). Every context must hold one sequence (batch size 1).

    Returns the rows whose own cache failed during the step, with what it raised (see :class:`BatchedCaches`); their
    contexts are left as they are, to be dropped, and every other row is stepped as if they were not there.
    """
    if len(contexts) != len(tokens):
        raise ValueError("one next token per context")
    for ctx in contexts:
        if ctx.batch != 1:
            raise ValueError("decode_step batches single-sequence contexts")
    ids = torch.tensor([[int(t)] for t in tokens], dtype=torch.long)  # (B, 1)
    positions = torch.cat([ctx.next_positions() for ctx in contexts])[:, None]  # (B, 1) true positions
    batch = BatchedCaches([ctx.cache for ctx in contexts])
    with sieve_attention_enabled(model):
        out = model(
            input_ids=ids,
            attention_mask=None,  # no padding: every row attends to its own cache
            position_ids=positions,
            past_key_values=hf_cache(batch),
            use_cache=True,
            logits_to_keep=1,
        )
    logits = out.logits[:, -1].float()  # (B, V)
    for b, ctx in enumerate(contexts):
        if b in batch.failures:
            continue
        ctx.mask = torch.cat([ctx.mask, ctx.mask.new_ones(1, 1)], dim=1)
        ctx.logits = logits[b : b + 1]
    return dict(batch.failures)
