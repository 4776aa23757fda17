"""Report sections built from stored rows: accuracy (``eval`` rows), speed and memory (``bench`` rows), and the two
side by side for every configuration measured by both. Each returns a list of :class:`~.render.Block`."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from . import plots
from .render import Block, cell, fmt, score_text, slug
from .stats import FULL, Row, accuracy, group, interval, mean, ordered_labels, sem, values

MB = 2**20


# ----------------------------------------------------------------------------------------------------- accuracy
def baseline_table(rows: list[Row]) -> Block:
    """Full-cache score per task (rows) and length (columns): mean and 95 % interval (Wilson for proportions)."""
    full = [r for r in rows if r["label"] == FULL]
    lengths = sorted({int(r["length"]) for r in full})
    header = ["task", "metric", *[f"{L} tok" for L in lengths], "samples"]
    body = []
    for task in sorted({r["task"] for r in full}):
        trows = [r for r in full if r["task"] == task]
        metric = trows[0]["metric"]
        cells = []
        for L in lengths:
            s = values([r for r in trows if int(r["length"]) == L], "score")
            cells.append(score_text(metric, mean(s), sem(s), *interval(s)) if s else "—")
        n = group(trows, lambda r: (int(r["length"]),))
        body.append([task, metric, *cells, "/".join(str(len(n.get((L,), []))) for L in lengths)])
    return Block("table", header=header, body=body)


def accuracy_table(rows: list[Row]) -> Block:
    header = ["task", "configuration", "budget", "n", "score", "KL (nats)", "top-1", "answer log-lik", "KV MB",
              "KV kept", "prefill s", "compress s", "decode s"]  # fmt: skip
    body = []
    order = {lab: i for i, lab in enumerate(ordered_labels(rows))}
    groups = group(rows, lambda r: (r["task"], r["label"]))
    for (task, label), grows in sorted(groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])):
        s = accuracy(grows)
        score = score_text(grows[0]["metric"], s.score, s.score_sem, s.score_lo, s.score_hi)
        body.append([task, label, grows[0]["budget"], str(s.n), score,
                     fmt(s.kl, 3), fmt(s.top1), fmt(s.answer_logprob), fmt(s.kv_mb, 1), fmt(s.kept, pct=True),
                     fmt(s.prefill_s), fmt(s.compress_s, 3), fmt(s.decode_s)])  # fmt: skip
    return Block("table", header=header, body=body)


def summary_table(rows: list[Row]) -> Block:
    """The results table ``tokensieve eval`` prints at the end (as lm-eval-harness does): per task, mode and
    configuration, the samples, the task's metric (mean and standard error), KL to the full cache and KV kept."""
    header = ["task", "mode", "method", "budget", "n", "metric", "value", "± stderr", "95 % CI", "KL", "KV kept"]
    order = {lab: i for i, lab in enumerate(ordered_labels(rows))}
    groups = group(rows, lambda r: (r["task"], r["mode"], r["label"]))
    body = []
    for (task, mode, _label), grows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order[kv[0][2]])):
        s = accuracy(grows)
        metric = grows[0]["metric"]
        err = "" if metric == "perplexity" or math.isnan(s.score_sem) else f"{s.score_sem:.3f}"
        ci = "" if metric == "perplexity" or math.isnan(s.score_lo) else f"{s.score_lo:.2f}–{s.score_hi:.2f}"
        body.append([task, mode, grows[0]["method"], grows[0]["budget"], str(s.n), metric,
                     fmt(s.score, 2 if metric == "perplexity" else 3), err, ci, fmt(s.kl, 3),
                     fmt(s.kept, pct=True)])  # fmt: skip
    return Block("table", header=header, body=body)


def provenance(rows: list[Row], runs: list[Row], store_name: str) -> list[Block]:
    """What the accuracy rows are (models, versions, threads, dates, time spent) and the commands that filled the
    store."""
    blocks: list[Block] = []
    commands = list(dict.fromkeys(r["command"] for r in runs if r.get("command")))
    if not rows:
        return [Block("p", "Produced by:"), Block("code", "\n".join(commands))] if commands else []
    models = sorted({r["model"] for r in rows})
    versions = sorted({r["version"] for r in rows})
    threads = sorted({int(r["threads"]) for r in rows if r.get("threads")})
    day = time.strftime("%Y-%m-%d", time.gmtime(min(r["created"] for r in rows)))
    compute = sum(values(rows, "cell_s"))
    blocks += [
        Block(
            "p",
            f"{len(rows)} accuracy measurements from `{store_name}`; model {', '.join(models)}; tokensieve "
            f"{', '.join(versions)}; {', '.join(map(str, threads)) or '?'} CPU thread(s); measured from {day}, "
            f"{compute / 60:.0f} min of measuring in total. Accuracy is the share of expected answers found "
            "(perplexity for the ppl task); KL and top-1 compare each cell's next-token distributions with the full "
            "cache's over a teacher-forced continuation (the full cache's own answer); KV kept = stored entries / "
            "full-cache entries of the same prompt; times are medians and come from a shared machine.",
        )
    ]
    if commands:
        blocks += [Block("p", "Produced by:"), Block("code", "\n".join(commands))]
    return blocks


