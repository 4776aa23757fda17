from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensieve.selection import Selection
from tokensieve.selection.topk import protected_mask, topk_select


def _valid(B, T, pads):
    v = torch.ones(B, T, dtype=torch.bool)
    for b, p in enumerate(pads):
        v[b, :p] = False
    return v


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3),
    H=st.integers(1, 3),
    T=st.integers(4, 40),
    sink=st.integers(0, 4),
    recent=st.integers(0, 6),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_topk_invariants(B, H, T, sink, recent, seed, data):
    g = torch.Generator().manual_seed(seed)
    pads = [data.draw(st.integers(0, T - 1)) for _ in range(B)]
    valid = _valid(B, T, pads)
    n_valid = valid.sum(-1)
    counts = torch.stack([torch.randint(1, int(n_valid[b]) + 1, (H,), generator=g) for b in range(B)])
    scores = torch.randn(B, H, T, generator=g)
    sel = topk_select(scores, counts, valid, sink=sink, recent=recent)
    sink_m, rec_m = protected_mask(valid, sink, recent)
    for b in range(B):
        for h in range(H):
            row = sel.row(b, h)
            k = int(counts[b, h])
            # exactly the budget, ascending, unique, never padding
            assert row.numel() == k
            assert torch.all(row[1:] > row[:-1])
            assert bool(valid[b, row].all())
            kept = set(row.tolist())
            prot_rec = rec_m[b].nonzero().flatten().tolist()
            prot_sink = sink_m[b].nonzero().flatten().tolist()
            n_rec = len(prot_rec)
            if k >= n_rec + len(prot_sink):
                # every protected token is kept, the rest are the top-scored others
                assert set(prot_rec) <= kept
                assert set(prot_sink) <= kept
                others = [i for i in range(T) if valid[b, i] and i not in prot_rec and i not in prot_sink]
                m = k - n_rec - len(prot_sink)
                best = sorted(others, key=lambda i: -float(scores[b, h, i]))[:m]
                assert set(best) <= kept
            elif k <= n_rec:
                # short budget: the newest recent tokens win
                assert kept == set(sorted(prot_rec)[-k:])


def test_selection_mask_roundtrip():
    m = torch.zeros(2, 2, 10, dtype=torch.bool)
    m[0, 0, [1, 3, 5]] = True
    m[0, 1, [0]] = True
    m[1, 0, [2, 9]] = True
    m[1, 1, :] = True
    sel = Selection.from_mask(m)
    assert sel.counts.tolist() == [[3, 1], [2, 10]]
    assert torch.equal(sel.mask(10), m)
    assert not sel.uniform
    assert sel.row(0, 0).tolist() == [1, 3, 5]
