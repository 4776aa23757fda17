"""Calibration text that every Python installation carries: the docstrings of standard-library modules.

Real, varied English technical prose, reproducible without downloads (it changes only with the Python version,
which profiles record).
"""

from __future__ import annotations

import importlib
import inspect
import sys

MODULES = (
    "argparse",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "fractions",
    "functools",
    "heapq",
    "inspect",
    "itertools",
    "json",
    "logging",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "zipfile",
)


def calibration_text(min_chars: int = 200_000) -> str:
    """Docstrings of standard-library modules and their public members, in a fixed order."""
    parts: list[str] = []
    total = 0
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # pragma: no cover - trimmed Python builds
            continue
        docs = [inspect.getdoc(mod) or ""]
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                docs.append(inspect.getdoc(obj) or "")
        for d in docs:
            d = " ".join(d.split())
            if len(d) > 80:
                parts.append(d)
                total += len(d)
        if total >= min_chars:
            break
    return "\n\n".join(parts)


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))
