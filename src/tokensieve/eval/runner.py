"""The evaluation runner: measure every cell of a grid, store one row per cell, resume after an interruption.

For each sample (task, length, depth, seed) the runner measures the full-cache baseline first; its greedy answer is
the teacher-forced continuation for every other cell of the sample and its next-token distributions are the
reference for KL divergence and top-1 agreement. The reference is kept in memory for the sample being measured
(after a restart it is recomputed, without being stored twice).

One cell (batch size 1):

1. prefill the prompt with the method and budget — query-agnostic: compress the context, then append the question
   uncompressed; query-aware: compress context and question together; with the grid's ``chunk``, in chunks of that
   many tokens (the full-cache reference always in one pass) — and record prefill/compress seconds, KV bytes and
   stored entries;
2. greedy-decode the answer on a fork of the cache and score it (accuracy tasks);
3. teacher-force the reference continuation on a fork: KL(full ‖ method) and top-1 agreement per position;
4. teacher-force the reference answer: its log-likelihood (for the perplexity task: the text's continuation, whose
   perplexity is the score).

Shared prefill (``EvalConfig.shared_prefill``, on by default): the forward pass over a prompt is the same for every
method that attends densely at prefill — they differ only in what they keep — so the runner records it once per
prompt (:meth:`~tokensieve.engine.Compressor.record_prefill`: every layer's queries, keys and values) and replays
it into each cell's cache (``Compressor.prefill(replay=...)``), which compresses exactly as a prefill would. Methods
that change the forward pass (sparse prefill, auxiliary tokens), chunked cells and recordings above
``SHARED_PREFILL_MAX_BYTES`` prefill as usual. Results are the same either way (tests/unit/test_prefill_replay.py);
a replayed cell's ``prefill_s`` is the recording's forward time plus its own compression.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch import Tensor
from tqdm import tqdm

from .. import __version__
from ..adapters.models import load_model, model_key
from ..data.prompts import PromptIds
from ..data.tasks import Sample
from ..engine import CachedContext, Compressor, PrefillRecord, compress
from ..errors import CapabilityError, ConfigError, PromptError
from ..results.store import ResultStore, spec_columns
from ..results.threads import use_threads
from ..spec import Spec
from .config import Cell, EvalConfig, expand
from .metrics import fidelity, log_probs, perplexity, token_logprobs


@dataclass
class Reference:
    """The full-cache model's continuation of one sample and its next-token log-probabilities ``(N, V)``."""

    ids: list[int]
    logp: Tensor
    kv_bytes: int
    entries: int


@dataclass
class RunSummary:
    store: str
    total: int  # cells in the grid
    already: int  # found in the store before this run
    ran: int  # measured by this run
    seconds: float
    notes: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # the grid's cells, in run order
    stored: int = 0  # cells of the grid in the store at the end (others may have run at the same time)


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
        return sh.num_layers * n * sh.head_dim * (sh.num_q_heads + 2 * sh.num_kv_heads) * itemsize


def set_threads(n: int | None) -> int:
    """Use ``n`` torch threads (None: the one default of :mod:`tokensieve.results.threads`)."""
    return use_threads(n)


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


def _prepare(cell: Cell, tokenizer: Any, cache: dict[Any, _Prepared]) -> _Prepared:
    sid = cell.sample_id
    if sid not in cache:
        depth = cell.depth if cell.depth is not None else 0.0
        sample = cell.task.make(tokenizer, cell.length, depth, cell.seed)
        cache[sid] = _Prepared(sample, sample.ids(tokenizer), sample.target_ids(tokenizer))
    return cache[sid]


