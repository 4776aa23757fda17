"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def test_readme_python_blocks_run(real_model, monkeypatch):
    import tokensieve as ts

    monkeypatch.setattr(ts, "load_model", lambda *a, **k: real_model)  # the session's model, already loaded
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    scope: dict[str, Any] = {}
    for block in blocks:
        if "path/to/" in block:  # needs the reader's own checkpoint: the same calls run on a tiny model in
            continue  # tests/unit/engine/test_vlm_families.py (test_the_readme_vlm_calls)
        short = block.replace("max_new_tokens=32", "max_new_tokens=8").replace("decode(fork, 32", "decode(fork, 8")
        exec(compile(short, "README.md", "exec"), scope)
    ctx, fork = scope["ctx"], scope["fork"]
    assert fork.cache.stored_entries() > ctx.cache.stored_entries()  # the question went into the fork only
    assert ctx.cache.stored_entries() == 30 * 3 * ts.Budget.ratio(0.25).tokens_for(len(scope["parts"].context))
