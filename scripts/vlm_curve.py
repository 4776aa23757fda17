"""Plot the embedded VLM's validation accuracy against training time, from the evaluation lines of a `train vlm`
log (`--eval-every`): overall with 95 % Wilson intervals and each question type, beside the image-blind prior.

Usage: .venv/bin/python scripts/vlm_curve.py LOG OUT.png [--prior 0.303] [--questions 197]
(LOG: a run's train.log, or docs/bench/vlm_train_eval.jsonl, its evaluation lines)."""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from tokensieve.results.stats import wilson

TYPES = ("attribute", "existence", "counting", "spatial", "reading")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("out")
    ap.add_argument("--prior", type=float, default=None, help="the image-blind prior's accuracy, drawn as a line")
    ap.add_argument("--questions", type=int, default=197, help="questions per evaluation (for the intervals)")
    args = ap.parse_args()
    rows = []
    with open(args.log) as f:
        for line in f:
            if line.startswith("{") and "eval_overall" in line:
                rows.append(json.loads(line))
    if not rows:
        raise SystemExit(f"{args.log} has no evaluation lines (train with --eval-every N)")
    hours = [r["elapsed"] / 3600 for r in rows]
    overall = [r["eval_overall"] for r in rows]
    lo, hi = zip(*(wilson(p * args.questions, args.questions) for p in overall))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.fill_between(hours, [100 * v for v in lo], [100 * v for v in hi], color="k", alpha=0.12, lw=0)
    ax.plot(hours, [100 * v for v in overall], "k-o", lw=2, ms=4, label="overall (95 % Wilson)")
    for t in TYPES:
        ax.plot(hours, [100 * r[f"eval_{t}"] for r in rows], "-", lw=1, marker=".", label=t)
    if args.prior is not None:
        ax.axhline(100 * args.prior, color="grey", ls="--", lw=1, label="image-blind prior")
    for r, h in zip(rows, hours):
        if r["step"] % 1000 == 0:
            ax.annotate(f"step {r['step']}", (h, 2), fontsize=7, color="grey", ha="center")
    ax.set_xlabel("training time (hours, both stages; language steps marked)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
