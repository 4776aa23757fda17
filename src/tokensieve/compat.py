"""The one place that knows which versions of our dependencies we were tested with."""

from __future__ import annotations

import warnings

import torch
import transformers
from packaging.version import Version

TESTED_TRANSFORMERS = (Version("5.0.0"), Version("5.24.0"))  # [low, high)
TRANSFORMERS_VERSION = Version(transformers.__version__)
TORCH_VERSION = Version(torch.__version__.split("+")[0])


def check_versions() -> None:
    """Warn (once per process) when transformers is outside the tested range."""
    low, high = TESTED_TRANSFORMERS
    if not (low <= TRANSFORMERS_VERSION < high):
        warnings.warn(
            f"tokensieve was tested with transformers >={low},<{high}; found {TRANSFORMERS_VERSION}. "
            "The attention hook relies on AttentionInterface and the Cache API of transformers 5.",
            RuntimeWarning,
            stacklevel=2,
        )


def sdpa_supports_gqa() -> bool:
    """`enable_gqa=` exists in torch.nn.functional.scaled_dot_product_attention from torch 2.5."""
    return Version("2.5") <= TORCH_VERSION
