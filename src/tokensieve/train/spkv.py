"""`tokensieve train spkv`: train SP-KV's write gate (:mod:`tokensieve.methods.kv.spkv_gate`) on the frozen model.

Objective (docs/SPKV.md explains the choice): the gate regresses an *oracle* of future utility. For every key ``j``
of layer ``ℓ`` and KV head ``g`` the frozen model's own attention gives

    o_j = max over queries t ∈ [j + w, j + w + horizon) and the query heads of group g of  A_tj

— the largest weight the key receives once it has left the local window ``w``, i.e. exactly when only the
long-term cache could serve it. The target is ``y_j = σ((log o_j − log ε) / temperature)`` and the loss a binary
cross-entropy, so ``u ≥ 0.5`` means "predicted ``o_j ≥ ε``" and sweeping ``τ`` moves that level smoothly
(``u ≥ τ`` ⇔ predicted ``log o_j ≥ log ε + temperature · logit τ``). With the LLM frozen a next-token or KL loss
alone never closes a gate (``u ≡ 1`` reproduces the model), which is why the paper's end-to-end recipe does not
transfer; the oracle needs no backward pass through the LLM, so the whole run fits a CPU budget.

Stages, one command, resumable (rerunning it continues where it stopped):

1. **collect** — one frozen forward pass per training sequence (``--sequences`` of ``--length`` tokens); for each
   layer, the gate's features (keys with RoPE undone, values) and the oracle of ``--samples`` sampled keys (the
   first token always among them) are saved as one shard per sequence under ``OUT/collect/``. Held-out sequences
   keep every out-of-window key (``OUT/heldout/``).
2. **fit** — Adam on the shards (``--steps`` minibatches of ``--batch`` keys per layer), checkpointed to
   ``OUT/checkpoint.pt`` every ``--checkpoint-every`` steps.
3. **calibrate** — the share of out-of-window entries kept at each threshold on the held-out sequences: the table
   that turns a target density into ``τ``; plus the gate's agreement with the oracle, written to ``OUT/metrics.json``.

Training text: the Python Language Reference's topic pages as Debian ships them in ``libpython3.11-stdlib``
(``/usr/lib/python3.11/pydoc_data/topics.py``; the running interpreter's copy of the same CPython file when the
Debian one is missing) — real English technical prose, and no evaluation task reads it (the tasks use the King James
Bible or generated text). The pages are concatenated (sorted by name) and cut into chunks; every tenth chunk is
held out for the calibration.
"""

from __future__ import annotations

import ast
import glob
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.capabilities import Apply, Capabilities, Phase
from ..core.context import LayerContext
from ..core.method import Compressed, PrefillMethod
from ..errors import ConfigError
from ..methods.kv.spkv_gate import KIND, GateNet, gate_features, gates_to_dict
from ..selection import Selection

DEBIAN_TOPICS = "/usr/lib/python3*/pydoc_data/topics.py"
SOURCES = "kjv,python-topics,stdlib,python-doc,generated"  # every real text source of tokensieve.data.text
TAU_GRID = [round(0.02 * i, 2) for i in range(1, 50)]  # 0.02 … 0.98


