"""Diffusion transformers from diffusers: sparse attention through the attention-processor API (docs/DIT.md).

``with sparsify(transformer, "svg:0.3", num_steps=50) as sieve: pipe(...)`` — the sieve sets its own processor on
every self-attention module of a ``WanTransformer3DModel`` or ``SD3Transformer2DModel`` (and puts the original ones
back on exit), follows the denoising step from the ``timestep`` the model is called with, and records what every
call computed. diffusers is the optional extra ``tokensieve[diffusion]``; it is imported when first needed.
"""

from __future__ import annotations

from .deps import EXTRA, require_diffusers
from .load import load_transformer
from .sieve import DiTSieve, dit_spec, sparsify

__all__ = ["EXTRA", "DiTSieve", "dit_spec", "load_transformer", "require_diffusers", "sparsify"]
