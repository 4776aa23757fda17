"""The paged ragged store and its loop-free kernels against the eager per-row reference, on random ragged lengths."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensieve.attention.dense import Modifiers, chunk_allowed, reference_attention, window_allowed
from tokensieve.attention.ragged import paged_decode
from tokensieve.cache.ragged import RaggedKV, Row
from tokensieve.cache.storage import build_store

D = 8
SCALE = D**-0.5


def _store(g: torch.Generator, lengths: list[list[int]], page: int, with_bias: bool, reserve: int) -> RaggedKV:
    B, H = len(lengths), len(lengths[0])
    rows = []
    for b in range(B):
        for h in range(H):
            n = lengths[b][h]
            bias = torch.randn(n, generator=g) if with_bias and (b + h) % 2 == 0 else None
            rows.append(
                Row.of(torch.randn(n, D, generator=g), torch.randn(n, D, generator=g), torch.arange(n), bias, reserve)
            )
    return RaggedKV(rows, B, H, page=page)


def _reference(store: RaggedKV, q: torch.Tensor, allowed=None) -> torch.Tensor:
    B, H = store.batch, store.heads
    rows = store.rows
    ks = [[rows[b * H + h].k for h in range(H)] for b in range(B)]
    vs = [[rows[b * H + h].v for h in range(H)] for b in range(B)]
    bias = [[rows[b * H + h].bias if rows[b * H + h].bias is not None else torch.zeros(rows[b * H + h].n)
             for h in range(H)] for b in range(B)]  # fmt: skip
    return reference_attention(q, ks, vs, SCALE, allowed, bias)


lengths_st = st.integers(1, 3).flatmap(
    lambda B: st.integers(1, 3).flatmap(
        lambda H: st.lists(st.lists(st.integers(0, 40), min_size=H, max_size=H), min_size=B, max_size=B)
    )
)


@settings(max_examples=60, deadline=None)
@given(
    lengths=lengths_st,
    G=st.integers(1, 3),
    page=st.sampled_from([1, 3, 8, 32]),
    steps=st.integers(1, 5),
    with_bias=st.booleans(),
    reserve=st.integers(0, 6),
    seed=st.integers(0, 10_000),
)
def test_decode_steps_match_reference(lengths, G, page, steps, with_bias, reserve, seed):
    """Every row of a different length (zero included), GQA, batch > 1: each decode step equals the reference, and
    the stored bytes are exactly the entries'."""
    g = torch.Generator().manual_seed(seed)
    store = _store(g, lengths, page, with_bias, reserve)
    B, H = len(lengths), len(lengths[0])
    for step in range(steps):
        store.append(torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g),
                     torch.full((B, 1), 100 + step), None)  # fmt: skip
        q = torch.randn(B, H * G, 1, D, generator=g)
        torch.testing.assert_close(store.attend(q, SCALE), _reference(store, q), atol=1e-5, rtol=1e-5)
    expected = [[n + steps for n in row] for row in lengths]
    assert store.lengths().tolist() == expected
    assert store.kv_bytes() == 2 * sum(map(sum, expected)) * D * 4
    assert store.allocated_bytes() >= store.kv_bytes()
    # unfilled slots: at most page - 1 per row, plus the pool's geometric headroom
    assert store.allocated_bytes() <= 2 * D * 4 * (page * sum((n + page - 1) // page for r in expected for n in r)
                                                  + max(64, store._k.shape[0] // 4 + 1) * page)  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(
    lengths=lengths_st,
    G=st.integers(1, 3),
    L=st.integers(2, 5),
    page=st.sampled_from([2, 4, 32]),
    window=st.sampled_from([None, 3, 9]),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_chunk_with_padding_and_window_matches_reference(lengths, G, L, page, window, seed, data):
    """A chunk of several tokens, left padding not stored, causal within the chunk, optionally a sliding window."""
    g = torch.Generator().manual_seed(seed)
    store = _store(g, lengths, page, True, 0)
    B, H = len(lengths), len(lengths[0])
    pads = [data.draw(st.integers(0, L - 1)) for _ in range(B)]
    valid = torch.ones(B, L, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False
    pos = torch.full((B, L), -1, dtype=torch.long)
    for b in range(B):
        pos[b, pads[b] :] = 50 + torch.arange(L - pads[b])
    store.append(torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g), pos, valid)
    q = torch.randn(B, H * G, L, D, generator=g)
    out = store.attend(q, SCALE, Modifiers(window=window))
    allowed = []
    for b in range(B):
        new_idx = valid[b].nonzero().flatten()
        arow = []
        for h in range(H):
            n_old = lengths[b][h]
            cp = torch.cat([torch.full((n_old,), -1), new_idx])
            a = chunk_allowed(cp, L)
            if window is not None:
                a = a & window_allowed(torch.where(valid[b], pos[b], -1), store.row(b, h)[2], window)
            arow.append(a)
        allowed.append(arow)
    ref = _reference(store, q, allowed)
    for b in range(B):  # padding queries are not compared: their output is unused
        torch.testing.assert_close(out[b, :, pads[b] :], ref[b, :, pads[b] :], atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(lengths=lengths_st, page=st.sampled_from([1, 4, 32]), seed=st.integers(0, 10_000), data=st.data())
def test_truncate_and_reorder_keep_rows_exact(lengths, page, seed, data):
    """Rolling back a chunk and reordering sequences (beam search) leave every row as it would be built anew."""
    g = torch.Generator().manual_seed(seed)
    store = _store(g, lengths, page, False, 0)
    B, H = len(lengths), len(lengths[0])
    before = [store.row(b, h) for b in range(B) for h in range(H)]
    store.append(torch.randn(B, H, 3, D, generator=g), torch.randn(B, H, 3, D, generator=g),
                 torch.arange(3).expand(B, 3), None)  # fmt: skip
    store.truncate([n for row in lengths for n in row])
    after = [store.row(b, h) for b in range(B) for h in range(H)]
    for x, y in zip(before, after):
        for a, c in zip(x, y):
            torch.testing.assert_close(a, c)
    order = torch.tensor(data.draw(st.lists(st.integers(0, B - 1), min_size=1, max_size=4)))
    store.reorder(order)
    for i, b in enumerate(order.tolist()):
        for h in range(H):
            for a, c in zip(store.row(i, h), before[b * H + h]):
                torch.testing.assert_close(a, c)
    q = torch.randn(order.numel(), H * 2, 1, D, generator=g)
    store.append(torch.randn(order.numel(), H, 1, D, generator=g), torch.randn(order.numel(), H, 1, D, generator=g),
                 torch.zeros(order.numel(), 1, dtype=torch.long), None)  # fmt: skip
    torch.testing.assert_close(store.attend(q, SCALE), _reference(store, q), atol=1e-5, rtol=1e-5)


def test_paged_decode_rows_without_pages_give_zeros():
    """A row that owns no page (an empty row) attends to nothing: zeros, not NaN."""
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 4, D, generator=g), torch.randn(2, 4, D, generator=g)
    bias = torch.zeros(2, 4)
    bias[1, 2:] = float("-inf")
    out = paged_decode(torch.randn(3, 2, D, generator=g), k, v, torch.tensor([0, 2]), bias, 3, SCALE)
    assert torch.isfinite(out).all()
    assert out[1].abs().sum() == 0
    assert out[0].abs().sum() > 0


def test_build_store_packs_rows_without_padding():
    """build_store's ragged path (vectorised) keeps each row's selection and extra entries, bytes exact."""
    g = torch.Generator().manual_seed(1)
    B, H, T, E = 2, 3, 20, 2
    k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    pos = torch.arange(T).expand(B, T)
    counts = torch.tensor([[5, 1, 7], [3, 7, 2]])
    idx = torch.full((B, H, 7), -1)
    for b in range(B):
        for h in range(H):
            idx[b, h, : int(counts[b, h])] = torch.randperm(T, generator=g)[: int(counts[b, h])].sort().values
    ek, ev = torch.randn(B, H, E, D, generator=g), torch.randn(B, H, E, D, generator=g)
    evalid = torch.tensor([[[True, False], [True, True], [False, False]], [[True, True], [False, True], [True, True]]])
    store = build_store(k, v, pos, idx, counts, extra_keys=ek, extra_values=ev, extra_valid=evalid, reserve=3)
    assert isinstance(store, RaggedKV)
    for b in range(B):
        for h in range(H):
            sel = idx[b, h, : int(counts[b, h])]
            rk, rv, rp = store.row(b, h)
            torch.testing.assert_close(rk, torch.cat([k[b, h, sel], ek[b, h][evalid[b, h]]]))
            torch.testing.assert_close(rv, torch.cat([v[b, h, sel], ev[b, h][evalid[b, h]]]))
            assert rp.tolist() == sel.tolist() + [-1] * int(evalid[b, h].sum())
    assert store.kv_bytes() == 2 * D * 4 * int(counts.sum() + evalid.sum())


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_st, page=st.sampled_from([1, 3, 8, 32]), with_bias=st.booleans(), seed=st.integers(0, 10_000))
def test_keep_take_and_entry_positions_follow_a_per_row_reference(lengths, page, with_bias, seed):
    """Evicting arbitrary entries of every row at once keeps each row's survivors in order (bytes exact), reads and
    appends stay exact afterwards, and take/entry_positions read each row's entries by index."""
    g = torch.Generator().manual_seed(seed)
    store = _store(g, lengths, page, with_bias, 2)
    B, H = len(lengths), len(lengths[0])
    before = [store.row(b, h) for b in range(B) for h in range(H)]
    bias_before = [r.bias for r in store.rows]
    pos = store.entry_positions()
    n = pos.shape[1]
    for r, (_, _, p) in enumerate(before):
        assert pos[r, : p.numel()].tolist() == p.long().tolist()
        assert bool((pos[r, p.numel() :] == -1).all())
    if n:
        idx = torch.stack([torch.randint(0, max(1, int(x)), (3,), generator=g) for x in store.lengths().flatten()])
        live = store.lengths().flatten() > 0
        rows = live.nonzero().flatten()
        k, v, p = store.take(rows, idx[rows])
        for i, r in enumerate(rows.tolist()):
            torch.testing.assert_close(k[i], before[r][0][idx[r]])
            torch.testing.assert_close(v[i], before[r][1][idx[r]])
            assert p[i].tolist() == before[r][2][idx[r]].long().tolist()
    mask = torch.rand(B * H, n + 2, generator=g) < 0.6
    evicted = store.keep(mask)
    assert evicted == sum(int((~mask[r, : before[r][2].numel()]).sum()) for r in range(B * H))
    for r, (k0, v0, p0) in enumerate(before):
        m = mask[r, : p0.numel()]
        k1, v1, p1 = store.row(r // H, r % H)
        torch.testing.assert_close(k1, k0[m])
        torch.testing.assert_close(v1, v0[m])
        assert p1.tolist() == p0[m].tolist()
        if bias_before[r] is not None:
            torch.testing.assert_close(store.rows[r].bias, bias_before[r][m])
    assert store.kv_bytes() == 2 * int(store.lengths().sum()) * D * 4
    q = torch.randn(B, H * 2, 1, D, generator=g)
    store.append(torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g),
                 torch.full((B, 1), 99, dtype=torch.long), None)  # fmt: skip
    torch.testing.assert_close(store.attend(q, SCALE), _reference(store, q), atol=1e-5, rtol=1e-5)
    assert store.evictions == (1 if evicted else 0)


def test_as_ragged_keeps_the_real_entries_of_a_dense_store():
    """A dense store with left padding (and a row-padded one) becomes ragged rows of its real entries only."""
    from tokensieve.cache.dense import DenseKV
    from tokensieve.cache.storage import RowPaddedKV, as_ragged

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 5, D, generator=g), torch.randn(2, 2, 5, D, generator=g)
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    pos = torch.where(valid, valid.long().cumsum(-1) - 1, -1)[:, None, :].expand(2, 2, 5)
    ragged = as_ragged(DenseKV(k, v, pos, valid=valid))
    assert ragged.lengths().tolist() == [[5, 5], [3, 3]]
    torch.testing.assert_close(ragged.row(1, 1)[0], k[1, 1, 2:])
    assert ragged.row(1, 0)[2].tolist() == [0, 1, 2]
    bias = torch.zeros(2, 2, 5)
    bias[0, 1, :3] = float("-inf")
    padded = RowPaddedKV(k, v, pos, bias, torch.tensor([[0, 3], [2, 2]]))
    rag = as_ragged(padded)
    assert rag.lengths().tolist() == [[5, 2], [3, 3]]
    torch.testing.assert_close(rag.row(0, 1)[1], v[0, 1, 3:])


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_st, page=st.sampled_from([1, 3, 8]), seed=st.integers(0, 10_000))
def test_drop_in_place_masks_entries_until_keep_reclaims_them(lengths, page, seed):
    """Entries dropped in place are gone for attention, rows and byte counts at once (a page of dropped entries
    only included), appends go on, and keep() reclaims their slots leaving the same rows."""
    g = torch.Generator().manual_seed(seed)
    store = _store(g, lengths, page, False, 2)
    B, H = len(lengths), len(lengths[0])
    before = [store.row(b, h) for b in range(B) for h in range(H)]
    drop = [torch.rand(p.numel(), generator=g) < 0.5 for (_, _, p) in before]
    if page == 1 and before[0][2].numel():
        drop[0][:] = True  # whole pages of dropped entries
    rows = torch.cat([torch.full((int(d.sum()),), r, dtype=torch.long) for r, d in enumerate(drop)])
    idx = torch.cat([d.nonzero().flatten() for d in drop])
    store.drop(rows, idx)
    assert store.dead() == int(idx.numel())
    for r, ((k0, _, p0), d) in enumerate(zip(before, drop)):
        k1, _, p1 = store.row(r // H, r % H)
        torch.testing.assert_close(k1, k0[~d])
        assert p1.tolist() == p0[~d].tolist()
    assert store.kv_bytes() == 2 * sum(int((~d).sum()) for d in drop) * D * 4
    assert store.lengths().flatten().tolist() == [int((~d).sum()) for d in drop]
    q = torch.randn(B, H * 2, 1, D, generator=g)
    store.append(torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g),
                 torch.full((B, 1), 99, dtype=torch.long), None)  # fmt: skip
    out = store.attend(q, SCALE)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference(store, q), atol=1e-5, rtol=1e-5)
    rows_now = [store.row(b, h) for b in range(B) for h in range(H)]
    store.keep(torch.ones(B * H, int(store.sizes().max()), dtype=torch.bool))
    assert store.dead() == 0
    for r, (k0, _, p0) in enumerate(rows_now):
        k1, _, p1 = store.row(r // H, r % H)
        torch.testing.assert_close(k1, k0)
        assert p1.tolist() == p0.tolist()
    torch.testing.assert_close(store.attend(q, SCALE), _reference(store, q), atol=1e-5, rtol=1e-5)
