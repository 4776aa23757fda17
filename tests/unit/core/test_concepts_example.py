"""The examples of the docs work as written: "adding a method" in docs/CONCEPTS.md, and the new KV method, the new
visual method and the new prefill mode of docs/ARCHITECTURE.md (each one file)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

import tokensieve as ts
from tokensieve.adapters.hf import sieve_attention_enabled
from tokensieve.core import registry

DOCS = Path(__file__).resolve().parents[3] / "docs"


def _blocks(doc: str, after: str) -> list[str]:
    text = (DOCS / doc).read_text()
    start = text.index(after)
    return re.findall(r"```python\n(.*?)```", text[start:], flags=re.S)


def _run(code: str, name: str, package: str) -> dict:
    """Run a file of the docs as if it were a module of ``package`` (its relative imports resolve there)."""
    scope: dict = {"__name__": f"{package}._docs_{name}", "__package__": package}
    exec(compile(code, f"{name}.py", "exec", dont_inherit=True), scope)
    return scope


def test_concepts_method_example(tiny_model):
    code = _blocks("CONCEPTS.md", "## Adding a method")[0]
    try:
        _run(code, "value_norm", "concepts_example")
        assert "value_norm" in ts.method_names()
        ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(0))
        ctx = ts.compress(tiny_model, "value_norm", 0.5).prefill(ids)
        assert ctx.cache.stored_entries() == 3 * 2 * 20
        store = ctx.cache.layers[0].store
        assert set(range(32, 40)) <= set(store.positions[0, 0].tolist())  # the recent window is kept
    finally:
        registry._REGISTRY["kv"].pop("value_norm", None)


def test_architecture_examples_are_one_file_each(tiny_model):
    kv, visual, mode = _blocks("ARCHITECTURE.md", "## How to add")[:3]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import vlm_tiny as vt

    try:
        _run(kv, "value_norm", "tokensieve.methods.kv")
        _run(visual, "norm_drop", "tokensieve.methods.visual")
        late = _run(mode, "late", "tokensieve.engine.prefill")["Late"]
        ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(0))
        ctx = ts.compress(tiny_model, "value_norm[recent=16]:0.5").prefill(ids)
        assert ctx.cache.stored_entries() == 3 * 2 * 20
        assert set(range(24, 40)) <= set(ctx.cache.layers[0].store.positions[0, 0].tolist())
        vlm = vt.llava()
        inputs, _ = vt.llava_batch()
        vctx = ts.compress(vlm, "norm_drop:0.25/snapkv:0.5").prefill(inputs)
        assert vctx.visual_tokens["projector"] == [4, 8, 0]
        # the mode: with first=0 it is the one-pass mode; from layer 1 on, layer 0 keeps the whole prompt
        press = ts.compress(tiny_model, "snapkv:0.5")
        one = press.prefill(ids)
        for first, dense in ((0, []), (1, [0])):
            cache = ts.SieveCache(3, press.plan(), late(press.plan(), first))
            with sieve_attention_enabled(tiny_model), torch.inference_mode():
                press._forward(ids, torch.ones_like(ids), torch.arange(40)[None], cache)
            for layer in range(3):
                got, want = cache.layers[layer].store.lengths(), one.cache.layers[layer].store.lengths()
                assert torch.equal(got, torch.full_like(want, 40) if layer in dense else want)
    finally:
        registry._REGISTRY["kv"].pop("value_norm", None)
        registry._REGISTRY["visual"].pop("norm_drop", None)
