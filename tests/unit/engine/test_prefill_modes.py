"""Each prefill mode alone against the one-pass mode: a mode changes how a prompt gets into the cache, never what a
method keeps where both can run it.

- full: the one-pass mode at a 100 % budget keeps every entry, as the full mode does;
- deferred: a method that scores each layer alone, declared deferred, keeps exactly what it keeps in one pass;
- sparse: a sparse-prefill method whose pattern reads every causal block attends as the dense one-pass prefill;
- chunked: a prompt no longer than the chunk is prefilled as in one pass, and the full cache in chunks equals it;
- replayed: a recorded full-cache prefill replayed into a one-pass cache equals running the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import Tensor

import tokensieve as ts
from tokensieve.cache.storage import as_dense
from tokensieve.core.capabilities import Apply, Capabilities, Phase
from tokensieve.core.context import LayerContext
from tokensieve.core.method import PrefillMethod
from tokensieve.engine.prefill import CHUNKED, DEFERRED, FULL, ONE_PASS, SPARSE, pick
from tokensieve.engine.prefill.chunked import Chunked
from tokensieve.engine.prefill.deferred import Deferred
from tokensieve.engine.prefill.one_pass import OnePass
from tokensieve.engine.prefill.sparse import Sparse
from tokensieve.methods.kv._sparse_prefill import BlockGrid, SparsePrefill
from tokensieve.methods.kv.snapkv import SnapKV

from ..methods.kv.test_methods_matrix import prompts


@dataclass(frozen=True)
class KeyNorm(PrefillMethod):
    """Test method: keep the largest keys of each layer (one pass)."""

    name: ClassVar[str] = "keynorm_test"
    paper: ClassVar[str] = "test"

    def score(self, ctx: LayerContext) -> Tensor:
        return ctx.keys.float().norm(dim=-1)


@dataclass(frozen=True)
class DeferredKeyNorm(KeyNorm):
    """The same scores, selected once every layer is scored (the deferred mode)."""

    name: ClassVar[str] = "keynorm_deferred_test"
    capabilities: ClassVar[Capabilities] = Capabilities(
        phases=frozenset({Phase.PREFILL}), apply=Apply.EVICT, deferred=True
    )


@dataclass(frozen=True)
class DenseBlocks(SparsePrefill):
    """Test sparse prefill: every causal block (the sparse kernel over the dense pattern)."""

    name: ClassVar[str] = "denseblocks_test"
    paper: ClassVar[str] = "test"
    block: int = 8

    def blocks(self, grid: BlockGrid, profile: object) -> Tensor:
        B, Hq = grid.q.shape[0], grid.q.shape[1]
        return grid.causal[None, None].expand(B, Hq, grid.n, grid.n)


def _state(ctx: ts.CachedContext) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    stores = [as_dense(s, "test") for s in ctx.cache.stores()]  # ragged rows (a padded batch) as padded rows
    return ctx.cache.lengths(), [s.keys for s in stores], [s.values for s in stores]


def _same(a: ts.CachedContext, b: ts.CachedContext, atol: float = 0.0) -> None:
    la, ka, va = _state(a)
    lb, kb, vb = _state(b)
    assert torch.equal(la, lb)
    for x, y in zip([*ka, *va], [*kb, *vb], strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)
    torch.testing.assert_close(a.logits, b.logits, atol=atol, rtol=0)


def test_the_compressor_picks_the_mode_from_the_capabilities(tiny_model):
    assert pick(ts.create_method("full")) == FULL
    assert pick(SnapKV()) == ONE_PASS
    assert pick(ts.create_method("kvzip")) == DEFERRED
    assert pick(ts.create_method("flexprefill")) == SPARSE
    assert ts.compress(tiny_model, "snapkv:0.5").mode == ONE_PASS
    assert isinstance(ts.compress(tiny_model, "snapkv:0.5").new_cache().mode, OnePass)
    assert isinstance(ts.compress(tiny_model, "simlayerkv:0.5").new_cache().mode, Deferred)
    chunked = ts.compress(tiny_model, "snapkv:0.5", chunk=16).prefill(torch.tensor([prompts()[0]]))
    assert isinstance(chunked.cache.mode, Chunked)
    assert chunked.cache.mode.name == CHUNKED


@torch.inference_mode()
def test_full_equals_one_pass_at_the_whole_budget(tiny_model):
    ids = torch.tensor([prompts()[0]])
    full = ts.compress(tiny_model, "full").prefill(ids)
    whole = ts.compress(tiny_model, KeyNorm(), 1.0).prefill(ids)
    assert type(whole.cache.mode) is OnePass
    _same(full, whole)


@pytest.mark.parametrize("budget", [0.25, 0.5])
@torch.inference_mode()
def test_deferred_equals_one_pass_for_a_per_layer_selection(tiny_model, budget):
    ids, mask = _batch()
    one = ts.compress(tiny_model, KeyNorm(), budget).prefill(ids, mask)
    deferred = ts.compress(tiny_model, DeferredKeyNorm(), budget).prefill(ids, mask)
    assert type(deferred.cache.mode) is Deferred
    assert not deferred.cache.mode.pending  # selected once the last layer was scored
    _same(one, deferred)
    press = ts.compress(tiny_model, DeferredKeyNorm(), budget)
    assert press.decode(deferred, 5).tokens == ts.compress(tiny_model, KeyNorm(), budget).decode(one, 5).tokens


@torch.inference_mode()
def test_sparse_with_every_block_equals_dense_one_pass(tiny_model):
    ids = torch.tensor([prompts()[0]])
    dense = ts.compress(tiny_model, SnapKV(), 0.5).prefill(ids)
    sparse = ts.compress(tiny_model, DenseBlocks(evict=SnapKV()), 0.5).prefill(ids)
    assert type(sparse.cache.mode) is Sparse
    _same(dense, sparse, atol=2e-5)


@torch.inference_mode()
def test_chunked_equals_one_pass_where_they_must(tiny_model):
    ids = torch.tensor([prompts()[0]])
    short = ts.compress(tiny_model, SnapKV(), 0.5, chunk=ids.shape[1]).prefill(ids)  # no longer than one chunk
    _same(ts.compress(tiny_model, SnapKV(), 0.5).prefill(ids), short)
    chunked = ts.compress(tiny_model, "full", chunk=7).prefill(ids)  # the full cache: chunks are only appended
    assert isinstance(chunked.cache.mode, Chunked)
    _same(ts.compress(tiny_model, "full").prefill(ids), chunked, atol=2e-5)


@pytest.mark.parametrize("spec", ["snapkv:0.25", "pyramidkv:0.5", "simlayerkv[recent=8]:0.5"])
@torch.inference_mode()
def test_replayed_equals_running_the_model(tiny_model, spec):
    ids, mask = _batch()
    record = ts.compress(tiny_model, "full").record_prefill(ids, mask)
    press = ts.compress(tiny_model, spec)
    _same(press.prefill(ids, mask), press.prefill(ids, mask, replay=record))


def _batch() -> tuple[Tensor, Tensor]:
    from tokensieve.data.prompts import left_pad

    return left_pad(prompts(seed=3, lengths=(40, 29)), 0)