@dataclass
class SPKVTrainConfig:
    out: str = "runs/spkv"
    model: str = "smollm2-135m"
    seed: int = 0
    length: int = 1024
    sequences: int = 64
    heldout: int = 8
    window: int = 64
    horizon: int = 256
    samples: int = 256
    epsilon: float = 0.02
    temperature: float = 1.0
    hidden: int = 0
    steps: int = 800
    batch: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-4
    checkpoint_every: int = 100
    threads: int = 2
    collect_minutes: float = 0.0
    sources: str = SOURCES
    input: str = "kv"
    target: str = "attention"
    hard_steps: int = 0
    hard_tau: float = 0.5
    hard_density: float = 0.25
    hard_weight: float = 1.0
    hard_lr: float = 1e-3

    def check(self) -> None:
        if self.input not in ("kv", "hidden"):
            raise ConfigError(
                f"--input is kv (keys and values) or hidden (the layer's hidden state); got {self.input!r}."
            )
        if self.target not in ("attention", "kvzip+"):
            raise ConfigError(f"--target is attention (the oracle beyond the window) or kvzip+; got {self.target!r}.")
        if self.hard_steps < 0 or not 0 < self.hard_tau < 1 or not 0 < self.hard_density <= 1:
            raise ConfigError("--hard-steps must be >= 0, --hard-tau in (0, 1) and --hard-density in (0, 1].")
        if not (math.isfinite(self.hard_weight) and self.hard_weight >= 0 and math.isfinite(self.hard_lr)
                and self.hard_lr > 0):  # fmt: skip
            raise ConfigError("--hard-weight must be a number >= 0 and --hard-lr a number > 0.")
        if self.length < self.window + self.horizon + 16:
            raise ConfigError(f"--length must exceed window + horizon + 16 = {self.window + self.horizon + 16}.")
        if min(self.sequences, self.heldout, self.samples, self.steps, self.batch, self.window, self.horizon) < 1:
            raise ConfigError("sequences, heldout, samples, steps, batch, window and horizon must all be >= 1.")
        if not 0 < self.epsilon < 1 or not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError("--epsilon must be in (0, 1) and --temperature a number > 0.")
        if self.hidden < 0:
            raise ConfigError(f"--hidden must be >= 0 (0: a linear gate); got {self.hidden}.")
        self.check_run()

    def check_run(self) -> None:
        """What every training command checks before any data is collected: the optimiser's settings, the
        checkpoint interval, the threads, the time budget and that ``--out`` can be written."""
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a number > 0; got {self.lr}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"--weight-decay must be a number >= 0; got {self.weight_decay}.")
        if self.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be >= 1 step; got {self.checkpoint_every}.")
        if self.threads < 1:
            raise ConfigError(f"--threads must be >= 1; got {self.threads}.")
        if not (math.isfinite(self.collect_minutes) and self.collect_minutes >= 0):
            raise ConfigError(f"--collect-minutes must be a number >= 0 (0: no limit); got {self.collect_minutes}.")
        writable_folder(Path(self.out), "--out")


def writable_folder(path: Path, flag: str) -> None:
    """Create ``path`` (a folder) if needed and check that files can be written in it, or a :class:`ConfigError`
    naming the flag — before any work whose results would go there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".tokensieve-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"Cannot write to {flag} {path}: {exc.strerror or exc}. Choose a writable folder.") from None


# ------------------------------------------------------------------------------------------------------ text
def topic_pages() -> tuple[dict[str, str], str]:
    """The Python reference's topic pages ``{name: text}`` and where they were read from."""
    for path in sorted(glob.glob(DEBIAN_TOPICS)):
        src = Path(path).read_text(encoding="utf-8")
        tree = ast.parse(src)
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "topics" for t in node.targets):
                pages = ast.literal_eval(node.value)
                if isinstance(pages, dict) and pages:
                    return {str(k): str(v) for k, v in pages.items()}, f"debian:libpython3-stdlib:{path}"
    import pydoc_data.topics as fallback  # the same file of the running CPython

    return dict(fallback.topics), f"cpython:{fallback.__file__}"


def token_sequences(tokenizer: Any, length: int, seed: int) -> tuple[list[list[int]], list[list[int]], str]:
    """Training and held-out sequences of ``length`` tokens, and the text's origin: the pages (sorted by name) are
    concatenated and cut into non-overlapping chunks; every tenth chunk is held out; each list is shuffled with
    ``seed``."""
    pages, origin = topic_pages()
    ids: list[int] = []
    for name in sorted(pages):
        ids.extend(tokenizer(pages[name].strip() + "\n\n", add_special_tokens=False)["input_ids"])
    chunks = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
    train = [c for i, c in enumerate(chunks) if i % 10 != 9]
    held = [c for i, c in enumerate(chunks) if i % 10 == 9]
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(held)
    return train, held, origin


