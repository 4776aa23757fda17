"""Training the embedded VLM (``tokensieve train vlm``): a CLIP vision tower and LLaVA projector in front of the
frozen SmolLM2-135M-Instruct (adapted with LoRA), on procedural scenes. See docs/VLM.md for the choices and numbers.

Two stages, one command, resumable at any checkpoint:

1. *vision* — the vision tower alone learns the scenes from dense targets (per 8 × 8 patch: the colour, shape and
   size of the object covering it, the word written on it, whether an object's centre lies in it; from CLS: counts
   per colour / shape / size, the total and the word). Cheap (no language model), and it makes patch tokens local:
   what a patch shows stays in that patch's token, so dropping visual tokens drops information.
2. *language* — the whole ``LlavaForConditionalGeneration`` on conversations of ``turns`` questions about one
   image, loss on the answer tokens (and the ``<|im_end|>`` that closes them); trained: vision tower (lower rate,
   dense targets kept as an auxiliary loss), projector and the LoRA factors; SmolLM2's own weights stay frozen.

Every step's data follows from (seed, step): resuming from a checkpoint continues the very same run.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.vlm import VisionSpec, build_vlm, save_vlm, spec_of
from ..data.scenes import MAX_OBJECTS, Scene, balanced_scene, caption, make_scene, split_seed
from .batches import (
    CLS_HEADS,
    PATCH_HEADS,
    Encoded,
    Encoder,
    collate,
    sample_questions,
    training_questions,
    vision_batch,
)
from .lora import add_lora, load_lora_state, lora_factors, lora_state

ALL_TARGETS = (
    "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj,self_attn.o_proj,mlp.gate_proj,mlp.up_proj,mlp.down_proj"
)
# Settings that only the language stage reads: they may change until that stage has taken its first step.
LANGUAGE_FIELDS = (
    "steps", "batch", "turns", "lr_vision", "lr_projector", "lr_lora", "aux_weight", "lora_rank", "lora_alpha",
    "lora_targets", "autocast_bf16", "text_layers", "packed", "balanced", "caption", "curriculum", "eval_every",
    "eval_scenes", "schedule", "decay",
)  # fmt: skip
STAGE_B_OFFSET = 100_000_000  # train-split scene indices of the language stage start here (stage A starts at 0)


@dataclass
class TrainConfig:
    out: str = "runs/vlm"
    seed: int = 0
    # vision tower geometry
    hidden_size: int = 192
    num_layers: int = 6
    num_heads: int = 3
    text_layers: int = 6  # the language model: SmolLM2's first text_layers decoder layers (0: all 30)
    text_hidden: int = 0  # > 0: a decoder of text_layers layers of this width trained from scratch, not SmolLM2's
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 0
    lr_text: float = 1e-3  # the from-scratch decoder's learning rate
    train_embeddings: bool = False  # the from-scratch decoder's (tied) embeddings: trained, or kept as initialised
    # their scale: the tied head's logits are at most |h|·|e|, and at the usual 0.02 a 49k-way softmax cannot get sharp
    text_embed_std: float = 0.15
    # stage 1: vision
    vision_steps: int = 1000
    vision_batch: int = 16
    vision_lr: float = 2e-3
    # stage 2: language
    steps: int = 1000
    batch: int = 2
    turns: int = 8
    lr_vision: float = 2e-4
    lr_projector: float = 1e-3
    lr_lora: float = 5e-4
    aux_weight: float = 0.5
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: str = ALL_TARGETS
    autocast_bf16: bool = False
    warmup: int = 50
    # the language stage's learning-rate schedule after the warm-up: "cosine" to 0.1 over every step, or "wsd"
    # (warm-up, stable, decay): constant until the last `decay` fraction of the steps, then cosine to 0.1 — a run
    # can then be lengthened (--steps) as long as its decay has not begun
    schedule: str = "cosine"
    decay: float = 0.2
    # stage 2's data (see language_step)
    packed: bool = True  # every question a branch of one image pass (as asked at evaluation), else one conversation
    balanced: bool = True  # scenes drawn around a counting question whose answer the words do not tell
    caption: bool = True  # one more branch per image: "List the objects." answered with every object, left to right
    curriculum: int = 0  # over the first N language steps the scenes grow from 1 object to 7 (0: 1–7 from the start)
    eval_every: int = 0  # every N language steps: greedy accuracy on eval_scenes validation scenes, into train.log
    eval_scenes: int = 40
    # budget and bookkeeping
    minutes: float = 90.0
    checkpoint_every: int = 50
    log_every: int = 10
    threads: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    def vision_spec(self) -> VisionSpec:
        targets = tuple(t for t in self.lora_targets.split(",") if t) if self.lora_rank else ()
        return VisionSpec(
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_size=4 * self.hidden_size,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_targets=targets,
            text_layers=self.text_layers,
            text_hidden=self.text_hidden,
            text_heads=self.text_heads,
            text_kv_heads=self.text_kv_heads,
            text_intermediate=self.text_intermediate,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# -------------------------------------------------------------------------------------------------- modules
class AuxHeads(nn.Module):
    """Linear read-outs of the vision tower: per patch (feature layer) and from CLS (pooled output)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.patch = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in PATCH_HEADS})
        self.cls = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in CLS_HEADS})

    def loss(
        self, feats: torch.Tensor, pooled: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        h = feats  # linear heads on the raw features: the projector's first layer can start as a copy of them
        total = feats.new_zeros(())
        metrics: dict[str, float] = {}
        for name, _ in PATCH_HEADS:
            logits = self.patch[name](h).flatten(0, 1)
            target = batch[f"patch_{name}"].flatten()
            # "none" dominates the patches: weigh it down so that the few object and word patches count
            weight = torch.ones(logits.shape[-1])
            weight[0] = 0.1
            if name == "centre":
                weight = torch.tensor([1.0, 10.0])
            total = total + nn.functional.cross_entropy(logits, target, weight=weight)
            fg = target > 0
            if fg.any():
                metrics[f"p_{name}"] = float((logits.argmax(-1)[fg] == target[fg]).float().mean())
        cls_loss = feats.new_zeros(())
        correct = 0.0
        for name, _ in CLS_HEADS:
            logits = self.cls[name](pooled)
            cls_loss = cls_loss + nn.functional.cross_entropy(logits, batch[f"cls_{name}"])
            correct += float((logits.argmax(-1) == batch[f"cls_{name}"]).float().mean())
        metrics["cls_acc"] = correct / len(CLS_HEADS)
        return total + cls_loss / len(CLS_HEADS) * 2.0, metrics


def class_words() -> dict[str, list[str]]:
    """Per patch head, the word each class stands for ('' for "none"): what the projector starts by writing."""
    from ..data.scenes import COLORS, SHAPES, SIZES, WORDS

    return {
        "color": ["", *COLORS],
        "shape": ["", *SHAPES],
        "size": ["", *SIZES],
        "word": ["", *WORDS],
        "centre": ["", "object"],
    }


@torch.no_grad()
def init_projector(model: Any, aux: AuxHeads, tokenizer: Any, pixel_values: torch.Tensor) -> None:
    """Start the projector as a reader of the trained patch heads that writes the words of their classes.

    ``linear_1``'s first rows copy the heads (one row per class), GELU keeps the confident ones, and ``linear_2`` maps
    each to the language model's embedding of its word (``red``, ``circle``, ``large``, the written word, ``object``
    at an object's centre; nothing for "none") scaled by the typical winning activation; the remaining rows start
    small. A patch of a large red circle then reaches the language model as about E(red) + E(circle) + E(large), which
    the frozen model can already read, and training refines it from there. The output is scaled so that visual tokens
    have the mean norm of the text embeddings.
    """
    proj = model.model.multi_modal_projector
    emb = model.model.language_model.embed_tokens.weight
    words = class_words()
    rows_w: list[torch.Tensor] = []
    rows_b: list[torch.Tensor] = []
    cols: list[torch.Tensor] = []
    for name, _ in PATCH_HEADS:
        head = aux.patch[name]
        assert isinstance(head, nn.Linear)
        rows_w.append(head.weight)
        rows_b.append(head.bias)
        for w in words[name]:
            if w:
                ids = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
                cols.append(emb[ids].mean(0))
            else:
                cols.append(torch.zeros(emb.shape[1]))
    w1, b1 = torch.cat(rows_w), torch.cat(rows_b)
    n = w1.shape[0]
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    feats = out.hidden_states[spec_of(model.config).feature_layer][:, 1:]
    act = nn.functional.gelu(feats @ w1.t() + b1)
    scale = float(act.max(-1).values.mean()) or 1.0
    proj.linear_1.weight[:n] = w1
    proj.linear_1.bias[:n] = b1
    proj.linear_1.weight[n:] *= 0.1
    proj.linear_1.bias[n:] = 0
    proj.linear_2.weight.mul_(0.1)
    proj.linear_2.weight[:, :n] = torch.stack(cols, 1) / scale
    proj.linear_2.bias.zero_()
    # visual tokens as large as the text embeddings they sit between (on average): not 6× larger
    norm = float(proj(feats).norm(dim=-1).mean())
    target = float(emb[: emb.shape[0] - 1].norm(dim=-1).mean())
    proj.linear_2.weight.mul_(target / norm)


def vision_forward(model: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(patch features at the LLaVA feature layer, CLS pooled output, projected visual tokens)."""
    spec = spec_of(model.config)
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    feats = out.hidden_states[spec.feature_layer][:, 1:]
    return feats, out.pooler_output, model.model.multi_modal_projector(feats)


def lm_loss(
    model: Any, visual: torch.Tensor, batch: dict[str, torch.Tensor], autocast_bf16: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the answer tokens; also returns whether each answer position's argmax was right."""
    ids = batch["input_ids"]
    embeds = model.model.language_model.embed_tokens(ids)
    mask = (ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, visual.to(embeds.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
        hidden = model.model.language_model(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).last_hidden_state
    targets = batch["targets"]
    sel = targets != -100
    logits = model.lm_head(hidden[sel].float())
    loss = nn.functional.cross_entropy(logits, targets[sel])
    return loss, logits.argmax(-1) == targets[sel]


# ---------------------------------------------------------------------------------------------- checkpoints
def _save_checkpoint(
    path: Path, trainables: dict[str, torch.Tensor], opt: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in trainables.items()}, str(tmp / "trainable.safetensors"))
    osd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            if k == "step":
                steps[str(idx)] = float(v)
            else:
                tensors[f"{idx}::{k}"] = v.contiguous()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {**state, "optimizer_steps": steps, "param_groups": osd["param_groups"]}
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _load_optimizer(path: Path, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "optimizer.safetensors"))
    per: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        idx, k = key.split("::")
        per.setdefault(int(idx), {})[k] = v
    for idx, step in state["optimizer_steps"].items():
        per.setdefault(int(idx), {})["step"] = torch.tensor(step)
    opt.load_state_dict({"state": per, "param_groups": state["param_groups"]})


# ------------------------------------------------------------------------------------------------- training
def _lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine", decay: float = 0.2) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "wsd":
        start = decay_start(total, warmup, decay)
        if step < start:
            return 1.0
        t = (step - start) / max(1, total - start)
    else:
        t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def steps_may_change(saved: TrainConfig, new: TrainConfig, step: int) -> bool:
    """Whether a language stage stopped before ``step`` may resume with ``new.steps`` instead of ``saved.steps``:
    both use the "wsd" schedule and neither length's decay has begun, so every step so far had the same rate."""
    if not saved.schedule == new.schedule == "wsd" or (saved.decay, saved.warmup) != (new.decay, new.warmup):
        return False
    stable = min(decay_start(saved.steps, saved.warmup, saved.decay), decay_start(new.steps, new.warmup, new.decay))
    return step < stable


def decay_start(total: int, warmup: int, decay: float) -> int:
    """The first step of a "wsd" schedule's decay: the last ``decay`` fraction of the steps (never in the warm-up)."""
    return max(warmup, total - round(decay * total))


class Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool = True, command: str = "") -> None:
        self.cfg = cfg
        self.command = command
        self.out = Path(cfg.out)
        self.progress = progress
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.model, self.processor = build_vlm(cfg.vision_spec())
        self.spec = spec_of(self.model.config)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.model.model.vision_tower.parameters():
            p.requires_grad_(True)
        for p in self.model.model.multi_modal_projector.parameters():
            p.requires_grad_(True)
        if self.spec.from_scratch:
            for p in self.model.model.language_model.parameters():
                p.requires_grad_(True)
            emb = self.model.model.language_model.embed_tokens.weight
            with torch.no_grad():
                emb.mul_(cfg.text_embed_std / float(emb[:-1].std()))
            emb.requires_grad_(cfg.train_embeddings)
        self.aux = AuxHeads(self.spec.hidden_size)
        self.lora = (
            add_lora(
                self.model.model.language_model,
                self.spec.lora_targets,
                self.spec.lora_rank,
                self.spec.lora_scale,
                prefix="model.language_model.",
            )
            if self.spec.lora_rank
            else {}
        )
        self.encoder = Encoder(self.processor.tokenizer, self.spec.num_visual_tokens)
        self.pad_id = int(self.processor.tokenizer.pad_token_id)
        self.elapsed = 0.0
        self.log_path = self.out / "train.log"
        # one record per process that ran part of the run: its command, where it started and stopped, its time
        self.chunks: list[dict[str, Any]] = []
        self.chunk: dict[str, Any] = {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()

    # ---- bookkeeping
    def trainables(self) -> dict[str, torch.Tensor]:
        prefixes: tuple[str, ...] = ("model.vision_tower.", "model.multi_modal_projector.")
        if self.spec.from_scratch:
            prefixes = (*prefixes, "model.language_model.")
        out = {k: v for k, v in self.model.state_dict().items() if k.startswith(prefixes)}
        out.update({f"aux.{k}": v for k, v in self.aux.state_dict().items()})
        out.update({f"lora::{k}": v for k, v in lora_state(self.lora).items()})
        return out

    def load_trainables(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {k: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(own, strict=False)
        self.aux.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("aux.")})
        if self.lora and any(k.startswith("lora::") for k in tensors):
            load_lora_state(self.lora, {k[6:]: v for k, v in tensors.items() if k.startswith("lora::")})

    def log(self, record: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def optimizer(self, stage: str) -> torch.optim.Optimizer:
        c = self.cfg
        vt = list(self.model.model.vision_tower.parameters())
        aux = list(self.aux.parameters())
        if stage == "vision":
            return torch.optim.AdamW([{"params": vt + aux, "lr": c.vision_lr}], weight_decay=0.01)
        groups = [
            {"params": vt, "lr": c.lr_vision},
            {"params": aux, "lr": c.lr_vision},
            {"params": list(self.model.model.multi_modal_projector.parameters()), "lr": c.lr_projector},
        ]
        if self.lora:
            groups.append({"params": [p for m in self.lora.values() for p in (m.lora_a, m.lora_b)], "lr": c.lr_lora})
        if self.spec.from_scratch:
            lm = [p for p in self.model.model.language_model.parameters() if p.requires_grad]
            groups.append({"params": lm, "lr": c.lr_text})
        if c.lr_vision == 0:  # the vision tower stays as stage 1 left it
            groups = groups[2:]
        return torch.optim.AdamW(groups, weight_decay=0.0)

    # ---- run
    def run(self) -> Path:
        from tqdm import tqdm

        c = self.cfg
        ckpt = self.out / "checkpoint"
        stage, step = "vision", 0
        state: dict[str, Any] = {}
        if (ckpt / "state.json").is_file():
            from safetensors.torch import load_file

            state = json.loads((ckpt / "state.json").read_text())
            saved = TrainConfig.from_dict(state["config"])
            free: dict[str, Any] = {"minutes": 0, "threads": 0}  # never change the result
            fresh_language = state["stage"] == "vision" or int(state["step"]) == 0
            if fresh_language:  # the language stage has not begun: its settings can still be chosen
                free.update(dict.fromkeys(LANGUAGE_FIELDS, 0))
            elif steps_may_change(saved, c, int(state["step"])):
                free["steps"] = 0  # a stable phase, in both the old and the new length: the run may grow or shrink
            if asdict(saved) | free != asdict(c) | free:
                raise SystemExit(
                    f"{ckpt} was written by a run with other settings; use another --out or the same settings.\n"
                    f"saved: {asdict(saved)}"
                )
            stage, step, self.elapsed = state["stage"], int(state["step"]), float(state["elapsed"])
            self.chunks = list(state.get("chunks", []))
            tensors = load_file(str(ckpt / "trainable.safetensors"))
            if fresh_language:  # only stage 1's results: the language stage starts from this run's own settings
                tensors = {k: v for k, v in tensors.items() if k.startswith(("model.vision_tower.", "aux."))}
            self.load_trainables(tensors)
            print(f"resuming {stage} stage at step {step} ({self.elapsed / 60:.1f} min so far)", file=sys.stderr)
        budget = c.minutes * 60
        stopped = False
        self.chunk["from"] = f"{stage} {step}"
        for st in ("vision", "language"):
            if st == "vision" and stage == "language":
                continue
            total = c.vision_steps if st == "vision" else c.steps
            opt = self.optimizer(st)
            base_lrs = [g["lr"] for g in opt.param_groups]
            if state and st == stage and step > 0:
                _load_optimizer(ckpt, opt, state)
            start = step if st == stage else 0
            if st == "language" and start == 0:
                calib = [make_scene(split_seed("train", STAGE_B_OFFSET - 1 - i)) for i in range(32)]
                pv = vision_batch(self.processor, calib, self.spec.grid)["pixel_values"]
                init_projector(self.model, self.aux, self.processor.tokenizer, pv)
            bar = tqdm(total=total, initial=start, desc=st, disable=not self.progress, dynamic_ncols=True)
            t_last = time.perf_counter()
            for s in range(start, total):
                if self.elapsed >= budget:
                    stopped = True
                    break
                for g, lr in zip(opt.param_groups, base_lrs):
                    if st == "language":
                        g["lr"] = lr * _lr_factor(s, total, c.warmup, c.schedule, c.decay)
                    else:
                        g["lr"] = lr * _lr_factor(s, total, c.warmup)
                metrics = self.vision_step(s, opt) if st == "vision" else self.language_step(s, opt)
                now = time.perf_counter()
                self.elapsed += now - t_last
                t_last = now
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k in ("loss", "acc", "p_color")})
                if st == "language" and c.eval_every > 0 and ((s + 1) % c.eval_every == 0 or s + 1 == total):
                    t0 = time.perf_counter()
                    metrics.update(self.quick_eval())
                    metrics["eval_seconds"] = round(time.perf_counter() - t0, 1)
                    t_last = time.perf_counter()  # the evaluation is not training time
                if (s + 1) % c.log_every == 0 or s + 1 == total or "eval_overall" in metrics:
                    self.log({"stage": st, "step": s + 1, "elapsed": round(self.elapsed, 1), **metrics})
                if (s + 1) % c.checkpoint_every == 0 or s + 1 == total:
                    nxt = ("language", 0) if (st == "vision" and s + 1 == total) else (st, s + 1)
                    _save_checkpoint(ckpt, self.trainables(), opt, self._state(*nxt))
            bar.close()
            if stopped:
                break
            stage, step, state = "language", 0, {}
        if stopped:
            print(f"time budget of {c.minutes} min reached; rerun the same command to continue", file=sys.stderr)
        return self.save_final(stopped)

    def _state(self, stage: str, step: int) -> dict[str, Any]:
        return {
            "stage": stage,
            "step": step,
            "elapsed": round(self.elapsed, 1),
            "config": asdict(self.cfg),
            "chunks": self.all_chunks(f"{stage} {step}"),
        }

    def all_chunks(self, upto: str) -> list[dict[str, Any]]:
        """The earlier chunks' records and this process's so far (wall and process CPU seconds)."""
        now = {
            **self.chunk,
            "to": upto,
            "wall_seconds": round(time.perf_counter() - self._t0, 1),
            "cpu_seconds": round(time.process_time() - self._cpu0, 1),
        }
        return [*self.chunks, now]

    def vision_step(self, s: int, opt: torch.optim.Optimizer) -> dict[str, float]:
        c = self.cfg
        self.model.model.vision_tower.train()
        scenes = [make_scene(split_seed("train", s * c.vision_batch + i)) for i in range(c.vision_batch)]
        batch = vision_batch(self.processor, scenes, self.spec.grid)
        out = self.model.model.vision_tower(batch["pixel_values"], output_hidden_states=True, return_dict=True)
        feats = out.hidden_states[self.spec.feature_layer][:, 1:]
        loss, metrics = self.aux.loss(feats, out.pooler_output, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        return {"loss": float(loss.detach()), **metrics}

    def max_objects(self, s: int) -> int:
        """The curriculum: scenes of at most this many objects at language step ``s``."""
        c = self.cfg
        if c.curriculum <= 0 or s >= c.curriculum:
            return MAX_OBJECTS
        return min(MAX_OBJECTS, 1 + (MAX_OBJECTS - 1) * s // c.curriculum)

    def language_data(self, s: int) -> tuple[list[Scene], list[Encoded]]:
        """The scenes and encoded questions of language step ``s`` (a function of the seed and the step)."""
        c = self.cfg
        scenes: list[Scene] = []
        encoded: list[Encoded] = []
        for k in (STAGE_B_OFFSET + s * c.batch + i for i in range(c.batch)):
            rng = random.Random(c.seed * 1_000_003 + k)
            n = c.turns if c.packed else rng.randint(1, c.turns)
            if c.balanced:
                scene, counting = balanced_scene(split_seed("train", k), 1, self.max_objects(s))
                qs = training_questions(scene, counting, rng, n)
            else:
                scene = make_scene(split_seed("train", k))
                qs = sample_questions(scene, rng, n)
            if c.caption:  # last in a conversation: no question may read its answer
                qs.append(caption(scene))
            scenes.append(scene)
            encoded.append(self.encoder.packed(qs) if c.packed else self.encoder.conversation(qs))
        return scenes, encoded

    @torch.no_grad()
    def quick_eval(self) -> dict[str, float]:
        """Greedy exact-match accuracy on the first ``eval_scenes`` validation scenes (one question of each type)."""
        from ..data.scenes import questions
        from ..data.scenes import scenes as split_scenes
        from .evaluate import Accuracy, answer_scene, image_tokens

        self.model.eval()
        acc = Accuracy()
        todo = split_scenes("val", self.cfg.eval_scenes)
        keep = torch.arange(self.spec.num_visual_tokens)
        for b in range(0, len(todo), 8):
            chunk = todo[b : b + 8]
            vis = image_tokens(self.model, self.processor, chunk)
            for j, scene in enumerate(chunk):
                for q, ok, _ in answer_scene(self.model, self.encoder, vis[j], questions(scene), keep):
                    acc.add(q.type, ok)
        self.model.train()
        return {"eval_overall": acc.overall(), **{f"eval_{t}": v for t, v in acc.per_type().items()}}

    def language_step(self, s: int, opt: torch.optim.Optimizer) -> dict[str, float]:
        c = self.cfg
        self.model.train()
        scenes, encoded = self.language_data(s)
        vb = vision_batch(self.processor, scenes, self.spec.grid)
        batch = collate(encoded, self.pad_id)
        if c.lr_vision == 0:
            self.model.model.vision_tower.eval()
            with torch.no_grad():
                feats, pooled, _ = vision_forward(self.model, vb["pixel_values"])
            visual = self.model.model.multi_modal_projector(feats)
            aux_loss = feats.new_zeros(())
            metrics: dict[str, float] = {}
        else:
            feats, pooled, visual = vision_forward(self.model, vb["pixel_values"])
            aux_loss, metrics = self.aux.loss(feats, pooled, vb)
        loss_lm, right = lm_loss(self.model, visual, batch, c.autocast_bf16)
        loss = loss_lm + c.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        return {
            "loss": float(loss_lm.detach()),
            "aux": float(aux_loss.detach()),
            "acc": float(right.float().mean()),
            **metrics,
        }

    def save_final(self, stopped: bool) -> Path:
        meta = {"elapsed_seconds": f"{self.elapsed:.0f}", "complete": str(not stopped)}
        # the saved config describes the untouched model: LoRA wrappers are not part of it
        path = save_vlm(self.model, self.out / "final", lora=lora_factors(self.lora), meta=meta)
        chunks = self.all_chunks("end" if not stopped else "stopped")
        record = {
            "config": asdict(self.cfg),
            "elapsed_minutes": round(self.elapsed / 60, 1),
            "complete": not stopped,
            "wall_hours": round(sum(float(ch.get("wall_seconds", 0)) for ch in chunks) / 3600, 2),
            "cpu_hours": round(sum(_cpu_seconds(ch) for ch in chunks) / 3600, 2),
            "chunks": chunks,
        }
        if any(ch.get("cpu_seconds") is None for ch in chunks):
            record["cpu_hours_note"] = "chunks recorded without a CPU time count their wall time"
        (self.out / "final" / "train.json").write_text(json.dumps(record, indent=2) + "\n")
        return path


def _cpu_seconds(chunk: dict[str, Any]) -> float:
    """A chunk's process CPU seconds; a chunk recorded before CPU time was measured counts its wall time."""
    cpu = chunk.get("cpu_seconds")
    return float(cpu if cpu is not None else chunk.get("wall_seconds") or 0)


def ship(run_dir: Path | str, dest: Path | str, command: str | None = None) -> Path:
    """Copy a run's final weights (config.json, model.safetensors, train.json) into the package; ``command``, when
    given, is recorded as the command that made them."""
    src, dst = Path(run_dir) / "final", Path(dest)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(src / name, dst / name)
    record = json.loads((src / "train.json").read_text())
    if command is not None:
        record["command"] = command
    # the record travels with the package: the user's home directory is written as ~, not as this machine's path
    (dst / "train.json").write_text(json.dumps(record, indent=2).replace(str(Path.home()), "~") + "\n")
    return dst
