"""Registration of methods: ``@register`` adds a method class under its family and name. Looking methods up, creating
them from names and listing them is :mod:`tokensieve.registry`, which also loads the built-in methods.

One registry holds every family (:data:`~tokensieve.core.method.FAMILIES`): a name is unique within its family, and a
visual method may share a KV method's name (``random``), written ``vis:random`` where both could be meant."""

from __future__ import annotations

from typing import TypeVar

from .method import FAMILIES, KV, Method

M = TypeVar("M", bound=type[Method])

_REGISTRY: dict[str, dict[str, type[Method]]] = {family: {} for family in FAMILIES}


def register(cls: M) -> M:
    """Class decorator: add a method to the registry under its ``family`` and ``name``."""
    name = cls.name
    if not name or name != name.lower() or " " in name or ":" in name or "/" in name:
        raise ValueError(f"{cls.__qualname__} needs a lower-case `name` without spaces, ':' or '/', got {name!r}")
    if cls.family not in _REGISTRY:
        raise ValueError(f"{cls.__qualname__}: unknown family {cls.family!r}; families: {', '.join(FAMILIES)}")
    names = _REGISTRY[cls.family]
    if name in names and names[name] is not cls:
        raise ValueError(
            f"Method name {name!r} is registered twice in family {cls.family!r} "
            f"({names[name].__qualname__}, {cls.__qualname__})"
        )
    if not cls.paper or not (cls.__doc__ or "").strip():
        raise ValueError(f"Method {name!r} must cite its paper (`paper`) and have a docstring")
    names[name] = cls
    return cls


def registered(family: str = KV) -> dict[str, type[Method]]:
    """One family of the registry (name → class), as filled so far by ``@register``."""
    return _REGISTRY[family]
