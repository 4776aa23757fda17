"""`tokensieve train kvzap`: fit KVzap's surrogates (:mod:`tokensieve.methods.kv.kvzap_surrogate`) to KVzip+ scores of
the frozen model.

Targets, as the official data collector (NVIDIA kvpress ``kvzap/data.py``) computes them: a text ``x`` is put in the
chat template as ``user: x + "\\n\\nRepeat the previous context exactly."`` / ``assistant: x`` and prefilled once. For
each layer, with ``A`` the attention weights (softmax over every earlier token of the whole prompt) of query head
``h``, the KVzip+ score of the original text's token ``j`` is

    s_j = log max over KV-group heads h and queries i of the repeated text of  A_h[i, j] · ‖W_o^h v_j‖ / ‖h_i‖

— KVzip's score (the largest attention a token gets while the model copies the text) weighted by the norm of what the
pair writes to the residual stream (``W_o^h``: head ``h``'s slice of the output projection) and divided by the norm
of the query's hidden state. The features are the hidden states the layer's attention reads for the original text's
tokens (after the input normalisation).

Stages, one command, resumable (rerunning it continues where it stopped):

1. **collect** — one frozen forward pass per text (the repeated prompt, ≈ 2 × its tokens); ``--tokens`` random
   tokens of each training text (features, targets) are saved as one shard per text (``OUT/collect/``); held-out texts
   keep every token (``OUT/heldout/``). Progress bar.
2. **fit** — ``linear``: ridge regression per layer in closed form (``alpha = 1``, scikit-learn's ``Ridge()`` as the
   official); ``mlp``: ``W₂ gelu(W₁ h + b₁) + b₂`` of width ``--mlp-hidden`` for all layers at once, AdamW
   (lr ``5e-3``, batch 512, ``--epochs`` 15, cosine schedule, gradient norm clipped at 1, MSE — the official
   settings), checkpointed to ``OUT/checkpoint.pt``.
3. **evaluate** — on the held-out texts: R² per layer (averaged over the KV heads, as scikit-learn's ``r2_score``)
   for each form, and the calibration table (share of entries at or above each threshold) → ``OUT/metrics.json``;
   the profile ``OUT/final/kvzap.json`` + ``kvzap.safetensors``.

Text: every real text source of :mod:`tokensieve.data.text` (``--sources``; a source that is not installed, e.g.
``python-doc`` without Debian's ``python3-doc``, is skipped and recorded), only their training part
(:func:`~tokensieve.data.text.held_out_split`: the last 10 % is held out from every trained profile; the ``prose``
evaluation task reads it). Texts of ``--min-tokens``–``--max-tokens`` tokens (750–1,250, as the official) start at
paragraph starts spread evenly over each source; the held-out texts come from the held-out parts.

Departures from the official recipe (settings, not the rule): ``--tokens`` 160 sampled tokens per text instead of
500 (the features of 300 texts then take 1.6 GB, not 5 GB), an MLP of width 64 instead of 512 (the paper's surrogate
is about 1/8 of the model's width: 512 for d = 4096; SmolLM2-135M has d = 576), inputs of the MLP standardised per
layer during training (folded into ``W₁`` on export: the same function class, better conditioned), the cosine
schedule stepped per minibatch instead of per epoch, no 5 % validation split (held-out texts are measured instead).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.context import LayerContext
from ..errors import ConfigError
from ..methods.kv.kvzap_surrogate import FORMS, KIND, KVzapSurrogate, SurrogateMLP, ridge
from .kvzip_target import kvzip_plus, repeat_prompt
from .spkv import SOURCES, _Observe, _version, passages, source_texts, writable_folder

THRESHOLDS = [round(-12.0 + 0.25 * i, 2) for i in range(49)]  # -12 … 0


@dataclass
class KVzapTrainConfig:
    out: str = "runs/kvzap"
    model: str = "smollm2-135m"
    seed: int = 0
    sources: str = SOURCES
    per_source: int = 75
    heldout_per_source: int = 3
    min_tokens: int = 750
    max_tokens: int = 1250
    tokens: int = 160
    forms: str = "mlp,linear"
    mlp_hidden: int = 64
    epochs: int = 15
    batch: int = 512
    lr: float = 5e-3
    weight_decay: float = 0.01
    ridge_alpha: float = 1.0
    checkpoint_every: int = 200
    threads: int = 2
    collect_minutes: float = 0.0

    def source_list(self) -> list[str]:
        names = [s.strip() for s in self.sources.split(",") if s.strip()]
        if not names:
            raise ConfigError("--sources takes comma-separated text sources (kjv, python-topics, stdlib, ...).")
        return names

    def form_list(self) -> list[str]:
        forms = [f.strip() for f in self.forms.split(",") if f.strip()]
        if not forms or any(f not in FORMS for f in forms):
            raise ConfigError(f"--forms takes {' and/or '.join(FORMS)}, comma-separated; got {self.forms!r}.")
        return forms

    def check(self) -> None:
        self.source_list()
        self.form_list()
        if not 8 <= self.min_tokens <= self.max_tokens:
            raise ConfigError("--min-tokens must be >= 8 and at most --max-tokens.")
        if min(self.per_source, self.heldout_per_source, self.tokens, self.mlp_hidden, self.epochs, self.batch) < 1:
            raise ConfigError("per-source, heldout-per-source, tokens, mlp-hidden, epochs and batch must be >= 1.")
        if self.tokens > self.min_tokens:
            raise ConfigError(f"--tokens ({self.tokens}) must not exceed --min-tokens ({self.min_tokens}).")
        for flag, v in (("--lr", self.lr), ("--ridge-alpha", self.ridge_alpha)):
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{flag} must be a number > 0; got {v}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"--weight-decay must be a number >= 0; got {self.weight_decay}.")
        if self.checkpoint_every < 1 or self.threads < 1:
            raise ConfigError("--checkpoint-every and --threads must be >= 1.")
        if not (math.isfinite(self.collect_minutes) and self.collect_minutes >= 0):
            raise ConfigError(f"--collect-minutes must be a number >= 0 (0: no limit); got {self.collect_minutes}.")
        writable_folder(Path(self.out), "--out")


# ------------------------------------------------------------------------------------------------------ trainer
class KVzapTrainer:
    def __init__(self, cfg: KVzapTrainConfig, progress: bool = True) -> None:
        cfg.check()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.progress = progress
        torch.set_num_threads(cfg.threads)
        cfg_path = self.out / "config.json"
        if cfg_path.exists() and self.started():
            try:
                old = json.loads(cfg_path.read_text())
            except ValueError:
                old = None
            if old != asdict(cfg):
                raise ConfigError(
                    f"{self.out} holds a run with other settings ({cfg_path}); use another --out or the same flags."
                )
        else:
            cfg_path.write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        self._model: Any = None

    def started(self) -> bool:
        return any(self.out.rglob("*.pt")) or (self.out / "metrics.json").exists()

    def model(self) -> tuple[Any, Any]:
        if self._model is None:
            from ..adapters.models import load_model

            self._model = load_model(self.cfg.model)
        return self._model

    def log(self, record: dict[str, Any]) -> None:
        with (self.out / "train.log").open("a") as f:
            f.write(json.dumps({"time": time.strftime("%H:%M:%S"), **record}) + "\n")

    # -- stage 1 -----------------------------------------------------------------------------------------------------
    def jobs(self, tokenizer: Any) -> tuple[list[tuple[str, int, str, list[int]]], list[str]]:
        """``(kind, index, source, text ids)`` of every text, held-out and training texts interleaved (a collection
        stopped early has both), and notes on skipped sources."""
        c = self.cfg
        texts, notes = source_texts(c.source_list())
        train: list[tuple[str, list[int]]] = []
        held: list[tuple[str, list[int]]] = []
        for j, (name, (part, rest)) in enumerate(sorted(texts.items())):
            train += [
                (name, p) for p in passages(tokenizer, part, c.per_source, c.min_tokens, c.max_tokens, c.seed + j)
            ]
            held += [(name, p) for p in passages(tokenizer, rest, c.heldout_per_source, c.min_tokens, c.max_tokens,
                                                 c.seed + 1000 + j)]  # fmt: skip
        random.Random(c.seed).shuffle(train)
        out: list[tuple[str, int, str, list[int]]] = []
        for i in range(max(len(train), len(held))):
            if i < len(held):
                out.append(("heldout", i, *held[i]))
            if i < len(train):
                out.append(("collect", i, *train[i]))
        return out, notes

    def collect(self) -> dict[str, Any]:
        from tqdm import tqdm

        from ..adapters.models import layer_weights
        from ..engine import Compressor

        c = self.cfg
        model, tok = self.model()
        weights = layer_weights(model)
        if any(w is None for w in weights.out_proj):
            raise ConfigError("KVzip+ needs every layer's attention output projection, and this model's was not found.")
        jobs, notes = self.jobs(tok)
        for note in notes:
            self.log({"stage": "collect", "note": note})
        todo = [j for j in jobs if not (self.out / j[0] / f"{j[1]:04d}.pt").exists()]
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="collect", disable=not self.progress)
        started = time.monotonic()
        for kind, i, source, text in todo:
            if c.collect_minutes > 0 and time.monotonic() - started > 60 * c.collect_minutes and self._count("collect"):
                self.log({"stage": "collect", "stopped": "collect-minutes spent", "shards": self._count("collect")})
                break
            t0 = time.perf_counter()
            ids, original, repeated = repeat_prompt(tok, text)
            n = original[1] - original[0]
            if kind == "collect":
                g = torch.Generator().manual_seed(c.seed * 100_003 + i)
                idx = torch.randperm(n, generator=g)[: c.tokens].sort().values
            else:
                idx = torch.arange(n)
            feats: list[Tensor] = []
            target: list[Tensor] = []

            def grab(ctx: LayerContext, idx: Tensor = idx, feats: list[Tensor] = feats, target: list[Tensor] = target,
                     original: tuple[int, int] = original, repeated: tuple[int, int] = repeated) -> None:  # fmt: skip
                if ctx.hidden is None:
                    raise ConfigError("The hidden states of the model's attention layers could not be captured.")
                out_proj = weights.out_proj[ctx.layer_idx]
                assert out_proj is not None
                feats.append(ctx.hidden[0, original[0] : original[1]][idx].half())
                target.append(kvzip_plus(ctx, out_proj, original, repeated)[:, idx].T.contiguous())  # (m, H)

            with torch.no_grad():
                Compressor(model, _Observe(callback=grab), 1.0).prefill(torch.tensor([ids]))
            dest = self.out / kind / f"{i:04d}.pt"
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(".tmp")
            torch.save({"feats": torch.stack(feats), "target": torch.stack(target), "source": source}, tmp)
            tmp.rename(dest)
            self.log({"stage": kind, "text": i, "source": source, "tokens": n,
                      "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
            bar.update(1)
        bar.close()
        used = sorted({s for _, _, s, _ in jobs})
        return {"sources": used, "skipped": notes}

    def _count(self, kind: str) -> int:
        n = 0
        while (self.out / kind / f"{n:04d}.pt").exists():
            n += 1
        return n

    def _load(self, kind: str) -> tuple[Tensor, Tensor]:
        n = self._count(kind)
        if n == 0:
            raise ConfigError(f"No '{kind}' shards in {self.out}: the collection has not produced any yet.")
        parts = [torch.load(self.out / kind / f"{i:04d}.pt") for i in range(n)]
        return torch.cat([p["feats"] for p in parts], 1), torch.cat([p["target"] for p in parts], 1)

    # -- stage 2 -----------------------------------------------------------------------------------------------------
    def fit_linear(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        ws, bs = [], []
        for layer in range(x.shape[0]):
            w, b = ridge(x[layer].float(), y[layer].float(), self.cfg.ridge_alpha)
            ws.append(w)
            bs.append(b)
        return {"linear.weight": torch.stack(ws), "linear.bias": torch.stack(bs)}

    def fit_mlp(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """AdamW on the squared error, every layer at once, resumable from ``checkpoint.pt``."""
        from tqdm import tqdm

        c = self.cfg
        L, N, d = x.shape
        H = y.shape[-1]
        torch.manual_seed(c.seed)
        net = SurrogateMLP(L, d, H, c.mlp_hidden)
        x32 = x.float()
        net.mean.copy_(x32.mean(1))
        net.std.copy_(x32.std(1).clamp_min(1e-4))
        del x32
        opt = torch.optim.AdamW(net.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        per_epoch = max(1, math.ceil(N / c.batch))
        steps = c.epochs * per_epoch
        ckpt = self.out / "checkpoint.pt"
        start = 0
        if ckpt.exists():
            state = torch.load(ckpt)
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            start = int(state["step"])
        bar = tqdm(total=steps, initial=start, desc="fit mlp", disable=not self.progress)
        order = torch.empty(0, dtype=torch.long)
        for s in range(start, steps):
            epoch, j = divmod(s, per_epoch)
            if j == 0 or order.numel() == 0:  # each epoch its own shuffle (the same after a resume)
                order = torch.randperm(N, generator=torch.Generator().manual_seed(c.seed * 7919 + epoch))
            idx = order[j * c.batch : (j + 1) * c.batch]
            for group in opt.param_groups:
                group["lr"] = c.lr * 0.5 * (1 + math.cos(math.pi * s / steps))
            loss = torch.nn.functional.mse_loss(net(x[:, idx]), y[:, idx].float())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if (s + 1) % c.checkpoint_every == 0 or s + 1 == steps:
                tmp = ckpt.with_suffix(".tmp")
                torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": s + 1}, tmp)
                tmp.rename(ckpt)
                self.log({"stage": "fit", "form": "mlp", "step": s + 1, "loss": round(float(loss.detach()), 5)})
        bar.close()
        return net.export()

    # -- stage 3 -----------------------------------------------------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def evaluate(surrogate: KVzapSurrogate, x: Tensor, y: Tensor) -> dict[str, Any]:
        """Held-out R² per layer (mean over KV heads) and the calibration table of each form."""
        out: dict[str, Any] = {"heldout_tokens_per_layer": int(x.shape[1])}
        cal: dict[str, dict[str, list[float]]] = {}
        for form in surrogate.forms():
            pred = torch.stack([surrogate.scores(form, layer, x[layer].float()) for layer in range(x.shape[0])])
            yt = y.float()
            sse = ((pred - yt) ** 2).sum(1)  # (L, H)
            sst = ((yt - yt.mean(1, keepdim=True)) ** 2).sum(1).clamp_min(1e-12)
            r2 = (1 - sse / sst).mean(-1)  # (L,)
            out[f"r2_{form}_per_layer"] = [round(float(v), 4) for v in r2]
            out[f"r2_{form}_mean"] = round(float(r2.mean()), 4)
            flat = pred.flatten()
            cal[form] = {"threshold": THRESHOLDS, "density": [round(float((flat >= t).float().mean()), 5)
                                                               for t in THRESHOLDS]}  # fmt: skip
        out["calibration"] = cal
        return out

    # -- all ----------------------------------------------------------------------------------------------------------
    def run(self) -> Path:
        from ..adapters.models import model_shape
        from ..adapters.profiles import Profile, save_profile, shape_dict

        info = self.collect()
        x, y = self._load("collect")
        tensors: dict[str, Tensor] = {}
        forms = self.cfg.form_list()
        if "linear" in forms:
            tensors.update(self.fit_linear(x, y))
        if "mlp" in forms:
            tensors.update(self.fit_mlp(x, y))
        del x, y
        model, _ = self.model()
        shape = model_shape(model)
        surrogate = KVzapSurrogate.from_dict({"tensors": tensors}, shape)
        hx, hy = self._load("heldout")
        metrics = {"train_texts": self._count("collect"), "heldout_texts": self._count("heldout"), **info,
                   **self.evaluate(surrogate, hx, hy)}  # fmt: skip
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        settings = {k: v for k, v in asdict(self.cfg).items() if k not in ("out", "collect_minutes", "threads")}
        settings.update(sources_used=info["sources"], target="log KVzip+ (official kvzap/data.py)")
        data: dict[str, Any] = {
            "tensors": tensors,
            "forms": forms,
            "activation": "gelu",
            "mlp_hidden": self.cfg.mlp_hidden if "mlp" in forms else 0,
            "features": "the hidden state each attention layer reads (its input after the input normalisation)",
            "calibration": metrics["calibration"],
            "r2": {f: metrics[f"r2_{f}_per_layer"] for f in forms},
        }
        prof = Profile(KIND, shape.key, shape_dict(shape), settings, data, version=_version())
        return save_profile(prof, self.out / "final" / f"{KIND}.json")


def ship(profile_path: Path, model_key: str) -> Path:
    """Copy a trained surrogate (``kvzap.json`` and ``kvzap.safetensors``) into the package's shipped profiles."""
    import shutil
    from importlib import resources

    dest = Path(str(resources.files("tokensieve"))) / "profiles" / model_key / f"{KIND}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(profile_path, dest)
    shutil.copy2(profile_path.with_suffix(".safetensors"), dest.with_suffix(".safetensors"))
    return dest


