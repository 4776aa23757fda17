"""Neural-network building blocks that stand on torch alone (no model loading, no lab).

* :mod:`tokensieve.nn.gaussian` — density-adaptive (Gaussian) attention: Form A (GAAM's multi-head block, normalised
  product of N Gaussians per head, residual) and Form B (DAAM's Algorithm 1, per-head offset and scale vectors, not
  normalised), with the papers' disagreements as options.
* :mod:`tokensieve.nn.speech` — the DAAM speech networks (CNN-LSTM and Transformer) with the Gaussian block, standard
  multi-head attention or no block in front.

See docs/DAAM.md.
"""

from .gaussian import DensityAdaptiveAttention, GaussianBlock, MultiHeadGaussianAdaptiveAttention, head_sizes, moments
from .speech import ATTENTION_KINDS, DAAMAudioCNNLSTM, DAAMAudioTransformer, FrontBlock, count_parameters

__all__ = [
    "ATTENTION_KINDS",
    "DAAMAudioCNNLSTM",
    "DAAMAudioTransformer",
    "DensityAdaptiveAttention",
    "FrontBlock",
    "GaussianBlock",
    "MultiHeadGaussianAdaptiveAttention",
    "count_parameters",
    "head_sizes",
    "moments",
]
