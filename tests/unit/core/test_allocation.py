"""Layer and head budget allocations sum exactly to the target."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensieve.methods.kv.adakv import adaptive_head_counts
from tokensieve.methods.kv.compresskv import compresskv_layer_budgets
from tokensieve.methods.kv.pyramidkv import pyramid_schedule
from tokensieve.methods.kv.razor import razor_allocation
from tokensieve.selection.allocation import round_to_total


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(0, 10_000))
def test_round_to_total_hits_target_within_bounds(rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, n, generator=g) * 50
    lo = torch.randint(0, 5, (rows, n), generator=g)
    hi = lo + torch.randint(0, 60, (rows, n), generator=g)
    total = torch.stack(
        [torch.randint(int(lo[r].sum()), int(hi[r].sum()) + 1, (1,), generator=g)[0] for r in range(rows)]
    )
    out = round_to_total(x, total, lo, hi)
    assert torch.equal(out.sum(-1), total)
    assert bool((out >= lo).all())
    assert bool((out <= hi).all())


@settings(max_examples=60, deadline=None)
@given(st.integers(8, 400), st.integers(2, 32), st.integers(0, 64))
def test_pyramid_sums_and_decreases(budget, layers, window):
    n = budget * 5
    sched = pyramid_schedule(budget, n, layers, window, 20.0)
    assert sum(sched) == layers * budget
    assert all(1 <= b <= n for b in sched)
    assert all(a >= b - 1 for a, b in itertools.pairwise(sched))  # non-increasing up to rounding
    assert sched[0] > sched[-1]


def test_pyramid_clamps_at_prompt_length():
    sched = pyramid_schedule(900, 1000, 30, 32, 20.0)
    assert sum(sched) == 30 * 900
    assert max(sched) <= 1000


def test_compresskv_budgets_follow_layer_scores():
    score = [0.1, 0.5, 0.2, 0.2]
    b = compresskv_layer_budgets(score, budget=100, n_tokens=1000)
    assert sum(b) == 400
    assert b[1] == max(b)
    assert min(b) >= 32
    assert max(b) <= 300  # clipped to 3 b
    small = compresskv_layer_budgets(score, budget=10, n_tokens=50)
    assert sum(small) == 40
    assert min(small) >= 10


def test_adakv_redistributes_and_keeps_the_total():
    B, H, T = 2, 3, 50
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(B, H, T, generator=g)
    scores[:, 0] *= 10  # head 0 has the largest scores: it should win entries
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :7] = False
    prot = torch.zeros(B, H, T, dtype=torch.bool)
    prot[..., -4:] = True
    counts = torch.full((B, H), 12)
    out = adaptive_head_counts(scores, counts, valid, prot, alpha=0.2)
    assert torch.equal(out.sum(-1), counts.sum(-1))
    assert bool((out[:, 0] > out[:, 1]).all())
    # the safeguard: every head keeps its protected tokens plus alpha of its free share
    assert bool((out >= 4 + int(0.2 * 8)).all())


def test_razor_allocation_demotes_retrieval_heads_that_do_not_fit():
    ranked = [(1, 0), (0, 1), (2, 1)]
    entries, is_ret = razor_allocation(ranked, 3, n_tokens=100, budget=40, num_layers=3, num_heads=2, floor=21)
    assert int(entries.sum()) == 3 * 2 * 40
    assert int(is_ret.sum()) == 1  # only the top-ranked head can keep all 100 tokens
    assert bool(is_ret[1, 0])
    assert int(entries[1, 0]) == 100
    assert int(entries[~is_ret].min()) >= 21
