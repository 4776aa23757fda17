"""One pass: each layer's prompt is compressed as soon as its attention is computed (score → select → apply), and the
layer stores only what the method keeps. The mode of every method that selects per layer.

A method that appends auxiliary tokens to the prompt (DapQ's pseudo-queries, its capabilities' ``suffix``) runs in
this mode too: the tokens ride along at the end of the chunk (``tail``), are attended to and scored with, and are
never stored nor counted as seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from ...cache.prefill import Chunk, Fresh, Plan, PrefillMode, make_run
from ...cache.storage import KVStore, build_store
from ...core.context import LayerContext, RunState
from ...core.method import Compressed, PrefillMethod
from ...errors import ConfigError


def build(comp: Compressed, k: Tensor, v: Tensor, positions: Tensor, reserve: int) -> KVStore:
    """The store of what an applier kept of a chunk (k, v ``(B, H_kv, T, D)``, positions ``(B, T)``)."""
    sel = comp.selection
    return build_store(
        comp.keys if comp.keys is not None else k,
        comp.values if comp.values is not None else v,
        positions,
        sel.indices,
        sel.counts,
        bias=comp.bias,
        extra_keys=comp.extra_keys,
        extra_values=comp.extra_values,
        extra_bias=comp.extra_bias,
        extra_valid=comp.extra_valid,
        reserve=reserve,
    )


class OnePass(PrefillMode):
    """Compress each layer's first chunk with the plan's method, in one pass over the prompt.

    Args:
        plan: the run's plan (its method compresses at prefill).
        tail: auxiliary tokens at the end of the chunk (attended to and scored with, never stored nor seen).
    """

    name = "one-pass"

    def __init__(self, plan: Plan, tail: int = 0) -> None:
        super().__init__(plan)
        if not isinstance(plan.method, PrefillMethod):
            raise ConfigError(f"Method '{plan.method.name}' does not compress at prefill.")
        self.method: PrefillMethod = plan.method
        self.tail = tail
        self.run: RunState | None = None  # the budgets, resolved from the first layer's prompt

    def fresh(self, c: Chunk, output: bool) -> Fresh:
        out = self.timed_attention(c, output)
        if c.length <= 1:  # a one-token prompt has nothing to choose from
            return self.keep(c, out)
        t0 = time.perf_counter()
        ctx = self.context(c)
        fresh = self.compress(c, ctx, out)
        self.stats.compress_seconds += time.perf_counter() - t0
        return fresh

    def context(self, c: Chunk) -> LayerContext:
        """The layer's context: the chunk's tensors and the run's budgets (resolved from the first layer's prompt,
        its real tokens without the tail)."""
        assert self.plan is not None
        L = c.length
        valid = c.real()
        if self.tail >= L:
            raise ConfigError(f"The auxiliary tail ({self.tail} tokens) is not shorter than the chunk ({L}).")
        if self.run is None:
            n_tokens = valid[:, : L - self.tail].sum(-1)
            self.run = make_run(self.plan, n_tokens)
            self.stats.compressed_tokens = n_tokens.tolist()
            self.stats.budget_tokens = self.run.budget_tokens.tolist()
        return LayerContext(c.layer_idx, c.q, c.k, c.v, valid, c.scaling, self.run, tail=self.tail, hidden=c.hidden)

    def compress(self, c: Chunk, ctx: LayerContext, out: Tensor | None) -> Fresh:
        """score → select → apply for the layer, now."""
        store = build(self.method.compress(ctx), c.k, c.v, c.positions, self.reserve)
        return Fresh(store, out, c.length - self.tail, ctx)


def forward_with_suffix(
    forward: Callable[[Tensor, Tensor, Tensor, int], Tensor], ids: Tensor, mask: Tensor, suffix: Tensor
) -> Tensor:
    """Prefill ``ids`` ``(B, T)`` with the method's auxiliary tokens ``suffix`` ``(B, N)`` at the positions that
    follow each prompt (``forward(ids, mask, positions, keep)`` runs them through the cache and returns the last
    ``keep`` positions' logits): they are attended to while the prompt is compressed and then dropped, so decoding
    starts right after the real prompt. Returns ``(B, V)``: the last real prompt token's next-token logits."""
    n_aux = int(suffix.shape[1])
    fwd_mask = torch.cat([mask, mask.new_ones(mask.shape[0], n_aux)], dim=1)
    positions = (fwd_mask.cumsum(-1) - 1).clamp_min(0)
    logits = forward(torch.cat([ids, suffix], dim=1), fwd_mask, positions, n_aux + 1)
    return logits[:, 0]


__all__ = ["OnePass", "build", "forward_with_suffix"]
