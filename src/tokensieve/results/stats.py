"""Statistics over stored rows: means with standard errors for accuracy rows, medians and ratios against the full
cache for speed rows, paired comparisons (exact sign test) and the visual-token rows' kept fractions. Pure Python over
row dicts; no plotting, no rendering."""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]
GroupKey = tuple[Any, ...]
FULL = "full"


# ---------------------------------------------------------------------------------------------------- basics
def values(rows: Iterable[Row], col: str) -> list[float]:
    """The non-null, non-NaN values of a column, as floats."""
    return [float(r[col]) for r in rows if r.get(col) is not None and not math.isnan(float(r[col]))]


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n`` (Wilson 1927; 95 % for ``z = 1.96``), within [0, 1]; for
    ``n = 0``: (0, 1)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n))) / den
    # the interval holds p exactly (at p = 0 or 1 rounding could put the bound a hair past it)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def interval(xs: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """A 95 % interval of the mean of ``xs``: Wilson's for a proportion (every value 0 or 1 — right or wrong
    answers), else mean ± z · standard error (NaN for fewer than two values)."""
    vals = [float(x) for x in xs if not math.isnan(float(x))]
    if not vals:
        return math.nan, math.nan
    if all(v in (0.0, 1.0) for v in vals):
        return wilson(sum(vals), len(vals), z)
    if len(vals) < 2:
        return math.nan, math.nan
    m, e = mean(vals), sem(vals)
    return m - z * e, m + z * e


def median(xs: Sequence[float]) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def sem(xs: Sequence[float]) -> float:
    """Standard error of the mean (NaN below two values)."""
    if len(xs) < 2:
        return math.nan
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def chunk_suffix(chunk: Any) -> str:
    """What a chunked prefill adds to a configuration's label in reports (`` chunk=512``); '' for one pass."""
    return "" if chunk is None else f" chunk={int(chunk)}"


def chunk_labelled(rows: Iterable[Row]) -> list[Row]:
    """Copies of stored rows whose ``label`` and ``method`` carry the chunk size of a chunked prefill
    (``snapkv:0.25 chunk=256``), so that every table, plot and join that groups rows by label keeps a chunked
    configuration apart from the same spec prefilled in one pass. One-pass rows (``chunk`` NULL or absent) are
    unchanged; the canonical label stays in ``spec_label``. Applying it twice changes nothing."""
    out = []
    for r in rows:
        r = dict(r)
        suffix = chunk_suffix(r.get("chunk"))
        r.setdefault("chunk", None)
        r.setdefault("spec_label", r["label"])
        if suffix and not str(r["label"]).endswith(suffix):
            r["label"] = f"{r['label']}{suffix}"
            r["method"] = f"{r['method']}{suffix}"
        out.append(r)
    return out


def group(rows: Iterable[Row], key: Callable[[Row], GroupKey]) -> dict[GroupKey, list[Row]]:
    out: dict[GroupKey, list[Row]] = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return dict(out)


def budget_order(label: str) -> tuple[int, float]:
    """Sort shown budgets (``10%``, ``0.125``, ``256 tok``): ratios ascending, then token counts; the full cache
    last."""
    if label == "100%":
        return (2, 0.0)
    m = re.match(r"([\d.]+)(%?)", label)
    if m is None:
        return (1, 0.0)
    value = float(m.group(1)) / (100.0 if m.group(2) else 1.0)
    return (1 if "tok" in label else 0, value)


def label_order(label: str) -> tuple[bool, str]:
    """The full cache first, then labels alphabetically."""
    return (label != FULL, label)


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """Points not dominated by another with less (or equal) KV kept and a better (or equal) score, by x."""
    sign = 1.0 if higher_is_better else -1.0
    front: list[tuple[float, float]] = []
    best = -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if sign * y > best:
            front.append((x, y))
            best = sign * y
    return front


# ---------------------------------------------------------------------------------------------- accuracy rows
def kept(r: Row) -> float:
    """Stored KV entries relative to the full cache of the same prompt."""
    full = r.get("full_entries") or 0
    return float(r["stored_entries"]) / float(full) if full else math.nan


@dataclass(frozen=True)
class Accuracy:
    """Aggregates of a group of accuracy rows (e.g. one task, mode and configuration)."""

    n: int
    score: float
    score_sem: float
    score_lo: float  # 95 % interval (Wilson for proportions, :func:`interval`)
    score_hi: float
    kl: float
    top1: float
    answer_logprob: float
    kv_mb: float
    kept: float
    prefill_s: float
    compress_s: float
    decode_s: float


def accuracy(rows: list[Row]) -> Accuracy:
    lo, hi = interval(values(rows, "score"))
    return Accuracy(
        n=len(rows),
        score=mean(values(rows, "score")),
        score_sem=sem(values(rows, "score")),
        score_lo=lo,
        score_hi=hi,
        kl=mean(values(rows, "kl")),
        top1=mean(values(rows, "top1")),
        answer_logprob=mean(values(rows, "answer_logprob")),
        kv_mb=mean(values(rows, "kv_bytes")) / 2**20,
        kept=mean([k for k in (kept(r) for r in rows) if not math.isnan(k)]),
        prefill_s=median(values(rows, "prefill_s")),
        compress_s=median(values(rows, "compress_s")),
        decode_s=median(values(rows, "decode_s")),
    )


