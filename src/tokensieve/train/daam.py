"""Training and evaluation of the DAAM speech networks on the offline speech corpus (``tokensieve train daam``,
``daam-frames``, ``daam-figures``; docs/DAAM.md).

Recipe of the DAAM depression paper (arXiv 2409.00391), scaled to this machine: Adam, learning rate 1e-3 multiplied
by 0.9 every 5 epochs, batch 20, BCE (binary task A) or cross-entropy (task B); standardised log-mel segments
(B, 40, 120). The paper trains 50 epochs; we train ``--epochs`` (default 12) and keep the epoch with the best
validation F1 macro (validation speakers are held out from training and from the test). Task A is scored per
recording by the majority vote of its segments, as the paper scores interviews; the metric is F1 macro.

Every run is one (task, network, front block, seed); its result is a line of ``results.jsonl`` in the output
directory and its best weights ``checkpoints/<run>.safetensors``. Rerunning a grid skips the runs already done.

``modules`` chooses the networks: ``"official"`` (default; the DAAM modules and speech networks as the authors' code
computes them) or ``"v1"`` (this package's earlier networks: log-space Gaussian weights, c from exp(N(0, 1)), no
CNN-LSTM dropout or code initialisation, mean pooling). Runs recorded with the earlier networks carry no ``modules`` in
their config and are read as ``"v1"``; official runs are named with ``-official``, so the two never
share a name, a checkpoint or a table row.

``selector="density"`` trains a transformer for frame dropping (docs/DAAM.md, "A frame selector trained for
dropping"): each batch keeps all frames, half or a quarter of them; the subset is evenly spaced at a random phase or
drawn by systematic sampling from the learned frame density (:class:`~tokensieve.nn.FrameScorer`), and the encoder
sees only that subset through a 0/1 key mask whose straight-through gradient trains the density.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..data.speech import Corpus, CorpusConfig, load_or_build, standardise
from ..errors import ConfigError
from ..nn import (
    ATTENTION_KINDS,
    DAAMAudioCNNLSTM,
    DAAMAudioTransformer,
    FrameScorer,
    count_parameters,
    inclusion_probabilities,
    systematic_sample,
)
from ..results.daam import front_label

NETWORKS = ("cnnlstm", "transformer")
MODULES = ("official", "v1")
SELECTORS = ("density",)
#: a selector run's batches keep these fractions of the frames (drawn uniformly per batch) …
SELECT_TRAIN_FRACTIONS = (0.25, 0.5, 1.0)
#: … drawn from the learned density with this probability, else evenly spaced (both at a random phase)
SELECT_P_LEARNED = 0.5
#: a selector run keeps the epoch with the best mean of validation F1 with every frame and at this fraction
SELECT_VAL_FRACTION = 0.25
HOWS = ("learned", "uniform", "random", "importance", "energy")


@dataclass(frozen=True)
class DaamRun:
    """One training run."""

    task: str = "a"
    network: str = "cnnlstm"
    attention: str = "daam"
    time_axis: bool = False
    seed: int = 0
    epochs: int = 12
    batch: int = 20
    lr: float = 1e-3
    decay_every: int = 5
    decay: float = 0.9
    segments: int = 0  #: task A: at most this many (evenly spaced) training segments per recording; 0: all
    feedforward: int = 2048  #: the transformer's feed-forward width (the paper's: 2048)
    time_heads: int = 0  #: heads of the time-axis Gaussian layer (0: as many as the mel layer's, 4)
    modules: str = "official"  #: "official" (the authors' code) or "v1" (the earlier networks)
    pool: str = ""  #: transformer pooling "last" / "mean"; "": the modules' default (official: last, v1: mean)
    selector: str = ""  #: "density": train a learned frame density and the encoder for dropping frames

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DaamRun:
        """The run of a recorded config; a config without ``modules`` was recorded with the earlier networks
        (``"v1"``)."""
        return cls(**{"modules": "v1", **config})

    def pooling(self) -> str:
        return self.pool or ("last" if self.modules == "official" else "mean")

    def name(self) -> str:
        t = "+time" if self.time_axis else ""
        g = f"-g{self.segments}" if self.segments else ""
        f = f"-ff{self.feedforward}" if self.feedforward != 2048 else ""
        th = f"-th{self.time_heads}" if self.time_heads else ""
        default_pool = "last" if self.modules == "official" else "mean"
        p = f"-p{self.pool}" if self.network == "transformer" and self.pool not in ("", default_pool) else ""
        o = "-official" if self.modules == "official" else ""
        sel = f"-select-{self.selector}" if self.selector else ""
        return f"{self.task}-{self.network}-{self.attention}{t}{th}-s{self.seed}-e{self.epochs}{g}{f}{p}{o}{sel}"

    def check(self) -> None:
        if self.task not in ("a", "b"):
            raise ConfigError(f"task must be a or b, got {self.task!r}")
        if self.network not in NETWORKS:
            raise ConfigError(f"network must be one of {', '.join(NETWORKS)}, got {self.network!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {self.attention!r}")
        if self.time_axis and self.attention != "daam":
            raise ConfigError("--time-axis adds a Gaussian layer: it needs --attention daam")
        if self.time_heads and not self.time_axis:
            raise ConfigError("--time-heads sets the heads of the time-axis layer: it needs --time-axis")
        if self.time_heads < 0:
            raise ConfigError("--time-heads must be ≥ 1 (or 0 for the default)")
        if self.epochs < 1 or self.batch < 1 or self.segments < 0:
            raise ConfigError("epochs and batch must be ≥ 1, segments ≥ 0")
        if self.feedforward < 1:
            raise ConfigError(f"--feedforward must be ≥ 1; got {self.feedforward}")
        if self.modules not in MODULES:
            raise ConfigError(f"--modules must be one of {', '.join(MODULES)}, got {self.modules!r}")
        if self.pool not in ("", "last", "mean"):
            raise ConfigError(f"--pool must be last or mean, got {self.pool!r}")
        if self.pool and self.network != "transformer":
            raise ConfigError("--pool chooses the transformer's pooling: it needs --networks transformer")
        if self.selector and (self.selector not in SELECTORS or self.network != "transformer"):
            raise ConfigError(f"a frame selector ({', '.join(SELECTORS)}) is trained on the transformer only")


def build_model(run: DaamRun, mels: int, frames: int, outputs: int) -> nn.Module:
    th = run.time_heads or None
    official = run.modules == "official"
    if run.network == "cnnlstm":
        return DAAMAudioCNNLSTM(mels, outputs, attention=run.attention, time_axis=run.time_axis, time_heads=th,
                                official=official)  # fmt: skip
    return DAAMAudioTransformer(
        mels, outputs, frames=frames, attention=run.attention, time_axis=run.time_axis, time_heads=th,
        feedforward=run.feedforward, official=official, pool=run.pooling(),  # type: ignore[arg-type]
        scorer=bool(run.selector),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ metrics


def f1_macro(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean over classes of F1 = 2·TP / (2·TP + FP + FN) (a class absent from both counts as F1 0)."""
    scores = []
    for c in range(n_classes):
        tp = int(np.sum((y_pred == c) & (y_true == c)))
        fp = int(np.sum((y_pred == c) & (y_true != c)))
        fn = int(np.sum((y_pred != c) & (y_true == c)))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def majority_vote(
    group: np.ndarray, y: np.ndarray, pred: np.ndarray, prob: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per recording (group): its label and the majority of its segments' predictions (a tie: mean probability)."""
    labels, votes = [], []
    for g in np.unique(group):
        m = group == g
        labels.append(int(y[m][0]))
        ones = int(pred[m].sum())
        n = int(m.sum())
        votes.append(1 if 2 * ones > n else 0 if 2 * ones < n else int(prob[m].mean() > 0.5))
    return np.array(labels), np.array(votes)


@dataclass
class Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val: Corpus
    test: Corpus
    n_classes: int


def thin(part: Corpus, per_group: int) -> Corpus:
    """At most ``per_group`` evenly spaced rows of each group (recording); ``0``: all rows."""
    if per_group <= 0:
        return part
    keep: list[int] = []
    for g in np.unique(part.group):
        rows = np.flatnonzero(part.group == g)
        if len(rows) > per_group:
            rows = rows[np.linspace(0, len(rows) - 1, per_group).round().astype(int)]
        keep.extend(rows.tolist())
    k = np.array(sorted(keep))
    return Corpus(part.x[k], part.y[k], part.group[k], part.split[k], part.speaker[k], part.classes, part.speakers)


def prepare(corpus: Corpus, segments: int = 0) -> Data:
    """Split and standardise with the training split's per-band statistics; ``segments``: see :class:`DaamRun`."""
    tr, va, te = thin(corpus.part("train"), segments), corpus.part("val"), corpus.part("test")
    if not len(tr.y) or not len(va.y) or not len(te.y):
        raise ConfigError("the corpus has an empty split")
    xtr, xva, xte = standardise(tr.x, va.x, te.x)
    va.x, te.x = xva, xte
    return Data(torch.from_numpy(xtr), torch.from_numpy(tr.y), va, te, len(corpus.classes))


@torch.no_grad()
def predict(
    model: nn.Module, x: np.ndarray, binary: bool, batch: int = 200, **kw: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, probability of the predicted / positive class) for rows of x."""
    model.eval()
    preds, probs = [], []
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i : i + batch])
        extra = {k: v[i : i + batch] for k, v in kw.items()}
        logits = model(xb, **extra)
        if binary:
            p = torch.sigmoid(logits[:, 0])
            preds.append((p > 0.5).long().numpy())
            probs.append(p.numpy())
        else:
            p = torch.softmax(logits, -1)
            preds.append(p.argmax(-1).numpy())
            probs.append(p.max(-1).values.numpy())
    return np.concatenate(preds), np.concatenate(probs)


def score(model: nn.Module, part: Corpus, n_classes: int, **kw: Any) -> dict[str, float]:
    """F1 macro (per recording by majority vote for the binary task, per clip otherwise) and accuracy."""
    binary = n_classes == 2 and part.classes[0] == "unmarked"
    pred, prob = predict(model, part.x, binary, **kw)
    out = {"segment_f1": f1_macro(part.y, pred, n_classes), "segment_acc": float(np.mean(pred == part.y))}
    if binary:
        y, v = majority_vote(part.group, part.y, pred, prob)
        out["f1"] = f1_macro(y, v, 2)
        out["acc"] = float(np.mean(y == v))
    else:
        out["f1"], out["acc"] = out["segment_f1"], out["segment_acc"]
    return out


# ------------------------------------------------------------------------------------------------------------ training


def selector_step(model: nn.Module, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The training forward of a selector run (``selector="density"``) on a batch x (B, mels, frames) → logits.

    A fraction f of the frames is drawn from :data:`SELECT_TRAIN_FRACTIONS`; below 1, k = round(f·frames) frames are
    kept by systematic sampling at a random phase per clip — with probability :data:`SELECT_P_LEARNED` from the
    scorer's learned density (inclusion probabilities p), else from a flat one (evenly spaced frames) — and the
    encoder sees only them. For the learned draw the encoder's key mask is m = hard + p − p.detach(): its forward
    value is the hard 0/1 mask, and the loss's gradient with respect to each frame's weight reaches that frame's
    inclusion probability, so the density rises where the loss wants frames kept. The evenly spaced draws train the
    encoder on the reduced frame rate itself."""
    h = model.front(x)  # type: ignore[operator]
    b, _, t = h.shape
    f = SELECT_TRAIN_FRACTIONS[int(torch.randint(len(SELECT_TRAIN_FRACTIONS), (1,), generator=gen))]
    k = max(1, round(f * t))
    if k >= t:
        return model.encode(h)  # type: ignore[operator]
    learned = float(torch.rand((), generator=gen)) < SELECT_P_LEARNED
    offset = torch.rand(b, generator=gen)
    if not learned:
        flat = inclusion_probabilities(torch.ones(b, t), k)
        return model.encode(h, systematic_sample(flat, k, offset))  # type: ignore[operator]
    idx, p = cast(FrameScorer, model.scorer).select(h, k, offset)
    hard = torch.zeros(b, t, dtype=p.dtype).scatter_(1, idx, 1.0)
    return model.encode(h, key_weights=hard + p - p.detach())  # type: ignore[operator]


def validation(model: nn.Module, run: DaamRun, part: Corpus, n_classes: int) -> dict[str, float]:
    """The validation scores that choose a run's best epoch (``f1``): every frame's, or for a selector run the mean of
    every frame's and the learned selection's at :data:`SELECT_VAL_FRACTION` (both kept in the dict)."""
    out = score(model, part, n_classes)
    if not run.selector:
        return out
    keep = select_frames(model, torch.from_numpy(part.x), SELECT_VAL_FRACTION, "learned")
    sel = score(model, part, n_classes, keep=keep)
    return {**{f"all_{k}": v for k, v in out.items()}, **{f"selected_{k}": v for k, v in sel.items()},
            "f1": 0.5 * (out["f1"] + sel["f1"]), "acc": 0.5 * (out["acc"] + sel["acc"])}  # fmt: skip


def train_run(run: DaamRun, data: Data, *, out: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train one run; return its record (validation and test scores at the best validation epoch)."""
    run.check()
    random.seed(run.seed)
    np.random.seed(run.seed)
    torch.manual_seed(run.seed)
    binary = run.task == "a"
    mels, frames = data.train_x.shape[1], data.train_x.shape[2]
    model = build_model(run, mels, frames, 1 if binary else data.n_classes)
    opt = torch.optim.Adam(model.parameters(), lr=run.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=run.decay_every, gamma=run.decay)
    loss_fn: nn.Module = nn.BCEWithLogitsLoss() if binary else nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(run.seed)
    select_gen = torch.Generator().manual_seed(10_000 + run.seed)  # frame subsets of a selector run
    n = len(data.train_y)
    best: dict[str, Any] = {"val": {"f1": -1.0}}
    best_state: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(range(run.epochs), desc=run.name(), disable=not progress, dynamic_ncols=True, leave=False)
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, run.batch):
            idx = order[i : i + run.batch]
            if len(idx) < 2:  # BatchNorm needs two rows
                continue
            xb = data.train_x[idx]
            logits = selector_step(model, xb, select_gen) if run.selector else model(xb)
            y = data.train_y[idx]
            loss = loss_fn(logits[:, 0], y.float()) if binary else loss_fn(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        val = validation(model, run, data.val, data.n_classes)
        bar.set_postfix(loss=f"{total / n:.3f}", val_f1=f"{val['f1']:.3f}")
        if val["f1"] > best["val"]["f1"]:
            best = {"val": val, "epoch": epoch + 1}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    test = (
        validation(model, run, data.test, data.n_classes) if run.selector else score(model, data.test, data.n_classes)
    )
    if run.selector:  # the record's test F1 is every frame's, as for the other runs
        test = {**test, "f1": test["all_f1"], "acc": test["all_acc"]}
    record = {
        "run": run.name(),
        "config": asdict(run),
        "parameters": count_parameters(model),
        "front_parameters": count_parameters(model.front),  # type: ignore[arg-type]
        "best_epoch": best["epoch"],
        "val": best["val"],
        "test": test,
        "seconds": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if out is not None:
        from safetensors.torch import save_file

        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in best_state.items()}, str(out / "checkpoints" / f"{run.name()}.safetensors")
        )
    return record


def done_runs(out: Path) -> dict[str, dict[str, Any]]:
    path = out / "results.jsonl"
    if not path.exists():
        return {}
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["run"]: r for r in recs}


def run_grid(
    runs: Sequence[DaamRun], out: Path, corpus_cfg: CorpusConfig | None = None, *, progress: bool = True
) -> list[dict[str, Any]]:
    """Train every run not yet in ``out/results.jsonl`` (appending its record); return all the grid's records."""
    for r in runs:
        r.check()
    out.mkdir(parents=True, exist_ok=True)
    corpus_cfg = corpus_cfg or CorpusConfig()
    data: dict[tuple[str, int], Data] = {}
    records = []
    for r in runs:
        done = done_runs(out)  # another process may share the directory: look again before each run
        key = corpus_cfg.key(r.task)
        if r.name() in done:
            found = done[r.name()].get("corpus")
            if found != key:
                raise ConfigError(
                    f"{out / 'results.jsonl'} already holds run {r.name()} trained on another speech corpus "
                    f"({found or 'an older one'}, this one is {key}): give the grid another --out directory"
                )
            records.append(done[r.name()])
            continue
        if (r.task, r.segments) not in data:
            data[r.task, r.segments] = prepare(load_or_build(r.task, corpus_cfg, progress=progress), r.segments)
        rec = {**train_run(r, data[r.task, r.segments], out=out, progress=progress), "corpus": key}
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if progress:
            print(f"{rec['run']}: test F1 {rec['test']['f1']:.3f} (val {rec['val']['f1']:.3f}, epoch "
                  f"{rec['best_epoch']}, {rec['seconds']:.0f} s)", flush=True)  # fmt: skip
        records.append(rec)
    return records


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = float(np.mean(xs))
    return m, float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def summary_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per (task, network, front block) — parameters, test F1 macro and accuracy mean ± std."""
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for r in records:
        c = r["config"]
        groups.setdefault((c["task"], c["network"], front_label(c), c["epochs"]), []).append(r)
    lines = [
        "| task | network | front block | parameters (block) | seeds | test F1 macro | test accuracy | val F1 macro |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (task, net, front, _), rs in sorted(groups.items()):
        f1, sf1 = mean_std([r["test"]["f1"] for r in rs])
        acc, sacc = mean_std([r["test"]["acc"] for r in rs])
        vf1, svf1 = mean_std([r["val"]["f1"] for r in rs])
        lines.append(
            f"| {task.upper()} | {net} | {front} | {rs[0]['parameters']:,} ({rs[0]['front_parameters']:,}) | "
            f"{len(rs)} | {f1:.3f} ± {sf1:.3f} | {acc:.3f} ± {sacc:.3f} | {vf1:.3f} ± {svf1:.3f} |"
        )
    return "\n".join(lines)


def _seed_f1(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str], dict[int, float]]:
    """Test F1 by (task, network, front label) and seed."""
    out: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in records:
        c = r["config"]
        out.setdefault((c["task"], c["network"], front_label(c)), {})[int(c["seed"])] = float(r["test"]["f1"])
    return out


def paired_fronts_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: within each (task, network), every two front blocks compared on the seeds both have (same seed:
    same initialisation of the shared layers, same batch order) — Δ test F1 with a 95 % t-interval, the paired t-test
    p and the seeds won / lost."""
    from .daam_stats import fmt, paired

    by = _seed_f1(records)
    lines = ["| task | network | a − b | seeds | Δ test F1 (95 % CI) | p (paired t) | seeds a higher / lower |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = sorted(by)
    for i, (task, net, a) in enumerate(keys):
        for task_b, net_b, b in keys[i + 1 :]:
            if (task_b, net_b) != (task, net):
                continue
            seeds = sorted(set(by[task, net, a]) & set(by[task, net, b]))
            if len(seeds) < 2:
                continue
            c = paired([by[task, net, a][s] for s in seeds], [by[task, net, b][s] for s in seeds])
            lines.append(f"| {task.upper()} | {net} | {a} − {b} | {len(seeds)} | {fmt(c['diff'], c['half'])} | "
                         f"{c['p']:.3f} | {c['wins']} / {c['losses']} |")  # fmt: skip
    return "\n".join(lines)


def versions_table(old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> str:
    """Markdown: each (task, network, front block) of ``new`` (the corrected modules) next to the same setting in
    ``old`` (the runs of the earlier networks, labelled ``[v1]``): test F1 mean ± 95 % t half-width of each, and the
    paired difference on the seeds both have (same seed, other modules)."""
    from .daam_stats import fmt, paired, t_interval

    def base(label: str) -> str:
        return label.removesuffix(" [v1]")

    by_old = {(t, n, base(f)): v for (t, n, f), v in _seed_f1(old).items() if f.endswith("[v1]")}
    by_new = {k: v for k, v in _seed_f1(new).items() if not k[2].endswith("]")}
    lines = ["| task | network | front block | seeds | v1 modules | corrected (official) | Δ corrected − v1, "
             "paired (95 % CI) | p | seeds higher / lower |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key in sorted(by_new):
        if key not in by_old:
            continue
        seeds = sorted(set(by_old[key]) & set(by_new[key]))
        if not seeds:
            continue
        o, n = [by_old[key][s] for s in seeds], [by_new[key][s] for s in seeds]
        c = paired(n, o)
        p = "—" if math.isnan(c["p"]) else f"{c['p']:.3f}"
        before, after, delta = fmt(*t_interval(o)), fmt(*t_interval(n)), fmt(c["diff"], c["half"])
        lines.append(f"| {key[0].upper()} | {key[1]} | {key[2]} | {len(seeds)} | {before} | {after} | {delta} | {p} | "
                     f"{c['wins']} / {c['losses']} |")  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ frames


def load_run(out: Path, record: dict[str, Any], data: Data) -> nn.Module:
    from safetensors.torch import load_file

    run = DaamRun.from_config(record["config"])
    binary = run.task == "a"
    model = build_model(run, data.train_x.shape[1], data.train_x.shape[2], 1 if binary else data.n_classes)
    model.load_state_dict(load_file(str(out / "checkpoints" / f"{run.name()}.safetensors")))
    return model.eval()


@torch.no_grad()
def frame_importance(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Importance of each frame (B, T): the time-axis Gaussian layer's weights summed over the mel bands."""
    _, ws = model.front(x, return_weights=True)  # type: ignore[operator]
    return _time_importance(ws)


def _time_importance(ws: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(ws) < 2:
        raise ConfigError("frame importance needs a model trained with --time-axis (a Gaussian layer on time)")
    return ws[1].sum(dim=1)


def choose_frames(
    model: nn.Module, x: torch.Tensor, h: torch.Tensor, ws: Sequence[torch.Tensor], k: int, how: str,
    gen: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """Sorted indices (B, k) of the frames to keep, from the input x (B, mels, T), the front block's output h and
    weights ws: ``"learned"`` — k frames drawn by systematic sampling (phase ½) from the model's learned frame
    density (a selector run; :meth:`~tokensieve.nn.FrameScorer.select`); ``"importance"`` — the top k of
    the time-axis Gaussian weights summed over bands; ``"energy"`` — the k loudest frames (mean standardised log-mel);
    ``"random"`` — k at random (``gen``); ``"uniform"`` — k evenly spaced."""
    b, _, t = x.shape
    if how == "learned":
        scorer = getattr(model, "scorer", None)
        if scorer is None:
            raise ConfigError("learned frame selection needs a model trained with a selector (daam-select)")
        idx = scorer.select(h, k)[0]
    elif how == "importance":
        idx = _time_importance(ws).topk(k, dim=1).indices
    elif how == "energy":
        idx = x.mean(dim=1).topk(k, dim=1).indices
    elif how == "random":
        g = gen if gen is not None else torch.Generator().manual_seed(0)
        idx = torch.stack([torch.randperm(t, generator=g)[:k] for _ in range(b)])
    elif how == "uniform":
        idx = torch.linspace(0, t - 1, k).round().long().expand(b, k)
    else:
        raise ConfigError(f"unknown frame selection {how!r} (one of {', '.join(HOWS)})")
    return idx.sort(dim=1).values


@torch.no_grad()
def select_frames(model: nn.Module, x: torch.Tensor, fraction: float, how: str, seed: int = 0) -> torch.Tensor:
    """Sorted indices (B, k) of the frames to keep, k = round(fraction · frames): see :func:`choose_frames`
    (``"random"`` draws from a generator seeded with ``seed``)."""
    k = max(1, round(fraction * x.shape[2]))
    h, ws = model.front(x, return_weights=True) if how in ("learned", "importance") else (x, [])  # type: ignore[operator]
    return choose_frames(model, x, h, ws, k, how, torch.Generator().manual_seed(seed))


@torch.no_grad()
def encoder_ms(model: nn.Module, x: torch.Tensor, keep: torch.Tensor | None, repeats: int = 5) -> float:
    """Median milliseconds of one forward pass (front block, selection and encoder) of the batch x."""
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model(x, keep=keep)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times[1:]))


def frame_selection(
    out: Path, fractions: Sequence[float], corpus_cfg: CorpusConfig | None = None, *, task: str = "b",
    progress: bool = True,
) -> list[dict[str, Any]]:  # fmt: skip
    """For every DAAM transformer run with a time-axis layer in ``out``: test F1 with all frames and with the
    ``fractions`` of frames kept by importance, at random and evenly spaced; and the forward time of a 200-row batch."""
    records = [
        r for r in done_runs(out).values()
        if r["config"]["network"] == "transformer" and r["config"]["time_axis"] and r["config"]["task"] == task
    ]  # fmt: skip
    if not records:
        raise ConfigError(f"no transformer run with --time-axis on task {task} in {out}: train one first")
    corpus = load_or_build(task, corpus_cfg, progress=progress)
    prepared: dict[int, Data] = {}
    rows = []
    for rec in sorted(records, key=lambda r: r["run"]):
        seg = rec["config"].get("segments", 0)  # the inputs standardised as in training
        data = prepared[seg] = prepared.get(seg) or prepare(corpus, seg)
        x = torch.from_numpy(data.test.x)
        model = load_run(out, rec, data)
        timing_x = x[:200]
        front = front_label(rec["config"])
        rows.append({"run": rec["run"], "front": front, "fraction": 1.0, "how": "all",
                     **score(model, data.test, data.n_classes), "ms": encoder_ms(model, timing_x, None)})  # fmt: skip
        hows = ("learned", "importance", "random", "uniform") if rec["config"].get("selector") else (
            "importance", "random", "uniform")  # fmt: skip
        for f in fractions:
            for how in hows:
                keep = select_frames(model, x, f, how, seed=rec["config"]["seed"])
                s = score(model, data.test, data.n_classes, keep=keep)
                ms = encoder_ms(model, timing_x, select_frames(model, timing_x, f, how))
                rows.append({"run": rec["run"], "front": front, "fraction": f, "how": how, **s, "ms": ms})
    return rows


def frames_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per (front block, fraction kept, selection) — test F1 and accuracy, forward time."""
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("front", "daam+time"), r["fraction"], r["how"]), []).append(r)
    lines = [
        "| front block | frames kept | selection | runs | test F1 macro | test accuracy | forward ms (200 clips) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (front, f, how), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
        f1, s1 = mean_std([r["f1"] for r in rs])
        acc, sa = mean_std([r["acc"] for r in rs])
        ms, sms = mean_std([r["ms"] for r in rs])
        lines.append(
            f"| {front} | {f:.0%} | {how} | {len(rs)} | {f1:.3f} ± {s1:.3f} | {acc:.3f} ± {sa:.3f} | "
            f"{ms:.0f} ± {sms:.0f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ figures


def figures(
    out: Path, figdir: Path, corpus_cfg: CorpusConfig | None = None, *, examples: int = 3,
    maps: list[dict[str, Any]] | None = None,
) -> list[Path]:  # fmt: skip
    """Importance maps of one DAAM run per task found in ``out`` (one with a time-axis layer if there is one): for a
    few test recordings, the log-mel input, the mel-axis weights and (with a time-axis layer) the frame importance;
    and the mean mel-band weights per class over the test split — appended to ``maps``, when given, as
    ``{"task", "run", "classes", "bands"}`` (classes × mel bands), for the results store."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir.mkdir(parents=True, exist_ok=True)
    paths = []
    by_task: dict[str, dict[str, Any]] = {}
    for r in sorted(done_runs(out).values(), key=lambda r: r["run"]):
        c = r["config"]
        if (
            c["attention"] == "daam"
            and not c.get("selector")
            and (c["task"] not in by_task or c["time_axis"] > by_task[c["task"]]["config"]["time_axis"])
        ):
            by_task[c["task"]] = r
    if not by_task:
        raise ConfigError(f"no DAAM run in {out}: train one first")
    for task, rec in sorted(by_task.items()):
        data = prepare(load_or_build(task, corpus_cfg), rec["config"].get("segments", 0))  # as in training
        model = load_run(out, rec, data)
        te = data.test
        # one example per class where possible, the first segment of a recording
        picks: list[int] = []
        for c in range(data.n_classes):
            hits = np.flatnonzero(te.y == c)
            if len(hits):
                picks.append(int(hits[0]))
            if len(picks) == examples:
                break
        x = torch.from_numpy(te.x[picks])
        with torch.no_grad():
            _, ws = model.front(x, return_weights=True)  # type: ignore[operator]
        rows = 3 if len(ws) > 1 else 2
        fig, axes = plt.subplots(rows, len(picks), figsize=(4 * len(picks), 2.5 * rows), squeeze=False)
        for j, i in enumerate(picks):
            axes[0, j].imshow(te.x[i], origin="lower", aspect="auto", cmap="magma")
            axes[0, j].set_title(f"{te.classes[te.y[i]]} — {te.speakers[te.speaker[i]]}", fontsize=9)
            axes[1, j].imshow(ws[0][j].numpy(), origin="lower", aspect="auto", cmap="viridis")
            if rows == 3:
                axes[2, j].plot(ws[1][j].sum(0).numpy())
                axes[2, j].set_xlim(0, te.x.shape[2] - 1)
        axes[0, 0].set_ylabel("input: mel band")
        axes[1, 0].set_ylabel("mel-axis weights: band")
        if rows == 3:
            axes[2, 0].set_ylabel("frame importance")
        for a in axes[rows - 1]:
            a.set_xlabel("frame (10 ms)")
        fig.suptitle(f"task {task.upper()}: {rec['run']}", fontsize=10)
        paths.append(_save(fig, plt, figdir / f"daam_task_{task}_examples.png"))
        # mean mel-band weight per class (test split)
        with torch.no_grad():
            _, wall = model.front(torch.from_numpy(te.x), return_weights=True)  # type: ignore[operator]
        band = wall[0].mean(dim=2).numpy()  # (N, mels)
        if maps is not None:
            present = [c for c in range(data.n_classes) if (te.y == c).any()]
            bands = [[round(float(x), 5) for x in band[te.y == c].mean(0)] for c in present]
            maps.append({"task": task, "run": rec["run"], "classes": [str(te.classes[c]) for c in present],
                         "bands": bands})  # fmt: skip
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for c in range(min(data.n_classes, 4)):
            ax.plot(band[te.y == c].mean(0), label=te.classes[c])
        ax.set_xlabel("mel band")
        ax.set_ylabel("mean weight")
        ax.legend(fontsize=8)
        ax.set_title(f"task {task.upper()}: mel-axis importance, test mean", fontsize=10)
        paths.append(_save(fig, plt, figdir / f"daam_task_{task}_bands.png"))
        frames = _frames_figure(out, figdir, task, corpus_cfg, plt)
        if frames is not None:
            paths.append(frames)
    return paths


def _frames_figure(
    out: Path, figdir: Path, task: str, corpus_cfg: CorpusConfig | None, plt: Any, examples: int = 4
) -> Path | None:
    """Frame importance of the lowest-seed transformer of each time-head setting over a few test clips, and the
    frames each keeps at 25 %: where the learned importance puts the selected tokens."""
    runs: dict[int, dict[str, Any]] = {}
    for r in sorted(done_runs(out).values(), key=lambda r: r["config"]["seed"]):
        c = r["config"]
        if c["task"] == task and c["network"] == "transformer" and c["time_axis"] and not c.get("selector"):
            runs.setdefault(c.get("time_heads", 0), r)
    if not runs:
        return None
    corpus = load_or_build(task, corpus_cfg)
    data = prepare(corpus, next(iter(runs.values()))["config"].get("segments", 0))
    te = data.test
    picks = [int(np.flatnonzero(te.y == c)[0]) for c in range(min(examples, data.n_classes)) if (te.y == c).any()]
    x = torch.from_numpy(te.x[picks])
    fig, axes = plt.subplots(1 + len(runs), len(picks), figsize=(3.6 * len(picks), 2.2 * (1 + len(runs))),
                             squeeze=False)  # fmt: skip
    for j, i in enumerate(picks):
        axes[0, j].imshow(te.x[i], origin="lower", aspect="auto", cmap="magma")
        axes[0, j].set_title(te.classes[te.y[i]], fontsize=9)
    for row, (th, rec) in enumerate(sorted(runs.items()), start=1):
        run_data = prepare(corpus, rec["config"].get("segments", 0))  # inputs standardised as in its training
        model = load_run(out, rec, run_data)
        x = torch.from_numpy(run_data.test.x[picks])
        imp = frame_importance(model, x)
        keep = select_frames(model, x, 0.25, "importance")
        for j in range(len(picks)):
            ax = axes[row, j]
            ax.plot(imp[j].numpy(), lw=1)
            ax.vlines(keep[j].numpy(), 0, float(imp[j].max()), colors="tab:red", alpha=0.25, lw=1)
            ax.set_xlim(0, te.x.shape[2] - 1)
        heads = th or 4
        axes[row, 0].set_ylabel(f"{heads} time head{'s' if heads > 1 else ''}", fontsize=9)
    for a in axes[-1]:
        a.set_xlabel("frame (10 ms)")
    fig.suptitle(f"task {task.upper()}: frame importance (blue) and the 25 % of frames kept (red)", fontsize=10)
    return _save(fig, plt, figdir / f"daam_task_{task}_frames.png")


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def parse_seeds(spec: str) -> list[int]:
    """``"0-4"`` or ``"0,3,7"``: at least one seed, each >= 0; a range runs upwards (``5-2`` is refused, not empty)."""
    try:
        if "-" in spec:
            lo, hi = (int(x) for x in spec.split("-"))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError as exc:
        raise ConfigError(f"--seeds takes 0-4 or 0,1,2 (whole numbers >= 0), got {spec!r}") from exc
    if "-" in spec and not seeds:
        raise ConfigError(f"--seeds {spec}: a range runs from low to high (write {hi}-{lo}).")
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--seeds takes 0-4 or 0,1,2 (whole numbers >= 0), got {spec!r}")
    return seeds


def grid(
    task: str, networks: Sequence[str], attentions: Sequence[str], seeds: Sequence[int], epochs: int,
    time_axis: bool = False, segments: int = 0, feedforward: int = 2048, time_heads: int = 0,
    modules: str = "official", pool: str = "",
) -> list[DaamRun]:  # fmt: skip
    """Networks × front blocks × seeds; ``pool`` applies to the transformer runs."""
    return [
        DaamRun(
            task=task,
            network=n,
            attention=a,
            time_axis=time_axis and a == "daam",
            seed=s,
            epochs=epochs,
            segments=segments,
            feedforward=feedforward,
            time_heads=time_heads if time_axis and a == "daam" else 0,
            modules=modules,
            pool=pool if n == "transformer" else "",
        )
        for n in networks
        for a in attentions
        for s in seeds
    ]