def source_texts(names: list[str]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """``{source: (training part, held-out part)}`` of the sources that are installed, and notes on the others."""
    from ..data.text import held_out_split, text_source

    out: dict[str, tuple[str, str]] = {}
    notes = []
    for name in names:
        try:
            out[name] = held_out_split(text_source(name).text())
        except ConfigError as exc:
            notes.append(f"{name} skipped: {exc}")
    if not out:
        raise ConfigError("None of the --sources is installed: " + "; ".join(notes))
    return out, notes


def passages(tokenizer: Any, text: str, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """``n`` texts of ``lo``–``hi`` tokens (length drawn per text) starting at paragraph starts spread evenly over
    ``text`` (each from the ``k``-th ``n``-th of it); fewer where the text is too short for more."""
    rng = random.Random(seed)
    starts = [0] + [m.end() for m in re.finditer(r"\n\n", text)]
    out: list[list[int]] = []
    for k in range(n):
        want = rng.randint(lo, hi)
        aim = len(text) * k // n
        i = next((j for j, s in enumerate(starts) if s >= aim), len(starts) - 1)
        ids = list(tokenizer(text[starts[i] : starts[i] + 12 * want], add_special_tokens=False)["input_ids"])
        if len(ids) >= want:
            out.append(ids[:want])
    return out


def source_sequences(
    tokenizer: Any, sources: list[str], n: int, n_held: int, lo: int, hi: int, seed: int
) -> tuple[list[list[int]], list[list[int]], str]:
    """``n`` training texts (from the training parts of the sources, about as many from each, shuffled with
    ``seed``) and ``n_held`` held-out texts (from their held-out parts) of ``lo``–``hi`` tokens, and their origin."""
    texts, notes = source_texts(sources)
    k = len(texts)
    train: list[list[int]] = []
    held: list[list[int]] = []
    for j, (_name, (part, rest)) in enumerate(sorted(texts.items())):
        train += passages(tokenizer, part, -(-n // k), lo, hi, seed + j)
        held += passages(tokenizer, rest, -(-n_held // k), lo, hi, seed + 1000 + j)
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(held)
    origin = (
        "training / held-out parts of " + ", ".join(sorted(texts)) + ("" if not notes else f" ({'; '.join(notes)})")
    )
    return train[:n], held[:n_held], origin


# ------------------------------------------------------------------------------------------------------ oracle
def oracle(ctx: LayerContext, window: int, horizon: int, chunk: int = 256) -> Tensor:
    """``(H_kv, T)``: for each key, the largest attention weight (softmax over the causal prompt, dense) it gets
    from a query ``t`` with ``window ≤ t − j < window + horizon``, over the query heads of its KV group (one
    sequence, no padding)."""
    q, k = ctx.queries[0].float(), ctx.keys[0].float()  # (Hq, T, D), (H, T, D)
    Hq, T, _ = q.shape
    H = k.shape[0]
    G = Hq // H
    kk = k.repeat_interleave(G, dim=0)  # (Hq, T, D)
    best = torch.zeros(Hq, T)
    cols = torch.arange(T)
    for s in range(0, T, chunk):
        rows = torch.arange(s, min(T, s + chunk))
        logits = torch.einsum("hqd,hkd->hqk", q[:, rows], kk) * ctx.scaling
        dist = rows[:, None] - cols[None, :]
        logits = logits.masked_fill(dist[None] < 0, float("-inf"))
        probs = logits.softmax(-1)
        far = (dist >= window) & (dist < window + horizon)
        best = torch.maximum(best, probs.masked_fill(~far[None], 0.0).amax(1))
    return best.view(H, G, T).amax(1)


def soft_target(o: Tensor, epsilon: float, temperature: float) -> Tensor:
    """``σ((log o − log ε) / temperature)``: 0.5 at the oracle level ``ε``."""
    return torch.sigmoid((o.clamp_min(1e-12).log() - math.log(epsilon)) / temperature)


# ------------------------------------------------------------------------------------------------------ trainer
@dataclass(frozen=True)
class _Observe(PrefillMethod):
    """Show every layer's prefill context to ``callback`` and keep the whole cache (not a registered method)."""

    name: ClassVar[str] = "spkv-observe"
    paper: ClassVar[str] = "internal"
    capabilities: ClassVar[Capabilities] = Capabilities(phases=frozenset({Phase.PREFILL}), apply=Apply.EVICT)
    callback: Callable[[LayerContext], None] = field(default=lambda ctx: None, compare=False)

    def compress(self, ctx: LayerContext) -> Compressed:
        self.callback(ctx)
        return Compressed(Selection.keep_all(ctx.batch, ctx.num_kv_heads, ctx.length, ctx.selectable))


class SPKVTrainer:
    def __init__(self, cfg: SPKVTrainConfig, progress: bool = True) -> None:
        cfg.check()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.progress = progress
        torch.set_num_threads(cfg.threads)
        self.out.mkdir(parents=True, exist_ok=True)
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
        else:  # nothing collected or trained yet (a run refused before its first shard): the settings may change
            cfg_path.write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        self._model: Any = None

    def started(self) -> bool:
        """Whether this run has produced anything its settings shaped: a shard, a checkpoint or metrics."""
        return any(self.out.rglob("*.pt")) or (self.out / "metrics.json").exists()

    # -- model --------------------------------------------------------------------------------------------------
    def model(self) -> tuple[Any, Any]:
        if self._model is None:
            from ..adapters.models import load_model

            self._model = load_model(self.cfg.model)
        return self._model

    def log(self, record: dict[str, Any]) -> None:
        with (self.out / "train.log").open("a") as f:
            f.write(json.dumps({"time": time.strftime("%H:%M:%S"), **record}) + "\n")

    # -- stage 1 -----------------------------------------------------------------------------------------------
    def key_range(self) -> tuple[int, int]:
        """(keys of a training sequence whose whole horizon lies in it — the keys sampled from —, keys of a held-out
        sequence kept: every key out of the window at the end). A subclass trains on other keys. With the KVzip+
        target every key of the text has its score."""
        c = self.cfg
        if c.target == "kvzip+":
            return c.length, c.length
        return c.length - c.window - c.horizon + 1, c.length - c.window + 1

    def sequences(self, tokenizer: Any) -> tuple[list[list[int]], list[list[int]], str]:
        """Training and held-out sequences of ``--length`` tokens: from the training / held-out parts of every text
        source (``--sources``), or — ``--sources ""`` — the Python reference topics cut in chunks, every tenth held
        out (the shipped gates' recipe)."""
        c = self.cfg
        names = [x.strip() for x in c.sources.split(",") if x.strip()]
        if not names:
            return token_sequences(tokenizer, c.length, c.seed)
        return source_sequences(tokenizer, names, c.sequences, c.heldout, c.length, c.length, c.seed)

    def target(self, ctx: LayerContext) -> Tensor:
        """``(H_kv, T, ...)`` training target of every key of one layer: SP-KV's oracle (a subclass may change it)."""
        return oracle(ctx, self.cfg.window, self.cfg.horizon)

    def collect(self) -> str:
        from tqdm import tqdm

        from ..adapters.models import model_shape
        from ..engine import Compressor

        c = self.cfg
        model, tok = self.model()
        shape = model_shape(model)
        train, held, origin = self.sequences(tok)
        if len(train) < c.sequences or len(held) < c.heldout:
            raise ConfigError(
                f"The training text gives {len(train)} training and {len(held)} held-out sequences of {c.length} "
                f"tokens; ask for at most that many (--sequences, --heldout) or shorter ones (--length)."
            )
        # held-out and training sequences alternate, so a collection cut short by --collect-minutes has both
        jobs: list[tuple[str, int, list[int]]] = []
        for i in range(max(c.sequences, c.heldout)):
            if i < c.heldout:
                jobs.append(("heldout", i, held[i]))
            if i < c.sequences:
                jobs.append(("collect", i, train[i]))
        todo = [j for j in jobs if not (self.out / j[0] / f"{j[1]:04d}.pt").exists()]
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="collect", disable=not self.progress)
        started = time.monotonic()
        for kind, i, ids in todo:
            if c.collect_minutes > 0 and time.monotonic() - started > 60 * c.collect_minutes and self._count("collect"):
                self.log({"stage": "collect", "stopped": "collect-minutes spent", "shards": self._count("collect")})
                break  # the wall-clock budget is spent: fit on the shards collected so far (rerun to add more)
            t0 = time.perf_counter()
            feats: list[Tensor] = []
            orc: list[Tensor] = []
            eligible, held_keys = self.key_range()
            if kind == "collect":
                g = torch.Generator().manual_seed(c.seed * 100_003 + i)
                pick = torch.randperm(eligible - 1, generator=g)[: c.samples - 1] + 1
                idx = torch.cat([torch.zeros(1, dtype=torch.long), pick.sort().values])
            else:
                idx = torch.arange(held_keys)

            fwd, original, repeated = ids, (0, len(ids)), (0, 0)
            if c.target == "kvzip+":  # the text, then its repetition: KVzip+ scores of the text's tokens
                from .kvzip_target import repeat_prompt

                fwd, original, repeated = repeat_prompt(tok, ids)

            def grab(
                ctx: LayerContext, idx: Tensor = idx, feats: list[Tensor] = feats, orc: list[Tensor] = orc,
                original: tuple[int, int] = original, repeated: tuple[int, int] = repeated,
            ) -> None:  # fmt: skip
                if c.input == "hidden":
                    if ctx.hidden is None:
                        raise ConfigError("The hidden states of the model's attention layers could not be captured.")
                    f = ctx.hidden[0, original[0] : original[1]].float()  # (T, d)
                else:
                    f = gate_features(ctx.keys, ctx.values, ctx.positions, shape.rope_of(ctx.layer_idx))[0]
                    f = f[original[0] : original[1]]
                feats.append(f[idx].half())
                if c.target == "kvzip+":
                    from .kvzip_target import kvzip_plus

                    out_proj = ctx.run.weights.out_proj[ctx.layer_idx] if ctx.run.weights is not None else None
                    if out_proj is None:
                        raise ConfigError("KVzip+ needs the attention output projection, which was not found.")
                    o = kvzip_plus(ctx, out_proj, original, repeated).exp()  # (H, T): the score itself
                else:
                    o = self.target(ctx)
                orc.append(o[:, idx].transpose(0, 1).contiguous())  # (n, H, ...)

            with torch.no_grad():
                Compressor(model, _Observe(callback=grab), 1.0).prefill(torch.tensor([fwd]))
            dest = self.out / kind / f"{i:04d}.pt"
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(".tmp")
            torch.save({"feats": torch.stack(feats), "oracle": torch.stack(orc), "idx": idx}, tmp)
            tmp.rename(dest)
            self.log({"stage": kind, "sequence": i, "seconds": round(time.perf_counter() - t0, 2)})
            bar.update(1)
        bar.close()
        return origin

    def _count(self, kind: str) -> int:
        """Shards of ``kind`` collected so far (consecutive from 0)."""
        n = 0
        while (self.out / kind / f"{n:04d}.pt").exists():
            n += 1
        return n

    def _load(self, kind: str) -> tuple[Tensor, Tensor]:
        n = self._count(kind)
        if n == 0:
            raise ConfigError(f"No '{kind}' shards in {self.out}: the collection has not produced any yet.")
        parts = [torch.load(self.out / kind / f"{i:04d}.pt") for i in range(n)]
        return torch.cat([p["feats"] for p in parts], 1), torch.cat([p["oracle"] for p in parts], 1)

    # -- stage 2 -----------------------------------------------------------------------------------------------
    def fit(self) -> GateNet:
        c = self.cfg
        feats, orc = self._load("collect")  # (L, N, F) half, (L, N, H)
        L, _, F = feats.shape
        H = orc.shape[-1]
        target = soft_target(orc, c.epsilon, c.temperature)
        torch.manual_seed(c.seed)
        net = GateNet(L, F, H, hidden=c.hidden)

        def loss_of(out: Tensor, idx: Tensor) -> Tensor:
            return torch.nn.functional.binary_cross_entropy_with_logits(out, target[:, idx])

        return self.optimise(net, feats, loss_of)

    def optimise(self, net: Any, feats: Tensor, loss_of: Callable[[Tensor, Tensor], Tensor]) -> Any:
        """The fit every gate shares: inputs standardised with the collection's statistics, AdamW with a cosine
        schedule on minibatches of keys (``loss_of(net(feats[:, idx]), idx)``), resumable from ``checkpoint.pt``
        (the minibatch stream continues where it stopped)."""
        from tqdm import tqdm

        c = self.cfg
        N = int(feats.shape[1])
        x32 = feats.float()
        net.mean.copy_(x32.mean(1))
        net.std.copy_(x32.std(1).clamp_min(1e-4))
        del x32
        opt = torch.optim.AdamW(net.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        ckpt = self.out / "checkpoint.pt"
        start = 0
        if ckpt.exists():
            state = torch.load(ckpt)
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            start = int(state["step"])
        g = torch.Generator().manual_seed(c.seed + 7)
        for _ in range(start):  # the minibatch stream continues where the checkpoint left it
            torch.randint(N, (c.batch,), generator=g)
        bar = tqdm(total=c.steps, initial=start, desc="fit", disable=not self.progress)
        for s in range(start, c.steps):
            lr = c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / c.steps)))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = torch.randint(N, (c.batch,), generator=g)
            loss = loss_of(net(feats[:, idx]), idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if (s + 1) % c.checkpoint_every == 0 or s + 1 == c.steps:
                tmp = ckpt.with_suffix(".tmp")
                torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": s + 1}, tmp)
                tmp.rename(ckpt)
                self.log({"stage": "fit", "step": s + 1, "loss": round(float(loss.detach()), 5), "lr": lr})
        bar.close()
        return net

    # -- stage 3 -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, net: GateNet) -> tuple[list[float], dict[str, Any]]:
        c = self.cfg
        feats, orc = self._load("heldout")  # (L, N, F), (L, N, H)
        u = torch.sigmoid(net(feats.float()))  # (L, N, H)
        dens = [float((u >= t).float().mean()) for t in TAU_GRID]
        important = orc >= c.epsilon
        written = u >= 0.5
        per_layer = (u >= 0.5).float().mean((1, 2))
        loss = torch.nn.functional.binary_cross_entropy(u, soft_target(orc, c.epsilon, c.temperature))
        # ranking quality: AUC of u against "oracle >= epsilon", per layer then averaged
        aucs = []
        for i in range(u.shape[0]):
            pos, neg = u[i][important[i]], u[i][~important[i]]
            if pos.numel() and neg.numel():
                neg_sorted = neg.sort().values
                ranks = torch.searchsorted(neg_sorted, pos)
                aucs.append(float(ranks.float().mean() / neg.numel()))
        metrics = {
            "train_sequences": self._count("collect"),
            "heldout_sequences": self._count("heldout"),
            "heldout_keys_per_layer": int(u.shape[1]),
            "heldout_bce": round(float(loss), 5),
            "oracle_important_share": round(float(important.float().mean()), 4),
            "density_at_0.5": round(float(written.float().mean()), 4),
            "recall_at_0.5": round(float((written & important).sum() / important.sum().clamp_min(1)), 4),
            "precision_at_0.5": round(float((written & important).sum() / written.sum().clamp_min(1)), 4),
            "auc_mean": round(sum(aucs) / max(1, len(aucs)), 4),
            "density_at_0.5_per_layer": [round(float(x), 3) for x in per_layer],
        }
        return dens, metrics

    # -- all ------------------------------------------------------------------------------------------------------
    def run(self) -> Path:
        from ..adapters.models import model_shape
        from ..adapters.profiles import Profile, save_profile, shape_dict

        origin = self.collect()
        net = self.fit()
        if self.cfg.hard_steps:
            from .spkv_hard import hard_gate_stage

            _, tok = self.model()
            net = hard_gate_stage(self, net, self.sequences(tok)[0][: self.cfg.sequences])
        dens, metrics = self.calibrate(net)
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        model, _ = self.model()
        shape = model_shape(model)
        target = "KVzip+ score" if self.cfg.target == "kvzip+" else "largest attention beyond the window"
        settings = {**asdict(self.cfg), "text": origin,
                    "objective": f"bce to sigmoid((log o - log eps)/temperature), o = {target}"}  # fmt: skip
        settings.pop("out")
        prof = Profile(KIND, shape.key, shape_dict(shape), settings, gates_to_dict(net.export(), self.cfg.window,
                       self.cfg.hidden, TAU_GRID, dens, self.cfg.input), version=_version())  # fmt: skip
        return save_profile(prof, self.out / "final" / f"{KIND}.json")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tokensieve")
    except PackageNotFoundError:  # pragma: no cover - a source checkout without metadata
        return ""


def ship(profile_path: Path, model_key: str, kind: str = KIND) -> Path:
    """Copy a trained gate into the package's shipped profiles (``tokensieve/profiles/<model>/<kind>.json``)."""
    from importlib import resources

    dest = Path(str(resources.files("tokensieve"))) / "profiles" / model_key / f"{kind}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(profile_path, dest)
    return dest


# ------------------------------------------------------------------------------------------------------ density
@torch.no_grad()
def density_table(model: Any, tokenizer: Any, specs: list[str], lengths: list[int], n: int, seed: int) -> list[dict]:
    """Achieved density (stored entries / full cache, after the prefill) of each spec on held-out topic text, per
    prompt length: mean and standard deviation over ``n`` prompts."""
    import tokensieve as ts

    from ..methods.kv.spkv import achieved_density

    _, held, _ = token_sequences(tokenizer, max(lengths), seed)
    if len(held) < n:
        raise ConfigError(f"Only {len(held)} held-out sequences of {max(lengths)} tokens; ask for fewer (--prompts).")
    rows = []
    for spec in specs:
        press = ts.compress(model, spec)
        for length in lengths:
            vals = []
            for ids in held[:n]:
                ctx = press.prefill(torch.tensor([ids[:length]]))
                vals.append(achieved_density(ctx.cache, length))
            m = sum(vals) / len(vals)
            sd = (sum((v - m) ** 2 for v in vals) / max(1, len(vals) - 1)) ** 0.5
            rows.append({"spec": spec, "length": length, "density": m, "sd": sd, "prompts": len(vals)})
    return rows


# ------------------------------------------------------------------------------------------------------ CLI
_HELP = {
    "out": "run directory: collect/, heldout/, checkpoint.pt, train.log, final/spkv.json (rerun to resume)",
    "model": "the frozen model (embedded name or local directory)",
    "seed": "seed of the text shuffle, the sampled keys, the initialisation and the minibatches",
    "length": "tokens per sequence",
    "sequences": "training sequences (one frozen forward pass each)",
    "heldout": "held-out sequences for the calibration table",
    "window": "local window w the gate is trained for (the method's default)",
    "horizon": "queries t with w <= t - j < w + horizon define key j's oracle",
    "samples": "keys sampled per sequence and layer (the first token is always one)",
    "epsilon": "oracle level (largest attention weight beyond the window) at which u = 0.5",
    "temperature": "log-units of the oracle per logit unit of u",
    "hidden": "hidden width of each layer's predictor (0: linear)",
    "steps": "Adam steps of the fit",
    "batch": "keys per layer per step",
    "lr": "peak learning rate (cosine to 10 %%)",
    "weight_decay": "AdamW weight decay",
    "checkpoint_every": "steps between checkpoints",
    "threads": "torch CPU threads",
    "collect_minutes": "> 0: stop collecting after this many minutes and fit on the shards so far (rerun to add more)",
    "sources": "comma-separated text sources (their training parts; held-out sequences from their held-out parts); "
    "'' = the Python reference topics, every tenth chunk held out (the first shipped gate's recipe)",
    "input": "what the gate reads: kv (keys with RoPE undone and values) or hidden (the layer's hidden state, as the "
    "paper's predictor)",
    "target": "attention (the largest attention weight a key gets beyond the window) or kvzip+ (its KVzip+ score, "
    "a query-agnostic oracle: the text is followed by its repetition; --epsilon is then the KVzip+ level)",
    "hard_steps": "> 0: after the oracle fit, this many steps of the hard-gate stage (KL to the full model through "
    "the hard gate, straight-through gradient; see train/spkv_hard.py)",
    "hard_tau": "the threshold of the hard gate during that stage",
    "hard_density": "the out-of-window density that stage aims at",
    "hard_weight": "weight of the density term of that stage",
    "hard_lr": "peak learning rate of that stage (cosine to 0)",
}


def add_commands(tsub: Any) -> None:
    import argparse

    from ..results.threads import whole_number

    p = tsub.add_parser("spkv", help="train SP-KV's write gate on the frozen model (resumable; see docs/SPKV.md)")
    defaults = SPKVTrainConfig()
    for f in fields(SPKVTrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name), help=_HELP.get(f.name))  # fmt: skip
    p.add_argument("--ship", action="store_true", help="copy the trained gate into the package's shipped profiles")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_spkv)
    d = tsub.add_parser("spkv-density", help="achieved density of SP-KV specs on held-out text, per prompt length")
    d.add_argument("--specs", default="spkv[tau=0.3],spkv[tau=0.5],spkv[tau=0.7]", help="comma-separated specs")
    d.add_argument("--lengths", default="512,1024,2048")
    d.add_argument("--prompts", type=whole_number(1), default=4, help="held-out prompts per length")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=whole_number(1), default=2)
    d.add_argument("--json", default=None, help="also write the rows to this JSON file")
    d.set_defaults(func=cmd_spkv_density)
    _ = argparse


def cmd_train_spkv(args: Any) -> int:
    values = {f.name: getattr(args, f.name) for f in fields(SPKVTrainConfig)}
    trainer = SPKVTrainer(SPKVTrainConfig(**values), progress=not args.no_progress)
    path = trainer.run()
    print(path)
    print((trainer.out / "metrics.json").read_text())
    if args.ship:
        from ..adapters.models import model_shape

        model, _ = trainer.model()
        print(f"shipped to {ship(path, model_shape(model).key)}")
    return 0


def cmd_spkv_density(args: Any) -> int:
    from ..adapters.models import load_model
    from ..spec import split_specs

    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if not lengths or min(lengths) < 2:
        raise ConfigError(f"--lengths takes prompt lengths >= 2, got {args.lengths!r}.")
    model, tok = load_model(args.model)
    rows = density_table(model, tok, [str(s) for s in split_specs(args.specs)], lengths, args.prompts, args.seed)
    print("| spec | prompt tokens | density (stored / full) | sd | prompts |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| `{r['spec']}` | {r['length']} | {r['density']:.3f} | {r['sd']:.3f} | {r['prompts']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


__all__ = [
    "SPKVTrainConfig",
    "SPKVTrainer",
    "add_commands",
    "density_table",
    "oracle",
    "soft_target",
    "token_sequences",
]
