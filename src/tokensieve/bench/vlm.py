"""`tokensieve bench --vlm`: VLM prefill with visual-token pruning against the unpruned model, in the same run.

Per configuration (a visual plan such as ``fastv:0.11`` or ``pool:0.22``, and ``full``) and repetition, one prompt
with one image is prefilled through :func:`tokensieve.adapters.vision.vision_adapter`'s stages and timed in parts:

* ``vision_s`` — the vision tower and the projector (``adapter.encode``; a vision-stage method runs inside it);
* ``lm_prefill_s`` — everything after: embedding, projector-stage pruning, the decoder layers (with an llm-stage
  method such as FastV between them) and the head on the last position;
* ``ttft_s`` — time to first token: both, plus the argmax of the first token;
* peak resident memory of the process while prefilling (model weights included) and what the prefill added;
* ``kv_bytes`` — the keys and values the prefill left in the cache (every layer);
* analytic FLOPs of vision + language-model prefill from the geometry (:func:`vit_flops`, :func:`projector_flops`,
  :func:`decoder_flops`) with the token counts each segment of decoder layers actually held.

The order of the configurations rotates between repetitions (drifts of a shared machine hit every configuration
alike); the summary gives medians, the spread (min–max) and speed-ups against ``full`` of the same run: measured
(TTFT and LM prefill) next to analytic (FLOPs).

With ``--store FILE`` every measurement is also a ``bench`` row of the results store, written as it is made (a rerun
skips what is stored), labelled as ``tokensieve train vlm-eval --store`` labels the same plan so that
``tokensieve report`` shows accuracy and speed together (:func:`run_into_store`; the columns are described above
:data:`EXTRA`).

Speed does not depend on weights, so the default tower is a **speed-only** configuration: the geometry of CLIP
ViT-L/14-336 (24 layers, width 1024, 16 heads, MLP 4096, 336 px, 14 px patches → 576 patch tokens + CLS) with
**random vision weights** in front of the embedded SmolLM2-135M language model (its real weights). Its answers mean
nothing; its timings are those of a LLaVA-1.5-shaped vision side on this language model.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..adapters.vlm import IMAGE_TOKEN, VisionSpec, build_vlm, chat_prompt, spec_of
from ..errors import ConfigError
from .machine import PeakRSS, describe_machine

FULL = "full"

# Towers by name. "vit-l-336" is the default (speed-only, random weights).
TOWERS: dict[str, VisionSpec] = {
    # CLIP ViT-L/14-336 (LLaVA-1.5's tower): 576 patch tokens + CLS.
    "vit-l-336": VisionSpec(
        image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096
    ),
    # ViT-B width and depth at the same 336 px / 14 px grid (576 tokens): a quicker tower with the same LM input.
    "vit-b-336": VisionSpec(
        image_size=336, patch_size=14, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072
    ),
    # The embedded VLM's own tower shape (128 px / 8 px → 256 tokens), also with random weights here.
    "embedded": VisionSpec(),
}
DEFAULT_TOWER = "vit-l-336"
DEFAULT_METHODS = ("fastv", "pool", "vis:random")
DEFAULT_BUDGETS = ("0.11", "0.22", "0.33")
QUESTION = "Describe the image in one sentence."
LABEL = "speed-only, random vision weights"


# ------------------------------------------------------------------------------------------------ FLOPs
def vit_flops(
    *, image_size: int, patch_size: int, hidden: int, intermediate: int, layers: int, channels: int = 3
) -> int:
    """Forward FLOPs of a CLIP ViT with a CLS token, counting a multiply-add as 2 FLOPs.

    With ``P = (image_size / patch_size)²`` patches, ``N = P + 1`` tokens, width ``d``, MLP width ``m`` and
    ``layers`` encoder layers run::

        patch embedding   2 · P · (channels · patch_size²) · d
        per layer         2 · N · 4d²           (q, k, v, o projections)
                        + 2 · 2 · N² · d        (q kᵀ and the attention-weighted sum of v, full attention)
                        + 2 · 2 · N · d · m     (the two MLP matrices)

    Layer norms, softmax, GELU, biases and the position embedding (O(N·d) each) are left out.
    """
    p = (image_size // patch_size) ** 2
    n = p + 1
    d, m = hidden, intermediate
    embed = 2 * p * channels * patch_size * patch_size * d
    per_layer = 2 * n * 4 * d * d + 4 * n * n * d + 4 * n * d * m
    return embed + layers * per_layer


def vit_layer_flops(tokens: int, hidden: int, intermediate: int) -> int:
    """One CLIP encoder layer on ``tokens`` tokens (the per-layer term of :func:`vit_flops`)."""
    n, d, m = tokens, hidden, intermediate
    return 2 * n * 4 * d * d + 4 * n * n * d + 4 * n * d * m


def vit_flops_run(config: Any, runs: Sequence[tuple[int, int]], images: int = 1) -> int:
    """Tower FLOPs of encoder runs actually made: ``runs`` are ``(layers, tokens)`` pairs (a vision-stage method
    that prunes inside the tower runs later layers on fewer tokens), plus the patch embedding of ``images``."""
    v = config.vision_config
    d, m = int(v.hidden_size), int(v.intermediate_size)
    p = (int(v.image_size) // int(v.patch_size)) ** 2
    embed = 2 * p * int(v.num_channels) * int(v.patch_size) ** 2 * d * images
    return embed + sum(layers * vit_layer_flops(t, d, m) for layers, t in runs)


def projector_flops(tokens: int, d_vision: int, d_text: int) -> int:
    """LLaVA's two-layer projector on ``tokens`` visual tokens: ``2·t·d_vision·d_text + 2·t·d_text²``."""
    return 2 * tokens * d_vision * d_text + 2 * tokens * d_text * d_text


