"""Sparse decode methods (Quest, TidalDecode, TokenSelect) after head-adaptive prefills (AdaKV, RazorAttention,
CompressKV): each (sequence, KV head) row selects within its own entries, with a budget of its own length."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from tokensieve.cache.decode import DecodeLayer, DecodeRun
from tokensieve.cache.ragged import RaggedKV, Row
from tokensieve.cache.storage import DenseKV, RowPaddedKV, as_dense
from tokensieve.core.context import ModelShape
from tokensieve.data.prompts import left_pad
from tokensieve.methods.kv.quest import Quest
from tokensieve.methods.kv.tokenselect import TokenSelect

from .test_methods_matrix import press_for, prompts

SPARSE = ["quest", "tidaldecode", "tokenselect"]
ADAPTIVE = ["adakv", "razor", "compresskv"]
PARAMS = {"quest": {"page": 4, "min_pages": 2, "dense_layers": 1}, "tokenselect": {"n_init": 2, "n_local": 4}}
D = 8


@pytest.mark.parametrize("prefill", ADAPTIVE)
@pytest.mark.parametrize("decode", SPARSE)
@torch.inference_mode()
def test_full_decode_budget_equals_the_prefill_alone(decode, prefill, tiny_model, tiny_profiles):
    """At 100 % decode budget a sparse method over a head-adaptive cache attends to every row's every entry:
    it generates what the prefill method generates alone (and, at 100 % prefill, what the full cache does)."""
    ids, mask = left_pad(prompts(7, lengths=(90, 61)), 0)
    for budget in (0.5, 1.0):
        alone = press_for(tiny_model, prefill, budget, tiny_profiles)
        ref_ctx = alone.prefill(ids, mask)
        ref = alone.decode(ref_ctx, 6)
        press = press_for(tiny_model, prefill, budget, tiny_profiles, decode=decode, decode_budget=1.0,
                          decode_params=PARAMS.get(decode))  # fmt: skip
        ctx = press.prefill(ids, mask)
        if budget < 1.0 and prefill != "compresskv":  # (CompressKV's heads come out even on the tiny model)
            assert any(isinstance(layer.decode.store, RowPaddedKV) for layer in ctx.cache.layers), prefill
        gen = press.decode(ctx, 6)
        assert gen.tokens == ref.tokens, (decode, prefill, budget)
    full = press_for(tiny_model, "full", 1.0, tiny_profiles)
    assert gen.tokens == full.decode(full.prefill(ids, mask), 6).tokens  # 100 % / 100 % = the full cache


@pytest.mark.parametrize("prefill", ADAPTIVE)
@pytest.mark.parametrize("decode", SPARSE)
@torch.inference_mode()
def test_batch_equals_single_on_head_adaptive_caches(decode, prefill, tiny_model, tiny_profiles):
    """Every row of a padded batch selects within its own entries, as it would alone."""
    rows = prompts(seed=5, lengths=(70, 33, 52))
    ids, mask = left_pad(rows, 0)
    press = press_for(tiny_model, prefill, 0.5, tiny_profiles, decode=decode, decode_budget=0.3,
                      decode_params=PARAMS.get(decode))  # fmt: skip
    ctx = press.prefill(ids, mask)
    if prefill != "compresskv":
        assert any(isinstance(layer.decode.store, RowPaddedKV) for layer in ctx.cache.layers), prefill
    gen = press.decode(ctx, 6)
    for b, r in enumerate(rows):
        single = press.decode(press.prefill(torch.tensor([r])), 6)
        assert gen.tokens[b] == single.tokens[0], (decode, prefill, b)


def _ragged(g: torch.Generator, lengths: list[list[int]]) -> RaggedKV:
    B, H = len(lengths), len(lengths[0])
    return RaggedKV([Row.of(torch.randn(n, D, generator=g), torch.randn(n, D, generator=g), torch.arange(n))
                     for row in lengths for n in row], B, H)  # fmt: skip


@pytest.mark.parametrize("method", [Quest(page=4, min_pages=2, dense_layers=0),
                                    Quest(page=4, min_pages=2, dense_layers=0, group="max"),
                                    TokenSelect(n_init=2, n_local=4)])  # fmt: skip
def test_each_row_selects_as_it_would_alone(method):
    """A row of a head-adaptive store gives exactly the output of the same method on that row alone (a one-row
    store of its own length): its pages / tokens are chosen among its own entries, its budget from its length."""
    g = torch.Generator().manual_seed(3)
    lengths = [[37, 9, 60], [22, 51, 14]]
    B, H, G = 2, 3, 2
    budget = ts.Budget.ratio(0.4)
    shape = ModelShape(1, H * G, H, D, 1024)
    ragged = _ragged(g, lengths)
    store = as_dense(ragged, method.name)
    assert isinstance(store, RowPaddedKV)
    assert store.lengths().tolist() == lengths
    assert store.kv_bytes() == ragged.kv_bytes()
    layer = DecodeLayer(0, store, DecodeRun(shape, torch.tensor([0]), budget), D**-0.5)
    layer.state = method.setup(layer, None)
    singles = {}
    for b in range(B):
        for h in range(H):
            k, v, p = ragged.row(b, h)
            one = DenseKV(k[None, None], v[None, None], p[None, None])
            sl = DecodeLayer(0, one, DecodeRun(ModelShape(1, G, 1, D, 1024), torch.tensor([0]), budget), D**-0.5)
            sl.state = method.setup(sl, None)
            singles[b, h] = sl
    for step in range(3):
        k_new, v_new = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        q = torch.randn(B, H * G, 1, D, generator=g)
        store.append(k_new, v_new, torch.full((B, 1), 1000 + step), None)
        method.on_append(layer, 1)
        out = method.step(layer, q)
        for (b, h), sl in singles.items():
            sl.store.append(k_new[b : b + 1, h : h + 1], v_new[b : b + 1, h : h + 1], torch.full((1, 1), 1000 + step),
                            None)  # fmt: skip
            method.on_append(sl, 1)
            alone = method.step(sl, q[b : b + 1, h * G : (h + 1) * G])
            torch.testing.assert_close(out[b : b + 1, h * G : (h + 1) * G], alone, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_eviction_while_decoding_is_still_refused_after_a_head_adaptive_prefill(tiny_model, tiny_profiles):
    with pytest.raises(ts.CapabilityError, match="head-adaptive"):
        press_for(tiny_model, "adakv", 0.5, tiny_profiles, decode="h2o", decode_budget=16)
