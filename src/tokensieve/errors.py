"""Exceptions raised by tokensieve.

Every error says what went wrong and what to do about it; the CLI prints the message without a traceback.
"""

from __future__ import annotations


class TokensieveError(Exception):
    """Base class of every error tokensieve raises on purpose."""


class ConfigError(TokensieveError, ValueError):
    """A request (method, budget, task, grid …) is malformed or inconsistent."""


class UnknownNameError(ConfigError, KeyError):
    """A name (method, model, task …) is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class ModelNotFoundError(TokensieveError, FileNotFoundError):
    """The requested model is not available locally."""


class CapabilityError(ConfigError):
    """A method was asked for something it does not support (phase, batching, a missing profile …)."""


class PromptError(ConfigError):
    """A prompt is empty or longer than the model's context."""


class TokensieveWarning(UserWarning):
    """Something runs, but probably not as the user meant (e.g. protected tokens that do not fit the budget)."""