def decoder_flops(
    *,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int,
    vocab: int,
    segments: Sequence[tuple[int, int]],
) -> int:
    """Prefill FLOPs of a Llama-family decoder (grouped-query attention, gated MLP), multiply-add = 2 FLOPs.

    ``segments`` are ``(layers, T)`` pairs: that many consecutive layers each holding ``T`` tokens (a stage-c method
    such as FastV after layer K gives ``[(K, T), (L − K, T')]``). With width ``D``, ``H`` query and ``G`` KV heads of
    size ``h``, MLP width ``F``::

        per layer    2 · T · D · (H·h + 2·G·h)      (q, k, v projections)
                   + 2 · T · H·h · D                (o projection)
                   + 2 · 2 · H · h · T(T+1)/2       (q kᵀ and weights · v, causal: query i sees i + 1 keys)
                   + 2 · 3 · T · D · F              (gate, up, down)
        head         2 · D · vocab                  (logits of the last position only)

    Norms, RoPE, SiLU and softmax (O(T·D)) are left out; FastV's one attention row is also left out (O(T·D)).
    """
    q, kv = heads * head_dim, kv_heads * head_dim
    total = 2 * hidden * vocab
    for layers, t in segments:
        per_layer = (
            2 * t * hidden * (q + 2 * kv) + 2 * t * q * hidden + 2 * q * t * (t + 1) + 6 * t * hidden * intermediate
        )
        total += layers * per_layer
    return total


