"""The method registry: the single list of methods, read by the library, the CLI, the evaluation runner and docs.

Methods register themselves with :func:`tokensieve.core.registry.register`; this module loads the built-in ones on
first use, looks them up by name (with a helpful error), creates them from parameters given as strings (a nested
method, e.g. AdaKV's ``base``, may be given by name) and lists them.

Every family is in it: the KV methods (``snapkv``, ``quest``, …), the visual-token methods (``todre``, ``fastv``,
…) and the diffusion-transformer methods (``svg``, ``radial``, …). A name is looked up among the KV methods first,
then the visual ones, then the DiT ones; ``vis:name`` names the visual method where both families have one
(``vis:random``), and ``dit:name`` a DiT method (listed so always: ``dit:full`` is the dense DiT).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
import typing
from dataclasses import dataclass
from typing import Any

from .core.method import DIT, FAMILIES, KV, VISUAL, Method
from .core.params import check_number, coerce_param
from .core.registry import registered
from .errors import ConfigError, UnknownNameError

VIS_PREFIX = "vis:"  # names the visual method where a KV method has the same name: vis:random
DIT_PREFIX = "dit:"  # names a diffusion-transformer method: dit:svg, dit:full
_PACKAGES = {KV: "tokensieve.methods.kv", VISUAL: "tokensieve.methods.visual", DIT: "tokensieve.methods.dit"}
_MACHINERY = {"base", "grammar"}  # modules of a method package that hold no method
_LOADED = False


def _load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for package in _PACKAGES.values():
        pkg = importlib.import_module(package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.ispkg and not mod.name.startswith("_") and mod.name not in _MACHINERY:
                importlib.import_module(f"{package}.{mod.name}")


def _family(family: str | None) -> list[str]:
    if family is None:
        return list(FAMILIES)
    if family not in FAMILIES:
        raise ConfigError(f"Unknown method family {family!r}; families: {', '.join(FAMILIES)}.")
    return [family]


def method_names(family: str | None = KV) -> list[str]:
    """The registered names of one family (default: the KV methods), or of every family (``family=None``; a visual
    method named like a KV method is listed as ``vis:name``, a DiT method always as ``dit:name``)."""
    _load_builtin()
    if family is None:
        kv = registered(KV)
        visual = sorted(f"{VIS_PREFIX}{n}" if n in kv else n for n in registered(VISUAL))
        return sorted(kv) + visual + sorted(f"{DIT_PREFIX}{n}" for n in registered(DIT))
    return sorted(registered(_family(family)[0]))


def split_family(name: str) -> tuple[str | None, str]:
    """``("visual", "random")`` for ``vis:random``, ``("dit", "svg")`` for ``dit:svg``; ``(None, name)`` for a name
    without a prefix."""
    key = name.strip().lower()
    if key.startswith(VIS_PREFIX):
        return VISUAL, key[len(VIS_PREFIX) :].strip()
    if key.startswith(DIT_PREFIX):
        return DIT, key[len(DIT_PREFIX) :].strip()
    return None, key


def get_method_class(name: str, family: str | None = None) -> type[Method]:
    """The class registered as ``name`` — among the KV methods first, then the visual ones, then the DiT ones
    (``vis:name`` / ``dit:name`` or ``family=``: that family only) — or :class:`UnknownNameError` with the closest
    names."""
    _load_builtin()
    prefixed, key = split_family(name)
    families = _family(prefixed or family)
    for fam in families:
        if key in registered(fam):
            return registered(fam)[key]
    if DIT not in families and key in registered(DIT):
        raise UnknownNameError(dit_refusal(key))
    names = [n for fam in families for n in registered(fam)]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    if families == [VISUAL]:
        raise UnknownNameError(f"Unknown visual method '{name}'.{hint} Visual methods: {', '.join(sorted(names))}.")
    if families == [DIT]:
        raise UnknownNameError(f"Unknown DiT method '{name}'.{hint} DiT methods: {', '.join(sorted(names))}.")
    raise UnknownNameError(f"Unknown method '{name}'.{hint} Valid methods: {', '.join(method_names(None))}.")


def dit_refusal(name: str) -> str:
    """Why a DiT method cannot stand in a language-model spec."""
    return (
        f"'{name}' is a diffusion-transformer (DiT) method: it sparsifies the attention of an image or video DiT "
        f"(`tokensieve generate-video PROMPT --spec {name}`, `tokensieve.adapters.diffusion.sparsify`), not a language "
        "model's cache or an image's tokens."
    )


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
    """Instantiate a registered method with parameters (strings are converted to the field types; a key may be
    written with ``-`` for ``_``). ``vis:name`` is the visual method of that name."""
    if isinstance(name, Method):
        if params:
            return dataclasses.replace(name, **params)
        return name
    cls = get_method_class(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for raw, value in params.items():
        key = raw.replace("-", "_")
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
    try:
        hints = typing.get_type_hints(type(method))
    except NameError:  # an annotation that cannot be resolved here (a method class defined in a function): unchecked
        hints = {}
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
    name: str  # as a spec writes it (vis:random for the visual method named like a KV method)
    family: str
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


def list_methods(family: str | None = None) -> list[MethodInfo]:
    """Every registered method (of one family, or all: the KV methods first) with its family, paper, capabilities
    and default parameters."""
    out = []
    for name in method_names(family) if family is not None else method_names(None):
        cls = get_method_class(name, family)
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
        out.append(
            MethodInfo(
                name=name,
                family=cls.family,
                paper=cls.paper,
                rule=cls.rule,
                capabilities=cls.summary(),
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
