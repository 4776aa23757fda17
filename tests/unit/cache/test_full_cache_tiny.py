"""The full-cache path through our cache and kernels reproduces transformers' own forward pass."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from tokensieve.cache.sieve_cache import SieveCache
from tokensieve.data.prompts import left_pad


def _hf_greedy_logits(model, ids, steps):
    """Reference: plain transformers (sdpa, DynamicCache), greedy, returns per-step last logits."""
    out = model(input_ids=ids, use_cache=True)
    logits = [out.logits[:, -1]]
    pkv = out.past_key_values
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        out = model(input_ids=nxt, past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@torch.inference_mode()
def test_full_method_matches_transformers(tiny_model):
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (1, 40))
    ref = _hf_greedy_logits(tiny_model, ids, steps=6)
    press = ts.compress(tiny_model, "full")
    ctx = press.prefill(ids)
    got = [ctx.logits]
    for _ in range(6):
        press.extend(ctx, got[-1].argmax(-1)[:, None])  # a single-token extend is a decode step
        got.append(ctx.logits)
    torch.testing.assert_close(torch.stack(got, 1), ref, atol=1e-4, rtol=1e-4)
    assert ctx.cache.seq_length() == 46
    assert tiny_model.config._attn_implementation == "sdpa"  # restored after every call


@torch.inference_mode()
def test_batch_with_left_padding_equals_single(tiny_model):
    torch.manual_seed(1)
    rows = [torch.randint(3, 97, (n,)).tolist() for n in (30, 17, 24)]
    ids, mask = left_pad(rows, pad_id=0)
    press = ts.compress(tiny_model, "full")
    ctx = press.prefill(ids, mask)
    first_logits = ctx.logits.clone()
    gen = press.decode(ctx, 5)
    for b, r in enumerate(rows):
        single = press.prefill(torch.tensor([r]))
        torch.testing.assert_close(first_logits[b], single.logits[0], atol=1e-4, rtol=1e-4)
        assert gen.tokens[b] == press.decode(single, 5).tokens[0]


@torch.inference_mode()
def test_generate_inside_context_manager_uses_sieve_cache(tiny_model):
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(2))
    ref = tiny_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with ts.compress(tiny_model, "full"):
        out = tiny_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert isinstance(out.past_key_values.sieve, SieveCache)
    assert torch.equal(out.sequences, ref)
    assert tiny_model.config._attn_implementation == "sdpa"


def test_attention_without_sieve_cache_is_a_clear_error(tiny_model):
    ids = torch.randint(3, 97, (1, 10))
    with ts.compress(tiny_model, "full"), pytest.raises(RuntimeError, match="SieveCache"):
        tiny_model(input_ids=ids, use_cache=False)


def test_prompt_errors(tiny_model):
    press = ts.compress(tiny_model, "full")
    with pytest.raises(ts.PromptError, match="empty"):
        press.prefill(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ts.PromptError, match="context"):
        press.prefill(torch.randint(3, 97, (1, 600)))
    ids, mask = left_pad([[5, 6, 7], [8, 9]], 0)
    with pytest.raises(ts.PromptError, match="left"):
        press.prefill(ids.flip(1), mask.flip(1))


def test_a_sieve_cache_without_routed_attention_is_a_clear_error(tiny_model):
    from tokensieve.adapters.hf import hf_cache

    cache = ts.compress(tiny_model, "full").new_cache()
    with pytest.raises(RuntimeError, match="not routed"):
        tiny_model(input_ids=torch.randint(3, 97, (1, 10)), past_key_values=hf_cache(cache), use_cache=True)


@torch.inference_mode()
def test_bad_inputs_are_refused_with_a_reason(tiny_model):
    press = ts.compress(tiny_model, "full")
    ctx = press.prefill(torch.randint(3, 97, (2, 12)))
    with pytest.raises(ts.PromptError, match="left"):  # a right-padded chunk would read logits from a pad
        press.extend(ctx, torch.randint(3, 97, (2, 3)), torch.tensor([[1, 1, 0], [1, 1, 1]]))
    with pytest.raises(ts.ConfigError, match="only 0"):
        press.prefill(torch.randint(3, 97, (1, 5)), torch.tensor([[1, 2, 1, 1, 1]]))
    with pytest.raises(ts.ConfigError, match="torch tensors"):
        press.prefill([[5, 6, 7]])  # type: ignore[arg-type]
    with pytest.raises(ts.ConfigError, match="integer token ids"):
        press.prefill(torch.rand(1, 5))
    with pytest.raises(ts.ConfigError, match="token ids in"):
        press.prefill(torch.tensor([[5, 6, 1000]]))
    with pytest.raises(ts.ConfigError, match="whole number"):
        press.decode(ctx, "5")  # type: ignore[arg-type]
    with pytest.raises(ts.PromptError, match="context"):  # headroom is checked before it is allocated
        press.prefill(torch.randint(3, 97, (1, 10)), reserve=10**9)
    assert press.decode(ctx, 2, eos_token_ids=None).steps >= 1  # type: ignore[arg-type]


@torch.inference_mode()
def test_beam_search_inside_compress(tiny_model):
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(6))
    kw = {"max_new_tokens": 6, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
    ref = tiny_model.generate(ids, **kw)
    with ts.compress(tiny_model, "full"):
        assert torch.equal(tiny_model.generate(ids, **kw), ref)  # the cache follows the beams
    with ts.compress(tiny_model, "adakv:0.5"):  # ragged rows follow the beams too
        out = tiny_model.generate(ids, **kw)
    assert out.shape == ref.shape
    with ts.compress(tiny_model, "+quest:0.5"), pytest.raises(ts.CapabilityError, match="Beam search"):
        tiny_model.generate(ids, **kw)


def test_wrong_argument_types_are_refused_with_a_reason(tiny_model):
    for method in (None, 123):
        with pytest.raises(ts.ConfigError, match="spec"):
            ts.compress(tiny_model, method)  # type: ignore[arg-type]
    with pytest.raises(ts.ConfigError, match="Profile"):
        ts.compress(tiny_model, "razor", 0.5, profile="x")
    with pytest.raises(ts.ConfigError, match="budget"):
        ts.compress(tiny_model, "snapkv", "abc")
