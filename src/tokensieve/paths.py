"""Where tokensieve keeps files of its own on the user's machine (no imports of the package: the bottom floor)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "TOKENSIEVE_HOME"


def cache_home() -> Path:
    """Root of tokensieve's user cache: ``$TOKENSIEVE_HOME``, else ``$XDG_CACHE_HOME/tokensieve``."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tokensieve"


__all__ = ["ENV_HOME", "cache_home"]
