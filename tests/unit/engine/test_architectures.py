"""Every architecture we claim, built tiny from its config: at 100 % budget tokensieve equals plain transformers
(logits and greedy tokens), and a left-padded batch equals each prompt alone — sliding windows (per layer, as in
Gemma's alternating layers) and logit soft-capping included."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from tokensieve.data.prompts import left_pad

VOCAB, WINDOW = 128, 16
COMMON = {"vocab_size": VOCAB, "max_position_embeddings": 512, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _llama(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, **kw)


def _configs():
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        GPTNeoXConfig,
        MistralConfig,
        Olmo2Config,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    dims = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4}
    return {
        "llama-mha": lambda: _llama(num_key_value_heads=4, **COMMON),
        "llama-gqa": lambda: _llama(num_key_value_heads=2, **COMMON),
        "qwen2": lambda: Qwen2Config(num_key_value_heads=2, **dims, **COMMON),
        "qwen2-window": lambda: Qwen2Config(
            num_key_value_heads=2, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2, **dims, **COMMON
        ),
        "qwen3": lambda: Qwen3Config(num_key_value_heads=2, head_dim=16, **dims, **COMMON),
        "mistral": lambda: MistralConfig(num_key_value_heads=2, sliding_window=None, **dims, **COMMON),
        "mistral-window": lambda: MistralConfig(num_key_value_heads=2, sliding_window=WINDOW, **dims, **COMMON),
        "gemma2": lambda: Gemma2Config(
            num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=5.0, **dims, **COMMON
        ),
        "gemma3": lambda: Gemma3TextConfig(
            num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2, **dims, **COMMON
        ),
        "phi3": lambda: Phi3Config(num_key_value_heads=2, **dims, **COMMON),
        "olmo2": lambda: Olmo2Config(num_key_value_heads=2, **dims, **COMMON),
        "gpt2": lambda: GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=512, vocab_size=VOCAB),
        "gpt-neox": lambda: GPTNeoXConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, **COMMON
        ),
    }


ARCHS = list(_configs())


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _configs()[request.param]()
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger weights than the default init, so that attention is far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return request.param, model


def _hf_greedy(model, ids, steps):
    with torch.inference_mode():
        out = model.generate(
            ids, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
        )
    return out.sequences[0, ids.shape[1] :].tolist(), torch.stack(out.logits, 1)[0]


@torch.inference_mode()
def _ours(press, ids, mask, steps):
    ctx = press.prefill(ids, mask)
    logits = [ctx.logits]
    gen = []
    for _ in range(steps):
        nxt = logits[-1].argmax(-1)
        gen.append(nxt)
        press.extend(ctx, nxt[:, None])
        logits.append(ctx.logits)
    return torch.stack(gen, 1), torch.stack(logits[:steps], 1)


@pytest.mark.parametrize("spec", ["full", "snapkv:1.0", "tova:1.0"])
def test_full_budget_equals_transformers(arch_model, spec):
    name, model = arch_model
    ids = torch.randint(3, VOCAB, (1, 48), generator=torch.Generator().manual_seed(1))
    ref_tokens, ref_logits = _hf_greedy(model, ids, 6)
    tokens, logits = _ours(ts.compress(model, spec), ids, None, 6)
    assert tokens[0].tolist() == ref_tokens, name
    torch.testing.assert_close(logits[0], ref_logits, atol=2e-4, rtol=2e-4)


def test_batched_equals_one_at_a_time(arch_model):
    name, model = arch_model
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (48, 30, 41)]
    ids, mask = left_pad(rows, 0)
    for spec in ("full", "snapkv:0.5"):
        press = ts.compress(model, spec)
        batch_tokens, batch_logits = _ours(press, ids, mask, 4)
        for b, r in enumerate(rows):
            tokens, logits = _ours(press, torch.tensor([r]), None, 4)
            assert batch_tokens[b].tolist() == tokens[0].tolist(), (name, spec, b)
            torch.testing.assert_close(batch_logits[b], logits[0], atol=2e-4, rtol=2e-4)


def test_generate_inside_compress_equals_transformers(arch_model):
    name, model = arch_model
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    ref_tokens, _ = _hf_greedy(model, ids, 5)
    with ts.compress(model, "full"), torch.inference_mode():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out[0, ids.shape[1] :].tolist() == ref_tokens, name


def test_decode_methods_are_refused_before_any_work_where_attention_is_modified(arch_model):
    from tokensieve.adapters.models import model_shape

    _, model = arch_model
    if not model_shape(model).modified:
        ts.compress(model, "+quest:0.5")  # plain attention: accepted
        return
    with pytest.raises(ts.CapabilityError, match="does not support"):
        ts.compress(model, "+quest:0.5")


def test_a_model_needing_eager_attention_loads_and_compresses(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.unit.core.test_registry_cli import save_tiny

    torch.manual_seed(0)
    save_tiny(tmp_path, AutoModelForCausalLM.from_config(_configs()["gemma2"]()))
    model, _ = ts.load_model(str(tmp_path))
    ids = torch.randint(3, 97, (1, 24), generator=torch.Generator().manual_seed(4))
    ref_tokens, _ = _hf_greedy(model, ids, 3)
    tokens, _ = _ours(ts.compress(model, "full"), ids, None, 3)
    assert tokens[0].tolist() == ref_tokens
