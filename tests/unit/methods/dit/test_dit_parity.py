"""Reference parity of the DiT methods: each paper's rule computed independently (plain loops and dense masks on
small tensors) against the method's output through the block-sparse kernel."""

from __future__ import annotations

import math

import pytest
import torch

from tokensieve.attention import flex
from tokensieve.methods.dit import DiTCall, VideoGrid
from tokensieve.methods.dit.psa import avg_pool_tokens, block_importance, pyramid_levels, tile_order
from tokensieve.methods.dit.radial import radial_mask
from tokensieve.methods.dit.svg2 import dynamic_map, kmeans
from tokensieve.methods.dit.vmoba import chunk_layout
from tokensieve.spec import parse_dit_spec


@pytest.fixture(autouse=True)
def _reference_kernel():
    previous = flex.set_compile(False)
    yield
    flex.set_compile(previous)


def qkv(B=1, H=2, N=128, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(3)]


def call_of(q, k, v, grid, step=5, num_steps=10, layer=1, state=None):
    return DiTCall(q, k, v, q.shape[-1] ** -0.5, grid, layer, 4, step, num_steps, {} if state is None else state)


def masked(q, k, v, mask, bias=None):
    """Dense attention under a ``(B, H, N, M)`` bool mask (and an additive logit bias)."""
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if bias is not None:
        logits = logits + bias
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, -1) @ v


