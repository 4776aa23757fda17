"""Scorers: pure functions of a :class:`~tokensieve.core.context.LayerContext` returning ``(B, H_kv, T)``.

Higher means more important. A scorer never sees the budget.
"""

from .attention import accumulated_attention_scores, last_query_scores, observation_window_scores, pool1d
from .simple import key_norm_scores, random_scores, recency_scores

__all__ = [
    "accumulated_attention_scores",
    "key_norm_scores",
    "last_query_scores",
    "observation_window_scores",
    "pool1d",
    "random_scores",
    "recency_scores",
]
