"""Visual-token methods: the ``visual`` family of the one method registry (score → select → apply on an image's
tokens, at the vision / projector / llm stage of a vision-language model). One file per method; they are written
in the one spec grammar of :mod:`tokensieve.spec` (``todre:0.1/snapkv:0.25``)."""

from .base import Stage, VisualContext, VisualGroup, VisualKept, VisualMethod

__all__ = ["Stage", "VisualContext", "VisualGroup", "VisualKept", "VisualMethod"]
