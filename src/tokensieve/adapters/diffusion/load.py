"""Loading a diffusers transformer from a folder, with a clear error for a folder that holds none."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import ConfigError, ModelNotFoundError

#: the transformer classes the adapters know (``_class_name`` in a diffusers config.json)
KNOWN = ("WanTransformer3DModel", "SD3Transformer2DModel")


def transformer_folder(path: str | Path) -> Path:
    """The folder of a diffusers transformer: ``path`` itself, or its ``transformer/`` when ``path`` is a pipeline."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"No model folder at {p}.")
    if (p / "model_index.json").is_file() and (p / "transformer" / "config.json").is_file():
        p = p / "transformer"
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ConfigError(
            f"{path} is not a diffusers transformer: no config.json (expected a folder saved by "
            f"{' or '.join(KNOWN)}.save_pretrained, or a pipeline folder with transformer/)."
        )
    try:
        name = json.loads(cfg.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        name = None
    if name not in KNOWN:
        raise ConfigError(
            f"{path} is not a diffusers transformer the adapters know: config.json names {name!r}; "
            f"supported: {', '.join(KNOWN)}."
        )
    return p


def load_transformer(path: str | Path, dtype: Any = None) -> Any:
    """A ``WanTransformer3DModel`` or ``SD3Transformer2DModel`` from a folder (see :func:`transformer_folder`)."""
    from .deps import require_diffusers

    diffusers = require_diffusers()
    folder = transformer_folder(path)
    name = json.loads((folder / "config.json").read_text())["_class_name"]
    cls = getattr(diffusers, name)
    kwargs = {} if dtype is None else {"torch_dtype": dtype}
    return cls.from_pretrained(str(folder), **kwargs).eval()
