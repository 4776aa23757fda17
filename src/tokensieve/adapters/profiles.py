"""Finding, validating, loading and saving profile files (small JSON documents).

A profile that holds trained weights (KVzap's surrogate) keeps them in a safetensors file beside its JSON document:
the document's ``data["tensors"]`` names that file (``<kind>.safetensors``), and :func:`load_profile` replaces the
name by the tensors it holds (``{name: Tensor}``), so a schema reads them like any other field. Never a pickle.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
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
                f"({mismatched}); recreate it with `{make_command(self.kind)}`."
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
            return _with_tensors(prof, path)
    return None


def _with_tensors(prof: Profile, path: Path) -> Profile:
    """The profile with ``data["tensors"]`` (the name of a safetensors file beside ``path``) read into tensors."""
    name = prof.data.get("tensors")
    if name is None:
        return prof
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
        raise ConfigError(f"Profile {path}: 'tensors' must name a .safetensors file beside it, not {name!r}.")
    file = path.parent / name
    if not file.is_file():
        raise ConfigError(f"Profile {path} names its weights {file}, which is missing; reinstall or retrain it.")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"Profile weights {file} cannot be read: {exc}") from None
    return replace(prof, data={**prof.data, "tensors": tensors})


def save_profile(profile: Profile, dest: Path | None = None) -> Path:
    """Write a profile (default: the user cache, where :func:`load_profile` finds it first). Tensors in
    ``data["tensors"]`` (``{name: Tensor}``) go to ``<kind>.safetensors`` beside the JSON document, which names it."""
    path = dest or user_dir() / profile.model / f"{profile.kind}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = profile.data.get("tensors")
    if isinstance(tensors, dict):
        from safetensors.torch import save_file

        name = f"{profile.kind}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path.parent / name))
        profile = replace(profile, data={**profile.data, "tensors": name})
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
            f"Create it with `{make_command(kind)}`."
        )
    return prof


def make_command(kind: str, model: str = "<model>") -> str:
    """The command that makes a profile of ``kind`` (``tokensieve train …`` for trained weights)."""
    schema = PROFILE_KINDS.get(kind)
    return schema.make_command(model) if schema is not None else f"tokensieve profile {kind} --model {model}"