def accuracy_json(rows: list[Row]) -> list[dict[str, Any]]:
    """Machine-readable aggregates per (task, mode, configuration, length)."""
    out = []
    keyf: Callable[[Row], GroupKey] = lambda r: (r["task"], r["mode"], r["label"], int(r["length"]))  # noqa: E731
    for key, grows in sorted(group(rows, keyf).items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        s = accuracy(grows)
        out.append(
            {
                "task": key[0], "mode": key[1], "label": key[2], "method": grows[0]["method"],
                "budget": grows[0]["budget"], "length": key[3], "chunk": grows[0].get("chunk"),
                **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in s.__dict__.items()},
            }
        )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------- speed rows
SPEED_FIELDS = (
    "prefill_s",
    "compress_s",
    "ttft_s",
    "tok_s",
    "attn_ms",
    "bytes_read",
    "kv_bytes",
    "alloc_bytes",
    "stored_entries",
    "prefill_peak_rss",
    "decode_peak_rss",
    "prefill_attn_s",
    "compile_s",
)
# Columns an older store lacks (read as None): their median is NaN when any repetition lacks them.
OPTIONAL_SPEED_FIELDS = frozenset({"prefill_attn_s", "compile_s"})


def _median(rs: list[Row], f: str) -> float:
    """The median of a column over repetitions; for ``compile_s`` the largest value (a compile is a one-off: the
    repetition that compiled a graph shows what it cost, the median would hide it)."""
    if f in OPTIONAL_SPEED_FIELDS and any(r.get(f) is None for r in rs):
        return float("nan")
    if f == "compile_s":
        return max(float(r[f]) for r in rs)
    return statistics.median(float(r[f]) for r in rs)


def amdahl(base: Row, m: Row) -> Row:
    """A prefill's speed-up against Amdahl's bound: ``prefill_speedup`` (the full cache's prefill seconds / this
    one's), ``amdahl_bound`` (``1 / (1 − share)``, ``share`` = the full cache's attention seconds / its prefill
    seconds: the speed-up if attention cost nothing) and ``of_amdahl`` (their ratio); NaN where the attention time
    was not recorded."""
    nan = float("nan")
    full_s, attn_s, this_s = base.get("prefill_s"), base.get("prefill_attn_s"), m.get("prefill_s")
    if not (full_s and this_s and attn_s is not None and math.isfinite(float(attn_s))):
        return {"prefill_speedup": nan, "amdahl_bound": nan, "of_amdahl": nan}
    share = float(attn_s) / float(full_s)
    bound = 1.0 / (1.0 - share) if share < 1 else float("inf")
    speedup = float(full_s) / float(this_s)
    return {"prefill_speedup": speedup, "amdahl_bound": bound, "of_amdahl": speedup / bound}


def _sparse_prefill(row: Row) -> bool:
    """Whether a stored row's prefill method is a sparse prefill attention method (it chooses key blocks)."""
    spec = row.get("spec")
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            return False
    name = ((spec or {}).get("method") or {}).get("name") if isinstance(spec, dict) else None
    if not name:  # a row without its spec (a run without a store): the prefill part of the label names the method
        name = re.split(r"[\[:]", str(row.get("prefill") or ""), maxsplit=1)[0]
    if not name:
        return False
    from ..errors import TokensieveError
    from ..registry import get_method_class

    try:
        return hasattr(get_method_class(str(name)), "blocks")
    except TokensieveError:
        return False


