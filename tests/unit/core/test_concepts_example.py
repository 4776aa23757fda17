"""The "adding a method" example of docs/CONCEPTS.md works as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import tokensieve as ts
from tokensieve.core import registry


def test_concepts_method_example(tiny_model):
    text = (Path(__file__).resolve().parents[3] / "docs" / "CONCEPTS.md").read_text()
    block = re.search(r"## Adding a method.*?```python\n(.*?)```", text, flags=re.S)
    assert block is not None
    scope: dict = {"__name__": "concepts_example"}
    try:
        exec(compile(block.group(1), "CONCEPTS.md", "exec", dont_inherit=True), scope)
        assert "value_norm" in ts.method_names()
        ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(0))
        ctx = ts.compress(tiny_model, "value_norm", 0.5).prefill(ids)
        assert ctx.cache.stored_entries() == 3 * 2 * 20
        store = ctx.cache.layers[0].store
        assert set(range(32, 40)) <= set(store.positions[0, 0].tolist())  # the recent window is kept
    finally:
        registry._REGISTRY.pop("value_norm", None)
