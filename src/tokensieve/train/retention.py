"""`tokensieve train retention`: train the global retention gates (:mod:`tokensieve.methods.kv.retention_gate`) on the
frozen model, on SP-KV's training machinery (:class:`tokensieve.train.spkv.SPKVTrainer`: the same text, collection
shards, resumable checkpoints, progress bars and seed).

Objective (docs/SPKV.md, "Global retention gates", explains the choice): the gates regress the *attention envelope*
of each key in log space. For key ``i`` of layer ``ℓ`` and KV head ``g`` the frozen model's own attention gives, for
each age band ``k`` (ages ``a_k`` = ``--ages``, 4, 16, 64, 256 by default),

    o_{i,k} = max over queries t with a_k ≤ t − i < 2 a_k, and the query heads of group g, of  A_ti

— the largest weight the key still receives at that age. Geometric retention models that envelope as ``β^age``, so
the loss is a Huber loss (1 nat) between ``a_k · log β_i`` and ``log max(o_{i,k}, floor)``, summed over the bands and
averaged over keys, layers and heads. Every layer's and head's target is in the same unit (log attention weight), and
the gates share their final projection, so the learned ``log β`` of different layers are directly comparable — what
the global eviction ranks. As for SP-KV, a KL loss to the frozen model alone never evicts anything (``β ≡ 1``
reproduces it); the paper adds a capacity penalty and back-propagates through the model, which this CPU budget does
not allow, while the oracle needs no backward pass through the LLM.

Stages (rerunning the command resumes): collect (one frozen forward pass per sequence; features and band oracles of
``--samples`` sampled keys per training sequence — the first token always among them — and of every key with all
bands inside a held-out sequence), fit (AdamW, checkpointed), evaluate on the held-out keys (``OUT/metrics.json``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.context import LayerContext
from ..errors import ConfigError
from ..methods.kv.retention_gate import KIND, RetentionNet, gates_to_dict
from .spkv import SPKVTrainConfig, SPKVTrainer, _version, ship


@dataclass
class RetentionTrainConfig(SPKVTrainConfig):
    """Settings of ``tokensieve train retention`` (SP-KV's ``window``, ``horizon``, ``epsilon``, ``temperature`` and
    ``hidden`` are unused; ``ages`` replaces the first two)."""

    out: str = "runs/retention"
    length: int = 1024
    sequences: int = 96
    heldout: int = 6
    samples: int = 192
    ages: str = "4,16,64,256"
    floor: float = 1e-6
    rank: int = 8
    bias_init: float = 3.0
    steps: int = 3000
    batch: int = 512
    lr: float = 3e-3
    threads: int = 1
    collect_minutes: float = 25.0
    sources: str = ""  # the shipped gates' text: the Python reference topics (SPKVTrainer.sequences)

    def age_list(self) -> list[int]:
        try:
            ages = [int(a) for a in self.ages.split(",") if a.strip()]
        except ValueError:
            raise ConfigError(f"--ages takes comma-separated whole numbers, got {self.ages!r}.") from None
        if not ages or min(ages) < 1 or sorted(set(ages)) != ages:
            raise ConfigError(f"--ages must be increasing whole numbers >= 1, got {self.ages!r}.")
        return ages

    def check(self) -> None:
        ages = self.age_list()
        if self.length < 2 * ages[-1] + 16:
            raise ConfigError(f"--length must be at least 2 * the largest age + 16 = {2 * ages[-1] + 16}.")
        if min(self.sequences, self.heldout, self.samples, self.steps, self.batch, self.rank) < 1:
            raise ConfigError("sequences, heldout, samples, steps, batch and rank must all be >= 1.")
        if not 0 < self.floor < 1:
            raise ConfigError("--floor must be in (0, 1).")
        if not math.isfinite(self.bias_init):
            raise ConfigError(f"--bias-init must be a finite number; got {self.bias_init}.")
        self.check_run()


def band_oracle(ctx: LayerContext, ages: list[int], chunk: int = 256) -> Tensor:
    """``(H_kv, T, K)``: for each key and age band ``[a_k, 2 a_k)``, the largest attention weight (dense causal
    softmax) it gets from a query at that age, over the query heads of its KV group (one sequence, no padding)."""
    q, k = ctx.queries[0].float(), ctx.keys[0].float()  # (Hq, T, D), (H, T, D)
    Hq, T, _ = q.shape
    H = k.shape[0]
    G = Hq // H
    kk = k.repeat_interleave(G, dim=0)
    best = torch.zeros(len(ages), Hq, T)
    cols = torch.arange(T)
    for s in range(0, T, chunk):
        rows = torch.arange(s, min(T, s + chunk))
        logits = torch.einsum("hqd,hkd->hqk", q[:, rows], kk) * ctx.scaling
        dist = rows[:, None] - cols[None, :]
        probs = logits.masked_fill(dist[None] < 0, float("-inf")).softmax(-1)
        for i, a in enumerate(ages):
            band = (dist >= a) & (dist < 2 * a)
            best[i] = torch.maximum(best[i], probs.masked_fill(~band[None], 0.0).amax(1))
    return best.view(len(ages), H, G, T).amax(2).permute(1, 2, 0)


def envelope_loss(log_beta: Tensor, orc: Tensor, ages: Tensor, floor: float) -> Tensor:
    """Huber (1 nat) between ``a_k · log β`` and ``log max(o_k, floor)``: ``log_beta (...)``, ``orc (..., K)``."""
    target = orc.float().clamp_min(floor).log()
    return torch.nn.functional.huber_loss(ages * log_beta[..., None], target, delta=1.0)


def target_log_beta(orc: Tensor, ages: Tensor, floor: float) -> Tensor:
    """The least-squares ``log β`` of each key's envelope (``Σ a_k y_k / Σ a_k²``), for the held-out metrics."""
    y = orc.float().clamp_min(floor).log()
    return (y * ages).sum(-1) / (ages * ages).sum()


