"""The method registry: the single list of methods, read by the library, the CLI, the evaluation runner and docs."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import ConfigError, UnknownNameError
from .method import Method

M = TypeVar("M", bound=type[Method])

_REGISTRY: dict[str, type[Method]] = {}
_LOADED = False


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


def _load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from .. import methods

    for mod in pkgutil.iter_modules(methods.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{methods.__name__}.{mod.name}")


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    _load_builtin()
    key = name.strip().lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownNameError(f"Unknown method '{name}'.{hint} Valid methods: {', '.join(sorted(_REGISTRY))}.")


def _coerce(value: Any, annotation: Any, field: str, method: str) -> Any:
    """Turn a CLI string into the field's type (int, float, bool, str, Literal, or a nested method name)."""
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{method}: {field} must be one of {', '.join(map(str, choices))}; got {value!r}.")
        return value
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if origin else [annotation]
    for typ in args:
        try:
            if typ is bool:
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if typ in (int, float, str):
                return typ(value)
        except ValueError:
            continue
    if any(a is str for a in args):
        return value
    raise ConfigError(f"{method}: cannot read {field}={value!r} as {getattr(annotation, '__name__', annotation)}.")


def create_method(name: str | Method, **params: Any) -> Method:
    """Instantiate a registered method with parameters (strings are converted to the field types)."""
    if isinstance(name, Method):
        if params:
            return dataclasses.replace(name, **params)
        return name
    cls = get_method_class(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in params.items():
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise ConfigError(f"Method '{cls.name}' has no parameter '{key}'. Its parameters: {valid}.")
        kwargs[key] = _coerce(value, hints.get(key, str), key, cls.name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"Method '{cls.name}': {exc}") from None


@dataclass(frozen=True)
class MethodInfo:
    name: str
    paper: str
    rule: str
    capabilities: str
    params: dict[str, Any]
    summary: str


def list_methods() -> list[MethodInfo]:
    """Every registered method with its paper, capabilities and default parameters."""
    out = []
    for name in method_names():
        cls = _REGISTRY[name]
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        defaults = {
            f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(cls)
        }
        out.append(
            MethodInfo(
                name=name,
                paper=cls.paper,
                rule=cls.rule,
                capabilities=cls.capabilities.describe(),
                params=defaults,
                summary=doc,
            )
        )
    return out