def speed(rows: list[Row], info: dict[str, Any]) -> list[Row]:
    """Medians per (configuration, length, batch) — ``compile_s``: the largest over repetitions — and ratios against
    the full cache of the same length and batch.

    Adds ``speedup`` (decode tok/s vs full), ``attn_ratio`` (full attention time / this one), ``kv_ratio``
    (stored KV bytes / full), ``compress_share`` (compression time / the full cache's prefill time),
    ``ttft_speedup`` (the full cache's time to first token / this one), ``prefill_attn_share`` (prefill attention
    time / this configuration's prefill time), ``ideal_speedup`` — the decode speed-up the bytes read per step
    allow, from the measured bandwidth (weights + KV read, full vs this configuration) — and, for a sparse prefill
    method, the prefill's speed-up against Amdahl's bound (:func:`amdahl`).
    """
    rows = chunk_labelled(rows)
    buckets = group(rows, lambda r: (r["label"], r["length"], r["batch"]))
    med: dict[GroupKey, Row] = {}
    for k, rs in buckets.items():
        m: Row = {f: _median(rs, f) for f in SPEED_FIELDS}
        m["prefill_attn_share"] = m["prefill_attn_s"] / m["prefill_s"] if m["prefill_s"] else float("nan")
        m.update({"label": k[0], "length": k[1], "batch": k[2], "reps": len(rs)})
        m.update({f: rs[0][f] for f in ("method", "prefill", "budget", "decode", "decode_budget", "chunk")})
        m["sparse_prefill"] = _sparse_prefill(rs[0])
        med[k] = m
    weights = float(info.get("weights_bytes", 0))
    bw = float(info.get("bandwidth", 0)) or float("nan")
    out = []

    def order(kv: tuple[GroupKey, Row]) -> tuple[Any, ...]:
        (label, length, batch), m = kv
        return (length, batch, m["chunk"] or 0, label != FULL + chunk_suffix(m["chunk"]))

    for (_, length, batch), m in sorted(med.items(), key=order):
        base = med.get((FULL + chunk_suffix(m["chunk"]), length, batch))  # the full cache prefilled alike
        if base is not None:
            m["speedup"] = m["tok_s"] / base["tok_s"] if base["tok_s"] else float("nan")
            m["attn_ratio"] = base["attn_ms"] / m["attn_ms"] if m["attn_ms"] else float("nan")
            m["kv_ratio"] = m["kv_bytes"] / base["kv_bytes"] if base["kv_bytes"] else float("nan")
            m["compress_share"] = m["compress_s"] / base["prefill_s"] if base["prefill_s"] else float("nan")
            m["ttft_speedup"] = base["ttft_s"] / m["ttft_s"] if m["ttft_s"] else float("nan")
            m["ideal_speedup"] = (weights + base["bytes_read"]) / (weights + m["bytes_read"])
            m.update(amdahl(base, m) if m["sparse_prefill"] else amdahl({}, {}))  # only a sparse prefill has one
        m["ideal_tok_s"] = batch / ((weights + m["bytes_read"]) / bw)
        out.append(m)
    return out


def ordered_labels(rows: Iterable[Row]) -> list[str]:
    """The configurations of some rows: the full cache first, then by method and budget."""
    first: dict[str, Row] = {}
    for r in rows:
        first.setdefault(r["label"], r)
    return sorted(first, key=lambda lab: (lab != FULL, first[lab]["method"], budget_order(first[lab]["budget"]), lab))


# ------------------------------------------------------------------------------------------- paired comparisons
def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test of ``wins`` against ``losses`` — the discordant pairs of a paired comparison (one
    side right where the other is wrong; ties and agreements left out): ``min(1, 2 · P(X ≤ min(wins, losses)))`` for
    ``X ~ Binomial(wins + losses, 1/2)``; 1.0 without a discordant pair."""
    if wins < 0 or losses < 0:
        raise ValueError("wins and losses are counts (>= 0)")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2.0 * tail / 2**n)


@dataclass(frozen=True)
class Paired:
    """Two configurations' 0/1 scores on the items both answered (:func:`paired`)."""

    n: int  # items both answered
    both: int  # right under both
    only_a: int  # right under a only
    only_b: int  # right under b only
    score_a: float  # mean score of a over the n items
    score_b: float
    p: float  # exact two-sided sign test on the discordant pairs (only_a vs only_b)


def paired(a: Iterable[Row], b: Iterable[Row], item: Callable[[Row], GroupKey]) -> Paired:
    """Pair the rows of two configurations by ``item`` (the question a row answers) and compare their 0/1 scores on
    the items both answered (an item answered twice by one side counts once: its first row)."""
    first_a: dict[GroupKey, float] = {}
    first_b: dict[GroupKey, float] = {}
    for rows, into in ((a, first_a), (b, first_b)):
        for r in rows:
            if r.get("score") is not None:
                into.setdefault(item(r), float(r["score"]))
    common = [k for k in first_a if k in first_b]
    xa = [first_a[k] >= 0.5 for k in common]
    xb = [first_b[k] >= 0.5 for k in common]
    only_a = sum(x and not y for x, y in zip(xa, xb))
    only_b = sum(y and not x for x, y in zip(xa, xb))
    n = len(common)
    return Paired(
        n=n,
        both=sum(x and y for x, y in zip(xa, xb)),
        only_a=only_a,
        only_b=only_b,
        score_a=sum(xa) / n if n else math.nan,
        score_b=sum(xb) / n if n else math.nan,
        p=sign_test(only_a, only_b),
    )


# --------------------------------------------------------------------------------------------- visual-token rows
def extra(row: Row) -> dict[str, Any]:
    """A row's ``extra`` JSON (measurements without a column of their own) as a dict; {} when absent."""
    value = row.get("extra")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def visual_kept(row: Row) -> float:
    """Visual tokens reaching the language model's last layer relative to the image's visual tokens: an eval row's
    ``context_tokens`` / ``extra.image_tokens``, a bench row's ``extra.kept_tokens`` / ``extra.image_tokens``."""
    e = extra(row)
    image = e.get("image_tokens") or 0
    kept_tokens = e.get("kept_tokens", row.get("context_tokens"))
    return float(kept_tokens) / float(image) if image and kept_tokens is not None else math.nan


def kv_kept(row: Row) -> float:
    """Stored KV entries relative to the unpruned prompt's (:func:`kept`), else bytes relative to bytes."""
    k = kept(row) if row.get("stored_entries") is not None else math.nan
    if math.isnan(k) and row.get("full_kv_bytes"):
        return float(row["kv_bytes"]) / float(row["full_kv_bytes"])
    return k
