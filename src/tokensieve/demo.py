"""The main job: one long-context question answered with several methods, side by side."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from .adapters.models import load_model, model_shape
from .core.budget import Budget
from .data.tasks import get_task
from .engine import compress
from .errors import ConfigError, PromptError, TokensieveWarning
from .spec import Spec

DECODE_TOKENS = 24  # fixed number of decode steps, so decode speed is measured on the same work for every method


@dataclass
class DemoRow:
    method: str
    budget: str
    answer: str
    correct: bool
    kv_mb: float
    kept: float  # stored entries / full-cache entries
    prefill_s: float
    decode_tok_s: float


def run_demo(
    *,
    model_name: str,
    methods: Sequence[str | Spec],
    budget: str,
    length: int,
    depth: float,
    seed: int,
    agnostic: bool = False,
    out: Any = None,
    progress: bool = False,
) -> list[DemoRow]:
    """Answer one passkey question with each spec (a spec without a budget gets ``budget``), full cache first.

    ``progress``: a bar on stderr, one step per spec. The table goes to ``out`` (default stdout).
    """
    out = out or sys.stdout
    if not methods:
        raise ConfigError("Give at least one method.")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= float(depth) <= 1.0:
        raise ConfigError(f"The needle depth must be in [0, 1] (0 = start, 1 = end of the context); got {depth!r}.")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ConfigError(f"The prompt length must be a whole number of tokens >= 1; got {length!r}.")
    b = Budget.parse(budget)  # fail on a bad spec or budget before loading anything
    specs = list(dict.fromkeys(Spec.parse(m).with_budget(b) for m in methods))
    specs = [Spec(), *[s for s in specs if not s.is_full]]  # the full cache first: the reference for `kept`
    model, tok = load_model(model_name)
    limit = model_shape(model).max_positions
    if limit and length + DECODE_TOKENS > limit:  # before the prompt is built or anything allocated
        raise PromptError(
            f"A prompt of {length} tokens plus the {DECODE_TOKENS} answer tokens exceeds the model's context of "
            f"{limit} tokens: use --length {limit - DECODE_TOKENS} or less."
        )
    task = get_task("passkey")
    sample = task.make(tok, length, depth, seed)
    prompt = sample.ids(tok)
    ids = torch.tensor([prompt.full])
    n = ids.shape[1]
    setting = (
        f"query-agnostic: the {len(prompt.context)}-token context is compressed before the question is seen"
        if agnostic
        else "query-aware: the whole prompt, question included, is compressed"
    )
    print(
        f"Passkey question in a {n}-token prompt (needle at depth {depth:.0%}, expected answer {sample.answers[0]}); "
        f"{setting}; model {model_name}, {torch.get_num_threads()} CPU threads.",
        file=out,
    )
    compressed = len(prompt.context) if agnostic else n
    for spec in specs:
        for note in budget_notes(spec, compressed):
            warnings.warn(note, TokensieveWarning, stacklevel=2)
    rows: list[DemoRow] = []
    full_entries = None
    bar = tqdm(specs, desc="demo", unit="method", file=sys.stderr, disable=not progress, leave=False)
    for spec in bar:
        bar.set_postfix_str(spec.label)
        reserve = DECODE_TOKENS + (len(prompt.question) if agnostic else 0)
        press = compress(model, reserve=reserve, **spec.compressor_kwargs())
        if agnostic:
            ctx = press.prefill(torch.tensor([prompt.context]))
            press.extend(ctx, torch.tensor([prompt.question]))
        else:
            ctx = press.prefill(ids)
        gen = press.decode(ctx, DECODE_TOKENS)  # fixed work: do not stop at EOS
        toks = gen.tokens[0]
        if tok.eos_token_id in toks:
            toks = toks[: toks.index(tok.eos_token_id)]
        answer = " ".join(tok.decode(toks, skip_special_tokens=True).split())
        entries = ctx.cache.stored_entries()
        if full_entries is None:
            full_entries = entries
        rows.append(
            DemoRow(
                method=spec.family,
                budget=spec.budget_text,
                answer=answer,
                correct=task.score(sample, answer) == 1.0,
                kv_mb=ctx.cache.kv_bytes() / 2**20,
                kept=entries / full_entries,
                prefill_s=ctx.prefill_seconds,
                decode_tok_s=gen.tokens_per_second,
            )
        )
    bar.close()
    print(format_table(rows), file=out)
    print(
        "KV MB counts the stored keys and values after decoding; kept = stored entries relative to the full cache.",
        file=out,
    )
    return rows


TINY_TOKENS = 16  # a budget keeping fewer tokens of a longer prompt is worth a warning
TINY_SHARE = 0.02  # … or less than this share of it


def budget_notes(spec: Spec, n: int) -> list[str]:
    """Warnings for the budgets of ``spec`` that keep very little of an ``n``-token prompt (``--budget 1`` is one
    token per layer and KV head, not the whole prompt); empty when every budget keeps a sensible share."""
    notes = []
    for budget, what in ((spec.budget, "the prefill"), (spec.decode_budget, "the decode method")):
        if budget is None or (spec.is_full and what == "the prefill"):
            continue
        kept = budget.tokens_for(n, larger="keep")
        if kept >= n or (kept >= TINY_TOKENS and kept >= TINY_SHARE * n):
            continue
        hint = (
            f" (a budget of {int(budget.value)} is a token count; a share of the prompt is written 0.25 or 25%)"
            if budget.kind == "tokens"
            else ""
        )
        notes.append(
            f"{spec.label}: {what} budget keeps {kept} of the {n} prompt tokens per layer and KV head "
            f"({kept / n:.1%}){hint}."
        )
    return notes


def format_table(rows: list[DemoRow]) -> str:
    head = ["method", "budget", "answer", "ok", "KV MB", "kept", "prefill s", "decode tok/s"]
    body = [
        [
            r.method,
            r.budget,
            (r.answer[:40] + "…") if len(r.answer) > 40 else r.answer,
            "yes" if r.correct else "no",
            f"{r.kv_mb:.2f}",
            f"{r.kept:.0%}",
            f"{r.prefill_s:.2f}",
            f"{r.decode_tok_s:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
