"""Running a small evaluation grid on a tiny model, shared by the evaluation tests."""

from __future__ import annotations

import io
from typing import Any

from tokensieve.data.testing import CharTokenizer
from tokensieve.eval.config import EvalConfig
from tokensieve.eval.runner import run_eval
from tokensieve.results.store import ResultStore


def run_grid(grid: dict[str, str], model: Any, store: Any, **overrides: str) -> Any:
    """Run ``grid`` (an eval grid's options) into ``store`` with ``overrides``; no progress bar, output swallowed."""
    cfg = EvalConfig.from_mapping({**grid, "store": str(store), **overrides})
    return run_eval(cfg, model=model, tokenizer=CharTokenizer(), progress=False, out=io.StringIO())


def eval_rows(store: Any) -> list[dict[str, Any]]:
    """Every eval row of ``store``."""
    with ResultStore(store, readonly=True) as s:
        return s.rows("eval")
