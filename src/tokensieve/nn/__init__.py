"""Neural-network building blocks that stand on torch alone (no model loading, no lab).

* :mod:`tokensieve.nn.gaussian` — density-adaptive (Gaussian) attention: Form A (GAAM's multi-head block, product of
  N Gaussians per head divided by its clamped sum, residual; a log-space ``stable`` option) and Form B (DAAM's
  Algorithm 1, rows split into heads with per-head offset and scale vectors, not normalised), each computing by
  default what its authors' code computes.
* :mod:`tokensieve.nn.gqdaam` — GQ-DAAM: Form B in front of the official grouped-query attention layer.
* :mod:`tokensieve.nn.speech` — the DAAM speech networks (CNN-LSTM and Transformer) with the Gaussian block, standard
  multi-head attention or no block in front, and a frame scorer (a learned frame density, sampled systematically)
  for token selection.

See docs/DAAM.md.
"""

from .gaussian import (
    DensityAdaptiveAttention,
    GaussianBlock,
    MultiHeadGaussianAdaptiveAttention,
    compute_dtype,
    head_sizes,
    moments,
)
from .gqdaam import GroupedQueryAttention, GroupedQueryDAAM
from .speech import (
    ATTENTION_KINDS,
    DAAMAudioCNNLSTM,
    DAAMAudioTransformer,
    FrameScorer,
    FrontBlock,
    count_parameters,
    he_uniform_,
    inclusion_probabilities,
    systematic_sample,
)

__all__ = [
    "ATTENTION_KINDS",
    "DAAMAudioCNNLSTM",
    "DAAMAudioTransformer",
    "DensityAdaptiveAttention",
    "FrameScorer",
    "FrontBlock",
    "GaussianBlock",
    "GroupedQueryAttention",
    "GroupedQueryDAAM",
    "MultiHeadGaussianAdaptiveAttention",
    "compute_dtype",
    "count_parameters",
    "he_uniform_",
    "head_sizes",
    "inclusion_probabilities",
    "moments",
    "systematic_sample",
]