def test_svg_matches_per_head_masks():
    grid = VideoGrid(4, 4, 8)  # S = 32 tokens a frame, N = 128
    q, k, v = qkv(H=3, N=grid.tokens)
    m = parse_dit_spec("svg[round_to=1,block=16]:0.3")
    c = call_of(q, k, v, grid)
    got = m.sparse(c)
    temporal = c.state["temporal_heads"]  # (B, H) from the online classification
    N, S, F = grid.tokens, grid.frame_tokens, grid.frames
    W = math.ceil(N * (1 - math.sqrt(1 - 0.3)))
    pos = [(t % S) * F + t // S for t in range(N)]  # token-major position of every frame-major token
    mask = torch.zeros(1, 3, N, N, dtype=torch.bool)
    for h in range(3):
        for i in range(N):
            for j in range(N):
                a, b = (pos[i], pos[j]) if temporal[0, h] else (i, j)
                mask[0, h, i, j] = abs(a - b) <= W or b < S
    torch.testing.assert_close(got.out, masked(q, k, v, mask), atol=1e-5, rtol=1e-4)
    assert got.density == pytest.approx(mask[0, 0].float().mean().item())


def test_svg_classification_prefers_the_matching_pattern():
    grid = VideoGrid(4, 4, 8)
    N = grid.tokens
    q, k, v = qkv(H=2, N=N)
    # head 0 attends within its frame, head 1 to its own place in every frame (sharp logits)
    f = torch.arange(N) // grid.frame_tokens
    s = torch.arange(N) % grid.frame_tokens
    q[0, 0] = torch.nn.functional.one_hot(f, 16).float() * 30
    k[0, 0] = torch.nn.functional.one_hot(f, 16).float()
    q[0, 1] = torch.nn.functional.one_hot(s, 32)[:, :16].float() * 30
    k[0, 1] = torch.nn.functional.one_hot(s, 32)[:, :16].float()
    temporal = parse_dit_spec("svg:0.3").classify(call_of(q, k, v, grid))
    assert temporal.tolist() == [[False, True]]


def naive_dynamic_map(qc, kc, sizes, p, min_ratio):
    out = torch.zeros(qc.shape[0], kc.shape[0], dtype=torch.bool)
    for a in range(qc.shape[0]):
        w = [sizes[b].item() * math.exp((qc[a] @ kc[b]).item() / math.sqrt(qc.shape[1])) for b in range(kc.shape[0])]
        total = sum(w)
        order = sorted(range(len(w)), key=lambda b: -w[b])
        acc = 0.0
        for rank, b in enumerate(order):
            if acc > p and rank >= int(min_ratio * kc.shape[0]):
                break
            out[a, b] = True
            acc += w[b] / total
    return out


def test_svg2_matches_cluster_rule():
    grid = VideoGrid(2, 8, 8)
    q, k, v = qkv(H=2, N=grid.tokens)
    m = parse_dit_spec("svg2[qc=6,kc=10,top_p=0.7,min_kc_ratio=0.2]")
    c = call_of(q, k, v, grid)
    got = m.sparse(c)
    ql, kl, qcent, kcent, ksz = m.clusters(call_of(q, k, v, grid))
    mask = torch.zeros(1, 2, grid.tokens, grid.tokens, dtype=torch.bool)
    for h in range(2):
        pairs = naive_dynamic_map(qcent[0, h], kcent[0, h], ksz[0, h], 0.7, 0.2)
        torch.testing.assert_close(pairs, dynamic_map(qcent, kcent, ksz, 0.7, 0.2)[0, h], atol=0, rtol=0)
        mask[0, h] = pairs[ql[0, h]][:, kl[0, h]]
    torch.testing.assert_close(got.out, masked(q, k, v, mask), atol=1e-5, rtol=1e-4)
    assert got.density == pytest.approx(float(mask.float().mean()))
    # joint attention: every video query also reads every text key
    tk, tv = qkv(H=2, N=5, seed=1)[:2]
    c = call_of(q, k, v, grid)
    c.text_k, c.text_v = tk, tv
    joint = m.sparse(c)
    both = torch.cat([mask, torch.ones(1, 2, grid.tokens, 5, dtype=torch.bool)], -1)
    torch.testing.assert_close(joint.out, masked(q, torch.cat([k, tk], 2), torch.cat([v, tv], 2), both),
                               atol=1e-5, rtol=1e-4)  # fmt: skip


def test_kmeans_reaches_a_fixed_point():
    x = torch.cat([torch.randn(40, 4) + 8, torch.randn(40, 4) - 8])[None]
    labels, cent, sizes = kmeans(x, 2, 50, seed=1)
    assert sorted(sizes[0].tolist()) == [40.0, 40.0]
    for c in range(2):  # every centroid is the mean of its points, every point nearest its centroid
        torch.testing.assert_close(cent[0, c], x[0][labels[0] == c].mean(0))
    assert torch.equal(torch.cdist(x[0], cent[0]).argmin(-1), labels[0])


def naive_radial(frames, tpf, block, decay):
    N = frames * tpf
    tok = torch.zeros(N, N, dtype=torch.bool)
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            for r in range(tpf):
                for c in range(tpf):
                    if j == 0:
                        ok = True
                    else:
                        w = tpf if d <= 1 else max(2 ** tpf.bit_length() / 2 ** d.bit_length() * decay, block)
                        dl = 2 ** tpf.bit_length() / 2 ** d.bit_length()
                        split = dl >= 128 or d % int(128 / dl) == 0
                        ok = abs(c - r) <= w and split
                    tok[i * tpf + r, j * tpf + c] = ok
    return tok


def test_radial_matches_the_official_mask_when_frames_fill_blocks():
    frames, tpf, block = 6, 128, 64  # frames of whole blocks: the per-pair shrink equals a global one
    tok = naive_radial(frames, tpf, block, 0.2)
    n = frames * tpf // block
    expect = torch.zeros(n, n, dtype=torch.bool)
    for a in range(n):
        for b in range(n):
            cols = tok[a * block : (a + 1) * block, b * block : (b + 1) * block].float().mean(0)
            nz = (cols > 0).sum().item()
            expect[a, b] = (cols > 1 / 3).sum().item() / (nz + 1e-9) > 0.6
    assert torch.equal(radial_mask(frames, tpf, block, 0.2), expect)


def test_radial_attends_its_blocks():
    grid = VideoGrid(4, 8, 8)
    q, k, v = qkv(N=grid.tokens)
    m = parse_dit_spec("radial[block=64]")
    got = m.sparse(call_of(q, k, v, grid))
    bm = radial_mask(4, 64, 64, 0.2)
    mask = bm.repeat_interleave(64, 0).repeat_interleave(64, 1)[None, None].expand(1, 2, -1, -1)
    torch.testing.assert_close(got.out, masked(q, k, v, mask), atol=1e-5, rtol=1e-4)


def test_vmoba_matches_global_threshold_rule():
    grid = VideoGrid(3, 4, 4)
    N = grid.tokens
    q, k, v = qkv(H=2, N=N)
    m = parse_dit_spec("vmoba[threshold=0.4]")
    layer = 1  # 2D partition: (F, H/4, W/4) = (3, 1, 1) chunks
    got = m.sparse(call_of(q, k, v, grid, layer=layer))
    order, chunk, C = chunk_layout(grid, m.chunk_shape(layer, grid), torch.device("cpu"))
    cid = torch.empty(N, dtype=torch.long)
    cid[order] = chunk  # chunk of every frame-major token
    mask = torch.zeros(1, 2, N, N, dtype=torch.bool)
    for h in range(2):
        means = torch.stack([k[0, h][cid == c].mean(0) for c in range(C)])
        gate = q[0, h] @ means.T  # (N, C)
        lo, hi = gate.min(), gate.max()
        norm = (gate - lo) / (hi - lo)
        own = torch.nn.functional.one_hot(cid, C).bool()
        total = norm.sum()
        need = 0.4 - norm[own].sum() / total
        sel = own.clone()
        pairs = sorted(((norm[i, c].item(), i, c) for i in range(N) for c in range(C) if not own[i, c]), reverse=True)
        acc = 0.0
        for val, i, c in pairs:
            if need <= 0:
                break
            sel[i, c] = True
            acc += val
            if acc / total >= need:
                break
        mask[0, h] = sel[:, cid]
    torch.testing.assert_close(got.out, masked(q, k, v, mask), atol=1e-5, rtol=1e-4)
    assert got.density == pytest.approx(float(mask.float().mean()))
    # joint attention: every video query also reads every text key
    tk, tv = qkv(H=2, N=5, seed=1)[:2]
    c = call_of(q, k, v, grid, layer=layer)
    c.text_k, c.text_v = tk, tv
    both = torch.cat([mask, torch.ones(1, 2, N, 5, dtype=torch.bool)], -1)
    torch.testing.assert_close(m.sparse(c).out, masked(q, torch.cat([k, tk], 2), torch.cat([v, tv], 2), both),
                               atol=1e-5, rtol=1e-4)  # fmt: skip


def test_psa_attention_matches_pooled_keys():
    grid = VideoGrid(2, 8, 16)  # N = 256: a whole number of 8 × 32 pooled groups
    N = grid.tokens
    q, k, v = qkv(H=2, N=N)
    m = parse_dit_spec("psa[block_m=32,tile=1x8x8]")
    got = m.sparse(call_of(q, k, v, grid))
    order = tile_order(grid, (1, 8, 8), torch.device("cpu"))
    qo, ko, vo = (x.index_select(2, order) for x in (q, k, v))
    gen = torch.Generator().manual_seed(0x95A + 1000 * 1 + 5)
    lvl = pyramid_levels(
        block_importance(qo, ko, 32, 32, q.shape[-1] ** -0.5, gen), {1: 0.6, 2: 0.7, 4: 0.7, 8: 0.8, 0: 1}
    )
    out = torch.zeros_like(qo)
    for h in range(2):
        for i in range(N):
            keys, vals, bias = [], [], []
            for b in range(N // 32):
                p = int(lvl[0, h, i // 32, b])
                if p == 0:
                    continue
                kb = ko[0, h, b * 32 : (b + 1) * 32]
                vb = vo[0, h, b * 32 : (b + 1) * 32]
                keys.append(kb.view(32 // p, p, -1).mean(1))
                vals.append(vb.view(32 // p, p, -1).mean(1))
                bias += [math.log(p)] * (32 // p)
            K, V = torch.cat(keys), torch.cat(vals)
            w = torch.softmax(qo[0, h, i] @ K.T * q.shape[-1] ** -0.5 + torch.tensor(bias), -1)
            out[0, h, i] = w @ V
    inv = torch.empty_like(order)
    inv[order] = torch.arange(N)
    torch.testing.assert_close(got.out, out.index_select(2, inv), atol=1e-5, rtol=1e-4)
    assert avg_pool_tokens(k, 2).shape[2] == N // 2


def test_psa_levels_follow_cumulative_bounds():
    w = torch.tensor([[0.5, 0.2, 0.1, 0.08, 0.05, 0.04, 0.02, 0.01] * 2]) / 2
    lvl = pyramid_levels(w, {1: 0.6, 2: 0.7, 4: 0.7, 8: 0.8, 0: 1.0})
    # sorted: cumulative 0.25, 0.5, 0.6, 0.7, 0.8, ... → level 1 up to and including the block crossing 0.6
    assert lvl[0].tolist().count(1) >= 3
    assert set(lvl[0].tolist()) <= {0, 1, 2, 8}


def test_adaspa_search_then_reuse():
    grid = VideoGrid(2, 8, 8)
    N = grid.tokens
    q, k, v = qkv(H=2, N=N)
    m = parse_dit_spec("adaspa[block=16,warmup=0,research=0]:0.3")
    state: dict = {}
    first = m.attend(call_of(q, k, v, grid, step=0, state=state))
    assert first.density == 1.0  # the search step runs dense
    probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
    n = N // 16
    mass = probs.view(1, 2, n, 16, n, 16).sum(-1).mean(3)  # (1, 2, n, n)
    score = torch.where(torch.eye(n, dtype=torch.bool), torch.tensor(float("inf")), mass).flatten()
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep[score.topk(math.ceil(0.3 * 2 * n * n)).indices] = True
    blocks = keep.view(1, 2, n, n)
    assert torch.equal(state["pattern"], blocks)
    second = m.attend(call_of(q, k, v, grid, step=1, state=state))
    mask = blocks.repeat_interleave(16, -1).repeat_interleave(16, -2)
    torch.testing.assert_close(second.out, masked(q, k, v, mask), atol=1e-5, rtol=1e-4)


def test_ras_selects_by_std_with_starvation_and_reads_cached_keys():
    m = parse_dit_spec("ras:0.25")
    pred = torch.zeros(1, 8, 4)
    pred[0, :, 0] = torch.arange(1.0, 9.0)  # std grows with the token index
    starved = torch.zeros(1, 8)
    assert m.select(pred, starved).tolist() == [[6, 7]]
    starved[0, 0] = 100.0  # a token left out for long comes back
    assert m.select(pred, starved).tolist() == [[0, 7]]
    grid = VideoGrid(1, 2, 4)
    q, k, v = qkv(N=8)
    state: dict = {}
    m.attend(call_of(q, k, v, grid, state=state))  # a full step caches every key
    active = torch.tensor([[1, 5]])
    k2, v2 = k.clone(), v.clone()
    k2[:, :, active[0]] += 1.0
    c = call_of(q[:, :, active[0]], k2[:, :, active[0]], v2[:, :, active[0]], grid, state=state)
    c.active = active
    got = m.attend(c)
    ref = masked(q[:, :, active[0]], k2, v2, torch.ones(1, 2, 2, 8, dtype=torch.bool))
    torch.testing.assert_close(got.out, ref, atol=1e-5, rtol=1e-4)
    assert got.density == pytest.approx(2 / 8)
