"""The CPU threads a run uses: one default for every command and runner (each measurement records its threads).

The default is every core this process may use, at most :data:`MAX_DEFAULT` (8): beyond that, a small model's
matrix products gain little and timings get noisier. ``--threads N`` (every command) or ``threads = N`` (a grid file)
sets it explicitly.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

MAX_DEFAULT = 8
DEFAULT_TEXT = f"all cores, at most {MAX_DEFAULT}"
HELP = f"torch CPU threads (default: {DEFAULT_TEXT})"


def cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    return min(cores(), MAX_DEFAULT)


def resolve_threads(n: int | None) -> int:
    """``n``, or the default when it is None; anything but a whole number >= 1 is an error."""
    from ..errors import ConfigError

    if n is None:
        return default_threads()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"threads must be a whole number >= 1 (default: {DEFAULT_TEXT}); got {n!r}.")
    return n


def use_threads(n: int | None) -> int:
    """Set torch's CPU threads (``n`` or the default); returns the number in use."""
    import torch

    torch.set_num_threads(resolve_threads(n))
    return int(torch.get_num_threads())


def threads_arg(text: str) -> int:
    """The argparse type of ``--threads``: a whole number >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads >= 1, got {text!r}")
    return n


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads`` with the one default (every command that computes takes it)."""
    parser.add_argument("--threads", type=threads_arg, default=None, metavar="N", help=HELP)


def whole_number(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum`` (``why`` is added to the error, e.g. what the number is)."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = minimum - 1
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}{why}")
        return n

    return parse