def vision_side_flops(config: Any) -> tuple[int, int]:
    """``(tower, projector)`` FLOPs of a tokensieve LlavaConfig's vision side, with the layers LLaVA runs (up to the
    feature layer) and the projector on the patch tokens (CLS dropped)."""
    v = config.vision_config
    n_layers = int(v.num_hidden_layers)
    fl = int(config.vision_feature_layer)
    run = fl if fl >= 0 else n_layers + 1 + fl
    tower = vit_flops(
        image_size=int(v.image_size),
        patch_size=int(v.patch_size),
        hidden=int(v.hidden_size),
        intermediate=int(v.intermediate_size),
        layers=run,
        channels=int(v.num_channels),
    )
    patches = (int(v.image_size) // int(v.patch_size)) ** 2
    return tower, projector_flops(patches, int(v.hidden_size), int(config.text_config.hidden_size))


def lm_flops(config: Any, segments: Sequence[tuple[int, int]]) -> int:
    t = config.text_config
    heads = int(t.num_attention_heads)
    head_dim = int(getattr(t, "head_dim", None) or int(t.hidden_size) // heads)
    return decoder_flops(
        hidden=int(t.hidden_size),
        heads=heads,
        kv_heads=int(getattr(t, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        intermediate=int(t.intermediate_size),
        vocab=int(t.vocab_size),
        segments=segments,
    )


# ------------------------------------------------------------------------------------------------ configs
def vlm_bench_specs(
    methods: str | Sequence[str] = DEFAULT_METHODS, budgets: Sequence[str] = DEFAULT_BUDGETS
) -> list[str]:
    """Visual specs to measure (``full`` first): a method given without a budget takes each of ``budgets``.

    Every spec is parsed now, so a typo fails before a model is built."""
    from ..spec import VisualPlan
    from ..spec import split_specs as split_list

    items = split_list(methods) if isinstance(methods, str) else [m.strip() for m in methods if m.strip()]
    if items == ["all"]:  # every registered visual method (vis:name where a KV method has the same name)
        from ..registry import method_names

        kv = set(method_names())
        items = [f"vis:{n}" if n in kv else n for n in method_names("visual")]
    out: list[str] = [FULL]
    for item in items:
        if item == FULL:
            continue
        body = item[4:] if item.lower().startswith("vis:") else item
        has_budget = ":" in body.rsplit("]", 1)[-1]
        for text in [item] if has_budget else [f"{item}:{b}" for b in budgets]:
            if not budgets and not has_budget:
                raise ConfigError(f"'{item}' gives no budget: write e.g. {item}:0.22 or give --budgets.")
            VisualPlan.parse([p for p in text.split("/") if p.strip()])
            if text not in out:
                out.append(text)
    if len(out) == 1:
        raise ConfigError("Give at least one visual method (e.g. fastv:0.22,pool:0.22).")
    return out


def tower_spec(name: str) -> VisionSpec:
    if name not in TOWERS:
        raise ConfigError(f"Unknown tower '{name}'; choose one of {', '.join(TOWERS)}.")
    return TOWERS[name]


def build_bench_model(spec: VisionSpec, *, seed: int = 0) -> tuple[Any, Any]:
    """The benchmark's LLaVA model: a random vision tower and projector of ``spec`` on the embedded text model (its
    real weights), in eval mode; and its tokenizer."""
    torch.manual_seed(seed)
    model, processor = build_vlm(spec, with_text_weights=True)
    return model.eval(), processor.tokenizer


def bench_inputs(model: Any, tokenizer: Any, question: str = QUESTION, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt with one image: the chat prompt with the image token repeated once per visual token, and random
    pixels (timing does not depend on them)."""
    spec = spec_of(model.config)
    text = chat_prompt([(question, None)]).replace(IMAGE_TOKEN, IMAGE_TOKEN * spec.num_visual_tokens)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


# ------------------------------------------------------------------------------------------------ running
@dataclass
class VlmBenchRow:
    """One timed prefill (one configuration and repetition)."""

    label: str
    rep: int
    prompt_tokens: int  # at the language model's input, before pruning
    visual_tokens: int  # visual tokens reaching the language model
    kept_tokens: int  # visual tokens in the last layers' cache
    vision_s: float
    lm_prefill_s: float
    ttft_s: float
    ttft_cpu_s: float  # CPU time of the process over the TTFT (all threads): steadier than wall time when shared
    peak_rss: int
    added_rss: int
    kv_bytes: int
    vision_flops: int
    lm_flops: int
    score_s: float = 0.0  # the methods' own score → select → apply (inside vision_s / lm_prefill_s)
    image_tokens: int = 0  # the image's visual tokens (placeholders in the prompt), before any pruning
    stored_entries: int = 0  # KV entries the prefill left in the cache: tokens × KV heads, summed over layers

    @property
    def flops(self) -> int:
        return self.vision_flops + self.lm_flops


def _prefill_once(adapter: Any, inputs: dict[str, torch.Tensor], spec: str) -> dict[str, Any]:
    from ..adapters.vision import segments as lm_segments
    from ..adapters.vision.base import as_plan

    plan = as_plan(None if spec == FULL else spec)
    encode = adapter.encode
    spent = [0.0]
    scoring = [0.0]
    for vs in plan.specs:  # time the methods' own score → select → apply (signals are computed in the stages)
        prune = vs.method.prune

        def timed_prune(*args: Any, _prune: Any = prune, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = _prune(*args, **kwargs)
            scoring[0] += time.perf_counter() - t
            return out

        object.__setattr__(vs.method, "prune", timed_prune)
    tower_runs: list[tuple[int, int]] = []
    clip = getattr(adapter, "clip", None)
    if clip is not None:
        run = clip.run

        def counted_run(h: Any, lo: int, hi: int, *args: Any) -> Any:
            tower_runs.extend([(hi - lo, int(h.shape[1]))] * int(h.shape[0]))
            return run(h, lo, hi, *args)

        clip.run = counted_run

    def timed_encode(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = encode(*args, **kwargs)
        spent[0] += time.perf_counter() - t
        return out

    adapter.encode = timed_encode
    try:
        gc.collect()
        with torch.inference_mode(), PeakRSS() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            seq, _, built = adapter.build(inputs, plan, "keep", None)
            state = lm_segments.prefill(adapter.stack, seq, plan, policy="keep")
            first = state.logits.argmax(-1)
            ttft, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        del adapter.encode  # back to the class's method
        if clip is not None:
            del clip.run
    del first
    segments = [(seg.end - seg.start, int(seg.valid[0].sum())) for seg in state.segments]
    counts = {**built, **state.visual_tokens}
    visual = counts.get("llm_input", [0])[0]
    kept = counts.get("llm", [visual])[0]
    return {
        "vision_s": spent[0],
        "lm_prefill_s": ttft - spent[0],
        "ttft_s": ttft,
        "ttft_cpu_s": cpu,
        "peak_rss": mem.peak,
        "added_rss": mem.added,
        "kv_bytes": state.cache.kv_bytes(),
        "segments": segments,
        "visual_tokens": visual,
        "kept_tokens": kept,
        "score_s": scoring[0],
        "projected_tokens": counts.get("vision", [0])[0],  # 0: every patch (no vision stage)
        "tower_runs": tower_runs,
    }


def run_vlm_bench(
    model: Any,
    inputs: dict[str, torch.Tensor],
    specs: Sequence[str],
    *,
    repetitions: int = 3,
    progress: Callable[[int, int, str], None] | None = None,
    skip: Callable[[str, int], bool] | None = None,
    on_row: Callable[[VlmBenchRow], None] | None = None,
) -> tuple[list[VlmBenchRow], dict[str, Any]]:
    """Time every spec (``full`` included) ``repetitions`` times on ``inputs`` (one prompt with its image, e.g.
    :func:`bench_inputs`), interleaved (rotated order); one untimed warm-up prefill first. Returns the rows and the
    run's description (machine, geometry, threads, versions). ``skip(spec, rep)``: a measurement not to make (already
    stored); ``on_row``: called with every row as soon as it is measured."""
    from ..adapters.vision import vision_adapter

    if repetitions < 1:
        raise ConfigError("repetitions >= 1 is required.")
    specs = list(dict.fromkeys([FULL, *specs]))
    if int(inputs["input_ids"].shape[0]) != 1:
        raise ConfigError("The VLM benchmark prefills one prompt at a time (batch 1).")
    adapter = vision_adapter(model)
    tower, _ = vision_side_flops(model.config)
    d_vision, d_text = int(model.config.vision_config.hidden_size), int(model.config.text_config.hidden_size)
    vc = model.config.vision_config
    patches = (int(vc.image_size) // int(vc.patch_size)) ** 2
    kv_heads = int(getattr(model.config.text_config, "num_key_value_heads", None) or 0) or int(
        model.config.text_config.num_attention_heads
    )
    image_tokens = int((inputs["input_ids"] == int(model.config.image_token_id)).sum())
    info = bench_info(model, repetitions)
    rows: list[VlmBenchRow] = []
    total, done = repetitions * len(specs), 0
    if skip is not None and all(skip(spec, rep) for rep in range(repetitions) for spec in specs):
        return rows, info
    _prefill_once(adapter, inputs, FULL)  # warm-up (allocator, first-call overheads)
    for rep in range(repetitions):
        shift = rep % len(specs)
        for spec in specs[shift:] + specs[:shift]:
            if skip is not None and skip(spec, rep):
                done += 1
                if progress is not None:
                    progress(done, total, spec)
                continue
            r = _prefill_once(adapter, inputs, spec)
            rows.append(
                VlmBenchRow(
                    label=spec,
                    rep=rep,
                    prompt_tokens=int(inputs["input_ids"].shape[1]),
                    visual_tokens=r["visual_tokens"],
                    kept_tokens=r["kept_tokens"],
                    vision_s=r["vision_s"],
                    lm_prefill_s=r["lm_prefill_s"],
                    ttft_s=r["ttft_s"],
                    ttft_cpu_s=r["ttft_cpu_s"],
                    peak_rss=r["peak_rss"],
                    added_rss=r["added_rss"],
                    kv_bytes=r["kv_bytes"],
                    vision_flops=(vit_flops_run(model.config, r["tower_runs"]) if r["tower_runs"] else tower)
                    + projector_flops(r["projected_tokens"] or patches, d_vision, d_text),
                    score_s=r["score_s"],
                    lm_flops=lm_flops(model.config, r["segments"]),
                    image_tokens=image_tokens,
                    stored_entries=sum(layers * n for layers, n in r["segments"]) * kv_heads,
                )
            )
            if on_row is not None:
                on_row(rows[-1])
            done += 1
            if progress is not None:
                progress(done, total, spec)
    return rows, info


def bench_info(model: Any, repetitions: int) -> dict[str, Any]:
    """The run's description: versions, threads, machine, the tower's and text model's geometry, the weights."""
    v = model.config.vision_config
    t = model.config.text_config
    return {
        "tokensieve": __version__,
        "torch": torch.__version__,
        "threads": int(torch.get_num_threads()),
        "machine": describe_machine(),
        "tower": {
            k: int(getattr(v, k))
            for k in (
                "image_size",
                "patch_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
            )
        },
        "text_model": {"layers": int(t.num_hidden_layers), "hidden_size": int(t.hidden_size)},
        "weights": LABEL,
        "repetitions": repetitions,
    }


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def summarize(rows: Sequence[VlmBenchRow]) -> list[dict[str, Any]]:
    """Per configuration (run order): medians, min–max spread of the times, and speed-ups against ``full``."""
    by: dict[str, list[VlmBenchRow]] = {}
    for r in rows:
        by.setdefault(r.label, []).append(r)
    if FULL not in by:
        raise ConfigError("The summary needs the unpruned ('full') rows of the same run.")
    out: list[dict[str, Any]] = []
    for label, rs in by.items():
        s: dict[str, Any] = {
            "label": label,
            "n": len(rs),
            "visual_tokens": rs[0].visual_tokens,
            "kept_tokens": rs[0].kept_tokens,
            "prompt_tokens": rs[0].prompt_tokens,
        }
        for key in ("vision_s", "lm_prefill_s", "ttft_s", "ttft_cpu_s", "score_s"):
            xs = [float(getattr(r, key)) for r in rs]
            s[key] = _median(xs)
            s[key + "_min"], s[key + "_max"] = min(xs), max(xs)
        s["peak_rss"] = int(max(r.peak_rss for r in rs))
        s["added_rss"] = int(_median([r.added_rss for r in rs]))
        s["kv_bytes"] = rs[0].kv_bytes
        s["vision_flops"], s["lm_flops"], s["flops"] = rs[0].vision_flops, rs[0].lm_flops, rs[0].flops
        out.append(s)
    full = next(s for s in out if s["label"] == FULL)
    for s in out:
        s["ttft_speedup"] = full["ttft_s"] / s["ttft_s"]
        s["cpu_speedup"] = full["ttft_cpu_s"] / s["ttft_cpu_s"]
        s["lm_speedup"] = full["lm_prefill_s"] / s["lm_prefill_s"]
        s["flops_speedup"] = full["flops"] / s["flops"]
        s["lm_flops_speedup"] = full["lm_flops"] / s["lm_flops"]
        s["vision_speedup"] = full["vision_s"] / s["vision_s"]
        s["vision_flops_speedup"] = full["vision_flops"] / s["vision_flops"]
    return out


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    head = (
        "| config | visual tokens (LM in → kept) | vision s | LM prefill s (min–max) | TTFT s (min–max) | "
        "LM speed-up | LM FLOPs speed-up | TTFT speed-up | TTFT CPU s | CPU speed-up | FLOPs speed-up | "
        "GFLOPs (vision + LM) | vision speed-up (FLOPs) | scoring ms | KV MiB | peak RSS MiB |"
    )
    lines = [head, "|" + "---|" * 16]
    for s in summary:
        lines.append(
            f"| {s['label']} | {s['visual_tokens']} → {s['kept_tokens']} | {s['vision_s']:.2f} | "
            f"{s['lm_prefill_s']:.3f} ({s['lm_prefill_s_min']:.3f}–{s['lm_prefill_s_max']:.3f}) | "
            f"{s['ttft_s']:.2f} ({s['ttft_s_min']:.2f}–{s['ttft_s_max']:.2f}) | {s['lm_speedup']:.2f}× | "
            f"{s['lm_flops_speedup']:.2f}× | {s['ttft_speedup']:.2f}× | {s['ttft_cpu_s']:.2f} | "
            f"{s['cpu_speedup']:.2f}× | {s['flops_speedup']:.2f}× | "
            f"{s['vision_flops'] / 1e9:.1f} + {s['lm_flops'] / 1e9:.1f} | "
            f"{s['vision_speedup']:.2f}× ({s['vision_flops_speedup']:.2f}×) | {1e3 * s['score_s']:.1f} | "
            f"{s['kv_bytes'] / 2**20:.1f} | "
            f"{s['peak_rss'] / 2**20:.0f} |"
        )
    return "\n".join(lines)


def write_report(
    out: Path, summary: Sequence[dict[str, Any]], rows: Sequence[VlmBenchRow], info: dict[str, Any], command: str
) -> tuple[Path, Path]:
    """``vlm_bench.json`` (rows, summary, run description) and ``vlm_bench.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    js = out / "vlm_bench.json"
    payload = {"command": command, "info": info, "summary": list(summary), "rows": [asdict(r) for r in rows]}
    js.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    md = out / "vlm_bench.md"
    tower = info["tower"]
    md.write_text(
        "# VLM prefill benchmark\n\nProduced by:\n\n```bash\n" + command + "\n```\n\n"
        f"Tower: {tower['num_hidden_layers']} layers, width {tower['hidden_size']}, {tower['image_size']} px / "
        f"{tower['patch_size']} px patches ({info['weights']}); language model: the embedded SmolLM2-135M "
        f"({info['text_model']['layers']} layers). torch {info['torch']}, {info['threads']} threads, "
        f"{info['repetitions']} interleaved repetitions (medians).\n\n" + markdown_table(summary) + "\n",
        encoding="utf-8",
    )
    return js, md


# ------------------------------------------------------------------------------------------------ store
# ``bench`` rows of ``tokensieve bench --vlm --store`` (one per configuration and repetition). The columns a KV
# benchmark fills mean here: ``label`` / ``method`` / ``budget*`` — the visual plan's
# (:func:`~tokensieve.results.store.visual_columns`, the labels ``tokensieve train vlm-eval --store`` writes);
# ``prefill`` the label; ``length`` the prompt's tokens before pruning; ``batch`` 1; ``prefill_s`` the whole prefill
# (vision side + language model, = ``ttft_s`` but the first token's argmax); ``compress_s`` the methods' own score →
# select → apply inside it; ``kv_bytes`` / ``stored_entries`` what the prefill left in the cache;
# ``prefill_peak_rss`` the process's peak while prefilling. No decoding is measured: the decode columns stay NULL.
# ``extra`` holds what has no column: vision_s, lm_prefill_s, ttft_cpu_s, added_rss, vision_flops, lm_flops,
# image_tokens, visual_tokens (at the LM's input), kept_tokens (at its last layer), tower.
EXTRA = ("vision_s", "lm_prefill_s", "ttft_cpu_s", "added_rss", "vision_flops", "lm_flops", "image_tokens",
         "visual_tokens", "kept_tokens")  # fmt: skip
TOOL = "bench-vlm"


def bench_model_key(tower: str) -> str:
    """The ``model`` column of the benchmark's rows: the embedded text model behind a random tower of this shape."""
    from ..adapters.models import DEFAULT_MODEL

    return f"{DEFAULT_MODEL}+{tower}-random"


def row_key(spec: str, *, model: str, tower: str, prompt_tokens: int, rep: int, threads: int) -> str:
    """The key of one measurement (:func:`~tokensieve.results.store.visual_key` with the workload)."""
    from ..results.store import visual_key

    return visual_key(spec, tool=TOOL, model=model, tower=tower, question=QUESTION, prompt_tokens=prompt_tokens,
                      batch=1, rep=rep, threads=threads)  # fmt: skip


def store_row(row: VlmBenchRow, *, key: str, model: str, run_id: int, threads: int, tower: str) -> dict[str, Any]:
    """A measurement as a ``bench`` row of the results store (see the comment above)."""
    from ..results.store import visual_columns

    cols = visual_columns(row.label)
    return {
        "key": key,
        **cols,
        "model": model,
        "version": __version__,
        "created": time.time(),
        "run_id": run_id,
        "threads": threads,
        "prefill": cols["label"],
        "length": row.prompt_tokens,
        "batch": 1,
        "rep": row.rep,
        "prefill_s": row.vision_s + row.lm_prefill_s,
        "compress_s": row.score_s,
        "ttft_s": row.ttft_s,
        "kv_bytes": row.kv_bytes,
        "stored_entries": row.stored_entries,
        "prefill_peak_rss": row.peak_rss,
        "extra": {**{k: getattr(row, k) for k in EXTRA}, "tower": tower},
    }


def from_store(r: dict[str, Any]) -> VlmBenchRow:
    """A stored ``bench`` row back as the measurement (labelled with its canonical label)."""
    extra = json.loads(r["extra"]) if isinstance(r.get("extra"), str) else (r.get("extra") or {})
    return VlmBenchRow(
        label=str(r["label"]),
        rep=int(r["rep"]),
        prompt_tokens=int(r["length"]),
        visual_tokens=int(extra["visual_tokens"]),
        kept_tokens=int(extra["kept_tokens"]),
        vision_s=float(extra["vision_s"]),
        lm_prefill_s=float(extra["lm_prefill_s"]),
        ttft_s=float(r["ttft_s"]),
        ttft_cpu_s=float(extra["ttft_cpu_s"]),
        peak_rss=int(r["prefill_peak_rss"]),
        added_rss=int(extra["added_rss"]),
        kv_bytes=int(r["kv_bytes"]),
        vision_flops=int(extra["vision_flops"]),
        lm_flops=int(extra["lm_flops"]),
        score_s=float(r["compress_s"] or 0.0),
        image_tokens=int(extra.get("image_tokens", 0)),
        stored_entries=int(r.get("stored_entries") or 0),
    )


def run_into_store(
    model: Any,
    inputs: dict[str, torch.Tensor],
    specs: Sequence[str],
    store: Any,
    *,
    tower: str,
    repetitions: int = 3,
    command: str = "",
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[list[VlmBenchRow], dict[str, Any], int]:
    """:func:`run_vlm_bench` into a results store: measurements already stored are skipped, every new one is stored
    as soon as it is made; returns every stored row of this grid (as measurements labelled with their canonical
    labels, in the order of ``specs`` and repetitions), the run's description and how many rows this run added."""
    from ..spec import visual_label

    specs = list(dict.fromkeys([FULL, *specs]))
    threads = int(torch.get_num_threads())
    mkey = bench_model_key(tower)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    keys = {(s, rep): row_key(s, model=mkey, tower=tower, prompt_tokens=prompt_tokens, rep=rep, threads=threads)
            for s in specs for rep in range(repetitions)}  # fmt: skip
    labels = [visual_label(s) for s in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError("The specs name one configuration twice: list each once.")
    done = store.keys("bench")
    todo = [k for k in keys.values() if k not in done]
    info = bench_info(model, repetitions)
    info["model"] = mkey
    added = [0]
    if todo:
        config = {"specs": labels, "tower": tower, "repetitions": repetitions, "threads": threads, "question": QUESTION}
        run_id = store.start_run(tool=TOOL, command=command, config=config, model=mkey, version=__version__,
                                 threads=threads, cells=len(keys), todo=len(todo), info=info)  # fmt: skip

        def write(row: VlmBenchRow) -> None:
            key = keys[row.label, row.rep]
            added[0] += int(store.add("bench", store_row(row, key=key, model=mkey, run_id=run_id, threads=threads,
                                                         tower=tower)))  # fmt: skip

        run_vlm_bench(model, inputs, specs, repetitions=repetitions, progress=progress,
                      skip=lambda s, rep: keys[s, rep] in done, on_row=write)  # fmt: skip
    stored = {r["key"]: r for r in store.rows("bench", "model = ?", (mkey,))}
    rows = [from_store(stored[keys[s, rep]]) for rep in range(repetitions) for s in specs if keys[s, rep] in stored]
    return rows, info, added[0]


# ------------------------------------------------------------------------------------------------ CLI
def cmd_bench_vlm(args: Any) -> int:
    """``tokensieve bench --vlm [TOWER]``: see the module docstring."""
    import shlex
    import sys

    from tqdm import tqdm

    from ..results.threads import use_threads

    spec = tower_spec(args.vlm)
    from .config import DEFAULT_METHODS as TEXT_DEFAULT

    methods = ",".join(DEFAULT_METHODS) if args.methods == TEXT_DEFAULT else args.methods
    budgets = [b.strip() for b in (args.budgets or ",".join(DEFAULT_BUDGETS)).split(",") if b.strip()]
    specs = vlm_bench_specs(methods, budgets)
    threads = use_threads(args.threads)
    parts = [
        "tokensieve",
        "bench",
        "--vlm",
        args.vlm,
        "--methods",
        methods,
        "--budgets",
        ",".join(budgets),
        "--reps",
        str(args.reps),
        "--threads",
        str(threads),
    ]
    for flag in ("report", "store"):
        if getattr(args, flag, None):
            parts += [f"--{flag}", str(getattr(args, flag))]
    command = " ".join(shlex.quote(p) for p in parts)
    store = None
    if getattr(args, "store", None):  # a store that cannot be written fails before the model is built
        from ..results.store import ResultStore

        store = ResultStore(args.store)
    print(f"building the {args.vlm} tower ({LABEL}) on the embedded SmolLM2-135M …", file=sys.stderr)
    model, tok = build_bench_model(spec)
    bar = tqdm(total=args.reps * len(specs), desc="bench vlm", unit="prefill", file=sys.stderr)

    def progress(done: int, _total: int, label: str) -> None:
        bar.n = done
        bar.set_postfix_str(label)
        bar.refresh()

    inputs = bench_inputs(model, tok)
    if store is not None:
        with store:
            rows, info, added = run_into_store(model, inputs, specs, store, tower=args.vlm, repetitions=args.reps,
                                               command=command, progress=progress)  # fmt: skip
        print(f"{added} rows written to {store.path}; `tokensieve report {store.path}` renders them", file=sys.stderr)
    else:
        rows, info = run_vlm_bench(model, inputs, specs, repetitions=args.reps, progress=progress)
    bar.close()
    summary = summarize(rows)
    print(f"{args.vlm} tower — {LABEL}; {info['threads']} threads; medians of {args.reps}")
    print(markdown_table(summary))
    if args.report:
        js, md = write_report(Path(args.report).expanduser(), summary, rows, info, command)
        print(f"report: {md} ({js})", file=sys.stderr)
    return 0