def accuracy_sections(rows: list[Row], out: Path) -> list[Block]:
    """Per mode: the full-cache baseline, accuracy vs KV kept, needle accuracy by depth (and length), accuracy vs
    prompt length, and the table of accuracy, fidelity and cost."""
    blocks: list[Block] = []
    modes = sorted({r["mode"] for r in rows})
    for mode in modes:
        mrows = [r for r in rows if r["mode"] == mode]
        suffix = f" — {mode}" if len(modes) > 1 else f" ({mode})"
        blocks += [Block("h2", "Full-cache baseline" + suffix), baseline_table(mrows)]
        path = out / f"pareto_{mode}.png"
        if plots.pareto(mrows, mode, path):
            blocks += [Block("h2", "Accuracy vs KV budget" + suffix), Block("image", "accuracy vs KV kept", path=path)]
        needle_rows = [r for r in mrows if r.get("depth") is not None]
        if needle_rows:
            labels = ordered_labels(needle_rows)
            if len({r["length"] for r in needle_rows}) == 1:  # one length: one matrix instead of a map per label
                p = out / f"needles_{mode}.png"
                if plots.depth_matrix(needle_rows, labels, mode, p):
                    blocks.append(Block("h2", "Needle accuracy by depth" + suffix))
                    blocks.append(Block("image", "needle depths", path=p))
                labels = []
            else:
                blocks.append(Block("h2", "Needle heatmaps, depth × length" + suffix))
            for label in labels:
                p = out / f"heatmap_{mode}_{slug(label)}.png"
                if plots.heatmaps([r for r in needle_rows if r["label"] == label], mode, label, p):
                    blocks.append(Block("image", f"needle heatmap {label}", path=p))
        path = out / f"lengths_{mode}.png"
        if plots.lengths(mrows, mode, path):
            blocks.append(Block("h2", "Accuracy vs prompt length" + suffix))
            blocks.append(Block("image", "accuracy vs length", path=path))
        blocks += [
            Block("h2", "Accuracy, fidelity and cost" + suffix),
            Block("p", "Means over lengths, depths and seeds (score ± standard error); times are medians."),
            accuracy_table(mrows),
        ]
    return blocks


# -------------------------------------------------------------------------------------------------------- speed
SPEED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (header, key, format)
    ("configuration", "label", "s"),
    ("ctx", "length", "d"),
    ("bs", "batch", "d"),
    ("prefill s", "prefill_s", ".2f"),
    ("compress %", "compress_share", ".1%"),
    ("TTFT s", "ttft_s", ".2f"),
    ("TTFT ×", "ttft_speedup", ".2f"),
    ("prefill attn s", "prefill_attn_s", ".2f"),
    ("attn % of prefill", "prefill_attn_share", ".0%"),
    ("compile s", "compile_s", ".1f"),
    ("decode tok/s", "tok_s", ".1f"),
    ("speed-up", "speedup", ".2f"),
    ("ideal speed-up", "ideal_speedup", ".2f"),
    ("attn ms/step", "attn_ms", ".1f"),
    ("attn ×", "attn_ratio", ".2f"),
    ("KV MB", "kv_mb", ".1f"),
    ("KV ×", "kv_ratio", ".3f"),
    ("read MB/step", "read_mb", ".1f"),
    ("peak RSS MB prefill", "prefill_peak_mb", ".0f"),
    ("peak RSS MB decode", "decode_peak_mb", ".0f"),
)

SPEED_NOTE = (
    "Ratios are against the full cache at the same context length and batch size, measured in the same run. "
    "*speed-up* is decode tokens/s; *ideal speed-up* is what the bytes read per step allow at the measured "
    "bandwidth (weights + KV read, full vs this configuration); *attn ×* is the full cache's attention time "
    "per step divided by this configuration's; *KV ×* is stored KV bytes relative to the full cache; "
    "*compress %* is compression time as a share of the full cache's prefill time; *TTFT ×* is the full cache's "
    "time to first token divided by this configuration's; *prefill attn s* is the wall time inside the prefill's "
    "attention calls (causal or sparse, summed over layers) and *attn % of prefill* its share of this "
    "configuration's prefill; *compile s* is FlexAttention compilation inside a timed prefill, the largest over "
    "repetitions (0 unless a prefill needed a graph the warm-up did not compile; the warm-up's own compile time is in "
    "the machine line); *peak RSS* is the "
    "process's resident memory (model weights included), highest while prefilling and while decoding."
)


def speed_cells(row: Row) -> list[str]:
    row = {
        **row,
        "kv_mb": row["kv_bytes"] / MB,
        "read_mb": row["bytes_read"] / MB,
        "prefill_peak_mb": row["prefill_peak_rss"] / MB,
        "decode_peak_mb": row["decode_peak_rss"] / MB,
    }
    return [cell(row.get(key), spec) for _, key, spec in SPEED_COLUMNS]


