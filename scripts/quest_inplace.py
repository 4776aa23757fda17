"""Quest's sparse attention read in place vs copied (docs/results/benchmarks.md): the attention of 28 sparse
layers at 8000 tokens, batch 1, 32-token pages, a 1/8 budget, against dense SDPA over the same cache.

Candidates: `lib` (the library's page gather + masked SDPA, per query head), `eager-indexed` (the selection written
as indexed reductions, eager), `compiled` (the same, torch.compile(dynamic=True): pages read in place) and
`compiled-max` (one page set per KV head). Random keys; outputs are checked against each other first.

Usage: python scripts/quest_inplace.py [THREADS]
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from tokensieve.attention.sparse import page_bounds, page_meta

torch.manual_seed(0)
threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(threads)
B, H, G, D, P, n, cap = 1, 3, 3, 64, 32, 8000, 8192
L = 28
scale = D**-0.5
bufs = [(torch.randn(B, H, cap, D), torch.randn(B, H, cap, D)) for _ in range(L)]
metas = [page_meta(k, n // P, P) for k, _ in bufs]
cur = (n - 1) // P
k = max(3, -(-(n // 8) // P))


def eager(qg, kbuf, vbuf, meta, n: int, cur: int, k: int):
    bounds = page_bounds(qg, meta[..., :cur])
    top = bounds.topk(k - 1, dim=-1, sorted=False).indices
    pages = torch.cat([top, torch.full_like(top[..., :1], cur)], -1)  # (B,H,G,k)
    slots = (pages[..., None] * P + torch.arange(P)).view(B, H, G, k * P)
    valid = slots < n
    slots = slots.clamp(max=n - 1)
    bi = torch.arange(B)[:, None, None, None]
    hi = torch.arange(H)[None, :, None, None]
    K = kbuf[bi, hi, slots]  # (B,H,G,kP,D)
    V = vbuf[bi, hi, slots]
    logits = (qg[..., None, :] * K).sum(-1) * scale
    logits = logits.masked_fill(~valid, float("-inf"))
    p = logits.softmax(-1)
    return (p[..., None] * V).sum(-2)


fused = torch.compile(eager, dynamic=True)


def eager_max(qg, kbuf, vbuf, meta, n: int, cur: int, k: int):
    bounds = page_bounds(qg, meta[..., :cur]).amax(2)  # (B,H,cur)
    top = bounds.topk(k - 1, dim=-1, sorted=False).indices
    pages = torch.cat([top, torch.full_like(top[..., :1], cur)], -1)  # (B,H,k)
    slots = (pages[..., None] * P + torch.arange(P)).view(B, H, k * P)
    valid = slots < n
    slots = slots.clamp(max=n - 1)
    bi = torch.arange(B)[:, None, None]
    hi = torch.arange(H)[None, :, None]
    K = kbuf[bi, hi, slots]  # (B,H,kP,D)
    V = vbuf[bi, hi, slots]
    logits = (qg[:, :, :, None, :] * K[:, :, None]).sum(-1) * scale  # (B,H,G,kP)
    logits = logits.masked_fill(~valid[:, :, None], float("-inf"))
    p = logits.softmax(-1)
    return (p[..., None] * V[:, :, None]).sum(-2)


fused_max = torch.compile(eager_max, dynamic=True)


def dense(qg, kbuf, vbuf, n):
    return F.scaled_dot_product_attention(qg, kbuf[:, :, :n], vbuf[:, :, :n], scale=scale)


def lib(qg, kbuf, vbuf, meta, n, cur, k):  # the library's per-head-pages path, standalone
    bounds = page_bounds(qg, meta[..., :cur])
    top = bounds.topk(k - 1, dim=-1, sorted=False).indices
    chosen = torch.zeros(B, H, G, cur + 1, dtype=torch.bool)
    chosen.scatter_(3, top, True)
    chosen[..., cur] = True
    union = chosen.any(2)
    counts = union.sum(-1)
    U = int(counts.max())
    order = union.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[..., :U]
    picked = chosen.gather(3, order[:, :, None, :].expand(B, H, G, U))
    picked &= (torch.arange(U) < counts[..., None])[:, :, None, :]
    slots = order[..., None] * P + torch.arange(P)
    mask = (picked[..., None] & (slots < n)[:, :, None]).view(B, H, G, U * P)
    per_row = cap // P
    flat = (torch.arange(B * H)[:, None] * per_row + order.view(B * H, U)).view(-1)
    K = kbuf.view(-1, P, D).index_select(0, flat).view(B, H, U * P, D)
    V = vbuf.view(-1, P, D).index_select(0, flat).view(B, H, U * P, D)
    return F.scaled_dot_product_attention(qg, K, V, attn_mask=mask, scale=scale)


qs = [torch.randn(B, H, G, D) for _ in range(L)]
for i in range(2):
    a = eager(qs[i], *bufs[i], metas[i], n, cur, k)
    b = fused(qs[i], *bufs[i], metas[i], n, cur, k)
    c = lib(qs[i], *bufs[i], metas[i], n, cur, k)
    print("maxdiff fused-eager", (a - b).abs().max().item(), "lib-eager", (a - c).abs().max().item())
t0 = time.perf_counter()
fused(qs[0], *bufs[0], metas[0], n - 5, (n - 6) // P, k)
print("recompile check", time.perf_counter() - t0)


def bench(fn):
    t = time.perf_counter()
    for i in range(L):
        fn(i)
    return time.perf_counter() - t


cands = {
    "dense": lambda i: dense(qs[i], *bufs[i], n),
    "lib": lambda i: lib(qs[i], *bufs[i], metas[i], n, cur, k),
    "eager-indexed": lambda i: eager(qs[i], *bufs[i], metas[i], n, cur, k),
    "compiled": lambda i: fused(qs[i], *bufs[i], metas[i], n, cur, k),
    "compiled-max": lambda i: fused_max(qs[i], *bufs[i], metas[i], n, cur, k),
}
res = {c: [] for c in cands}
for r in range(15):
    for c, fn in cands.items():
        res[c].append(bench(fn) * 1000)
for c in cands:
    print(
        f"{c:15s} {statistics.median(res[c]):8.2f} ms / 28 layers  (dense/this {statistics.median(res['dense']) / statistics.median(res[c]):.2f})"
    )
