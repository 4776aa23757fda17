"""The embedded vision-language model: a transformers ``LlavaForConditionalGeneration`` made of a small CLIP vision
tower (with a CLS token), LLaVA's two-layer projector and the embedded SmolLM2-135M-Instruct as language model.

It is trained here (``tokensieve train vlm``, see docs/VLM.md) on the procedural scenes of
:mod:`tokensieve.data.scenes`, and shipped in ``tokensieve/weights/<name>/``: ``config.json`` (the ``LlavaConfig``)
and ``model.safetensors`` holding only what was trained — the vision tower, the projector and, when the language
model was adapted, low-rank factors ``lora::<weight>::A`` / ``lora::<weight>::B`` that :func:`load_vlm` adds to the
text model's own weights (``W + scale · B @ A``). The text model's weights are never copied: they are read from the
embedded model's cache (``tokensieve pull``).

Images are 128 × 128 pixels cut into 8 × 8 patches: 256 patch tokens plus CLS in the vision tower, and the 256 patch
tokens (``vision_feature_select_strategy="default"`` drops CLS, as in LLaVA-1.5) reach the language model at the
positions of the ``<image>`` token, which the processor repeats 256 times. ``<image>`` is a special token added to
SmolLM2's tokenizer (id 49152); the text model's embedding matrix gains that one row (zeros: it is always replaced
by visual features, and as an output it scores 0 and is never generated in practice).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, ModelNotFoundError

VLM_NAME = "smollm2-135m-llava"
VLM_ALIASES = {"vlm": VLM_NAME, "smollm2-llava": VLM_NAME}
TEXT_MODEL = "smollm2-135m"
IMAGE_TOKEN = "<image>"
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
WEIGHTS_ROOT = Path(__file__).resolve().parent.parent / "weights"
LORA_PREFIX = "lora::"

# The processor's chat template: the SmolLM2 template, with ``{"type": "image"}`` items written as "<image>\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class VisionSpec:
    """The geometry of the vision tower (a CLIP ViT) and of the language model's adaptation."""

    image_size: int = 128
    patch_size: int = 8
    hidden_size: int = 192
    num_layers: int = 6
    num_heads: int = 3
    intermediate_size: int = 768
    feature_layer: int = -2  # LLaVA-1.5 reads the penultimate layer
    text_layers: int = 0  # the language model keeps its first text_layers decoder layers (0: all of them)
    lora_rank: int = 0  # 0: the language model is frozen as it is
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()  # names of Linear modules inside each decoder layer, e.g. "self_attn.q_proj"
    # A language model trained from scratch instead of SmolLM2's layers (text_hidden > 0): a Llama decoder of
    # text_layers layers of this width, SmolLM2's tokenizer and RoPE settings, embeddings initialised from SmolLM2's.
    text_hidden: int = 0
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 0  # 0: 3 × text_hidden

    @property
    def from_scratch(self) -> bool:
        """Whether the language model is trained from scratch (its weights are then part of the shipped file)."""
        return self.text_hidden > 0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per image at the language model's input (CLS is dropped)."""
        return self.grid * self.grid

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionSpec:
        d = dict(d)
        d["lora_targets"] = tuple(d.get("lora_targets", ()))
        return cls(**d)


# ------------------------------------------------------------------------------------------------------ names
def vlm_name(name: str) -> str | None:
    """The embedded VLM's name for ``name`` (or an alias), else None."""
    key = VLM_ALIASES.get(name, name)
    return key if key == VLM_NAME else None


def weights_dir(name: str = VLM_NAME) -> Path:
    """Where the shipped weights of an embedded VLM live (package data)."""
    return WEIGHTS_ROOT / name


def text_model_dir() -> Path:
    from .home import resolve

    return Path(resolve(TEXT_MODEL)[0])