def run_eval(
    cfg: EvalConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    progress: bool = True,
    out: TextIO | None = None,
    command: str = "",
    dry_run: bool = False,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
    ray: Any = None,
) -> RunSummary:
    """Run a grid into its store; every check happens before the first cell is measured.

    ``model``/``tokenizer``: an already loaded model (default: ``load_model(cfg.model)``). ``dry_run``: validate,
    print the plan and stop. ``ray``: a :class:`~tokensieve.eval.ray_backend.RayOptions` to measure the cells on Ray
    actors (this process still writes every row).
    """
    out = out or sys.stderr
    t_start = time.perf_counter()
    # 1. everything that needs no model: names, options, the text sources, the store
    for task in cfg.task_objects:
        task.check()
    store = ResultStore(cfg.store)
    threads_before = torch.get_num_threads()
    try:
        threads = set_threads(cfg.threads)
        if ray is not None:  # without Ray installed, fail before the model loads
            from .ray_backend import import_ray

            import_ray()
        # 2. the model and what depends on it
        if model is None or tokenizer is None:
            model, tokenizer = load_model(cfg.model)
        mkey = model_key(model)
        limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        for task in cfg.task_objects:
            for length in cfg.lengths:
                need = length + max(task.max_new_tokens, 64) + 1
                if limit and need > limit:
                    raise PromptError(
                        f"Length {length} is above what {mkey} can take for {task.name}: {length} prompt tokens plus "
                        f"up to {need - length} answer tokens exceed its context of {limit} tokens. "
                        f"Use lengths <= {limit - (need - length)}."
                    )
        dropped: dict[str, str] = {}
        for m in cfg.method_list():
            try:
                for s in m.at_budgets(cfg.budgets):
                    make_press(model, s, chunk=None if s.is_full else cfg.chunk)  # capability / profile checks
            except CapabilityError as exc:
                if not cfg.all_methods:
                    raise
                dropped[m.label] = f"{m.label} skipped: {exc}"
        if dropped:
            keep = tuple(m for m in cfg.methods if m.label not in dropped)
            cfg = dataclasses.replace(cfg, methods=keep or (Spec(),))
        cells, notes = expand(cfg)
        notes = list(dropped.values()) + notes
        keys = [c.key(mkey) for c in cells]
        if len(set(keys)) != len(keys):
            raise ConfigError("The grid has duplicate cells (the same method and parameters listed twice?).")
        done = store.keys("eval")
        todo = [i for i, k in enumerate(keys) if k not in done]
        already = len(cells) - len(todo)
        for note in notes:
            print(f"note: {note}", file=out)
        print(  # the plan first: a large grid's samples take a while to generate
            f"{len(cells)} cells ({len(cfg.task_objects)} tasks x {len(cfg.specs())} configurations incl. full cache, "
            f"{len(cfg.lengths)} lengths"
            + (f"; prefilled in chunks of {cfg.chunk} tokens, the full cache in one pass" if cfg.chunk else "")
            + f"); {already} already in {store.path}, {len(todo)} to run; "
            f"model {mkey}, {threads} threads.",
            file=out,
            flush=True,
        )
        prepared: dict[Any, _Prepared] = {}
        # generate every sample now: a too-short length or a budget too large fails here, before any measurement
        for cell in tqdm(cells, desc="samples", unit="cell", disable=not progress or len(cells) < 1000, file=out):
            prep = _prepare(cell, tokenizer, prepared)
            n = len(prep.prompt.context) if cell.mode == "agnostic" and prep.prompt.question else len(prep.prompt)
            for budget in (cell.spec.budget, cell.spec.decode_budget):
                if budget is not None:
                    budget.tokens_for(n)
        if dry_run or not todo:
            return RunSummary(str(store.path), len(cells), already, 0, time.perf_counter() - t_start, notes, keys,
                              already)  # fmt: skip
        run_id = store.start_run(tool="eval", command=command, config=cfg.describe(), model=mkey, version=__version__,
                                 threads=threads, cells=len(cells), todo=len(todo))  # fmt: skip
        if ray is not None:
            from .ray_backend import run_cells_ray

            ran = run_cells_ray(ray, cfg, cells, keys, set(todo), prepared, store, run_id, mkey, progress, on_cell,
                                _row)  # fmt: skip
        else:
            ran = _run_cells(model, tokenizer, cfg, cells, keys, set(todo), prepared, store, run_id, mkey, threads,
                             progress, on_cell)  # fmt: skip
        stored = len(set(keys) & store.keys("eval"))
        return RunSummary(str(store.path), len(cells), already, ran, time.perf_counter() - t_start, notes, keys,
                          stored)  # fmt: skip
    finally:
        store.close()
        torch.set_num_threads(threads_before)


