"""`tokensieve train video-dit`: train the embedded video DiT by flow matching on procedural clips (resumable).

Every step draws ``batch`` clips (:func:`tokensieve.data.clips.make_clip`, seeds from the step) and noise levels ``σ``
from a logit-normal distribution (as SD3 / Wan training) moved toward high noise by ``shift``
(``σ' = sσ / (1 + (s − 1)σ)``, SD3's resolution shift: flat procedural frames stay recognisable under much noise, so
the layout of a clip is decided at σ > 0.9, which the unshifted distribution rarely draws; the sampler uses the same
shift by default), forms ``x_σ = (1 − σ) x_0 + σ ε`` on pixels in [−1, 1] and regresses the velocity ``ε − x_0`` (mean
squared error). One prompt in ten is dropped (the "no prompt" embedding) so that sampling may use classifier-free
guidance. AdamW, a linear warm-up then a constant rate; an exponential moving average of the weights (``ema``) is what
``final/`` holds and what a run's checkpoint loads as. The run directory holds ``checkpoint.pt`` (weights, optimizer,
step, the model's configuration; written every ``save_every`` steps and when this invocation's wall-clock budget
``--minutes`` is spent), ``minutes.json`` (the wall-clock minutes spent over all invocations, and the process CPU
minutes — every thread's — from the step where CPU accounting began, ``cpu_from_step``), ``train.log`` (JSON lines)
and, at the end, ``final/`` (the weights as ``load_embedded`` reads them). Every invocation logs its settings.
Rerunning the same command resumes where the last chunk stopped; batches and noise follow from the step, so a run in
chunks sees the same data as a run in one go. The clips' ``frames`` may change between chunks (a curriculum: short clips
are cheaper — attention's cost grows with the square of the tokens — and the 3D RoPE places any number of frames);
the model then samples the frames of its last chunk. ``bf16`` runs the forward and backward matrix products in
bfloat16 under autocast. Every ``eval_every`` steps the quality gate is measured on ``eval_clips``
generated test clips and logged.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError


@dataclass
class VideoTrainConfig:
    out: str = "runs/video-dit"
    steps: int = 1500  # ≈ 4 CPU-hours at batch 8 (8.4–10 CPU-s a step on one core, idle to loaded machine)
    batch: int = 8
    lr: float = 3e-4
    warmup: int = 200
    seed: int = 0
    shift: float = 3.0  # noise-level shift of the training distribution (σ' = sσ / (1 + (s − 1)σ))
    ema: float = 0.995  # decay of the exponential moving average of the weights (0: none); final/ holds the average
    minutes: float = 0.0  # wall-clock budget of this invocation (one chunk); 0: no budget
    save_every: int = 250
    eval_every: int = 1000
    eval_clips: int = 40
    eval_steps: int = 20
    threads: int = 1
    layers: int = 4
    heads: int = 3
    frames: int = 8  # clip frames
    size: int = 64  # clip height and width, pixels (tokens = frames × (size / 4)², patch 1 × 4 × 4)
    coords: bool = True  # coordinate input channels (a run trained without them continues with them, widened)
    bf16: bool = False  # matrix products in bfloat16 (autocast; weights, optimizer and loss stay float32)
    prediction: str = "x"  # the transformer predicts the clean clip ("x", JiT) or the velocity ("v"); loss on v


def _batch(step: int, cfg: VideoTrainConfig, frames: int, size: int) -> tuple[torch.Tensor, list[str]]:
    from ..data.clips import make_clip, split_seed

    clips = [make_clip(split_seed("train", step * cfg.batch + i), frames, size) for i in range(cfg.batch)]
    x = torch.from_numpy(np.stack([c.frames for c in clips])).float() / 127.5 - 1.0  # (B, F, H, W, 3)
    return x.permute(0, 4, 1, 2, 3).contiguous(), [c.prompt for c in clips]


def gate_eval(
    model: Any,
    n: int,
    steps: int,
    start: int = 0,
    guidance: float = 1.0,
    from_sigma: float = 1.0,
    progress: bool = False,
) -> dict[str, Any]:
    """The quality gate on ``n`` generated test clips (prompt and seed of test clip ``start + i``), with Wilson 95 %
    intervals; ``progress``: a progress bar. ``from_sigma`` < 1: each clip starts from the test clip itself noised to
    that level (a diagnostic: does the model keep a layout it is given?)."""
    from ..adapters.diffusion.embedded import sample
    from ..data.clips import gate, gate_rates, make_clip, split_seed
    from ..results.stats import wilson

    results = []
    for i in _progress(range(n), progress, "gate"):
        seed = split_seed("test", start + i)
        clip = make_clip(seed, model.cfg.frames, model.cfg.size)
        init = (torch.from_numpy(clip.frames)[None], from_sigma) if from_sigma < 1.0 else None
        video = sample(model, [clip.prompt], [seed], steps=steps, guidance=guidance, start=init)[0].numpy()
        results.append(gate(video, clip.prompt))
    color, motion = gate_rates(results)
    out: dict[str, Any] = {"gate_color": color, "gate_motion": motion, "clips": n,
                           "color_ci95": [round(x, 3) for x in wilson(round(color * n), n)],
                           "motion_ci95": [round(x, 3) for x in wilson(round(motion * n), n)]}  # fmt: skip
    if from_sigma < 1.0:
        out["from_sigma"] = from_sigma
    return out


def _progress(items: Any, on: bool, desc: str) -> Any:
    if not on:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="clip")


_PATCH = "transformer.patch_embedding.weight"


class VideoTrainer:
    def __init__(self, cfg: VideoTrainConfig, progress: bool = True, model_cfg: Any = None) -> None:
        """``model_cfg``: a :class:`VideoDiTConfig` (default: the embedded model's, with ``cfg``'s layers and heads)."""
        from ..adapters.diffusion.embedded import EmbeddedVideoDiT, VideoDiTConfig, config_of, widen_to_coordinates

        self.cfg = cfg
        self.progress = progress
        self.dir = Path(cfg.out)
        self.dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        shared = {f.name for f in fields(VideoDiTConfig)}  # layers, heads, frames, size, shift, coords, prediction
        mcfg = (
            replace(model_cfg, shift=cfg.shift)
            if model_cfg is not None
            else VideoDiTConfig(**{k: v for k, v in asdict(cfg).items() if k in shared})
        )
        self.model = EmbeddedVideoDiT(mcfg)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.step = 0
        # the moving average of the weights (a checkpoint written before averaging began starts it from its weights)
        self.ema: dict[str, torch.Tensor] | None = self._weights() if cfg.ema else None
        self.changed: dict[str, Any] = {}  # settings that differ from the previous invocation's
        ckpt = self.dir / "checkpoint.pt"
        if ckpt.is_file():
            state = torch.load(ckpt, map_location="cpu", weights_only=True)  # tensors and plain values only
            old = config_of(state["model_config"])
            widen = mcfg.coords and not old.coords  # coordinate channels added to a run trained without them
            # the sampler's shift and the clips' frames may change between chunks (the 3D RoPE places any frames)
            saved = {**asdict(old), "shift": mcfg.shift, "frames": mcfg.frames,
                     "coords": mcfg.coords if widen else old.coords}  # fmt: skip
            if saved != asdict(mcfg):  # fields added to the configuration since the checkpoint: their defaults
                wanted = asdict(mcfg)
                diff = ", ".join(f"{k}: {v!r} there, {wanted[k]!r} asked" for k, v in saved.items() if wanted[k] != v)
                raise ConfigError(
                    f"{ckpt} was trained with another model configuration ({diff})"
                    + (" (with coordinate channels, which cannot be removed)" if old.coords and not mcfg.coords else "")
                    + "; pass its settings to resume it, or use a new --out."
                )
            self.model.load_state_dict(widen_to_coordinates(state["model"]) if widen else state["model"])
            self.opt.load_state_dict(state["opt"])
            if widen:  # the optimizer's moments of the patch embedding gain zeros for the new channels
                moments = self.opt.state[self.model.get_parameter(_PATCH)]
                for k, v in moments.items():
                    if isinstance(v, torch.Tensor) and v.dim() == 5:
                        moments[k] = widen_to_coordinates({_PATCH: v})[_PATCH]
            self.step = int(state["step"])
            if cfg.ema:
                ema = state.get("ema")
                self.ema = (widen_to_coordinates(ema) if widen else ema) if ema else self._weights()
            added = {"shift": 1.0, "ema": 0.0, "coords": False, "bf16": False, "prediction": "v"}  # before they existed
            before = {**added, **state.get("config", {})}
            self.changed = {k: [before[k], v] for k, v in asdict(cfg).items()
                            if k in before and before[k] != v and k not in ("out", "minutes", "threads")}  # fmt: skip
        self._resumed_at = self.step

    def _weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def save(self) -> None:
        tmp = self.dir / "checkpoint.pt.tmp"
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                 **({"ema": self.ema} if self.ema is not None else {}), "config": asdict(self.cfg),
                 "model_config": json.loads(json.dumps(asdict(self.model.cfg)))}  # fmt: skip
        torch.save(state, tmp)
        tmp.replace(self.dir / "checkpoint.pt")

    def log(self, record: dict[str, Any]) -> None:
        with open(self.dir / "train.log", "a") as f:
            f.write(json.dumps({"step": self.step, "time": time.time(), **record}) + "\n")
        if self.progress:
            print(json.dumps({"step": self.step, **record}), flush=True)

    def lr_at(self, step: int) -> float:
        return self.cfg.lr * min(1.0, (step + 1) / max(self.cfg.warmup, 1))

    def train_step(self) -> float:
        cfg, mc = self.cfg, self.model.cfg
        x0, prompts = _batch(self.step, cfg, mc.frames, mc.size)
        rng = random.Random(cfg.seed * 1_000_003 + self.step)
        prompts_in: list[str | None] = [None if rng.random() < 0.1 else p for p in prompts]
        g = torch.Generator().manual_seed(cfg.seed * 7919 + self.step)
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=g))
        sigma = cfg.shift * sigma / (1 + (cfg.shift - 1) * sigma)
        s = sigma[:, None, None, None, None]
        xt = (1 - s) * x0 + s * noise
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.model.train()
        with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")  # rms_norm, unfused
            pred = self.model(xt, sigma, prompts_in)
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.step += 1
        if self.ema is not None:
            decay = min(cfg.ema, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for name, value in self.model.state_dict().items():
                    avg = self.ema[name]
                    if avg.is_floating_point():
                        avg.lerp_(value, 1 - decay)
                    else:
                        avg.copy_(value)
        return float(loss.detach())

    def averaged(self) -> Any:
        """The model with the averaged weights (the trained weights when ``ema`` is 0)."""
        if self.ema is None:
            return self.model
        from ..adapters.diffusion.embedded import EmbeddedVideoDiT

        model = EmbeddedVideoDiT(self.model.cfg)
        model.load_state_dict(self.ema)
        return model.eval()

    def run(self) -> Path:
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        t0 = time.time()
        spent, cpu_spent = self._spent()
        c0 = time.process_time()
        losses: list[float] = []
        # every invocation's settings, so that a run in chunks with changed settings can be reproduced from its log
        self.log({"invocation": asdict(cfg), "resumed_at_step": self.step,
                  **({"changed": self.changed} if self.changed else {})})  # fmt: skip
        if self.changed and self.progress:
            print(f"note: settings changed since the last chunk (before, now): {self.changed}", flush=True)
        t_log = time.time()
        while self.step < cfg.steps:
            losses.append(self.train_step())
            if self.step % 50 == 0:
                per_step = (time.time() - t_log) / len(losses)  # seconds per training step since the last line
                eta = per_step * (cfg.steps - self.step) / 60
                self.log({"loss": sum(losses) / len(losses), "lr": self.lr_at(self.step),
                          "s_per_step": round(per_step, 2), "eta_minutes": round(eta, 1)})  # fmt: skip
                losses, t_log = [], time.time()
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self.log(gate_eval(self.averaged(), cfg.eval_clips, cfg.eval_steps))
                t_log = time.time()
            if self.step % cfg.save_every == 0:
                self.save()
            if cfg.minutes and (time.time() - t0) / 60 >= cfg.minutes and self.step < cfg.steps:
                self.save()
                total = self._add_spent(spent + (time.time() - t0) / 60, cpu_spent + (time.process_time() - c0) / 60)
                self.log({"stopped": "minutes spent", **total})
                return self.dir / "checkpoint.pt"
        self.save()
        self._add_spent(spent + (time.time() - t0) / 60, cpu_spent + (time.process_time() - c0) / 60)
        final = self.averaged().save(self.dir / "final", {"train": asdict(cfg), "steps_done": self.step})
        return final

    def _spent(self) -> tuple[float, float]:
        """(wall minutes, CPU minutes) spent by earlier invocations."""
        f = self.dir / "minutes.json"
        data = json.loads(f.read_text()) if f.is_file() else {}
        return float(data.get("minutes", 0.0)), float(data.get("cpu_minutes", 0.0))

    def _add_spent(self, total: float, cpu_total: float) -> dict[str, Any]:
        f = self.dir / "minutes.json"
        data = json.loads(f.read_text()) if f.is_file() else {}
        # a run begun before CPU accounting counts CPU from the step this invocation resumed at
        start = data.get("cpu_from_step", self._resumed_at if f.is_file() else 0)
        record = {"minutes": total, "cpu_minutes": cpu_total, "cpu_from_step": start}
        f.write_text(json.dumps(record) + "\n")
        return record


MAX_SHIP_MB = 40.0


def ship(final: Path) -> Path:
    """Copy a run's ``final/`` into the package's weights folder (refused above :data:`MAX_SHIP_MB`)."""
    from ..adapters.diffusion.embedded import weights_dir

    size = (final / "model.safetensors").stat().st_size / 2**20
    if size > MAX_SHIP_MB:
        raise ConfigError(
            f"{final} holds {size:.1f} MB of weights; the shipped model must stay ≤ {MAX_SHIP_MB:.0f} MB."
        )
    dst = weights_dir()
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(final / name, dst / name)
    return dst


def cmd_train_video_dit(args: argparse.Namespace) -> int:
    values = {f.name: getattr(args, f.name) for f in fields(VideoTrainConfig)}
    cfg = VideoTrainConfig(**values)
    if cfg.steps < 1 or cfg.batch < 1 or cfg.lr <= 0:
        raise ConfigError("--steps and --batch must be ≥ 1 and --lr > 0.")
    if cfg.frames < 2 or cfg.size < 16 or cfg.size % 4:
        raise ConfigError("--frames must be ≥ 2 and --size a multiple of 4, ≥ 16 (patches of 4 × 4 pixels).")
    out = VideoTrainer(cfg, progress=not args.no_progress).run()
    print(out)
    if args.ship and out.name == "final":
        print(f"shipped to {ship(out)}")
    elif args.ship:
        print("not shipped: the run stopped before its last step (rerun the command to resume)")
    return 0


def cmd_video_gate(args: argparse.Namespace) -> int:
    from ..adapters.diffusion.embedded import load_embedded

    if not 0.0 < args.from_sigma <= 1.0 or args.clips < 1 or args.steps < 1:
        raise ConfigError("--from-sigma must be in (0, 1], --clips and --steps ≥ 1.")
    torch.set_num_threads(args.threads)
    model = load_embedded(args.model)
    result = gate_eval(model, args.clips, args.steps, guidance=args.guidance, from_sigma=args.from_sigma, progress=True)
    print(json.dumps(result))
    return 0


_HELP = {
    "out": "the run directory (checkpoint.pt, train.log, final/)",
    "steps": "optimizer steps of the whole run",
    "batch": "clips per step",
    "lr": "AdamW learning rate after the warm-up",
    "warmup": "steps of linear warm-up",
    "seed": "seed of the batches, the noise and the initialisation",
    "shift": "shift of the logit-normal noise levels toward high noise, σ' = sσ / (1 + (s − 1)σ)",
    "ema": "decay of the moving average of the weights that final/ holds (0: the last weights)",
    "minutes": "wall-clock budget of this invocation; rerun the same command to resume (0: no budget)",
    "save_every": "write checkpoint.pt every this many steps",
    "eval_every": "log the quality gate every this many steps (0: never)",
    "eval_clips": "generated clips per quality-gate measurement",
    "eval_steps": "sampler steps per generated clip in the quality gate",
    "threads": "torch threads",
    "layers": "transformer blocks; a resumed run must keep it",
    "heads": "attention heads of 64 dimensions; a resumed run must keep it",
    "frames": "frames per clip (may change between chunks: a curriculum of short clips first; the model samples the "
    "frames of the last chunk by default)",
    "size": "clip height and width in pixels, a multiple of 4; a resumed run must keep it",
    "bf16": "compute the matrix products in bfloat16 (autocast; about 1.3-1.4x faster on CPUs with bfloat16 dot "
    "products; weights, optimizer and loss stay float32)",
    "prediction": "what the transformer outputs: x (the clean clip, as JiT; its velocity is derived) or v (the "
    "velocity); a resumed run must keep it",
    "coords": "give the model each pixel's (frame, row, column) as three input channels (a run trained without "
    "them gains them, zero-initialised, when resumed with them)",
}


def add_commands(tsub: Any) -> None:
    p = tsub.add_parser("video-dit", help="train the embedded video DiT on procedural clips (resumable; docs/DIT.md)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    defaults = VideoTrainConfig()
    for f in fields(VideoTrainConfig):
        value = getattr(defaults, f.name)
        kind: Any = {"action": argparse.BooleanOptionalAction} if isinstance(value, bool) else {"type": type(value)}
        if f.name == "prediction":
            kind["choices"] = ["x", "v"]
        p.add_argument("--" + f.name.replace("_", "-"), default=value, help=_HELP[f.name], **kind)
    p.add_argument("--ship", action="store_true", help="copy final/ into the package (tokensieve/weights/)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stdout (train.log is written)")
    p.set_defaults(func=cmd_train_video_dit)
    g = tsub.add_parser("video-gate", help="the quality gate of the embedded video DiT on generated test clips",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    g.add_argument(
        "--model",
        default=None,
        help="a final/ folder of train video-dit, or a run directory still training "
        "(its checkpoint); default: the shipped model",
    )
    g.add_argument("--clips", type=int, default=200, help="generated clips (held-out prompts and seeds)")
    g.add_argument("--steps", type=int, default=20, help="sampler steps per clip")
    g.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    g.add_argument("--threads", type=int, default=1, help="torch threads")
    g.add_argument("--from-sigma", type=float, default=1.0,
                   help="start each clip from the test clip itself noised to this level (a diagnostic; 1: from pure "
                   "noise, the gate)")  # fmt: skip
    g.set_defaults(func=cmd_video_gate)


__all__ = ["VideoTrainConfig", "VideoTrainer", "add_commands", "gate_eval"]
