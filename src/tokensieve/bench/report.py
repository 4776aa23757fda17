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
    """Two PNGs: the attention speed-up per decode step against the full cache, and decode speed against KV bytes.

    One panel per (context length, batch size); each configuration keeps its colour across panels and plots.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    lengths = sorted({r["length"] for r in summary})
    batches = sorted({r["batch"] for r in summary})
    labels = sorted({r["label"] for r in summary}, key=lambda s: (s != "full", s))
    index = {(r["label"], r["length"], r["batch"]): r for r in summary}
    cmap = plt.get_cmap("tab20" if len(labels) > 10 else "tab10")
    colour = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}

    def panels(width: float, height: float) -> tuple[Any, Any]:
        fig, axes = plt.subplots(
            len(batches), len(lengths), figsize=(width * len(lengths), height * len(batches)), squeeze=False
        )
        return fig, axes

    fig, axes = panels(4.6, 0.28 * len(labels) + 1.2)
    for bi, batch in enumerate(batches):
        for li, length in enumerate(lengths):
            ax = axes[bi][li]
            shown = [(label, index[(label, length, batch)]) for label in labels if (label, length, batch) in index]
            ys = list(range(len(shown)))[::-1]
            ratios = [float(r.get("attn_ratio") or 0.0) for _, r in shown]
            ratios = [x if math.isfinite(x) else 0.0 for x in ratios]
            ax.barh(ys, ratios, color=[colour[label] for label, _ in shown])
            for y, ratio in zip(ys, ratios):
                ax.text(ratio, y, f" {ratio:.2f}x", va="center", fontsize=7)
            ax.axvline(1.0, color="black", lw=0.8)
            ax.set_yticks(ys)
            ax.set_yticklabels([label for label, _ in shown] if li == 0 else [], fontsize=7)
            ax.set_xlim(0, max([*ratios, 1.0]) * 1.25)
            ax.set_title(f"{length} tokens, batch {batch}", fontsize=9)
            if bi == len(batches) - 1:
                ax.set_xlabel("attention speed-up per decode step (full = 1)", fontsize=8)
            ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Decode attention cost against the full cache, same run")
    fig.tight_layout()
    p = out_dir / "bench_attention.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(p)

    fig, axes = panels(4.0, 3.4)
    for bi, batch in enumerate(batches):
        for li, length in enumerate(lengths):
            ax = axes[bi][li]
            for label in labels:
                r = index.get((label, length, batch))
                if r is not None:
                    ax.scatter(
                        r["kv_bytes"] / MB,
                        r["tok_s"],
                        color=colour[label],
                        label=label,
                        marker="*" if label == "full" else "o",
                        s=90 if label == "full" else 30,
                    )
            ax.set_xlabel("stored KV MB", fontsize=8)
            ax.set_ylabel("decode tokens/s", fontsize=8)
            ax.set_title(f"{length} tokens, batch {batch}", fontsize=9)
            ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=7)
    fig.suptitle("Decode speed against stored KV bytes")
    fig.tight_layout(rect=(0, 0.04 + 0.025 * ((len(names) + 3) // 4), 1, 1))
    p = out_dir / "bench_speed_memory.png"
    fig.savefig(p, dpi=110)
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
