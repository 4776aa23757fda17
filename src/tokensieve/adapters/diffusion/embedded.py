"""The embedded video DiT: diffusers' Wan transformer at a tiny width, flow matching in pixel space, a word prompt.

``EmbeddedVideoDiT`` holds a ``WanTransformer3DModel`` (patch 1 × 4 × 4 on RGB pixels: 8 frames of 64 × 64 make
8 × 16 × 16 = 2,048 tokens; 3 heads of 64, 4 layers) and a text encoder that is one embedding per word of a closed
vocabulary plus one per slot of the prompt template ("a {color} {shape} moving {direction}"): the transformer's
cross-attention reads those three vectors. A prompt outside the template or the vocabulary is refused with the words
the model knows. Besides RGB, the patch embedding reads three coordinate channels (:func:`coordinates`: each pixel's
frame, row and column in [−1, 1]) — Wan's RoPE gives attention relative positions only, and from pure noise the model
must know where a token sits to put the object where its motion starts (``coords``; a model saved without them has
none). The velocity convention is Wan's (``x_σ = (1 − σ) x_0 + σ ε``, velocity ``ε − x_0``, timestep ``1000 σ``);
the transformer predicts the clean clip ``x̂_0`` and :meth:`EmbeddedVideoDiT.forward` returns its velocity
``(x_σ − x̂_0) / σ`` (``prediction="x"``, as JiT; ``"v"``: the transformer predicts the velocity itself, as Wan and
every model saved before the option); :func:`sample` integrates it with Euler steps from σ = 1 to 0, one noise seed
per clip, so a clip is the same alone or in a batch.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigError, ModelNotFoundError, PromptError

EMBEDDED_NAME = "video-dit-wan-tiny"
WEIGHTS_ROOT = Path(__file__).resolve().parent.parent.parent / "weights"
SLOTS = ("color", "shape", "direction")
MAX_FRAMES = 64  # the temporal positions of the transformer's 3D RoPE (rope_max_seq_len)
MIN_SIGMA = 0.05  # x-prediction: the noise level below which the velocity's denominator stops shrinking (JiT's clip)


def default_vocab() -> dict[str, list[str]]:
    return {
        "color": ["red", "blue", "green", "yellow", "purple", "orange", "gray"],
        "shape": ["circle", "square", "triangle"],
        "direction": ["right", "left", "up", "down"],
    }


@dataclass
class VideoDiTConfig:
    frames: int = 8
    size: int = 64
    patch: tuple[int, int, int] = (1, 4, 4)
    heads: int = 3
    head_dim: int = 64
    layers: int = 4
    ffn: int = 768
    text_dim: int = 64
    freq_dim: int = 64
    shift: float = 1.0  # the noise-level shift it was trained with, which its sampler uses by default
    coords: bool = True  # three input channels with each pixel's (t, y, x) in [−1, 1] besides its RGB
    prediction: str = "x"  # what the transformer outputs: "x" the clean clip (JiT), "v" the velocity ε − x_0
    template: str = "a {color} {shape} moving {direction}"
    vocab: dict[str, list[str]] = field(default_factory=default_vocab)

    @property
    def tokens(self) -> int:
        pt, ph, pw = self.patch
        return (self.frames // pt) * (self.size // ph) * (self.size // pw)


class EmbeddedVideoDiT(nn.Module):
    """A Wan transformer with a word-embedding text encoder (see the module docstring)."""

    def __init__(self, cfg: VideoDiTConfig | None = None) -> None:
        super().__init__()
        from diffusers import WanTransformer3DModel

        self.cfg = cfg = cfg or VideoDiTConfig()
        if cfg.prediction not in ("x", "v"):
            raise ConfigError(f"prediction must be 'x' (the clean clip) or 'v' (the velocity), not {cfg.prediction!r}.")
        self.transformer = WanTransformer3DModel(
            patch_size=tuple(cfg.patch),
            num_attention_heads=cfg.heads,
            attention_head_dim=cfg.head_dim,
            in_channels=6 if cfg.coords else 3,
            out_channels=3,
            text_dim=cfg.text_dim,
            freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn,
            num_layers=cfg.layers,
            rope_max_seq_len=max(MAX_FRAMES, cfg.size),
        )
        self.words = [w for s in SLOTS for w in cfg.vocab[s]]
        self.embed = nn.Embedding(len(self.words) + 1, cfg.text_dim)  # the last row: "no prompt" (guidance)
        self.slot = nn.Parameter(torch.randn(len(SLOTS), cfg.text_dim) * 0.02)
        pattern = re.escape(cfg.template)
        for s in SLOTS:
            pattern = pattern.replace(re.escape("{" + s + "}"), rf"(?P<{s}>\w+)")
        self._pattern = re.compile(r"^\s*" + pattern.replace(r"\ ", r"\s+") + r"\s*$", re.IGNORECASE)

    # -- prompts ---------------------------------------------------------------------------------------------
    def parse(self, prompt: str) -> tuple[str, str, str]:
        m = self._pattern.match(prompt)
        words = {s: (m.group(s).lower() if m else "") for s in SLOTS}
        bad = [f"{s} {words[s]!r}" for s in SLOTS if words[s] not in self.cfg.vocab[s]]
        if m is None or bad:
            known = "; ".join(f"{s}: {', '.join(self.cfg.vocab[s])}" for s in SLOTS)
            raise PromptError(
                f"The embedded video model cannot condition on {prompt!r}"
                + (f" (unknown {', '.join(bad)})" if m is not None else "")
                + f": it knows prompts of the form {self.cfg.template!r} with {known}."
            )
        return words["color"], words["shape"], words["direction"]

    def encode(self, prompts: list[str | None]) -> Tensor:
        """``(B, 3, text_dim)``: the prompt's words (None: the "no prompt" embedding), each plus its slot's."""
        null = len(self.words)
        ids = [[null] * 3 if p is None else [self.words.index(w) for w in self.parse(p)] for p in prompts]
        dev = self.slot.device
        return self.embed(torch.tensor(ids, device=dev)) + self.slot[None]

    def forward(self, x: Tensor, sigma: Tensor, prompts: list[str | None]) -> Tensor:
        """The predicted velocity ``ε − x_0`` at noise level ``sigma`` ``(B,)`` of pixels ``x`` ``(B, 3, F, H, W)``."""
        run: Any = self.transformer  # diffusers' ModelMixin types its __call__ loosely
        inp = torch.cat([x, coordinates(x)], dim=1) if self.cfg.coords else x
        out: Tensor = run(inp, sigma * 1000.0, self.encode(prompts), return_dict=False)[0]
        if self.cfg.prediction == "x":  # the clean clip predicted: its velocity (x_σ − x̂_0) / σ, σ floored as JiT
            s = sigma.clamp(min=MIN_SIGMA).to(out.dtype).view(-1, *([1] * (out.dim() - 1)))
            out = (x - out) / s
        return out

    # -- files -----------------------------------------------------------------------------------------------
    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.cfg)
        (folder / "config.json").write_text(json.dumps({"embedded_video_dit": cfg, **(extra or {})}, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))
        return folder


def coordinates(x: Tensor) -> Tensor:
    """``(B, 3, F, H, W)``: every pixel's frame, row and column of ``x`` ``(B, C, F, H, W)``, each spread over [−1, 1]
    (a clip of any length spans the same range; one frame sits at 0)."""
    b, _, f, h, w = x.shape

    def axis(n: int) -> Tensor:
        return torch.linspace(-1.0, 1.0, n, device=x.device, dtype=x.dtype) if n > 1 else x.new_zeros(1)

    t, y, z = torch.meshgrid(axis(f), axis(h), axis(w), indexing="ij")
    return torch.stack([t, y, z])[None].expand(b, -1, -1, -1, -1)


def widen_to_coordinates(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The weights of a model without coordinate channels, for one with them: the patch embedding gains zero
    weights for the three channels, so the widened model computes what the old one did until it learns to read
    them (a run trained without them continues with them; see ``train video-dit --coords``)."""
    key = "transformer.patch_embedding.weight"
    w = state[key]
    if w.shape[1] != 3:
        raise ConfigError(f"{key} has {w.shape[1]} input channels; only a 3-channel (RGB) model widens.")
    return {**state, key: torch.cat([w, w.new_zeros(w.shape[0], 3, *w.shape[2:])], dim=1)}


