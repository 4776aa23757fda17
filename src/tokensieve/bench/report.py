"""Benchmark summaries as text tables, Markdown and PNG plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

MB = 2**20


def _f(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return format(x, spec)


COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (header, key, format)
    ("configuration", "label", "s"),
    ("ctx", "length", "d"),
    ("bs", "batch", "d"),
    ("prefill s", "prefill_s", ".2f"),
    ("compress %", "compress_share", ".1%"),
    ("TTFT s", "ttft_s", ".2f"),
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


def row_cells(row: dict[str, Any]) -> list[str]:
    row = {
        **row,
        "kv_mb": row["kv_bytes"] / MB,
        "read_mb": row["bytes_read"] / MB,
        "prefill_peak_mb": row["prefill_peak_rss"] / MB,
        "decode_peak_mb": row["decode_peak_rss"] / MB,
    }
    return [_f(row.get(key), fmt) for _, key, fmt in COLUMNS]


def text_table(summary: list[dict[str, Any]]) -> str:
    head = [h for h, _, _ in COLUMNS]
    body = [row_cells(r) for r in summary]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def markdown_table(summary: list[dict[str, Any]]) -> str:
    head = [h for h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in summary]
    return "\n".join(lines)


def describe(info: dict[str, Any]) -> str:
    bw = info.get("bandwidth", 0) / 1e9
    return (
        f"{info.get('cores', '?')} CPU cores ({info.get('cpu', '?')}), {info.get('threads', '?')} torch threads, "
        f"torch {info.get('torch', '?')}, {info.get('memory_gib', '?')} GiB RAM; measured read bandwidth "
        f"{bw:.1f} GB/s; model {info.get('model', '?')} ({info.get('weights_bytes', 0) / MB:.0f} MB of weights, "
        f"read once per decode step); {info.get('decode_tokens', '?')} decoded tokens, medians of "
        f"{info.get('repetitions', '?')} interleaved repetitions; tokensieve {info.get('version', '?')}."
    )


def plots(summary: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Two PNGs: attention time per step against the full cache, and decode speed against KV bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    settings = sorted({(r["length"], r["batch"]) for r in summary})
    labels = sorted({r["label"] for r in summary}, key=lambda s: (s != "full", s))
    index = {(r["label"], r["length"], r["batch"]): r for r in summary}

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(settings) * len(labels) / 3), 4))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        xs, ys = [], []
        for j, s in enumerate(settings):
            r = index.get((label, *s))
            if r is not None:
                xs.append(j + i * width)
                ys.append(r["attn_ms"])
        ax.bar(xs, ys, width=width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))])
    ax.set_xticklabels([f"{n} tok, bs {b}" for n, b in settings])
    ax.set_ylabel("attention ms per decode step (all layers)")
    ax.set_title("Decode attention cost")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p = out_dir / "bench_attention.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    made.append(p)

    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.8), squeeze=False)
    for ax, s in zip(axes[0], settings):
        for label in labels:
            r = index.get((label, *s))
            if r is not None:
                ax.scatter(r["kv_bytes"] / MB, r["tok_s"], label=label, marker="*" if label == "full" else "o")
        ax.set_xlabel("stored KV MB")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"{s[0]} tokens, batch {s[1]}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    p = out_dir / "bench_speed_memory.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    made.append(p)
    return made


def write_markdown(summary: list[dict[str, Any]], info: dict[str, Any], out_dir: Path, command: str = "") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = plots(summary, out_dir)
    lines = ["# Benchmark", ""]
    if command:
        lines += ["Produced by:", "", "```bash", command, "```", ""]
    lines += [describe(info), "", markdown_table(summary), ""]
    lines += [
        "Ratios are against the full cache at the same context length and batch size, measured in the same run. "
        "*speed-up* is decode tokens/s; *ideal speed-up* is what the bytes read per step allow at the measured "
        "bandwidth (weights + KV read, full vs this configuration); *attn ×* is the full cache's attention time "
        "per step divided by this configuration's; *KV ×* is stored KV bytes relative to the full cache; "
        "*compress %* is compression time as a share of the full cache's prefill time; *peak RSS* is the "
        "process's resident memory (model weights included), highest while prefilling and while decoding.",
        "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in pngs]
    path = out_dir / "bench.md"
    path.write_text("\n".join(lines) + "\n")
    return path
