"""Registration of methods: ``@register`` adds a method class under its family and name. Looking methods up, creating
them from names and listing them is :mod:`tokensieve.registry`, which also loads the built-in methods.

One registry holds every family (:data:`~tokensieve.core.method.FAMILIES`): a name is unique within its family, and a
visual method may share a KV method's name (``random``), written ``vis:random`` where both could be meant."""

from __future__ import annotations

from typing import TypeVar

from .method import FAMILIES, KV, Method, PrefillMethod

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
    check_declaration(cls)
    names[name] = cls
    return cls


_HOOKS = (  # (base class, hook, capability): overriding the hook is what the capability declares
    (Method, "prefill_suffix", "suffix"),
    (PrefillMethod, "prefill_attention", "own_attention"),
    (PrefillMethod, "prefill_passes", "passes"),
)


def check_declaration(cls: type[Method]) -> None:
    """A method's capabilities are its one declaration: a class that overrides a prefill hook declares the
    capability that hook implements, and one that declares a capability implements its hook (a class that resolves
    its capabilities per instance, :meth:`Method.declared`, may override a hook to delegate it)."""
    per_instance = cls.declared is not Method.declared
    for base, hook, flag in _HOOKS:
        if not issubclass(cls, base):
            continue
        overrides = getattr(cls, hook) is not getattr(base, hook)
        declared = bool(getattr(cls.capabilities, flag))
        if overrides and not declared and not per_instance:
            raise ValueError(f"Method {cls.name!r} overrides {hook}: declare capabilities {flag}=True.")
        if declared and not overrides:
            raise ValueError(f"Method {cls.name!r} declares {flag}=True: implement {hook}.")


def registered(family: str = KV) -> dict[str, type[Method]]:
    """One family of the registry (name → class), as filled so far by ``@register``."""
    return _REGISTRY[family]
