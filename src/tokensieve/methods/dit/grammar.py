"""The DiT spec grammar: ``name[key=value,...]:value`` names one DiT sparse-attention method with its parameters.

::

    dit_spec := [ 'dit:' ] name [ '[' key '=' value { ',' key '=' value } ']' ] [ ':' value ]

The grammar is the project's (``snapkv[window=64]:0.25``, ``fastv[layer=2]:0.25``): ``svg:0.3`` (Sparse VideoGen
computing 30 % of the attention), ``svg2[top_p=0.9]``, ``radial[decay=0.2]``, ``ras:0.5`` (half the tokens updated per
step), ``full`` (the dense model). The value after ``:`` sets the method's density-like knob, named by its class's
``budget_param`` (a method whose paper controls sparsity by a threshold takes it as a parameter instead and refuses a
``:value``). Values are parsed to each field's type; ``label_of`` writes one canonical label (fields that differ from
the defaults, sorted) so that rows of every tool join.

This module is the grammar only: the DiT methods register in the one method registry (family ``dit``), and
:func:`tokensieve.spec.parse_dit_spec` looks the name up there and builds the method with :func:`build`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, get_type_hints

from ...errors import ConfigError

PREFIX = "dit:"
_CALL = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\[(.*)\])?\s*(?::\s*([^\]\[]+))?\s*$")


def split_call(text: str) -> tuple[str, str, str | None]:
    """``(name, parameters text, value or None)`` of a DiT spec (a leading ``dit:`` is dropped)."""
    raw = text.strip()
    body = raw[len(PREFIX) :] if raw.lower().startswith(PREFIX) else raw
    m = _CALL.match(body)
    if m is None:
        raise ConfigError(f"Malformed DiT spec {text!r}: expected name[key=value,...]:value, e.g. 'svg:0.3'.")
    return m.group(1).lower(), m.group(2) or "", m.group(3)


def _convert(value: str, kind: Any, where: str, key: str) -> Any:
    try:
        if kind is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
        if kind is str:
            return value
        if getattr(kind, "__origin__", None) is tuple or kind is tuple:
            return tuple(int(x) for x in value.replace("x", " ").replace("/", " ").split())
    except ValueError:
        raise ConfigError(
            f"In DiT spec '{where}': {key}={value!r} is not a valid {getattr(kind, '__name__', kind)}."
        ) from None
    return value


def build(cls: Any, text: str) -> Any:
    """The method of class ``cls`` (a DiT method class) with the parameters and value the spec ``text`` gives."""
    name, params_text, budget = split_call(text)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for part in [p for p in params_text.split(",") if p.strip()]:
        if "=" not in part:
            raise ConfigError(f"In DiT spec '{text}': parameter '{part.strip()}' is not key=value.")
        key, value = (s.strip() for s in part.split("=", 1))
        key = key.replace("-", "_")
        if key not in fields:
            raise ConfigError(
                f"In DiT spec '{text}': {name} has no parameter {key!r}; parameters: {', '.join(fields)}."
            )
        if key in kwargs:
            raise ConfigError(f"In DiT spec '{text}': parameter {key!r} given twice.")
        kwargs[key] = _convert(value, hints[key], text, key)
    if budget is not None:
        if cls.budget_param is None:
            raise ConfigError(
                f"In DiT spec '{text}': {name} takes no ':value' — its paper sets sparsity by a threshold given as a "
                f"parameter ({', '.join(k for k in fields if k not in ('warmup', 'dense_layers'))})."
            )
        if cls.budget_param in kwargs:
            raise ConfigError(f"In DiT spec '{text}': {cls.budget_param} given both as a parameter and as ':value'.")
        kwargs[cls.budget_param] = _convert(budget.strip(), hints[cls.budget_param], text, cls.budget_param)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the field check above
        raise ConfigError(f"In DiT spec '{text}': {e}") from None


def label_of(method: Any) -> str:
    """``name[k=v,...]:value`` with only the fields that differ from the class defaults, sorted."""
    cls = type(method)
    defaults = cls()
    parts = []
    budget = None
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name):
        if not f.init:
            continue
        value = getattr(method, f.name)
        if f.name == cls.budget_param:
            budget = value
            continue
        if value != getattr(defaults, f.name):
            text = (
                "x".join(str(x) for x in value)
                if isinstance(value, tuple)
                else f"{value:g}"
                if isinstance(value, float)
                else str(value)
            )
            parts.append(f"{f.name}={text}")
    out = cls.name + (f"[{','.join(parts)}]" if parts else "")
    if budget is not None:
        out += f":{budget:g}" if isinstance(budget, float) else f":{budget}"
    return out


__all__ = ["PREFIX", "build", "label_of", "split_call"]
