"""Registration of methods: ``@register`` adds a method class under its name. Looking methods up, creating them
from names and listing them is :mod:`tokensieve.registry`, which also loads the built-in methods."""

from __future__ import annotations

from typing import TypeVar

from .method import Method

M = TypeVar("M", bound=type[Method])

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: M) -> M:
    """Class decorator: add a method to the registry under ``cls.name``."""
    name = cls.name
    if not name or name != name.lower() or " " in name:
        raise ValueError(f"{cls.__qualname__} needs a lower-case `name` without spaces, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(
            f"Method name {name!r} is registered twice ({_REGISTRY[name].__qualname__}, {cls.__qualname__})"
        )
    if not cls.paper or not (cls.__doc__ or "").strip():
        raise ValueError(f"Method {name!r} must cite its paper (`paper`) and have a docstring")
    _REGISTRY[name] = cls
    return cls


def registered() -> dict[str, type[Method]]:
    """The registry itself (name → class), as filled so far by ``@register``."""
    return _REGISTRY
