"""Imports the built-in visual-token methods (each module registers one)."""

from . import fastv, pool, random  # noqa: F401
