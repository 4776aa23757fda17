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
``SHARED_PREFILL_MAX_BYTES`` prefill as usual. Results are the same either way
(tests/unit/engine/test_prefill_replay.py); a replayed cell's ``prefill_s`` is the recording's forward time plus its
own compression.
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
from tqdm import tqdm

from .. import __version__
from ..adapters.models import load_model, model_key
from ..data.tasks import Sample
from ..errors import CapabilityError, ConfigError, PromptError
from ..results.store import ResultStore, spec_columns
from ..results.threads import use_threads
from ..spec import Spec
from .cells import Reference, SharedPrefill, _Prepared, make_press, measure
from .config import Cell, EvalConfig, expand


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


def set_threads(n: int | None) -> int:
    """Use ``n`` torch threads (None: the one default of :mod:`tokensieve.results.threads`)."""
    return use_threads(n)


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