def _spearman(a: Tensor, b: Tensor) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


class RetentionTrainer(SPKVTrainer):
    cfg: RetentionTrainConfig

    def __init__(self, cfg: RetentionTrainConfig, progress: bool = True) -> None:
        super().__init__(cfg, progress)
        self.ages = cfg.age_list()

    def key_range(self) -> tuple[int, int]:
        n = self.cfg.length - 2 * self.ages[-1] + 1  # keys whose every band lies inside the sequence
        return n, n

    def target(self, ctx: LayerContext) -> Tensor:
        return band_oracle(ctx, self.ages)

    def _ages(self) -> Tensor:
        return torch.tensor(self.ages, dtype=torch.float32)

    # -- fit ------------------------------------------------------------------------------------------------------
    def fit(self) -> RetentionNet:  # type: ignore[override]
        c = self.cfg
        feats, orc = self._load("collect")  # (L, N, F) half, (L, N, H, K)
        L, _, F = feats.shape
        H = orc.shape[2]
        ages = self._ages()
        torch.manual_seed(c.seed)
        net = RetentionNet(L, F, H, hidden=c.rank, bias_init=c.bias_init)

        def loss_of(out: Tensor, idx: Tensor) -> Tensor:
            return envelope_loss(out, orc[:, idx], ages, c.floor)

        result: RetentionNet = self.optimise(net, feats, loss_of)
        return result

    # -- held-out metrics -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, net: RetentionNet) -> dict[str, Any]:
        c = self.cfg
        feats, orc = self._load("heldout")
        ages = self._ages()
        pred = net(feats.float())  # (L, N, H)
        tgt = target_log_beta(orc, ages, c.floor)
        constant = envelope_loss(torch.full_like(pred, float(tgt.mean())), orc, ages, c.floor)
        # the global policy at a quarter of the held-out keys, by prediction and by the target, at the age of the
        # largest band: which share of the target's choice the gates pick, and how many entries each layer gets
        age = float(ages[-1])
        k = pred.numel() // 4
        mine = torch.zeros(pred.numel(), dtype=torch.bool)
        mine[(age * pred).flatten().topk(k).indices] = True
        best = torch.zeros(pred.numel(), dtype=torch.bool)
        best[(age * tgt).flatten().topk(k).indices] = True
        per_layer = mine.view(pred.shape).float().mean((1, 2))
        return {
            "train_sequences": self._count("collect"),
            "heldout_sequences": self._count("heldout"),
            "heldout_keys_per_layer": int(pred.shape[1]),
            "heldout_loss": round(float(envelope_loss(pred, orc, ages, c.floor)), 5),
            "heldout_loss_constant_beta": round(float(constant), 5),
            "spearman_global": round(_spearman(pred, tgt), 4),
            "spearman_per_layer_mean": round(
                sum(_spearman(pred[i], tgt[i]) for i in range(pred.shape[0])) / pred.shape[0], 4
            ),
            "global_top25_overlap_with_target": round(float((mine & best).sum()) / max(1, k), 4),
            "global_top25_share_per_layer": [round(float(x), 3) for x in per_layer],
        }

    def run(self) -> Path:
        from ..adapters.models import model_shape
        from ..adapters.profiles import Profile, save_profile, shape_dict

        origin = self.collect()
        net = self.fit()
        metrics = self.evaluate(net)
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        model, _ = self.model()
        shape = model_shape(model)
        settings = {
            k: v
            for k, v in asdict(self.cfg).items()
            if k not in ("out", "window", "horizon", "epsilon", "temperature", "hidden", "collect_minutes")
        }
        settings.update(text=origin, objective="huber(a_k * log beta, log max(o_k, floor)) over age bands [a_k, 2 a_k)")
        prof = Profile(KIND, shape.key, shape_dict(shape), settings, gates_to_dict(*net.export()), version=_version())
        return save_profile(prof, self.out / "final" / f"{KIND}.json")


