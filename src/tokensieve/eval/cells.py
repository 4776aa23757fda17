"""One cell of an evaluation grid: prefill a sample's prompt with the cell's spec, decode its answer, and measure
what the compression kept against the full-cache reference (KL, top-1 agreement, log-likelihood of the answer).

The runner (:mod:`.runner`) measures cells in this process, the Ray backend (:mod:`.ray_backend`) on actors; both call
:func:`measure`. Shared prefill (``EvalConfig.shared_prefill``): the forward pass over a prompt is the same for every
method that attends densely at prefill, so :class:`SharedPrefill` records it once per prompt and replays it into each
cell's cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..data.prompts import PromptIds
from ..data.tasks import Sample
from ..engine import CachedContext, Compressor, PrefillRecord, compress
from ..spec import Spec
from .config import Cell
from .metrics import fidelity, log_probs, perplexity, token_logprobs


@dataclass
class Reference:
    """The full-cache model's continuation of one sample and its next-token log-probabilities ``(N, V)``."""

    ids: list[int]
    logp: Tensor
    kv_bytes: int
    entries: int


@dataclass
class _Prepared:
    sample: Sample
    prompt: PromptIds
    target: list[int]


SHARED_PREFILL_MAX_BYTES = 2 << 30  # a recording holds every layer's queries, keys and values


