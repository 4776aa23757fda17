from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokensieve import Budget, ConfigError


@pytest.mark.parametrize(
    ("spec", "kind", "value"),
    [
        (0.25, "ratio", 0.25),
        ("25%", "ratio", 0.25),
        ("0.5", "ratio", 0.5),
        ("1.0", "ratio", 1.0),
        (256, "tokens", 256),
        ("256", "tokens", 256),
        ("1", "tokens", 1),
    ],
)
def test_parse(spec, kind, value):
    b = Budget.parse(spec)
    assert (b.kind, b.value) == (kind, value)


@pytest.mark.parametrize("spec", [0.0, -0.1, 1.5, "150%", "0", "-3", "abc", "", 0, -5])
def test_parse_rejects_out_of_range(spec):
    with pytest.raises(ConfigError):
        Budget.parse(spec)


def test_ratio_message_says_what_to_do():
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        Budget.parse("1.5")


def test_tokens_larger_than_prompt_is_an_error():
    with pytest.raises(ConfigError, match="larger than the prompt"):
        Budget.tokens(512).tokens_for(300)


def test_protected_counts_validated():
    with pytest.raises(ConfigError):
        Budget(0.5, sink=-1)


@given(st.floats(min_value=1e-3, max_value=1.0), st.integers(min_value=1, max_value=100_000))
def test_ratio_tokens_within_bounds(r, n):
    k = Budget.ratio(r).tokens_for(n)
    assert 1 <= k <= n
    assert abs(k - r * n) <= 1.0


def test_full_ratio_keeps_everything():
    assert Budget.ratio(1.0).tokens_for(777) == 777
    assert Budget.ratio(1.0).is_full
