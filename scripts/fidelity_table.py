#!/usr/bin/env python3
"""Natural-text fidelity from tokensieve results stores, one Markdown table per budget.

For each configuration (the store's method and budget) of the given tasks (default ``prose``: held-out prose, see
``tokensieve eval --list-tasks``): the number of samples, the mean KL(full ‖ method) over the teacher-forced
continuation with a 95 % interval (mean ± 1.96 standard errors over samples), the mean top-1 agreement with the full
model, and the measured density (stored entries / full cache). Then the configurations in order of mean KL, each
against the next one on the same samples: how many samples each has the lower KL on (ties dropped) and the exact
two-sided sign test, which separates neighbours whose intervals overlap.

  .venv/bin/python scripts/fidelity_table.py runs/learned.sqlite --budgets 0.25,0.1
  .venv/bin/python scripts/fidelity_table.py runs/spkv-attention.sqlite runs/spkv-kvzip.sqlite --budgets 0.25

Several stores: rows are labelled ``store:method`` (e.g. gates trained two ways, evaluated into two stores).
"""

from __future__ import annotations

import argparse
import math
import sqlite3
from collections import defaultdict
from pathlib import Path


def sign_test(b: int, c: int) -> float:
    """Exact two-sided sign test (binomial, p = 1/2) of ``b`` wins against ``c``."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def ratio_of(text: str) -> float | None:
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else None
    except ValueError:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stores", nargs="+")
    p.add_argument("--tasks", default="prose", help="tasks whose KL / top-1 are pooled (comma-separated)")
    p.add_argument("--budgets", default="0.25,0.1", help="ratios as stored")
    p.add_argument("--mode", default="agnostic")
    args = p.parse_args()
    tasks = {t for t in args.tasks.split(",") if t}
    budgets = [float(b) for b in args.budgets.split(",") if b]
    kl: dict[tuple[str, float], dict[tuple[object, ...], float]] = defaultdict(dict)
    top1: dict[tuple[str, float], list[float]] = defaultdict(list)
    dens: dict[tuple[str, float], list[float]] = defaultdict(list)
    for store in args.stores:
        tag = f"{Path(store).stem}:" if len(args.stores) > 1 else ""
        con = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
        q = (
            "SELECT label, budget, json_extract(config, '$.mode'), task, length, depth, seed, kl, top1, "
            "CAST(stored_entries AS REAL) / full_entries FROM eval WHERE kl IS NOT NULL"
        )
        for label, budget, mode, task, length, depth, seed, k, t1, share in con.execute(q):
            if task not in tasks or mode != args.mode or str(label) == "full":
                continue
            r = ratio_of(str(budget))
            if r is None:
                continue
            key = (f"{tag}{label}", r)
            kl[key][(task, length, depth, seed)] = float(k)
            if t1 is not None:
                top1[key].append(float(t1))
            if share is not None:
                dens[key].append(float(share))
    for b in budgets:
        rows = sorted((k for k in kl if abs(k[1] - b) < 1e-9), key=lambda k: sum(kl[k].values()) / len(kl[k]))
        if not rows:
            continue
        print(f"\n### {', '.join(sorted(tasks))}, {args.mode}, budget {b:g}\n")
        print("| configuration | n | KL (nats) [95 %] | top-1 | density |")
        print("|---|---:|---|---:|---:|")
        for k in rows:
            xs = list(kl[k].values())
            m = sum(xs) / len(xs)
            sd = (sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)) ** 0.5
            h = 1.96 * sd / len(xs) ** 0.5
            t1 = sum(top1[k]) / len(top1[k]) if top1[k] else float("nan")
            d = sum(dens[k]) / len(dens[k]) if dens[k] else float("nan")
            print(f"| `{k[0]}` | {len(xs)} | {m:.3f} [{m - h:.3f}, {m + h:.3f}] | {t1:.3f} | {d:.3f} |")
        print("\nEach against the next (same samples; wins = lower KL):\n")
        print("| configuration | next | wins | losses | sign test p |")
        print("|---|---|---:|---:|---:|")
        for a, c in zip(rows, rows[1:]):
            common = set(kl[a]) & set(kl[c])
            wins = sum(1 for s in common if kl[a][s] < kl[c][s])
            losses = sum(1 for s in common if kl[a][s] > kl[c][s])
            print(f"| `{a[0]}` | `{c[0]}` | {wins} | {losses} | {sign_test(wins, losses):.3g} |")


if __name__ == "__main__":
    main()
