"""Serving: an OpenAI-compatible HTTP server over compressed caches (``tokensieve serve``), with continuous
batching, admission by KV memory and stored contexts; an lm-evaluation-harness backend; Ray replicas.

The engine (:mod:`.engine`, :mod:`.batching`) needs nothing beyond tokensieve itself; the HTTP app needs the
``serve`` extra (FastAPI, uvicorn), Ray the ``ray`` extra, the harness backend the ``lmeval`` extra. Each is
imported only when used, and a missing one is a :class:`~tokensieve.errors.ConfigError` naming the extra.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ConfigError


def require(module: str, extra: str) -> Any:
    """Import ``module`` or explain which optional extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"This needs the '{module}' package, which is not installed: pip install 'tokensieve[{extra}]' "
            f"(or the pinned set: pip install -r requirements.txt)."
        ) from exc


__all__ = ["require"]
