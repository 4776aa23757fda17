"""diffusers, the optional extra ``tokensieve[diffusion]``: imported when first needed, else an error naming it."""

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
