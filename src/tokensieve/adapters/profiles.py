"""Finding, validating, loading and saving profile files (small JSON documents)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..core.context import ModelShape
from ..core.profiles import PROFILE_KINDS, ProfileData
from ..errors import CapabilityError, ConfigError
from .home import cache_home


@dataclass(frozen=True)
class Profile:
    """A per-model profile.

    Attributes:
        kind: what it profiles (``retrieval-heads``, ``compresskv``, ``fasa``).
        model: the model key it was made for.
        shape: the model's attention geometry (checked on load).
        settings: how it was made (data, sizes, seeds) — enough to rerun the command.
        data: the profile itself.
        version: tokensieve version that wrote it.
        created: UTC timestamp.
    """

    kind: str
    model: str
    shape: dict[str, int]
    settings: dict[str, Any]
    data: dict[str, Any]
    version: str = ""
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def content(self, shape: ModelShape) -> ProfileData:
        """The profile's data as its kind's typed schema (:mod:`tokensieve.core.profiles`), validated against the
        model's shape; a malformed file raises :class:`ConfigError` naming the field."""
        self.check_shape(shape)
        schema = PROFILE_KINDS.get(self.kind)
        if schema is None:
            raise ConfigError(f"Unknown profile kind '{self.kind}'; known kinds: {', '.join(PROFILE_KINDS)}.")
        return schema.from_dict(self.data, shape)

    def check_shape(self, shape: ModelShape) -> None:
        want = shape_dict(shape)
        mismatched = {k: (self.shape.get(k), v) for k, v in want.items() if self.shape.get(k) != v}
        if mismatched:
            raise ConfigError(
                f"The '{self.kind}' profile for '{self.model}' was made for a model of another shape "
                f"({mismatched}); recreate it with `tokensieve profile {self.kind} --model <model>`."
            )


def shape_dict(shape: ModelShape) -> dict[str, int]:
    return {
        "num_layers": shape.num_layers,
        "num_q_heads": shape.num_q_heads,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
    }


def user_dir() -> Path:
    return cache_home() / "profiles"


def profile_paths(kind: str, model: str) -> list[Path]:
    """Where a profile is looked for, in order: the user cache, then the package's shipped profiles."""
    shipped = Path(str(resources.files("tokensieve"))) / "profiles" / model / f"{kind}.json"
    return [user_dir() / model / f"{kind}.json", shipped]


def load_profile(kind: str, shape: ModelShape) -> Profile | None:
    """The profile of ``kind`` for the model (by ``shape.key``), or None if there is none."""
    for path in profile_paths(kind, shape.key):
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
                prof = Profile(**raw)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"Profile {path} is not a valid tokensieve profile: {exc}") from None
            if prof.kind != kind:
                raise ConfigError(f"Profile {path} holds a '{prof.kind}' profile, not '{kind}'.")
            prof.check_shape(shape)
            return prof
    return None


def save_profile(profile: Profile, dest: Path | None = None) -> Path:
    """Write a profile (default: the user cache, where :func:`load_profile` finds it first)."""
    path = dest or user_dir() / profile.model / f"{profile.kind}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(asdict(profile), indent=1, sort_keys=True)
    # one line per innermost list of numbers keeps the files short and diffable
    text = re.sub(r"\[\s+([-+0-9.eE,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    path.write_text(text + "\n")
    return path


def profile_for(method: Any, shape: ModelShape) -> Profile | None:
    """The profile a method needs (``method.capabilities.profile``) for this model, or None if it needs none.

    Raises :class:`CapabilityError` naming the command that creates a missing profile.
    """
    kind = method.capabilities.profile
    if kind is None:
        return None
    prof = load_profile(kind, shape)
    if prof is None:
        raise CapabilityError(
            f"Method '{method.name}' needs a '{kind}' profile for model '{shape.key}', and none is installed. "
            f"Create it with `tokensieve profile {kind} --model <model>`."
        )
    return prof
