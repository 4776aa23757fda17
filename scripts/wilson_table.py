#!/usr/bin/env python3
"""Accuracy with Wilson 95 % intervals from a tokensieve results store, one Markdown table.

Rows are configurations (the store's method and budget), columns the modes × budgets asked for; each cell is
``mean [lo, hi] (n)`` over every sample stored for it (all tasks, lengths, depths and seeds of the filter). A score
in [0, 1] that is not 0/1 (a multi-answer task's share) counts as that many successes, which keeps the interval an
approximation for such tasks; the needle tasks used here score 0 or 1.

  .venv/bin/python scripts/wilson_table.py runs/screen36.sqlite --budgets 0.1,0.25,0.5 --modes agnostic,aware
  .venv/bin/python scripts/wilson_table.py runs/screen36.sqlite --budgets 0.1 --modes agnostic --tasks niah_single

``--paired MODE:BUDGET`` (e.g. ``agnostic:0.1``) adds, for that column, the methods in order of accuracy with a paired
comparison of each with the next one: every method of a screen answers the same samples, so the samples only one of
the two answers (b and c) decide between them — an exact two-sided sign test (McNemar's exact test) on b and c, which
separates neighbours whose independent intervals overlap.
"""

from __future__ import annotations

import argparse
import math
import sqlite3
from collections import defaultdict

from tokensieve.results.stats import wilson


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store")
    p.add_argument("--budgets", default="0.1,0.25,0.5", help="ratios as stored (the full cache is always shown)")
    p.add_argument("--modes", default="agnostic,aware")
    p.add_argument("--tasks", default="", help="only these tasks (default: all in the store)")
    p.add_argument("--min-n", type=int, default=1, help="leave out cells with fewer samples")
    p.add_argument("--paired", action="append", default=[], metavar="MODE:BUDGET",
                   help="paired comparisons of neighbours in that column (repeatable), e.g. agnostic:0.1")  # fmt: skip
    p.add_argument("--kl", type=float, default=None, metavar="BUDGET",
                   help="add each mode's mean KL to the full cache (nats) and the KV kept at this budget")  # fmt: skip
    args = p.parse_args()
    budgets = [float(b) for b in args.budgets.split(",") if b]
    modes = [m for m in args.modes.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]

    con = sqlite3.connect(f"file:{args.store}?mode=ro", uri=True)
    q = (
        "SELECT method, budget, json_extract(config, '$.mode'), json_extract(config, '$.task'), score, length, depth, "
        "seed, kl, CAST(stored_entries AS REAL) / full_entries FROM eval"
    )
    kls: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    kept: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    cells: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    full: dict[str, list[float]] = defaultdict(list)
    per_sample: dict[tuple[str, str, str], dict[tuple[object, ...], float]] = defaultdict(dict)
    for method, budget, mode, task, score, length, depth, seed, kl, share in con.execute(q):
        if score is None or (tasks and task not in tasks):
            continue
        if method == "full":
            full[mode].append(float(score))
            continue
        cells[(method, str(budget), mode)].append(float(score))
        if kl is not None:
            kls[(method, str(budget), mode)].append(float(kl))
        if share is not None:
            kept[(method, str(budget), mode)].append(float(share))
        per_sample[(method, str(budget), mode)][(task, length, depth, seed)] = float(score)

    def budget_of(text: str) -> float | None:
        """The store's budget column: ``25%`` (a ratio) or a token count."""
        try:
            return float(text[:-1]) / 100 if text.endswith("%") else None
        except ValueError:
            return None

    def same_budget(text: str, b: float) -> bool:
        r = budget_of(text)
        return r is not None and abs(r - b) < 1e-9

    cols = [(m, b) for m in modes for b in budgets]
    methods = sorted({k[0] for k in cells})

    def fmt(xs: list[float]) -> str:
        if len(xs) < args.min_n:
            return "—"
        lo, hi = wilson(sum(xs), len(xs))
        return f"{sum(xs) / len(xs):.2f} [{lo:.2f}, {hi:.2f}] ({len(xs)})"

    def at(table: dict[tuple[str, str, str], list[float]], m: str, mode: str, b: float) -> list[float]:
        """Every value of method ``m`` in ``mode`` at the ratio budget ``b``."""
        return [x for (mm, bb, md), v in table.items() if mm == m and md == mode and same_budget(bb, b) for x in v]

    def extra(m: str) -> list[str]:
        """The ``--kl`` cells of method ``m``: mean KL per mode and the KV kept, at that budget."""
        if args.kl is None:
            return []
        if m == "full":
            return ["0"] * len(modes) + ["100 %"]
        cells = []
        for mode in modes:
            v = at(kls, m, mode, args.kl)
            cells.append(f"{sum(v) / len(v):.3f}" if v else "—")
        share = at(kept, m, modes[0], args.kl)
        return [*cells, f"{100 * sum(share) / len(share):.0f} %" if share else "—"]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    head = ["method"] + [f"{m} {1 - b:.0%} compression" for m, b in cols]
    if args.kl is not None:
        head += [f"KL {mode} {1 - args.kl:.0%}" for mode in modes] + [f"KV kept ({modes[0]})"]
    print(line(head))
    print("|---" * len(head) + "|")
    all_full = full.get("agnostic", []) or [x for xs in full.values() for x in xs]
    print(line(["full cache"] + [fmt(all_full) for _ in cols] + extra("full")))
    rows = []
    for m in methods:
        vals = [at(cells, m, mode, b) for mode, b in cols]
        if any(len(v) >= args.min_n for v in vals):
            rows.append((m, vals))
    rows.sort(key=lambda r: -sum(sum(v) / len(v) for v in r[1] if v))
    for m, vals in rows:
        print(line([m] + [fmt(v) for v in vals] + extra(m)))
    for spec in args.paired:
        mode, _, b = spec.partition(":")
        column = {m: scores for (m, bb, md), scores in per_sample.items()
                  if md == mode and same_budget(bb, float(b))}  # fmt: skip
        paired_table(mode, float(b), column, args.min_n)


def sign_test(b: int, c: int) -> float:
    """Exact two-sided p-value of b successes against c under p = 1/2 (McNemar's exact test)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_table(mode: str, budget: float, column: dict[str, dict[tuple[object, ...], float]], min_n: int) -> None:
    """Methods of one column by accuracy, each compared with the next on the samples both answered."""
    ranked = sorted(
        ((m, s) for m, s in column.items() if len(s) >= min_n), key=lambda ms: -sum(ms[1].values()) / len(ms[1])
    )
    print(f"\n{mode}, {1 - budget:.0%} compression: each method against the next one (paired, same samples)\n")
    print("| method | accuracy (n) | vs next | only this / only next | p (exact sign test) |")
    print("|---|---|---|---|---|")
    for i, (m, s) in enumerate(ranked):
        acc = f"{sum(s.values()) / len(s):.2f} ({len(s)})"
        if i + 1 == len(ranked):
            print(f"| {m} | {acc} | — | — | — |")
            continue
        nxt, t = ranked[i + 1]
        common = s.keys() & t.keys()
        b = sum(1 for k in common if s[k] >= 0.5 > t[k])
        c = sum(1 for k in common if t[k] >= 0.5 > s[k])
        print(f"| {m} | {acc} | {nxt} | {b} / {c} | {sign_test(b, c):.3f} |")


if __name__ == "__main__":
    main()