# ------------------------------------------------------------------------------------------------------ CLI
_HELP = {
    "out": "run directory: collect/, heldout/, checkpoint.pt, train.log, final/retention.json (rerun to resume)",
    "model": "the frozen model (embedded name or local directory)",
    "seed": "seed of the text shuffle, the sampled keys, the initialisation and the minibatches",
    "length": "tokens per sequence",
    "sequences": "training sequences (one frozen forward pass each)",
    "heldout": "held-out sequences for the metrics",
    "samples": "keys sampled per training sequence and layer (the first token is always one)",
    "ages": "age bands [a, 2a) of the attention envelope the gates fit (comma-separated, increasing)",
    "floor": "smallest attention weight counted (log floor of the targets)",
    "rank": "hidden width r of each layer's gate (the final projection r -> kv_heads is shared)",
    "bias_init": "initial bias of the shared projection (beta = sigmoid(bias) at the start)",
    "steps": "AdamW steps of the fit",
    "batch": "keys per layer per step",
    "lr": "peak learning rate (cosine to 10 %%)",
    "weight_decay": "AdamW weight decay",
    "checkpoint_every": "steps between checkpoints",
    "threads": "torch CPU threads",
    "collect_minutes": "> 0: stop collecting after this many minutes and fit on the shards so far (rerun to add more)",
}


def add_commands(tsub: Any) -> None:
    from dataclasses import fields

    p = tsub.add_parser(
        "retention", help="train the global retention gates on the frozen model (resumable; see docs/SPKV.md)"
    )
    defaults = RetentionTrainConfig()
    for f in fields(RetentionTrainConfig):
        if f.name in _HELP:
            p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                           default=getattr(defaults, f.name), help=_HELP[f.name])  # fmt: skip
    p.add_argument("--ship", action="store_true", help="copy the trained gates into the package's shipped profiles")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_retention)


def cmd_train_retention(args: Any) -> int:
    values = {k: getattr(args, k) for k in _HELP}
    trainer = RetentionTrainer(RetentionTrainConfig(**values), progress=not args.no_progress)
    path = trainer.run()
    print(path)
    print((trainer.out / "metrics.json").read_text())
    if args.ship:
        from ..adapters.models import model_shape

        model, _ = trainer.model()
        print(f"shipped to {ship(path, model_shape(model).key, KIND)}")
    return 0


__all__ = [
    "RetentionTrainConfig",
    "RetentionTrainer",
    "add_commands",
    "band_oracle",
    "envelope_loss",
    "target_log_beta",
]
