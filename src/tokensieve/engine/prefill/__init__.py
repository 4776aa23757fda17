"""Prefill modes, one file each: how a prompt gets into the cache. The Compressor picks one when it is built
(:func:`pick`, from its method's capabilities; built with ``chunk=N``, it prefills a prompt longer than ``N`` in the
chunked mode):

==============  ==========================================================================================
``full``        keep every entry (no method, or one that does not compress): :mod:`tokensieve.cache.prefill`
``one-pass``    compress each layer as soon as its attention is computed: :mod:`.one_pass`
``deferred``    score every layer, keep the prompt whole, select for all layers at the end (after the method's
                auxiliary passes, if it asks for any): :mod:`.deferred`
``sparse``      the method computes the prompt's attention itself, then keep or compress: :mod:`.sparse`
``chunked``     prefill in chunks, re-compress every layer to the whole prompt's budget after each: :mod:`.chunked`
==============  ==========================================================================================

A recorded full-cache prefill can be replayed into a cache of any mode but the sparse and chunked ones
(:mod:`.replay`). Each mode is tested alone against the one-pass mode (tests/unit/engine/).
"""

from __future__ import annotations

from torch import Tensor

from ...cache.prefill import Plan, PrefillMode
from ...core.method import Method
from .chunked import Chunked
from .deferred import Deferred
from .one_pass import OnePass
from .replay import PrefillRecord, Recording, replay
from .sparse import Sparse, SparseKeep

FULL, ONE_PASS, DEFERRED, SPARSE, CHUNKED = "full", "one-pass", "deferred", "sparse", "chunked"


def pick(method: Method) -> str:
    """The prefill mode of a method, by its capabilities: ``full``, ``one-pass``, ``deferred`` or ``sparse``."""
    caps = method.declared()
    if caps.own_attention:
        return SPARSE
    if not method.compresses:
        return FULL
    return DEFERRED if caps.deferred else ONE_PASS


def make(
    mode: str, plan: Plan | None, *, tail: int = 0, passes: bool = False, n_tokens: Tensor | None = None
) -> PrefillMode:
    """A fresh mode object for one cache (a mode holds the state of one prefill): ``tail`` auxiliary tokens end the
    prompt (one-pass), ``passes``: auxiliary passes follow it (deferred), ``n_tokens`` ``(B,)``: the prompts'
    lengths (chunked)."""
    if plan is None or mode == FULL:
        return PrefillMode(plan)
    if mode == CHUNKED:
        assert n_tokens is not None
        return Chunked(plan, n_tokens)
    if mode == SPARSE:
        return Sparse(plan, tail) if plan.method.compresses else SparseKeep(plan)
    if mode == DEFERRED:
        return Deferred(plan, passes)
    return OnePass(plan, tail)


__all__ = [
    "CHUNKED",
    "DEFERRED",
    "FULL",
    "ONE_PASS",
    "SPARSE",
    "Chunked",
    "Deferred",
    "OnePass",
    "PrefillRecord",
    "Recording",
    "Sparse",
    "SparseKeep",
    "make",
    "pick",
    "replay",
]
