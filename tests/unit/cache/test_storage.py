"""Kernel tests: every storage's attention against the eager reference; exact byte accounting."""

from __future__ import annotations

import pytest
import torch

from tokensieve.attention.dense import causal_attention, chunk_allowed, reference_attention
from tokensieve.cache.storage import DenseKV, RaggedKV, Row, build_store

D = 8
SCALE = D**-0.5


def _rows(store, B, H):
    ks = [[store.row(b, h)[0] for h in range(H)] for b in range(B)]
    vs = [[store.row(b, h)[1] for h in range(H)] for b in range(B)]
    return ks, vs


@pytest.mark.parametrize("L", [1, 5])
def test_dense_append_attend_matches_reference(L):
    torch.manual_seed(0)
    B, H, G, n0 = 2, 2, 3, 11
    k0, v0 = torch.randn(B, H, n0, D), torch.randn(B, H, n0, D)
    pos0 = torch.arange(n0).expand(B, H, n0)
    store = DenseKV(k0, v0, pos0, reserve=2)
    k1, v1 = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    store.append(k1, v1, (n0 + torch.arange(L)).expand(B, L), None)  # grows past the reserve when L > 2
    q = torch.randn(B, H * G, L, D)
    out = store.attend(q, SCALE)
    ks, vs = _rows(store, B, H)
    cp = torch.cat([torch.full((n0,), -1), torch.arange(L)])
    allowed = [[chunk_allowed(cp, L) for _ in range(H)] for _ in range(B)]
    ref = reference_attention(q, ks, vs, SCALE, allowed)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert store.n == n0 + L


def test_dense_padding_and_bias_match_reference():
    torch.manual_seed(1)
    B, H, G, n = 2, 2, 2, 9
    k, v = torch.randn(B, H, n, D), torch.randn(B, H, n, D)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, :3] = False
    bias = torch.randn(B, H, n)
    store = DenseKV(k, v, torch.zeros(B, H, n, dtype=torch.long), valid=valid, bias=bias, reserve=4)
    store.append(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), torch.zeros(B, 1, dtype=torch.long), None)
    q = torch.randn(B, H * G, 1, D)
    out = store.attend(q, SCALE)
    ks, vs = _rows(store, B, H)  # rows exclude padding
    full_bias = torch.cat([bias, torch.zeros(B, H, 1)], -1)
    vmask = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], -1)
    biases = [[full_bias[b, h][vmask[b]] for h in range(H)] for b in range(B)]
    ref = reference_attention(q, ks, vs, SCALE, bias=biases)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("L", [1, 4])
def test_ragged_matches_reference(L):
    torch.manual_seed(2)
    B, H, G = 2, 3, 3
    lengths = [[5, 9, 1], [13, 2, 7]]
    rows = [
        Row.of(
            torch.randn(lengths[b][h], D),
            torch.randn(lengths[b][h], D),
            torch.arange(lengths[b][h]),
            bias=torch.randn(lengths[b][h]) if h == 1 else None,
        )
        for b in range(B)
        for h in range(H)
    ]
    store = RaggedKV(rows, B, H)
    valid = torch.ones(B, L, dtype=torch.bool)
    if L > 1:
        valid[1, 0] = False  # a left-padded token in the new chunk is not stored
    store.append(torch.randn(B, H, L, D), torch.randn(B, H, L, D), torch.zeros(B, L, dtype=torch.long), valid)
    q = torch.randn(B, H * G, L, D)
    out = store.attend(q, SCALE)
    ks, vs = _rows(store, B, H)
    allowed, biases = [], []
    for b in range(B):
        new_idx = valid[b].nonzero().flatten()
        arow, brow = [], []
        for h in range(H):
            n_old = lengths[b][h]
            cp = torch.cat([torch.full((n_old,), -1), new_idx])
            arow.append(chunk_allowed(cp, L))
            r = store.rows[b * H + h]
            brow.append(r.bias[: r.n] if r.bias is not None else torch.zeros(r.n))
        allowed.append(arow)
        biases.append(brow)
    ref = reference_attention(q, ks, vs, SCALE, allowed, biases)
    # padding queries (row 1, position 0) are not compared: their output is unused
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :, 1:], ref[1, :, 1:], atol=1e-5, rtol=1e-5)
    assert store.lengths().tolist() == [[5 + L, 9 + L, 1 + L], [13 + L - (L > 1), 2 + L - (L > 1), 7 + L - (L > 1)]]


def test_build_store_uniform_and_ragged_bytes_are_exact():
    torch.manual_seed(3)
    B, H, T = 2, 3, 12
    k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    pos = torch.arange(T).expand(B, T)
    idx = torch.tensor([[[0, 3, 7], [1, 2, 11], [4, 5, 6]]] * B)
    dense = build_store(k, v, pos, idx, torch.full((B, H), 3))
    assert isinstance(dense, DenseKV)
    assert dense.kv_bytes() == 2 * B * H * 3 * D * 4
    torch.testing.assert_close(dense.row(1, 1)[0], k[1, 1, [1, 2, 11]])
    counts = torch.tensor([[3, 1, 2], [2, 3, 3]])
    idx2 = idx.clone()
    for b in range(B):
        for h in range(H):
            idx2[b, h, int(counts[b, h]) :] = -1
    ragged = build_store(k, v, pos, idx2, counts, reserve=5)
    assert isinstance(ragged, RaggedKV)
    stored = sum(ragged.row(b, h)[0].numel() + ragged.row(b, h)[1].numel() for b in range(B) for h in range(H))
    assert ragged.kv_bytes() == stored * 4 == int(counts.sum()) * 2 * D * 4
    # a page pool: every row's pages (its last one partly filled) with room for 5 more tokens, nothing else
    P = ragged.page
    pages = int(((counts + 5 + P - 1) // P).sum())
    assert ragged.allocated_bytes() == pages * P * 2 * D * 4
    torch.testing.assert_close(ragged.row(0, 2)[1], v[0, 2, [4, 5]])
    assert ragged.row(0, 2)[2].tolist() == [4, 5]


def test_causal_attention_with_padding_matches_reference():
    torch.manual_seed(4)
    B, H, G, T = 2, 2, 3, 7
    q, k, v = torch.randn(B, H * G, T, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :2] = False
    out = causal_attention(q, k, v, valid, SCALE)
    for b in range(B):
        start = int((~valid[b]).sum())
        ks = [[k[b, h, start:] for h in range(H)]]
        vs = [[v[b, h, start:] for h in range(H)]]
        n = T - start
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        ref = reference_attention(q[b : b + 1, :, start:], ks, vs, SCALE, [[causal] * H])
        torch.testing.assert_close(out[b : b + 1, :, start:], ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()
