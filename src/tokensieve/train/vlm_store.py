"""The VLM's visual-token method comparison into a results store (``tokensieve train vlm-eval --methods ... --store``).

One ``eval`` row per (visual spec, held-out scene, question), committed as soon as its scene's batch is answered, so
an interrupted run loses at most one batch and a rerun skips every key already stored; a runner claims its questions
before measuring them (:meth:`~tokensieve.results.store.ResultStore.claim`), so several runs can share a store. The
measurement is :func:`~tokensieve.train.evaluate.answer_questions`, the one ``evaluate_specs`` makes.

What the columns hold (the accuracy columns of a KV row, with these meanings):

* ``key`` — :func:`~tokensieve.results.store.visual_key` of the resolved plan and the workload (tool, model key,
  split, scene index and seed, question text); ``label`` / ``method`` / ``budget*`` —
  :func:`~tokensieve.results.store.visual_columns` (``todre:0.11``; ``full`` for no pruning), the same as
  ``tokensieve bench --vlm --store`` writes for the same plan;
* ``task`` — ``scenes/<question type>`` (attribute, existence, counting, spatial, reading); ``task_options`` —
  ``{"split", "scene", "scene_seed", "question"}``; ``seed`` — the scene's index in its split; ``depth`` NULL;
* ``mode`` ``aware`` (the question is in the prompt the methods see); ``metric`` ``exact_match``; ``score`` 1 when
  the greedy answer is exactly the gold answer then ``<|im_end|>``, else 0; ``output`` the model's answer;
  ``answers`` ``[gold answer]``;
* ``length`` = ``prompt_tokens`` — the prompt's tokens at the language model's input before pruning (system prompt,
  every visual token, question); ``context_tokens`` — the visual tokens that reach the language model's last decoder
  layer (what "visual tokens kept" is measured from; the image's own count is ``extra.image_tokens``);
* ``kv_bytes`` / ``stored_entries`` — the keys and values the prompt's prefill left in the cache (every layer;
  entries = tokens × KV heads), ``full_kv_bytes`` / ``full_entries`` the same unpruned, so "KV kept" is their ratio;
* ``decode_tokens`` — greedy tokens generated; ``cell_s`` — the scene batch's wall time divided among its questions
  (no per-question times: timing is ``tokensieve bench --vlm``'s job);
* ``extra`` — ``{"image_tokens", "visual_tokens": {stage: count}, "batch"}``: the image's visual tokens, the visual
  tokens after each stage that ran (``vision``, ``projector``, ``llm_input``, ``llm:K``, ``llm``), the questions
  answered in the batch.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from .. import __version__
from ..errors import ConfigError
from ..results.store import ResultStore, visual_columns, visual_key
from .evaluate import Accuracy, Answered

TOOL = "vlm-eval"
OVERLAYS_TOOL = "vlm-overlays"  # a run that drew the kept-patch figure: its info names the PNG
TASK_PREFIX = "scenes/"
MODE = "aware"
METRIC = "exact_match"


@dataclass
class StoreSummary:
    store: str
    total: int  # rows of the grid (specs × questions)
    already: int  # stored before this run
    ran: int  # measured by this run
    seconds: float
    by_spec: dict[str, Accuracy] = field(default_factory=dict)  # every stored row of the grid, per spec text


def vlm_model_key(name: str, model: Any) -> str:
    """The ``model`` column of a VLM's rows: the embedded VLM's name, else the run folder's name (``vlm-final``) and a
    fingerprint of the weights, so two checkpoints never share keys."""
    import re

    from ..adapters.models import model_fingerprint
    from ..adapters.vlm import vlm_name

    known = vlm_name(name)
    if known is not None:
        return known
    path = Path(name).expanduser().resolve()
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{path.parent.name}-{path.name}").strip("-.") or "vlm"
    return f"{base}-{model_fingerprint(model)}"


def command_line(args: Any) -> str:
    """The ``tokensieve train vlm-eval`` command that reproduces a stored run (recorded in the store's runs)."""
    parts = ["tokensieve", "train", "vlm-eval", "--model", str(args.model), "--scenes", str(args.scenes)]
    parts += ["--split", args.split, "--methods", args.methods, "--budgets", args.budgets]
    if getattr(args, "overlays", None):
        parts += ["--overlays", str(args.overlays)]
    parts += ["--threads", str(args.threads), "--store", str(args.store)]
    return " ".join(shlex.quote(p) for p in parts)


def row_key(spec: str, *, model: str, split: str, scene: int, scene_seed: int, question: str) -> str:
    """The key of one question under one visual spec."""
    return visual_key(spec, tool=TOOL, model=model, split=split, scene=scene, scene_seed=scene_seed, question=question)


def evaluate_into_store(
    model: Any,
    processor: Any,
    specs: list[str],
    store: ResultStore,
    *,
    model_key: str,
    n_scenes: int = 100,
    split: str = "test",
    command: str = "",
    threads: int | None = None,
    progress: bool = True,
    out: TextIO | None = None,
) -> StoreSummary:
    """Measure every (spec, scene, question) of the grid not yet in ``store`` (see the module docstring); returns the
    counts and each spec's accuracy over every stored row of the grid (earlier runs' included)."""
    from tqdm import tqdm

    from ..adapters.vision import vision_adapter
    from ..adapters.vlm import spec_of
    from ..data.scenes import questions, scenes
    from .batches import Encoder
    from .evaluate import answer_questions, scene_batch

    out = out or sys.stderr
    t_start = time.perf_counter()
    columns = {s: visual_columns(s) for s in specs}
    labels = [c["label"] for c in columns.values()]
    if len(set(labels)) != len(labels):
        twice = sorted({lab for lab in labels if labels.count(lab) > 1})
        raise ConfigError(f"The specs name one configuration twice ({', '.join(twice)}): list each once.")
    adapter = vision_adapter(model)
    for s in specs:  # what the model cannot run fails now, not after the first scenes
        check_plan(adapter, s)
    todo_scenes = scenes(split, n_scenes)
    qs_of = [questions(scene) for scene in todo_scenes]
    keys: dict[tuple[str, int, int], str] = {
        (s, i, j): row_key(s, model=model_key, split=split, scene=i, scene_seed=scene.seed, question=q.text)
        for s in specs
        for i, (scene, qs) in enumerate(zip(todo_scenes, qs_of))
        for j, q in enumerate(qs)
    }
    done = store.keys("eval")
    todo = [k for k in keys.values() if k not in done]
    already = len(keys) - len(todo)
    print(f"{len(keys)} rows ({len(specs)} visual specs incl. full x {sum(map(len, qs_of))} questions of {n_scenes} "
          f"{split} scenes); {already} already in {store.path}, {len(todo)} to run; model {model_key}.",
          file=out)  # fmt: skip
    threads = int(threads if threads is not None else torch.get_num_threads())
    ran = 0
    if todo:
        config = {"specs": labels, "scenes": n_scenes, "split": split, "model": model_key, "positions": "official"}
        run_id = store.start_run(tool=TOOL, command=command, config=config, model=model_key, version=__version__,
                                 threads=threads, cells=len(keys), todo=len(todo))  # fmt: skip
        model.eval()
        encoder = Encoder(processor.tokenizer, spec_of(model.config).num_visual_tokens)
        image_token = int(model.config.image_token_id)
        bar = tqdm(total=n_scenes * len(specs), desc=f"vlm eval {split} → store", disable=not progress,
                   dynamic_ncols=True)  # fmt: skip
        try:
            for i, (scene, qs) in enumerate(zip(todo_scenes, qs_of)):
                batch = None
                for s in specs:
                    # claimed: this runner's to measure (not stored, not being measured by another run)
                    mine = [
                        j for j in range(len(qs)) if keys[s, i, j] not in done and store.claim("eval", keys[s, i, j])
                    ]
                    if mine:
                        bar.set_postfix_str(f"scene {i} {columns[s]['label']}")
                        sub = [qs[j] for j in mine]
                        if batch is None or len(mine) != len(qs):
                            batch = scene_batch(encoder, processor, scene, sub)
                        t0 = time.perf_counter()
                        answered = answer_questions(adapter, encoder, batch, sub, s, scene.seed, image_token)
                        share = (time.perf_counter() - t0) / len(sub)
                        for j, a in zip(mine, answered):
                            row = _row(columns[s], keys[s, i, j], model_key, run_id, threads, split, i, scene.seed, a,
                                       share, len(sub))  # fmt: skip
                            ran += int(store.add("eval", row))
                        if len(mine) != len(qs):
                            batch = None  # the next spec's batch may be the whole scene again
                    bar.update(1)
        finally:
            bar.close()
            store.release()
    by_spec = stored_accuracy(store, {s: [keys[k] for k in keys if k[0] == s] for s in specs})
    return StoreSummary(str(store.path), len(keys), already, ran, time.perf_counter() - t_start, by_spec)


def check_plan(adapter: Any, spec: str) -> None:
    """Refuse, with the reason, a visual spec the adapter's model cannot run (a stage its family lacks, a decoder layer
    it does not have)."""
    from ..adapters.vision.segments import llm_stage_layers
    from ..spec import visual_plan

    plan = visual_plan(spec)
    adapter.check_plan(plan, "official")
    llm_stage_layers(plan, adapter.stack.num_layers)


def _row(cols: Mapping[str, Any], key: str, model: str, run_id: int, threads: int, split: str, scene: int,
         scene_seed: int, a: Answered, share: float, batch: int) -> dict[str, Any]:  # fmt: skip
    workload = {"split": split, "scene": scene, "scene_seed": scene_seed, "question": a.question.text}
    return {
        "key": key,
        **cols,
        "config": {"spec": cols["spec"], "tool": TOOL, "model": model, **workload},
        "model": model,
        "version": __version__,
        "created": time.time(),
        "run_id": run_id,
        "threads": threads,
        "task": TASK_PREFIX + a.question.type,
        "task_options": workload,
        "length": a.prompt_tokens,
        "seed": scene,
        "mode": MODE,
        "metric": METRIC,
        "score": 1.0 if a.right else 0.0,
        "output": a.output,
        "answers": [a.question.answer],
        "prompt_tokens": a.prompt_tokens,
        "context_tokens": a.kept_tokens,
        "kv_bytes": a.kv_bytes,
        "stored_entries": a.stored_entries,
        "full_kv_bytes": a.full_kv_bytes,
        "full_entries": a.full_entries,
        "decode_tokens": a.tokens,
        "cell_s": share,
        "extra": {"image_tokens": a.image_tokens, "visual_tokens": a.visual_tokens, "batch": batch},
    }


def stored_accuracy(store: ResultStore, keys: Mapping[str, list[str]]) -> dict[str, Accuracy]:
    """Accuracy per spec over the stored rows of the given keys (rows another run stored included)."""
    wanted = {k: s for s, ks in keys.items() for k in ks}
    out = {s: Accuracy() for s in keys}
    for r in store.rows("eval", "task LIKE ?", (TASK_PREFIX + "%",)):
        s = wanted.get(r["key"])
        if s is not None and r["score"] is not None:
            out[s].add(str(r["task"])[len(TASK_PREFIX) :], bool(r["score"]))
    return out


def record_overlays(store: ResultStore, path: Path, *, specs: list[str], model_key: str, n_scenes: int, split: str,
                    command: str, threads: int) -> int:  # fmt: skip
    """Record a kept-patch figure (``vlm-eval --overlays``) in the store's runs, so ``tokensieve report`` shows it —
    with each configuration's own column (:func:`~.overlays.tile_path`) where it was written, for the interactive
    report's hover."""
    from .overlays import tile_path

    labels = [visual_columns(s)["label"] for s in specs]
    tiles = {label: str(tile_path(Path(path), s).resolve()) for label, s in zip(labels, specs)
             if tile_path(Path(path), s).is_file()}  # fmt: skip
    return store.start_run(
        tool=OVERLAYS_TOOL, command=command, config={"specs": labels, "scenes": n_scenes, "split": split},
        model=model_key, version=__version__, threads=threads, cells=0, todo=0,
        info={"overlays": str(Path(path).expanduser().resolve()), "tiles": tiles},
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------ CLI
def open_store(args: Any) -> ResultStore | None:
    """``vlm-eval --store FILE``'s store, opened now (a path that cannot be written fails before the model loads)."""
    return ResultStore(args.store) if getattr(args, "store", None) else None


def store_eval(store: ResultStore, args: Any, model: Any, processor: Any, specs: list[str]) -> dict[str, Accuracy]:
    """``vlm-eval --methods ... --store``: the comparison into the store; returns each spec's accuracy over its stored
    rows (for the table and ``--json``)."""
    with store:
        summary = evaluate_into_store(model, processor, specs, store, model_key=vlm_model_key(args.model, model),
                                      n_scenes=args.scenes, split=args.split, command=command_line(args),
                                      threads=args.threads, progress=not args.no_progress)  # fmt: skip
    print(f"{summary.ran} rows written to {summary.store} ({summary.already} were there); "
          f"`tokensieve report {summary.store}` renders them", file=sys.stderr)  # fmt: skip
    return summary.by_spec


def store_overlays(store: ResultStore, args: Any, model: Any, specs: list[str], path: Path) -> None:
    """``vlm-eval --overlays PNG --store``: record the figure for the report."""
    with store:
        record_overlays(store, path, specs=specs, model_key=vlm_model_key(args.model, model), n_scenes=args.scenes,
                        split=args.split, command=command_line(args), threads=args.threads)  # fmt: skip