# ------------------------------------------------------------------------------------------------ building
def build_tokenizer(text_dir: Path | str) -> Any:
    """SmolLM2's tokenizer with the ``<image>`` special token added (id = the text vocabulary's size)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(text_dir))
    n = len(tok)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) != n:
        raise ConfigError(f"{IMAGE_TOKEN} did not get id {n} in the tokenizer of {text_dir}.")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def vlm_config(text_config: Any, spec: VisionSpec, image_token_id: int) -> Any:
    """A ``LlavaConfig``: a CLIP vision tower of ``spec`` and ``text_config`` with one more vocabulary row."""
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        num_channels=3,
        hidden_act="gelu",
        projection_dim=spec.hidden_size,
    )
    text = text_config.__class__.from_dict(text_config.to_dict())
    text.vocab_size = image_token_id + 1
    if spec.text_layers:
        if not 0 < spec.text_layers <= text.num_hidden_layers:
            raise ConfigError(f"text_layers={spec.text_layers}: the text model has {text.num_hidden_layers} layers")
        text.num_hidden_layers = spec.text_layers
        if isinstance(getattr(text, "layer_types", None), list):
            text.layer_types = text.layer_types[: spec.text_layers]
    if spec.from_scratch:
        if not spec.text_layers:
            raise ConfigError("A language model trained from scratch needs text_layers > 0.")
        if spec.text_hidden % spec.text_heads or spec.text_heads % spec.text_kv_heads:
            raise ConfigError(
                f"text_hidden={spec.text_hidden}, text_heads={spec.text_heads}, text_kv_heads={spec.text_kv_heads}: "
                "the width must split into the heads and the query heads into the KV heads."
            )
        text.hidden_size = spec.text_hidden
        text.num_attention_heads = spec.text_heads
        text.num_key_value_heads = spec.text_kv_heads
        text.head_dim = spec.text_hidden // spec.text_heads
        text.intermediate_size = spec.text_intermediate or 3 * spec.text_hidden
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=spec.num_visual_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=spec.feature_layer,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    config.tokensieve_vision_spec = asdict(spec)
    return config


def spec_of(config: Any) -> VisionSpec:
    d = getattr(config, "tokensieve_vision_spec", None)
    if d is None:
        raise ConfigError("This LlavaConfig was not made by tokensieve (no tokensieve_vision_spec).")
    return VisionSpec.from_dict(d)


def build_processor(tokenizer: Any, spec: VisionSpec) -> Any:
    """A ``LlavaProcessor`` with transformers' Pillow CLIP image processor (no torchvision)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLS
        chat_template=CHAT_TEMPLATE,
    )


