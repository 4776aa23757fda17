"""Quest's page-wise per-head path (each page read once per KV head) equals the per-query-head gather."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from tokensieve.attention.sparse import page_bounds
from tokensieve.cache.decode import DecodeLayer, DecodeRun
from tokensieve.cache.storage import DenseKV
from tokensieve.core.context import ModelShape
from tokensieve.methods.kv.quest import Quest

D = 8


@pytest.mark.parametrize("n", [64, 70, 95])  # full last page, partial last pages
@pytest.mark.parametrize("B", [1, 3])
def test_page_union_equals_per_query_head_gather(n, B):
    g = torch.Generator().manual_seed(n + B)
    H, G, P = 2, 3, 8
    method = Quest(page=P, min_pages=2, dense_layers=0)
    store = DenseKV(torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g),
                    torch.arange(n).expand(B, H, n))  # fmt: skip
    run = DecodeRun(ModelShape(1, H * G, H, D, 1024), torch.tensor([0]), ts.Budget.ratio(0.3))
    layer = DecodeLayer(0, store, run, D**-0.5)
    layer.state = method.setup(layer, None)
    method.on_append(layer, 1)
    q = torch.randn(B, H * G, 1, D, generator=g)
    cur = (n - 1) // P
    k = max(method.min_pages, -(-run.tokens_for(n) // P))
    bounds = page_bounds(q.view(B, H, G, D), layer.state["meta"][..., :cur])
    fast = method._per_head_pages(layer, q, bounds, cur, k)
    slow = method._per_head(layer, q, bounds, cur, k, 0)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(method.step(layer, q), fast)
