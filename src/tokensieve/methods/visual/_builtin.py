"""Imports the built-in visual-token methods: every module of this package except the machinery registers one (a
new method is one new file here)."""

import importlib
import pkgutil

_MACHINERY = {"base", "registry", "spec", "_builtin"}

for _info in pkgutil.iter_modules(importlib.import_module(__package__ or "").__path__):
    if _info.name not in _MACHINERY and not _info.name.startswith("_"):
        importlib.import_module(f"{__package__}.{_info.name}")
