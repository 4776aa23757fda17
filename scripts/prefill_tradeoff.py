#!/usr/bin/env python3
"""Sparse prefill: accuracy against time to first token, from one results store.

Reads the ``bench`` rows (medians per configuration and length, ratios against the full cache of the same run,
:func:`tokensieve.results.stats.speed`) and the ``eval`` accuracy rows of one prompt length, prints one Markdown table
per benchmark length — TTFT, prefill, prefill attention and its share, compile seconds, peak prefill RSS, TTFT
speed-up against the full cache — with the accuracy (Wilson 95 % interval, samples n, share of the full cache's
accuracy) next to the length the accuracy was measured at, and draws accuracy against TTFT speed-up (one marker per
configuration and benchmark length) as a PNG.

  .venv/bin/python scripts/prefill_tradeoff.py runs/prefill-bench.sqlite --acc-length 2048 \\
      --png docs/figures/prefill_accuracy_ttft.png
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from tokensieve.results.stats import speed, wilson
from tokensieve.results.store import ResultStore

MB = 2**20


def _accuracy(rows: list[dict[str, Any]], length: int, mode: str) -> dict[str, tuple[float, float, float, int]]:
    """label -> (accuracy, Wilson low, Wilson high, n) over every task, depth and seed at ``length`` tokens."""
    scores: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["metric"] == "accuracy" and int(r["length"]) == length and r["mode"] == mode and r["score"] is not None:
            scores[r["label"]].append(float(r["score"]))
    out = {}
    for label, xs in scores.items():
        lo, hi = wilson(sum(xs), len(xs))
        out[label] = (sum(xs) / len(xs), lo, hi, len(xs))
    return out


def _f(x: Any, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store")
    p.add_argument("--acc-length", type=int, default=2048, help="prompt length of the accuracy rows (model tokens)")
    p.add_argument("--mode", default="aware")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--png", default=None, help="write the accuracy / TTFT speed-up plot here")
    args = p.parse_args()
    with ResultStore(args.store, readonly=True) as store:
        bench = [r for r in store.rows("bench") if r["chunk"] is None and int(r["batch"]) == args.batch]
        evals = [r for r in store.rows("eval") if r["chunk"] is None]
        runs = store.runs("bench")
    info = runs[-1]["info"] if runs else {}
    summary = speed(bench, info)
    acc = _accuracy(evals, args.acc_length, args.mode)
    full_acc = acc.get("full", (math.nan, 0.0, 0.0, 0))[0]
    for length in sorted({int(r["length"]) for r in summary}):
        with_acc = length == args.acc_length
        head = ["spec", "TTFT s", "prefill s", "prefill attn s", "attn share", "compile s", "peak prefill RSS MB",
                "× full TTFT"]  # fmt: skip
        if with_acc:
            head += [f"accuracy at {args.acc_length} [95 % Wilson] (n)", "× full accuracy"]
        print(f"\n{length} tokens, batch {args.batch} (medians of {summary[0]['reps']} repetitions)\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in (r for r in summary if int(r["length"]) == length):
            cells = [f"`{r['label']}`", _f(r["ttft_s"], ".2f"), _f(r["prefill_s"], ".2f"),
                     _f(r["prefill_attn_s"], ".2f"), _f(r["prefill_attn_share"], ".0%"), _f(r["compile_s"], ".1f"),
                     _f(r["prefill_peak_rss"] / MB, ".0f"), _f(r.get("ttft_speedup"), ".2f")]  # fmt: skip
            if with_acc:
                a = acc.get(r["label"])
                cells += (
                    [
                        f"{a[0]:.2f} [{a[1]:.2f}–{a[2]:.2f}] ({a[3]})",
                        _f(a[0] / full_acc if full_acc else math.nan, ".2f"),
                    ]
                    if a
                    else ["—", "—"]
                )
            print("| " + " | ".join(cells) + " |")
    if args.png:
        _plot(summary, acc, args, Path(args.png))
        print(f"\nplot: {args.png}")


def _plot(
    summary: list[dict[str, Any]], acc: dict[str, tuple[float, float, float, int]], args: Any, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({int(r["length"]) for r in summary})
    labels = [lab for lab in dict.fromkeys(r["label"] for r in summary) if lab in acc]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    colours = plt.get_cmap("tab10")
    markers = ["o", "s", "^", "D"]
    for i, label in enumerate(labels):
        a, lo, hi = acc[label][:3]
        for j, length in enumerate(lengths):
            row = next((r for r in summary if r["label"] == label and int(r["length"]) == length), None)
            if row is None or row.get("ttft_speedup") is None:
                continue
            ax.errorbar(row["ttft_speedup"], a, yerr=[[a - lo], [hi - a]], fmt=markers[j % len(markers)],
                        color=colours(i % 10), capsize=3, mfc="none" if j == 0 and len(lengths) > 1 else None,
                        label=f"{label} @ {length}")  # fmt: skip
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.axvline(2.0, color="grey", lw=0.8, ls="--")
    if "full" in acc:
        ax.axhline(0.95 * acc["full"][0], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("time-to-first-token speed-up vs the full cache (× full, batch 1)")
    ax.set_ylabel(f"needle accuracy at {args.acc_length} tokens ({args.mode}), 95 % Wilson")
    ax.set_title(
        "Sparse prefill: 2K accuracy vs TTFT speed-up at each bench length (dashed: 2×, 95 % of full)", fontsize=10
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="spec @ bench length")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