def speed_table(summary: list[Row]) -> Block:
    return Block("table", header=[h for h, _, _ in SPEED_COLUMNS], body=[speed_cells(r) for r in summary])


def machine(info: dict[str, Any]) -> str:
    bw = info.get("bandwidth", 0) / 1e9
    return (
        f"{info.get('cores', '?')} CPU cores ({info.get('cpu', '?')}), {info.get('threads', '?')} torch threads, "
        f"torch {info.get('torch', '?')}, {info.get('memory_gib', '?')} GiB RAM; measured read bandwidth "
        f"{bw:.1f} GB/s; model {info.get('model', '?')} ({info.get('weights_bytes', 0) / MB:.0f} MB of weights, "
        f"read once per decode step); {info.get('decode_tokens', '?')} decoded tokens, medians of "
        f"{info.get('repetitions', '?')} interleaved repetitions; tokensieve {info.get('version', '?')}."
        + (
            f" FlexAttention compiled in the warm-up: {info['warmup_compile_s']:.1f} s."
            if info.get("warmup_compile_s")
            else ""
        )
    )


def speed_sections(summary: list[Row], info: dict[str, Any], out: Path, *, heading: str | None = None) -> list[Block]:
    """The machine, the table of every configuration, length and batch size, what the columns mean, two plots."""
    blocks = [Block("h2", heading)] if heading else []
    blocks += [Block("p", machine(info)), speed_table(summary), Block("p", SPEED_NOTE)]
    blocks += [Block("image", p.stem, path=p) for p in plots.speed(summary, out)]
    return blocks


# ------------------------------------------------------------------------------------------------------- joined
def joined_sections(eval_rows: list[Row], summary: list[Row]) -> list[Block]:
    """Accuracy and speed side by side, one table per (context length, batch size) of the benchmark, for every
    configuration (label) with both accuracy rows and speed rows."""
    both = {r["label"] for r in eval_rows} & {r["label"] for r in summary}
    if not both:
        return []
    acc_rows = [r for r in eval_rows if r["label"] in both and r["metric"] == "accuracy"]
    modes = sorted({r["mode"] for r in acc_rows})
    by = group(acc_rows, lambda r: (r["label"], r["mode"]))
    fid = group([r for r in eval_rows if r["label"] in both], lambda r: (r["label"], r["mode"]))
    tasks = sorted({r["task"] for r in acc_rows})
    lengths = sorted({int(r["length"]) for r in acc_rows})
    counts = sorted({len([r for r in acc_rows if r["label"] == lab]) for lab in both})
    samples = "/".join(map(str, counts)) if counts else "0"
    suffix = (lambda m: f" ({m})") if len(modes) > 1 else (lambda m: "")
    header = ["configuration", "TTFT s", "TTFT ×", "prefill attn s", "decode tok/s", "speed-up", "attn ×", "KV MB",
              "KV ×", "peak RSS MB decode"]  # fmt: skip
    header += [f"accuracy{suffix(m)}" for m in modes] + [f"KL{suffix(m)}" for m in modes]
    order = {lab: i for i, lab in enumerate(ordered_labels(eval_rows))}
    blocks = [
        Block("h2", "Accuracy and speed, side by side"),
        Block(
            "p",
            f"Every configuration measured by both `tokensieve eval` and `tokensieve bench` in this store "
            f"({len(both)} of them). Accuracy is the mean score over {', '.join(tasks) or 'no accuracy task'} at "
            f"{', '.join(map(str, lengths)) or '—'} tokens ({samples} samples per configuration); KL (nats) is the "
            "mean over the teacher-forced continuation; speed columns are the benchmark's medians at each context "
            "length and batch size, against the full cache of the same run.",
        ),
    ]
    index = {(r["label"], r["length"], r["batch"]): r for r in summary}
    for length, batch in sorted({(r["length"], r["batch"]) for r in summary}):
        body = []
        for label in sorted(both, key=lambda lab: order.get(lab, math.inf)):
            s = index.get((label, length, batch))
            if s is None:
                continue
            row = [label, cell(s.get("ttft_s"), ".2f"), cell(s.get("ttft_speedup"), ".2f"),
                   cell(s.get("prefill_attn_s"), ".2f"),
                   cell(s.get("tok_s"), ".1f"), cell(s.get("speedup"), ".2f"), cell(s.get("attn_ratio"), ".2f"),
                   cell(s["kv_bytes"] / MB, ".1f"), cell(s.get("kv_ratio"), ".3f"),
                   cell(s["decode_peak_rss"] / MB, ".0f")]  # fmt: skip
            row += [fmt(accuracy(by.get((label, m), [])).score) for m in modes]
            row += [fmt(accuracy(fid.get((label, m), [])).kl, 3) for m in modes]
            body.append(row)
        if body:
            blocks += [Block("h3", f"{length} tokens, batch {batch}"), Block("table", header=header, body=body)]
    return blocks


__all__ = [
    "SPEED_COLUMNS",
    "accuracy_sections",
    "accuracy_table",
    "baseline_table",
    "joined_sections",
    "machine",
    "provenance",
    "speed_cells",
    "speed_sections",
    "speed_table",
]
