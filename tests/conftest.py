"""Shared fixtures: a tiny random Llama built in-process, and the real embedded model loaded once per session."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_config(**overrides: object):
    from transformers import LlamaConfig

    cfg: dict[str, object] = {
        "vocab_size": 97,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,  # GQA with groups of 3, like the embedded model
        "head_dim": 8,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def make_tiny_model(seed: int = 0, **overrides: object):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides))
    # Larger-than-default weights give peaky attention, so that selections actually differ between methods.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(4.0)
    model.set_attn_implementation("sdpa")
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M-Instruct, loaded once (provisioned by `make setup`)."""
    from tokensieve.adapters.models import is_pulled, load_model

    if not is_pulled():
        pytest.fail("The embedded model is not provisioned: run `make setup` (or `tokensieve pull`) first.")
    return load_model()


def synthetic_profiles(model) -> dict:
    """Valid profiles for the tiny model: retrieval heads from the real (data-free) profiler, the others built
    from deterministic numbers (their profilers need a tokenizer and a model that can retrieve)."""
    from tokensieve.adapters.models import model_shape
    from tokensieve.adapters.profiles import Profile, shape_dict
    from tokensieve.profiling.retrieval_heads import profile_retrieval_heads

    shape = model_shape(model)
    L, H, Hq, D = shape.num_layers, shape.num_kv_heads, shape.num_q_heads, shape.head_dim
    g = torch.Generator().manual_seed(0)
    sd = shape_dict(shape)
    return {
        "retrieval-heads": profile_retrieval_heads(model, n_random=24, repeats=3, echo_share=0.2, induction_share=0.2),
        "compresskv": Profile(
            "compresskv",
            shape.key,
            sd,
            {},
            {
                "srh": [torch.randperm(Hq, generator=g)[:4].tolist() for _ in range(L)],
                "layer_score": (torch.rand(L, generator=g) + 0.1).div_(1).tolist(),
            },
        ),
        "fasa": Profile(
            "fasa", shape.key, sd, {}, {"ks": [8, 16], "ca": torch.rand(2, L, H, D // 2, generator=g).tolist()}
        ),
        "duo": Profile(
            "duo", shape.key, sd, {}, {"gates": torch.rand(L, H, generator=g).tolist(), "sink": 4, "recent": 8}
        ),
        "minference": Profile(  # one pattern per (layer, query head), the three kinds in turn
            "minference",
            shape.key,
            sd,
            {},
            {
                "patterns": [
                    [[("vs", 16, 16), ("a", 4, 16), ("block", 2, 0)][(layer + h) % 3] for h in range(Hq)]
                    for layer in range(L)
                ]
            },
        ),
        "spkv": Profile(  # SP-KV's write gate: random linear gates, a made-up monotone calibration table
            "spkv",
            shape.key,
            sd,
            {},
            {
                "window": 8,
                "hidden": 0,
                "layers": [
                    {"w1": (torch.randn(H, 2 * H * D, generator=g) * (2 * H * D) ** -0.5 * 2).tolist(), "b1": [0.0] * H}
                    for _ in range(L)
                ],
                "calibration": {"tau": [0.1, 0.5, 0.9], "out_density": [0.9, 0.5, 0.1]},
            },
        ),
        "kvzap": Profile(  # KVzap's surrogates: random linear and two-layer MLP maps of the hidden state
            "kvzap",
            shape.key,
            sd,
            {},
            {
                "tensors": {
                    "linear.weight": torch.randn(L, H, shape.hidden_size, generator=g) * shape.hidden_size**-0.5 * 2,
                    "linear.bias": torch.zeros(L, H),
                    "mlp.w1": torch.randn(L, 16, shape.hidden_size, generator=g) * shape.hidden_size**-0.5,
                    "mlp.b1": torch.zeros(L, 16),
                    "mlp.w2": torch.randn(L, H, 16, generator=g) * 0.5,
                    "mlp.b2": torch.full((L, H), -1.0),
                }
            },
        ),
        "retention": Profile(  # global retention gates: random per-layer maps, one shared final projection
            "retention",
            shape.key,
            sd,
            {},
            {
                "w1": (torch.randn(L, 4, 2 * H * D, generator=g) * (2 * H * D) ** -0.5 * 2).tolist(),
                "b1": torch.zeros(L, 4).tolist(),
                "w2": torch.randn(H, 4, generator=g).tolist(),
                "b2": [2.0] * H,
            },
        ),
    }


@pytest.fixture(scope="session")
def tiny_profiles(tiny_model):
    return synthetic_profiles(tiny_model)