class SharedPrefill:
    """The recorded prefills of the sample being measured (its context and its whole prompt), made on first use."""

    def __init__(self, max_bytes: int = SHARED_PREFILL_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.sample: Any = None
        self.records: dict[tuple[int, ...], PrefillRecord] = {}
        self.recorded = 0  # forward passes recorded
        self.replayed = 0  # prefills served from a recording

    def get(self, press: Compressor, sample: Any, ids: list[int]) -> PrefillRecord | None:
        """The recording of ``ids`` for ``press`` to replay, or None when it must prefill itself."""
        if press.replay_refusal() is not None:
            return None
        if sample != self.sample:  # one sample at a time: the previous one's recordings are dropped
            self.sample, self.records = sample, {}
        key = tuple(ids)
        if key not in self.records:
            if self._estimate(press, len(ids)) > self.max_bytes:
                return None
            self.records[key] = press.record_prefill(torch.tensor([ids]))
            self.recorded += 1
        self.replayed += 1
        return self.records[key]

    @staticmethod
    def _estimate(press: Compressor, n: int) -> int:
        sh = press.shape
        itemsize = torch.empty((), dtype=press.model.dtype).element_size()
        per_token = sh.head_dim * (sh.num_q_heads + 2 * sh.num_kv_heads) + sh.hidden_size  # q, k, v, hidden state
        return sh.num_layers * n * per_token * itemsize


def teacher_force(press: Compressor, ctx: CachedContext, targets: list[int], *, stepwise: bool = False) -> Tensor:
    """``(N, V)`` log-probabilities predicting each of ``targets`` after the context (modifies ``ctx``).

    ``stepwise``: feed the targets one token per forward pass, as decoding does (needed when a decode-time method
    acts on every step); otherwise one forward pass over the whole chunk.
    """
    first = ctx.logits[0]  # (V,) predicts targets[0]
    if len(targets) == 1:
        return log_probs(first[None])
    if stepwise:
        rows = [first]
        for t in targets[:-1]:
            out = press.extend(ctx, torch.tensor([[t]]), return_logits=True)
            assert out is not None
            rows.append(out[0, -1])
        return log_probs(torch.stack(rows))  # (N, V)
    logits = press.extend(ctx, torch.tensor([targets]), return_logits=True)
    assert logits is not None
    return log_probs(torch.cat([first[None], logits[0, :-1]], dim=0))  # (N, V)


def make_press(model: Any, spec: Spec, *, reserve: int = 0, chunk: int | None = None) -> Compressor:
    """A Compressor for a resolved spec: its prefill method and budget, and its decode method if any; ``chunk``:
    its prefills run in chunks of that many tokens (refused, with the reason, for a method that cannot)."""
    return compress(model, reserve=reserve, chunk=chunk, **spec.compressor_kwargs())


def measure(
    model: Any,
    tokenizer: Any,
    cell: Cell,
    prep: _Prepared,
    reference: Reference | None,
    *,
    with_fidelity: bool = True,
    shared: SharedPrefill | None = None,
) -> tuple[dict[str, Any], Reference]:
    """Measure one cell; returns its result columns and the reference (built here for a full-cache cell).
    ``shared``: replay the sample's recorded prefill where the cell's method allows it (see the module docstring)."""
    task, sample, prompt, target = cell.task, prep.sample, prep.prompt, prep.target
    eos = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    n_new = task.max_new_tokens
    follow = max(n_new, len(target), len(reference.ids) if reference else n_new) + 1
    t_cell = time.perf_counter()
    press = make_press(model, cell.spec, reserve=len(prompt.question) + follow, chunk=cell.chunk)
    stepwise = cell.spec.decode is not None
    whole = cell.mode == "aware" or not prompt.question
    ids = prompt.full if whole else prompt.context
    record = shared.get(press, cell.sample_id, ids) if shared is not None else None
    ctx = press.prefill(torch.tensor([ids]), replay=record)
    if not whole:
        press.extend(ctx, torch.tensor([prompt.question]))
    row: dict[str, Any] = {
        "prompt_tokens": len(prompt),
        "context_tokens": len(prompt.context) if cell.mode == "agnostic" else len(prompt),
        "prefill_s": ctx.prefill_seconds,
        "compress_s": ctx.compress_seconds,
        "kv_bytes": ctx.cache.kv_bytes(),
        "stored_entries": ctx.cache.stored_entries(),
        "metric": task.metric,
    }

    out_ids: list[int] = []
    if n_new > 0:
        gen = press.decode(ctx.fork(), n_new, eos_token_ids=eos)
        out_ids = gen.tokens[0]
        output = tokenizer.decode(out_ids, skip_special_tokens=True)
        row.update(output=output, score=task.score(sample, output), decode_s=gen.decode_seconds,
                   decode_tokens=len(out_ids))  # fmt: skip
        finished = bool(gen.finished[0]) if gen.finished else False
    else:
        row.update(output="", decode_s=0.0, decode_tokens=0)
        finished = False

    if reference is None:
        if task.metric == "perplexity":
            ref_ids = list(target)
        else:
            ref_ids = out_ids + (eos[:1] if finished or not out_ids else [])
        ref_ids = ref_ids or eos[:1] or [0]
    else:
        ref_ids = reference.ids
    same = ref_ids == target
    # The reference continuation is teacher-forced on a fork first (ctx must still end at the prompt), the answer
    # last, on ctx itself; when both are the same tokens one pass serves both.
    lp_ref: Tensor | None = None
    if with_fidelity or reference is None:
        lp_ref = teacher_force(press, ctx if same else ctx.fork(), ref_ids, stepwise=stepwise)
    lp_tgt = lp_ref if same and lp_ref is not None else teacher_force(press, ctx, target, stepwise=stepwise)
    if reference is None:
        assert lp_ref is not None
        reference = Reference(ref_ids, lp_ref, int(row["kv_bytes"]), int(row["stored_entries"]))
    if with_fidelity and lp_ref is not None:
        fid = fidelity(reference.logp, lp_ref)
        row.update(kl=fid.kl, kl_max=fid.kl_max, top1=fid.top1, fidelity_tokens=fid.n)
    answer_lp = float(token_logprobs(lp_tgt, torch.tensor(target)).sum())
    row.update(answer_logprob=answer_lp, answer_tokens=len(target))
    if task.metric == "perplexity":
        row["score"] = perplexity(answer_lp, len(target))
    row.update(full_kv_bytes=reference.kv_bytes, full_entries=reference.entries, cell_s=time.perf_counter() - t_cell)
    return row, reference


__all__ = ["SHARED_PREFILL_MAX_BYTES", "Reference", "SharedPrefill", "make_press", "measure", "teacher_force"]