def text_state_dict(text_dir: Path | str, num_layers: int | None = None) -> dict[str, torch.Tensor]:
    """The text model's weights (its first ``num_layers`` decoder layers), named as in the LLaVA model."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for k, v in load_file(str(Path(text_dir) / "model.safetensors")).items():
        if num_layers is not None and k.startswith("model.layers.") and int(k.split(".")[2]) >= num_layers:
            continue
        if k.startswith("model."):
            out["model.language_model." + k[len("model.") :]] = v
        elif k == "lm_head.weight":
            out[k] = v
    return out


def build_vlm(
    spec: VisionSpec | None = None,
    *,
    text_dir: Path | str | None = None,
    config: Any = None,
    with_text_weights: bool = True,
) -> tuple[Any, Any]:
    """A fresh VLM (random vision tower and projector) on the embedded text model, and its processor.

    The text model's weights are loaded (its embedding gains a zero row for ``<image>``) unless
    ``with_text_weights=False``.
    """
    from transformers import AutoConfig, LlavaForConditionalGeneration

    text_dir = Path(text_dir) if text_dir is not None else text_model_dir()
    tok = build_tokenizer(text_dir)
    image_token_id = int(tok.convert_tokens_to_ids(IMAGE_TOKEN))
    if config is None:
        config = vlm_config(AutoConfig.from_pretrained(str(text_dir)), spec or VisionSpec(), image_token_id)
    elif int(config.image_token_id) != image_token_id:
        raise ConfigError(f"The VLM's image token id {config.image_token_id} is not the tokenizer's {image_token_id}.")
    spec = spec_of(config)
    model: Any = LlavaForConditionalGeneration(config)
    if spec.from_scratch:
        if with_text_weights:
            init_scratch_embeddings(model, text_dir)
    elif with_text_weights:
        state = text_state_dict(text_dir, int(config.text_config.num_hidden_layers))
        emb_key = "model.language_model.embed_tokens.weight"
        emb = state[emb_key]
        state[emb_key] = torch.cat([emb, torch.zeros(1, emb.shape[1], dtype=emb.dtype)], dim=0)
        if "lm_head.weight" in state and not config.tie_word_embeddings:
            head = state["lm_head.weight"]
            state["lm_head.weight"] = torch.cat([head, torch.zeros(1, head.shape[1], dtype=head.dtype)], dim=0)
        missing, unexpected = model.load_state_dict(state, strict=False)
        lm_missing = [k for k in missing if k.startswith("model.language_model.")]
        if lm_missing or unexpected:
            raise ModelNotFoundError(
                f"The text model in {text_dir} does not fit the VLM: missing {lm_missing[:3]}, unexpected "
                f"{unexpected[:3]}."
            )
    model.config.name_or_path = VLM_NAME
    return model, build_processor(tok, spec)


@torch.no_grad()
def init_scratch_embeddings(model: Any, text_dir: Path | str) -> None:
    """Start a from-scratch language model's embeddings as SmolLM2's, projected on their principal directions.

    Tokens that mean similar things start close (as in SmolLM2), at the width of the new model; the norms are scaled
    to the model's initialiser range. The ``<image>`` row stays zero (it is always replaced by visual features).
    """
    from safetensors.torch import load_file

    src = load_file(str(Path(text_dir) / "model.safetensors"))["model.embed_tokens.weight"].float()
    emb = model.model.language_model.embed_tokens.weight
    width = emb.shape[1]
    centred = src - src.mean(0, keepdim=True)
    gen = torch.Generator().manual_seed(0)
    sample = centred[torch.randperm(centred.shape[0], generator=gen)[:8192]]
    _, _, v = torch.linalg.svd(sample, full_matrices=False)
    reduced = centred @ v[:width].t()
    reduced *= float(model.config.text_config.initializer_range) / float(reduced.std())
    emb.zero_()
    emb[: reduced.shape[0]] = reduced.to(emb.dtype)


# ---------------------------------------------------------------------------------------------- saving/loading
SCRATCH_HALF = ("model.language_model.embed_tokens.weight",)  # stored as float16: the vocabulary is most of the file


def trained_state(model: Any) -> dict[str, torch.Tensor]:
    """The parameters a VLM adds to its text model: vision tower and projector — and, for a language model trained
    from scratch, all of it (the tied output head is the embedding matrix and is not stored twice; the embedding
    matrix is stored as float16)."""
    scratch = spec_of(model.config).from_scratch
    prefixes: tuple[str, ...] = ("model.vision_tower.", "model.multi_modal_projector.")
    if scratch:
        prefixes = (*prefixes, "model.language_model.")
    out = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith(prefixes)}
    if scratch:
        if not model.config.tie_word_embeddings:
            out["lm_head.weight"] = model.lm_head.weight.detach().contiguous()
        for k in SCRATCH_HALF:
            out[k] = out[k].to(torch.float16)
    return out


def save_vlm(
    model: Any,
    out_dir: Path | str,
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    meta: dict[str, str] | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (vision tower, projector, low-rank factors) to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = trained_state(model)
    for name, (a, b) in (lora or {}).items():
        tensors[f"{LORA_PREFIX}{name}::A"] = a.detach().contiguous()
        tensors[f"{LORA_PREFIX}{name}::B"] = b.detach().contiguous()
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", **(meta or {})})
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(model.config.to_json_string(use_diff=False))
    return out / "model.safetensors"


def merge_lora(model: Any, factors: dict[str, torch.Tensor], scale: float) -> int:
    """Add ``scale · B @ A`` to each weight named in ``factors`` (keys ``lora::<weight>::A|B``). Returns the count."""
    params = dict(model.named_parameters())
    names = sorted({k[len(LORA_PREFIX) :].rsplit("::", 1)[0] for k in factors if k.startswith(LORA_PREFIX)})
    with torch.no_grad():
        for name in names:
            if name not in params:
                raise ModelNotFoundError(f"The low-rank factors name {name}, which the model does not have.")
            a, b = factors[f"{LORA_PREFIX}{name}::A"], factors[f"{LORA_PREFIX}{name}::B"]
            w = params[name]
            w.add_((b.to(torch.float32) @ a.to(torch.float32)).to(w.dtype), alpha=scale)
    return len(names)


def load_vlm(
    name_or_dir: str = VLM_NAME,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Load the embedded VLM (or a directory written by :func:`save_vlm`) on the embedded text model.

    Returns ``(model, processor)``: a ``LlavaForConditionalGeneration`` in eval mode and its ``LlavaProcessor``
    (``processor.tokenizer`` is the tokenizer).
    """
    from safetensors.torch import load_file
    from transformers import LlavaConfig

    key = vlm_name(name_or_dir)
    src = weights_dir(key) if key is not None else Path(name_or_dir).expanduser()
    if not (src / "config.json").is_file() or not (src / "model.safetensors").is_file():
        raise ModelNotFoundError(
            f"No trained VLM in {src} (config.json and model.safetensors). Train one with `tokensieve train vlm`."
        )
    config = LlavaConfig.from_json_file(str(src / "config.json"))
    model, processor = build_vlm(config=config, with_text_weights=not spec_of(config).from_scratch)
    trained = load_file(str(src / "model.safetensors"))
    own = {k: v for k, v in trained.items() if not k.startswith(LORA_PREFIX)}
    missing, unexpected = model.load_state_dict(own, strict=False)
    required: tuple[str, ...] = ("model.vision_tower.", "model.multi_modal_projector.")
    if spec_of(config).from_scratch:
        required = (*required, "model.language_model.")
    bad_missing = [k for k in missing if k.startswith(required)]
    if bad_missing or unexpected:
        raise ModelNotFoundError(
            f"{src} does not fit its config: missing {bad_missing[:3]}, unexpected {unexpected[:3]}"
        )
    merge_lora(model, trained, spec_of(config).lora_scale)
    if key is not None:
        model.config.name_or_path = key
    model = model.to(device=device, dtype=dtype).eval()
    return model, processor


