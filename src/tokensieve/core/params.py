"""Reading a method's parameter from text (the CLI, a spec): one rule for KV and visual methods."""

from __future__ import annotations

import math
import typing
from typing import Any

from ..errors import ConfigError

INT_LIMIT = 2**63 - 1  # a whole-number parameter must fit a 64-bit integer (what torch computes with)


def check_number(value: Any, field: str, method: str) -> None:
    """Refuse a float that is not finite (NaN, ±inf) and a whole number beyond a 64-bit integer: no parameter means
    anything there, and such values either compute garbage silently or overflow deep inside torch."""
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{method}: {field} must be a finite number; got {value!r}.")
    if isinstance(value, int) and abs(value) > INT_LIMIT:
        raise ConfigError(f"{method}: {field}={value} is too large (at most {INT_LIMIT}).")


def coerce_param(value: Any, annotation: Any, field: str, method: str) -> Any:
    """Turn a string into the field's type (int, float, bool, str or a Literal); other values pass unchanged.
    Numbers, given as text or not, must be finite and fit a 64-bit integer (:func:`check_number`)."""
    if not isinstance(value, str):
        check_number(value, field, method)
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
                out = typ(value)
        except ValueError:
            continue
        else:
            if typ in (int, float, str):
                check_number(out, field, method)
                return out
    if any(a is str for a in args):
        return value
    raise ConfigError(f"{method}: cannot read {field}={value!r} as {getattr(annotation, '__name__', annotation)}.")