# ------------------------------------------------------------------------------------------------------ CLI
_HELP = {
    "out": "run directory: collect/, heldout/, checkpoint.pt, train.log, metrics.json, final/ (rerun to resume)",
    "model": "the frozen model (embedded name or local directory)",
    "seed": "seed of the texts, the sampled tokens, the initialisation and the minibatches",
    "sources": "comma-separated text sources (training part of each; one not installed is skipped)",
    "per_source": "training texts per source",
    "heldout_per_source": "held-out texts per source (from its held-out part), for R² and the calibration table",
    "min_tokens": "shortest text (tokens)",
    "max_tokens": "longest text (tokens)",
    "tokens": "tokens sampled per training text (features and targets kept)",
    "forms": "surrogates to fit: mlp and/or linear",
    "mlp_hidden": "hidden width of the MLP surrogate",
    "epochs": "epochs of the MLP fit",
    "batch": "tokens per minibatch of the MLP fit",
    "lr": "peak learning rate of the MLP fit (cosine to 0)",
    "weight_decay": "AdamW weight decay",
    "ridge_alpha": "ridge penalty of the linear surrogate",
    "checkpoint_every": "MLP steps between checkpoints",
    "threads": "torch CPU threads",
    "collect_minutes": "> 0: stop collecting after this many minutes and fit on the shards so far (rerun to add more)",
}


def add_commands(tsub: Any) -> None:
    p = tsub.add_parser("kvzap", help="fit KVzap's surrogates to KVzip+ scores of the frozen model (resumable)")
    defaults = KVzapTrainConfig()
    for f in fields(KVzapTrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name), help=_HELP.get(f.name))  # fmt: skip
    p.add_argument("--ship", action="store_true", help="copy the trained surrogate into the package's shipped profiles")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_kvzap)


def cmd_train_kvzap(args: Any) -> int:
    values = {f.name: getattr(args, f.name) for f in fields(KVzapTrainConfig)}
    trainer = KVzapTrainer(KVzapTrainConfig(**values), progress=not args.no_progress)
    path = trainer.run()
    print(path)
    metrics = json.loads((trainer.out / "metrics.json").read_text())
    metrics.pop("calibration", None)
    print(json.dumps(metrics, indent=2))
    if args.ship:
        from ..adapters.models import model_shape

        model, _ = trainer.model()
        print(f"shipped to {ship(path, model_shape(model).key)}")
    return 0


__all__ = ["KVzapTrainConfig", "KVzapTrainer", "add_commands", "kvzip_plus", "repeat_prompt"]
