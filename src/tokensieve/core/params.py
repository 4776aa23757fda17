"""Reading a method's parameter from text (the CLI, a spec): one rule for KV and visual methods."""

from __future__ import annotations

import typing
from typing import Any

from ..errors import ConfigError


def coerce_param(value: Any, annotation: Any, field: str, method: str) -> Any:
    """Turn a string into the field's type (int, float, bool, str or a Literal); other values pass unchanged."""
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
