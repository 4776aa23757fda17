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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..adapters.hf import hf_cache, sieve_attention_enabled
from ..attention.dense import PLAIN, Modifiers
from ..cache.sieve_cache import SieveCache
from ..engine import CachedContext


class BatchedCaches(SieveCache):
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
        n = len(caches[0].layers)
        if any(len(c.layers) != n for c in caches):
            raise ValueError("Every cache of a batch must belong to the same model (same number of layers).")
        super().__init__(n, None)
        self.caches = list(caches)
        self.failures: dict[int, Exception] = {}  # row → what its cache raised

    def seq_length(self, layer_idx: int = 0) -> int:
        # Only used by transformers for mask sizes; our attention ignores it (every row has its own length).
        return max(c.seq_length(layer_idx) for c in self.caches)

    def kv_bytes(self) -> int:
        return sum(c.kv_bytes() for c in self.caches)

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
        for b, cache in enumerate(self.caches):
            if b in self.failures:
                outs.append(torch.zeros_like(q[b : b + 1]))
                continue
            pos = None if positions is None else positions[b : b + 1] if positions.shape[0] == B else positions
            mask = None if padding_mask is None else padding_mask[b : b + 1]
            try:
                h = None if hidden is None else hidden[b : b + 1]
                out = cache.attend(layer_idx, q[b : b + 1], k[b : b + 1], v[b : b + 1], mask, scaling, pos, mods, h)
            except Exception as exc:  # this row's own cache failed: fail its request alone
                self.failures[b] = exc
                out = torch.zeros_like(q[b : b + 1])
            outs.append(out)
        return torch.cat(outs, dim=0)


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
