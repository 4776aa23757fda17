"""tokensieve — decide which tokens matter, and measure what that keeps and what it costs.

Quick start::

    import tokensieve as ts

    model, tok = ts.load_model()  # the embedded SmolLM2-135M-Instruct (run `tokensieve pull` once)
    press = ts.compress(model, "snapkv", budget=0.25)
    ctx = press.prefill(ids)  # compressed to a quarter of the prompt's KV entries
    out = press.decode(ctx, max_new_tokens=32, eos_token_ids=[tok.eos_token_id])
"""

from __future__ import annotations

from .adapters.models import load_model, pull
from .cache.sieve_cache import SieveCache
from .core import Budget, Capabilities, LayerContext, Method, Phase, PrefillMethod, Selection
from .core.registry import register
from .engine import CachedContext, Compressor, Generation, compress
from .errors import (
    CapabilityError,
    ConfigError,
    ModelNotFoundError,
    PromptError,
    TokensieveError,
    TokensieveWarning,
    UnknownNameError,
)
from .registry import create_method, list_methods, method_names

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "CachedContext",
    "Capabilities",
    "CapabilityError",
    "Compressor",
    "ConfigError",
    "Generation",
    "LayerContext",
    "Method",
    "ModelNotFoundError",
    "Phase",
    "PrefillMethod",
    "PromptError",
    "Selection",
    "SieveCache",
    "TokensieveError",
    "TokensieveWarning",
    "UnknownNameError",
    "__version__",
    "compress",
    "create_method",
    "list_methods",
    "load_model",
    "method_names",
    "pull",
    "register",
]
