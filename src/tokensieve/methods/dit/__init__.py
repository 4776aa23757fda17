"""Sparse attention and token caching for diffusion transformers: one file per paper (docs/DIT.md).

``parse_dit_spec("svg:0.3")`` builds a method; :mod:`tokensieve.adapters.diffusion` attaches it to a diffusers
transformer through its attention processors.
"""

from .base import Attended, DiTCall, DiTMethod, VideoGrid
from .spec import dit_method_names, get_dit_class, label_of, parse_dit_spec

__all__ = [
    "Attended",
    "DiTCall",
    "DiTMethod",
    "VideoGrid",
    "dit_method_names",
    "get_dit_class",
    "label_of",
    "parse_dit_spec",
]
