"""Sparse prefill: the method computes the prompt's attention itself — each query block reads only the key blocks it
chooses (FlexPrefill, MInference, A-shape, HiP; their capabilities declare ``own_attention``) — and the cache then
keeps the prompt whole or compresses it in one pass with the method's ``evict`` method
(``flexprefill[evict=snapkv]:0.25``)."""

from __future__ import annotations

from torch import Tensor

from ...cache.prefill import Chunk, Fresh, Plan, PrefillMode
from ...core.method import PrefillMethod
from .one_pass import OnePass


def sparse_attention(method: PrefillMethod, plan: Plan, c: Chunk) -> Tensor | None:
    """The method's own attention output of a prompt chunk ``(B, H_q, L, D)``, or None where it leaves it dense (a
    one-token chunk)."""
    if c.length <= 1:
        return None
    return method.prefill_attention(c.layer_idx, c.q, c.k, c.v, c.valid, c.scaling, c.mods, plan.profile)


class SparseKeep(PrefillMode):
    """The method's sparse attention over the prompt; every entry is stored (its ``evict`` is ``full``)."""

    name = "sparse"

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        assert isinstance(plan.method, PrefillMethod)
        self.method: PrefillMethod = plan.method

    def attention(self, c: Chunk) -> Tensor:
        assert self.plan is not None
        own = sparse_attention(self.method, self.plan, c)
        return super().attention(c) if own is None else own

    def fresh(self, c: Chunk, output: bool) -> Fresh:
        return self.keep(c, self.timed_attention(c, output))


class Sparse(OnePass):
    """The method's sparse attention over the prompt, then its ``evict`` method compresses each layer in one pass."""

    name = "sparse"

    def attention(self, c: Chunk) -> Tensor:
        assert self.plan is not None
        own = sparse_attention(self.method, self.plan, c)
        return super().attention(c) if own is None else own


__all__ = ["Sparse", "SparseKeep", "sparse_attention"]
