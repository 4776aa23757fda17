"""Diffusion transformers from diffusers: sparse attention through the attention-processor API (docs/DIT.md).

``with sparsify(transformer, "svg:0.3", num_steps=50) as sieve: pipe(...)`` — the sieve sets its own processor on
every self-attention module of a ``WanTransformer3DModel`` or ``SD3Transformer2DModel`` (and puts the original ones
back on exit), follows the denoising step from the ``timestep`` the model is called with, and records what every
call computed. diffusers is the optional extra ``tokensieve[diffusion]``; it is imported when first needed.
"""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError

EXTRA = "diffusion"


def require_diffusers() -> Any:
    """The diffusers module, or a ConfigError naming the extra that installs it."""
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError(f"Diffusion transformers need diffusers: pip install 'tokensieve[{EXTRA}]' ({e}).") from None
    return diffusers


from .load import load_transformer  # noqa: E402
from .sieve import DiTSieve, dit_spec, sparsify  # noqa: E402

__all__ = ["EXTRA", "DiTSieve", "dit_spec", "load_transformer", "require_diffusers", "sparsify"]
