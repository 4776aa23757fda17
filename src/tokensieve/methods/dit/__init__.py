"""Sparse attention and token caching for diffusion transformers: one file per paper (docs/DIT.md).

Each method registers in the one method registry as family ``dit`` (``tokensieve methods`` lists them as
``dit:name``); :func:`tokensieve.spec.parse_dit_spec` builds one from a spec (``"svg:0.3"``), and
:mod:`tokensieve.adapters.diffusion` attaches it to a diffusers transformer through its attention processors.
"""

from .base import Attended, DiTCall, DiTMethod, VideoGrid
from .grammar import label_of

__all__ = [
    "Attended",
    "DiTCall",
    "DiTMethod",
    "VideoGrid",
    "label_of",
]