def _run_cells(
    model: Any,
    tokenizer: Any,
    cfg: EvalConfig,
    cells: list[Cell],
    keys: list[str],
    todo: set[int],
    prepared: dict[Any, _Prepared],
    store: ResultStore,
    run_id: int,
    mkey: str,
    threads: int,
    progress: bool,
    on_cell: Callable[[dict[str, Any]], None] | None,
) -> int:
    # Progress is weighted by prompt tokens, so the ETA accounts for long prompts being slower.
    weight = {i: len(prepared[cells[i].sample_id].prompt) for i in todo}
    bar = tqdm(total=sum(weight.values()), unit="tok", unit_scale=True, desc="eval", disable=not progress,
               dynamic_ncols=True, smoothing=0.05)  # fmt: skip
    ran = 0
    shared = SharedPrefill() if cfg.shared_prefill else None
    reference: Reference | None = None
    ref_sample: Any = None
    ref_mode: dict[Any, str] = {}
    for c in cells:  # the reference of a sample is its first full-cache cell
        ref_mode.setdefault(c.sample_id, c.mode)
    try:
        for i, cell in enumerate(cells):
            if i not in todo:
                continue
            if not store.claim("eval", keys[i]):  # stored or being measured by another run on this store
                bar.update(weight[i])
                continue
            sid = cell.sample_id
            prep = prepared[sid]
            if ref_sample != sid:
                reference, ref_sample = None, sid
            is_ref = cell.spec.is_full and cell.mode == ref_mode[sid]
            if reference is None and not is_ref:
                # The sample's reference cell is already stored (an earlier run): recompute the reference.
                ref_cell = next(c for c in cells if c.sample_id == sid and c.spec.is_full)
                _, reference = measure(model, tokenizer, ref_cell, prep, None, with_fidelity=False, shared=shared)
            bar.set_postfix_str(f"{ran + 1}/{len(todo)} cells · {cell.task.name} L={cell.length} "
                                f"{cell.spec.label} {cell.mode}")  # fmt: skip
            result, reference = measure(model, tokenizer, cell, prep, reference, with_fidelity=cfg.fidelity,
                                        shared=shared)  # fmt: skip
            row = _row(cell, keys[i], mkey, run_id, threads, prep.sample, result)
            if not store.add("eval", row):  # another run stored it first (its claim had lapsed): keep its row
                bar.update(weight[i])
                continue
            ran += 1
            bar.update(weight[i])
            if on_cell is not None:
                on_cell(row)
    finally:
        bar.close()
        store.release()
    return ran


def _row(cell: Cell, key: str, mkey: str, run_id: int, threads: int, sample: Sample, result: dict[str, Any]
         ) -> dict[str, Any]:  # fmt: skip
    config = cell.config(mkey)
    row = {
        "key": key,
        **spec_columns(cell.spec),
        "config": json.dumps(config, sort_keys=True, default=str),
        "model": mkey,
        "version": __version__,
        "created": time.time(),
        "run_id": run_id,
        "chunk": cell.chunk,
        "task": cell.task.name,
        "task_options": config["task_options"],
        "length": cell.length,
        "depth": cell.depth,
        "seed": cell.seed,
        "mode": cell.mode,
        "answers": list(sample.answers),
        "threads": threads,
    }
    row.update(result)
    return row