# ----------------------------------------------------------------------------------------------- prompts
def chat_prompt(turns: list[tuple[str, str | None]], *, image: bool = True) -> str:
    """The prompt of a conversation about one image: ``turns`` of (question, answer or None for the model's turn).

    Identical to ``processor.apply_chat_template`` with the image before the first question.
    """
    parts = [f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"]
    for i, (q, a) in enumerate(turns):
        img = f"{IMAGE_TOKEN}\n" if image and i == 0 else ""
        parts.append(f"<|im_start|>user\n{img}{q}<|im_end|>\n<|im_start|>assistant\n")
        if a is not None:
            parts.append(f"{a}<|im_end|>\n")
    return "".join(parts)


def image_spans(input_ids: torch.Tensor, image_token_id: int) -> list[list[tuple[int, int]]]:
    """Per sample, the [start, end) runs of image tokens in ``input_ids`` (B, T)."""
    out: list[list[tuple[int, int]]] = []
    for row in (input_ids == image_token_id).to(torch.int8):
        d = torch.diff(row, prepend=row.new_zeros(1), append=row.new_zeros(1))
        starts = (d == 1).nonzero().flatten().tolist()
        ends = (d == -1).nonzero().flatten().tolist()
        out.append(list(zip(starts, ends)))
    return out


def describe(model: Any) -> dict[str, Any]:
    """Sizes of a VLM's parts, for reports."""
    n = {
        part: sum(p.numel() for k, p in model.named_parameters() if k.startswith(prefix))
        for part, prefix in (
            ("vision_tower", "model.vision_tower."),
            ("projector", "model.multi_modal_projector."),
            ("language_model", "model.language_model."),
        )
    }
    return {"parameters": n, "visual_tokens": spec_of(model.config).num_visual_tokens}


def read_meta(name_or_dir: str = VLM_NAME) -> dict[str, Any]:
    """The training record shipped next to the weights (``train.json``), or {}."""
    key = vlm_name(name_or_dir)
    src = weights_dir(key) if key is not None else Path(name_or_dir)
    p = src / "train.json"
    return json.loads(p.read_text()) if p.is_file() else {}
