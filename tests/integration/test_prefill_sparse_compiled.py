"""The compiled FlexAttention kernel (slow: one compilation, tens of seconds on a 2-core CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.unit.engine.test_prefill_sparse import masked_reference, qkv
from tokensieve.attention import flex
from tokensieve.attention.dense import Modifiers

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def compiled():
    previous = flex.set_compile(True)
    yield
    flex.set_compile(previous)


def test_compiled_kernel_is_reused_across_lengths():
    """The real path: FlexAttention compiled once (dynamic shapes), equal to SDPA with every block and to the dense
    masked reference with sparse blocks, padding and a window; other lengths and batch sizes do not recompile."""
    flex.STATS.reset()
    for B, T in ((1, 70), (2, 90), (1, 130)):
        q, k, v = qkv(B=B, T=T, seed=T)
        n = -(-T // 16)
        blocks = torch.ones(B, 4, n, n, dtype=torch.bool)
        out = flex.block_sparse_attention(q, k, v, blocks, 16, None, 0.35)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.35, enable_gqa=True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        blocks = torch.rand(B, 4, n, n, generator=torch.Generator().manual_seed(T)) < 0.4
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[-1, :11] = False
        out = flex.block_sparse_attention(q, k, v, blocks, 16, valid, 0.35, Modifiers(window=40))
        ref = masked_reference(q, k, v, blocks | torch.eye(n, dtype=torch.bool), 16, valid, 0.35, Modifiers(window=40))
        torch.testing.assert_close(out[:, :, 11:], ref[:, :, 11:], atol=1e-5, rtol=1e-5)
    assert flex.STATS.calls == 6
    # one graph for batch size 1 and one for larger batches (dynamo specialises sizes 0 and 1), none per length
    assert flex.STATS.compiles <= 2


@torch.inference_mode()
def test_full_density_on_the_embedded_model_equals_transformers(real_model):
    """The real path end to end: the embedded model, the compiled kernel, FlexPrefill at gamma = 1 (every block with
    attention mass) reproduces plain transformers; at its defaults it reads fewer blocks and still runs."""
    import tokensieve as ts

    model, _ = real_model
    ids = torch.randint(10, 40000, (1, 700), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits[0, -1]
    flex.STATS.reset()
    ctx = ts.compress(model, "flexprefill[gamma=1.0,min_budget=0]").prefill(ids)
    torch.testing.assert_close(ctx.logits[0], ref, atol=2e-3, rtol=1e-3)
    assert flex.STATS.density == 1.0
    flex.STATS.reset()
    ctx = ts.compress(model, "flexprefill[min_budget=128]").prefill(ids)
    assert torch.isfinite(ctx.logits).all()
    assert flex.STATS.density < 1.0