def weights_dir(name: str = EMBEDDED_NAME) -> Path:
    return WEIGHTS_ROOT / name


def load_embedded(path: str | Path | None = None) -> EmbeddedVideoDiT:
    """The embedded video DiT from a folder written by :meth:`EmbeddedVideoDiT.save` (default: the shipped one), or
    from a training run still under way: its directory (``checkpoint.pt`` inside) or the checkpoint file itself (its
    moving average of the weights when it keeps one), so that a partly trained model can be sampled and gated."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else weights_dir()
    cfg_file = folder / "config.json"
    ckpt = folder if folder.suffix == ".pt" else folder / "checkpoint.pt"
    if not cfg_file.is_file() and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # tensors and plain values only
        if not isinstance(state, dict) or "model_config" not in state or "model" not in state:
            raise ModelNotFoundError(f"{ckpt} is not a checkpoint of `tokensieve train video-dit`.")
        model = EmbeddedVideoDiT(config_of(state["model_config"]))
        model.load_state_dict(state.get("ema") or state["model"])  # the averaged weights, as final/ will hold
        return model.eval()
    if not cfg_file.is_file():
        raise ModelNotFoundError(
            f"No embedded video DiT at {folder}: train one with `tokensieve train video-dit --out DIR --ship` "
            "(see docs/DIT.md), or give --model a run's final/ folder or its directory (its checkpoint)."
        )
    data = json.loads(cfg_file.read_text()).get("embedded_video_dit")
    if data is None:
        raise ModelNotFoundError(f"{folder} holds no embedded video DiT (config.json has no 'embedded_video_dit').")
    model = EmbeddedVideoDiT(config_of(data))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


def config_of(data: dict[str, Any]) -> VideoDiTConfig:
    """The configuration a model was saved with (one saved before the options existed: no coordinate channels, a
    velocity model)."""
    return VideoDiTConfig(**{"coords": False, "prediction": "v", **data, "patch": tuple(data["patch"])})


def clip_frames(model: EmbeddedVideoDiT, frames: int | None, option: str = "frames") -> int:
    """The frames of a sampled clip: ``frames`` (None: the model's own), refused outside the RoPE's positions (the
    message names ``option``)."""
    f = frames or model.cfg.frames
    if not 1 <= f <= MAX_FRAMES:
        raise ConfigError(f"{option} must be in [1, {MAX_FRAMES}] (the positions of the model's RoPE); got {f}.")
    return f


def sigmas(steps: int, shift: float = 1.0) -> Tensor:
    """``steps + 1`` noise levels from 1 to 0 with Wan's shift ``σ' = s σ / (1 + (s − 1) σ)``."""
    s = torch.linspace(1.0, 0.0, steps + 1)
    return shift * s / (1 + (shift - 1) * s)


@torch.no_grad()
def sample(
    model: EmbeddedVideoDiT,
    prompts: list[str],
    seeds: list[int],
    steps: int = 20,
    guidance: float = 1.0,
    shift: float | None = None,
    sieve: Any = None,
    frames: int | None = None,
    start: tuple[Tensor, float] | None = None,
) -> Tensor:
    """Clips ``(B, F, H, W, 3)`` uint8 for the prompts, each from the noise of its seed (Euler on the flow).

    ``sieve``: a :class:`~tokensieve.adapters.diffusion.DiTSieve` on ``model.transformer`` (reset here for the run's
    steps) or None. ``guidance`` > 1 adds classifier-free guidance (a second, prompt-less call per step); ``shift``
    moves the noise levels toward high noise (None: the shift the model was trained with); ``frames``: clips longer
    (or shorter) than the model was trained on (None: its own; the 3D RoPE places up to 64 frames). ``start``:
    ``(clips, σ0)`` begins from these clips ``(B, F, H, W, 3)`` uint8 noised to ``σ0`` (each with its seed's noise)
    instead of from pure noise, and integrates only the steps below ``σ0`` — how much of a clip's layout the model
    keeps once it is given (None: from σ = 1)."""
    cfg = model.cfg
    for p in prompts:
        model.parse(p)
    f = clip_frames(model, frames)
    noise = [torch.randn(3, f, cfg.size, cfg.size, generator=torch.Generator().manual_seed(s)) for s in seeds]
    x = torch.stack(noise).to(model.slot.device)
    sig = sigmas(steps, cfg.shift if shift is None else shift)
    if start is not None:
        clips, s0 = start
        if not 0.0 < s0 <= 1.0 or tuple(clips.shape) != (len(seeds), f, cfg.size, cfg.size, 3):
            raise ConfigError(f"start: clips of shape {(len(seeds), f, cfg.size, cfg.size, 3)} and 0 < σ0 ≤ 1.")
        x0 = clips.to(x.device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        sig = torch.cat([torch.tensor([s0]), sig[sig < s0]])
        x = (1 - s0) * x0 + s0 * x
        steps = len(sig) - 1
    if sieve is not None:
        sieve.reset(steps)
    for i in range(steps):
        t = torch.full((x.shape[0],), float(sig[i]), device=x.device)
        v = model(x, t, list(prompts))
        if guidance != 1.0:
            v0 = model(x, t, [None] * len(prompts))
            v = v0 + guidance * (v - v0)
        x = x + (sig[i + 1] - sig[i]) * v
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()


def write_gif(frames: Tensor, path: str | Path, scale: int = 4, fps: int = 6) -> Path:
    """One clip ``(F, H, W, 3)`` uint8 as an animated GIF, upscaled ``scale`` times (nearest)."""
    from PIL import Image

    imgs = [
        Image.fromarray(f.numpy()).resize((f.shape[1] * scale, f.shape[0] * scale), Image.Resampling.NEAREST)
        for f in frames
    ]
    path = Path(path)
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    return path
