"""The method registry: the single list of methods, read by the library, the CLI, the evaluation runner and docs.

Methods register themselves with :func:`tokensieve.core.registry.register`; this module loads the built-in ones on
first use, looks them up by name (with a helpful error), creates them from parameters given as strings (a nested
method, e.g. AdaKV's ``base``, may be given by name) and lists them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
import typing
from dataclasses import dataclass
from typing import Any

from .core.method import Method
from .core.params import check_number, coerce_param
from .core.registry import registered
from .errors import ConfigError, UnknownNameError

_REGISTRY = registered()
_LOADED = False


def _load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import methods

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
    from .methods.visual.registry import visual_method_names

    if key in visual_method_names():
        raise UnknownNameError(
            f"'{name}' is a visual-token method: it prunes an image's tokens in a vision-language model, not a KV "
            "cache. Give an image and a VLM (`tokensieve generate --image FILE --model VLM --spec "
            f"{key}:0.25/snapkv:0.5`, docs/VLM_PRUNING.md)."
        )
    close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownNameError(f"Unknown method '{name}'.{hint} Valid methods: {', '.join(sorted(_REGISTRY))}.")


def _method_type(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Method)


def _coerce(value: Any, annotation: Any, field: str, method: str) -> Any:
    """Turn a CLI string into the field's type (int, float, bool, str, Literal, or a nested method by name)."""
    if _method_type(annotation):
        inner = value if isinstance(value, Method) else create_method(str(value)) if isinstance(value, str) else None
        if not isinstance(inner, annotation):
            raise ConfigError(
                f"{method}: {field} must be a {annotation.__name__} (a registered method such as 'snapkv'); "
                f"got {value!r}."
            )
        return inner
    return coerce_param(value, annotation, field, method)


def create_method(name: str | Method, /, **params: Any) -> Method:
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


def check_fields(method: Method) -> None:
    """Every parameter of ``method`` (and of methods nested in it) has its field's type — an ``int`` field holds a
    whole number, not ``3.7`` or ``True`` — and is a finite number that fits a 64-bit integer, else
    :class:`ConfigError` naming the parameter."""
    hints = typing.get_type_hints(type(method))
    for f in dataclasses.fields(method):
        value, annotation = getattr(method, f.name), hints.get(f.name)
        check_number(value, f.name, method.name)
        if not _fits(value, annotation):
            raise ConfigError(
                f"Method '{method.name}': {f.name}={value!r} is not a {getattr(annotation, '__name__', annotation)}."
            )
        if isinstance(value, Method):
            check_fields(value)


def _fits(value: Any, annotation: Any) -> bool:
    if annotation is None or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin is not None and type(None) in typing.get_args(annotation):  # Optional[...]
        return value is None or any(_fits(value, a) for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


@dataclass(frozen=True)
class MethodInfo:
    name: str
    paper: str
    rule: str
    capabilities: str
    params: dict[str, Any]
    summary: str
    profile: str = ""  # what per-model profile it needs and the command that makes it ("" when none)


def _default(f: dataclasses.Field[Any]) -> Any:
    """A field's default for listings; a nested method shows as its name."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return value.name if isinstance(value, Method) else value
    return None


def list_methods() -> list[MethodInfo]:
    """Every registered method with its paper, capabilities and default parameters."""
    out = []
    for name in method_names():
        cls = _REGISTRY[name]
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
        out.append(
            MethodInfo(
                name=name,
                paper=cls.paper,
                rule=cls.rule,
                capabilities=cls.capabilities.describe(),
                params=defaults,
                summary=doc,
                profile=_profile_note(cls.capabilities.profile),
            )
        )
    return out


def _profile_note(kind: str | None) -> str:
    """``trained profile 'kvzap' (make it: tokensieve train kvzap --model <model>)`` or a measured profile's note."""
    if kind is None:
        return ""
    from .core.profiles import PROFILE_KINDS

    schema = PROFILE_KINDS.get(kind)
    what = "trained" if schema is not None and schema.trained else "measured"
    make = schema.make_command() if schema is not None else f"tokensieve profile {kind} --model <model>"
    return f"{what} profile '{kind}' (make it: {make})"
