"""The registry of visual-token methods (separate from the KV methods': see :mod:`.base`)."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, TypeVar

from ...core.params import coerce_param
from ...errors import ConfigError, UnknownNameError
from .base import VisualMethod

V = TypeVar("V", bound=type[VisualMethod])

_VISUAL: dict[str, type[VisualMethod]] = {}


def register_visual(cls: V) -> V:
    """Class decorator: add a visual-token method under ``cls.name``."""
    name = cls.name
    if not name or name != name.lower() or " " in name:
        raise ValueError(f"{cls.__qualname__} needs a lower-case `name` without spaces, got {name!r}")
    if name in _VISUAL and _VISUAL[name] is not cls:
        raise ValueError(f"Visual method {name!r} is registered twice")
    if not cls.paper or not (cls.__doc__ or "").strip():
        raise ValueError(f"Visual method {name!r} must cite its paper (`paper`) and have a docstring")
    _VISUAL[name] = cls
    return cls


def visual_method_names() -> list[str]:
    from . import _builtin  # noqa: F401  (registers the built-in methods)

    return sorted(_VISUAL)


def get_visual_class(name: str) -> type[VisualMethod]:
    visual_method_names()
    key = name.strip().lower()
    if key in _VISUAL:
        return _VISUAL[key]
    close = difflib.get_close_matches(key, list(_VISUAL), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownNameError(f"Unknown visual method '{name}'.{hint} Visual methods: {', '.join(sorted(_VISUAL))}.")


def create_visual(name: str | VisualMethod, **params: Any) -> VisualMethod:
    """Instantiate a registered visual method; string parameters are converted to the field types."""
    if isinstance(name, VisualMethod):
        method = dataclasses.replace(name, **params) if params else name
        method.check()
        return method
    cls = get_visual_class(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in params.items():
        key = key.replace("-", "_")
        if key not in fields:
            raise ConfigError(
                f"Visual method '{cls.name}' has no parameter '{key}'. "
                f"Its parameters: {', '.join(sorted(fields)) or 'none'}."
            )
        kwargs[key] = coerce_param(value, hints.get(key, str), key, cls.name)
    try:
        method = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"Visual method '{cls.name}': {exc}") from None
    method.check()
    return method
