"""Report sections built from stored rows: accuracy (``eval`` rows), speed and memory (``bench`` rows), the two
side by side for every configuration measured by both, and a VLM's visual-token methods (their own rows:
:func:`~.store.is_visual`). Each returns a list of :class:`~.render.Block`."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from . import plots
from .render import Block, cell, fmt, score_text, slug
from .stats import (
    FULL,
    Paired,
    Row,
    accuracy,
    extra,
    group,
    interval,
    kv_kept,
    mean,
    median,
    ordered_labels,
    paired,
    sem,
    values,
    visual_kept,
    wilson,
)

MB = 2**20


# ----------------------------------------------------------------------------------------------------- accuracy
def baseline_table(rows: list[Row]) -> Block:
    """Full-cache score per task (rows) and length (columns): mean and 95 % interval (Wilson for proportions)."""
    full = [r for r in rows if r["label"] == FULL]
    lengths = sorted({int(r["length"]) for r in full})
    header = ["task", "metric", *[f"{L} tok" for L in lengths], "samples"]
    body = []
    for task in sorted({r["task"] for r in full}):
        trows = [r for r in full if r["task"] == task]
        metric = trows[0]["metric"]
        cells = []
        for L in lengths:
            s = values([r for r in trows if int(r["length"]) == L], "score")
            cells.append(score_text(metric, mean(s), sem(s), *interval(s)) if s else "—")
        n = group(trows, lambda r: (int(r["length"]),))
        body.append([task, metric, *cells, "/".join(str(len(n.get((L,), []))) for L in lengths)])
    return Block("table", header=header, body=body)


def accuracy_table(rows: list[Row]) -> Block:
    header = ["task", "configuration", "budget", "n", "score", "KL (nats)", "top-1", "answer log-lik", "KV MB",
              "KV kept", "prefill s", "compress s", "decode s"]  # fmt: skip
    body = []
    order = {lab: i for i, lab in enumerate(ordered_labels(rows))}
    groups = group(rows, lambda r: (r["task"], r["label"]))
    for (task, label), grows in sorted(groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])):
        s = accuracy(grows)
        score = score_text(grows[0]["metric"], s.score, s.score_sem, s.score_lo, s.score_hi)
        body.append([task, label, grows[0]["budget"], str(s.n), score,
                     fmt(s.kl, 3), fmt(s.top1), fmt(s.answer_logprob), fmt(s.kv_mb, 1), fmt(s.kept, pct=True),
                     fmt(s.prefill_s), fmt(s.compress_s, 3), fmt(s.decode_s)])  # fmt: skip
    return Block("table", header=header, body=body)


def summary_table(rows: list[Row]) -> Block:
    """The results table ``tokensieve eval`` prints at the end (as lm-eval-harness does): per task, mode and
    configuration, the samples, the task's metric (mean and standard error), KL to the full cache and KV kept."""
    header = ["task", "mode", "method", "budget", "n", "metric", "value", "± stderr", "95 % CI", "KL", "KV kept"]
    order = {lab: i for i, lab in enumerate(ordered_labels(rows))}
    groups = group(rows, lambda r: (r["task"], r["mode"], r["label"]))
    body = []
    for (task, mode, _label), grows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order[kv[0][2]])):
        s = accuracy(grows)
        metric = grows[0]["metric"]
        err = "" if metric == "perplexity" or math.isnan(s.score_sem) else f"{s.score_sem:.3f}"
        ci = "" if metric == "perplexity" or math.isnan(s.score_lo) else f"{s.score_lo:.2f}–{s.score_hi:.2f}"
        body.append([task, mode, grows[0]["method"], grows[0]["budget"], str(s.n), metric,
                     fmt(s.score, 2 if metric == "perplexity" else 3), err, ci, fmt(s.kl, 3),
                     fmt(s.kept, pct=True)])  # fmt: skip
    return Block("table", header=header, body=body)


def provenance(rows: list[Row], runs: list[Row], store_name: str) -> list[Block]:
    """What the accuracy rows are (models, versions, threads, dates, time spent) and the commands that filled the
    store."""
    blocks: list[Block] = []
    commands = list(dict.fromkeys(r["command"] for r in runs if r.get("command")))
    if not rows:
        return [Block("p", "Produced by:"), Block("code", "\n".join(commands))] if commands else []
    models = sorted({r["model"] for r in rows})
    versions = sorted({r["version"] for r in rows})
    threads = sorted({int(r["threads"]) for r in rows if r.get("threads")})
    day = time.strftime("%Y-%m-%d", time.gmtime(min(r["created"] for r in rows)))
    compute = sum(values(rows, "cell_s"))
    blocks += [
        Block(
            "p",
            f"{len(rows)} accuracy measurements from `{store_name}`; model {', '.join(models)}; tokensieve "
            f"{', '.join(versions)}; {', '.join(map(str, threads)) or '?'} CPU thread(s); measured from {day}, "
            f"{compute / 60:.0f} min of measuring in total. Accuracy is the share of expected answers found "
            "(perplexity for the ppl task); KL and top-1 compare each cell's next-token distributions with the full "
            "cache's over a teacher-forced continuation (the full cache's own answer); KV kept = stored entries / "
            "full-cache entries of the same prompt; times are medians and come from a shared machine.",
        )
    ]
    if commands:
        blocks += [Block("p", "Produced by:"), Block("code", "\n".join(commands))]
    return blocks


def accuracy_sections(rows: list[Row], out: Path) -> list[Block]:
    """Per mode: the full-cache baseline, accuracy vs KV kept, needle accuracy by depth (and length), accuracy vs
    prompt length, and the table of accuracy, fidelity and cost."""
    blocks: list[Block] = []
    modes = sorted({r["mode"] for r in rows})
    for mode in modes:
        mrows = [r for r in rows if r["mode"] == mode]
        suffix = f" — {mode}" if len(modes) > 1 else f" ({mode})"
        blocks += [Block("h2", "Full-cache baseline" + suffix), baseline_table(mrows)]
        path = out / f"pareto_{mode}.png"
        if plots.pareto(mrows, mode, path):
            blocks += [Block("h2", "Accuracy vs KV budget" + suffix), Block("image", "accuracy vs KV kept", path=path)]
        needle_rows = [r for r in mrows if r.get("depth") is not None]
        if needle_rows:
            labels = ordered_labels(needle_rows)
            if len({r["length"] for r in needle_rows}) == 1:  # one length: one matrix instead of a map per label
                p = out / f"needles_{mode}.png"
                if plots.depth_matrix(needle_rows, labels, mode, p):
                    blocks.append(Block("h2", "Needle accuracy by depth" + suffix))
                    blocks.append(Block("image", "needle depths", path=p))
                labels = []
            else:
                blocks.append(Block("h2", "Needle heatmaps, depth × length" + suffix))
            for label in labels:
                p = out / f"heatmap_{mode}_{slug(label)}.png"
                if plots.heatmaps([r for r in needle_rows if r["label"] == label], mode, label, p):
                    blocks.append(Block("image", f"needle heatmap {label}", path=p))
        path = out / f"lengths_{mode}.png"
        if plots.lengths(mrows, mode, path):
            blocks.append(Block("h2", "Accuracy vs prompt length" + suffix))
            blocks.append(Block("image", "accuracy vs length", path=path))
        blocks += [
            Block("h2", "Accuracy, fidelity and cost" + suffix),
            Block("p", "Means over lengths, depths and seeds (score ± standard error); times are medians."),
            accuracy_table(mrows),
        ]
    return blocks


# -------------------------------------------------------------------------------------------------------- speed
SPEED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (header, key, format)
    ("configuration", "label", "s"),
    ("ctx", "length", "d"),
    ("bs", "batch", "d"),
    ("prefill s", "prefill_s", ".2f"),
    ("compress %", "compress_share", ".1%"),
    ("TTFT s", "ttft_s", ".2f"),
    ("TTFT ×", "ttft_speedup", ".2f"),
    ("prefill attn s", "prefill_attn_s", ".2f"),
    ("attn % of prefill", "prefill_attn_share", ".0%"),
    ("prefill ×", "prefill_speedup", ".2f"),
    ("of Amdahl", "of_amdahl", ".2f"),
    ("compile s", "compile_s", ".1f"),
    ("decode tok/s", "tok_s", ".1f"),
    ("speed-up", "speedup", ".2f"),
    ("ideal speed-up", "ideal_speedup", ".2f"),
    ("attn ms/step", "attn_ms", ".1f"),
    ("attn ×", "attn_ratio", ".2f"),
    ("KV MB", "kv_mb", ".1f"),
    ("KV ×", "kv_ratio", ".3f"),
    ("read MB/step", "read_mb", ".1f"),
    ("peak RSS MB prefill", "prefill_peak_mb", ".0f"),
    ("peak RSS MB decode", "decode_peak_mb", ".0f"),
)

SPEED_NOTE = (
    "Ratios are against the full cache at the same context length and batch size, measured in the same run. "
    "*speed-up* is decode tokens/s; *ideal speed-up* is what the bytes read per step allow at the measured "
    "bandwidth (weights + KV read, full vs this configuration); *attn ×* is the full cache's attention time "
    "per step divided by this configuration's; *KV ×* is stored KV bytes relative to the full cache; "
    "*compress %* is compression time as a share of the full cache's prefill time; *TTFT ×* is the full cache's "
    "time to first token divided by this configuration's; *prefill attn s* is the wall time inside the prefill's "
    "attention calls (causal or sparse, summed over layers) and *attn % of prefill* its share of this "
    "configuration's prefill; *compile s* is FlexAttention compilation inside a timed prefill, the largest over "
    "repetitions (0 unless a prefill needed a graph the warm-up did not compile; the warm-up's own compile time is in "
    "the machine line); *peak RSS* is the "
    "process's resident memory (model weights included), highest while prefilling and while decoding."
)


def speed_cells(row: Row) -> list[str]:
    row = {
        **row,
        "kv_mb": row["kv_bytes"] / MB,
        "read_mb": row["bytes_read"] / MB,
        "prefill_peak_mb": row["prefill_peak_rss"] / MB,
        "decode_peak_mb": row["decode_peak_rss"] / MB,
    }
    return [cell(row.get(key), spec) for _, key, spec in SPEED_COLUMNS]


def speed_table(summary: list[Row]) -> Block:
    return Block("table", header=[h for h, _, _ in SPEED_COLUMNS], body=[speed_cells(r) for r in summary])


def machine(info: dict[str, Any]) -> str:
    bw = info.get("bandwidth", 0) / 1e9
    return (
        f"{info.get('cores', '?')} CPU cores ({info.get('cpu', '?')}), {info.get('threads', '?')} torch threads, "
        f"torch {info.get('torch', '?')}, {info.get('memory_gib', '?')} GiB RAM; measured read bandwidth "
        f"{bw:.1f} GB/s; model {info.get('model', '?')} ({info.get('weights_bytes', 0) / MB:.0f} MB of weights, "
        f"read once per decode step); {info.get('decode_tokens', '?')} decoded tokens, medians of "
        f"{info.get('repetitions', '?')} interleaved repetitions; tokensieve {info.get('version', '?')}."
        + (
            f" FlexAttention compiled in the warm-up: {info['warmup_compile_s']:.1f} s."
            if info.get("warmup_compile_s")
            else ""
        )
    )


def speed_sections(summary: list[Row], info: dict[str, Any], out: Path, *, heading: str | None = None) -> list[Block]:
    """The machine, the table of every configuration, length and batch size, what the columns mean, two plots."""
    blocks = [Block("h2", heading)] if heading else []
    blocks += [Block("p", machine(info)), speed_table(summary), Block("p", SPEED_NOTE)]
    blocks += [Block("image", p.stem, path=p) for p in plots.speed(summary, out)]
    return blocks


# ------------------------------------------------------------------------------------------------------- joined
def joined_sections(eval_rows: list[Row], summary: list[Row]) -> list[Block]:
    """Accuracy and speed side by side, one table per (context length, batch size) of the benchmark, for every
    configuration (label) with both accuracy rows and speed rows."""
    both = {r["label"] for r in eval_rows} & {r["label"] for r in summary}
    if not both:
        return []
    acc_rows = [r for r in eval_rows if r["label"] in both and r["metric"] == "accuracy"]
    modes = sorted({r["mode"] for r in acc_rows})
    by = group(acc_rows, lambda r: (r["label"], r["mode"]))
    fid = group([r for r in eval_rows if r["label"] in both], lambda r: (r["label"], r["mode"]))
    tasks = sorted({r["task"] for r in acc_rows})
    lengths = sorted({int(r["length"]) for r in acc_rows})
    counts = sorted({len([r for r in acc_rows if r["label"] == lab]) for lab in both})
    samples = "/".join(map(str, counts)) if counts else "0"
    suffix = (lambda m: f" ({m})") if len(modes) > 1 else (lambda m: "")
    header = ["configuration", "TTFT s", "TTFT ×", "prefill attn s", "decode tok/s", "speed-up", "attn ×", "KV MB",
              "KV ×", "peak RSS MB decode"]  # fmt: skip
    header += [f"accuracy{suffix(m)}" for m in modes] + [f"KL{suffix(m)}" for m in modes]
    order = {lab: i for i, lab in enumerate(ordered_labels(eval_rows))}
    blocks = [
        Block("h2", "Accuracy and speed, side by side"),
        Block(
            "p",
            f"Every configuration measured by both `tokensieve eval` and `tokensieve bench` in this store "
            f"({len(both)} of them). Accuracy is the mean score over {', '.join(tasks) or 'no accuracy task'} at "
            f"{', '.join(map(str, lengths)) or '—'} tokens ({samples} samples per configuration); KL (nats) is the "
            "mean over the teacher-forced continuation; speed columns are the benchmark's medians at each context "
            "length and batch size, against the full cache of the same run.",
        ),
    ]
    index = {(r["label"], r["length"], r["batch"]): r for r in summary}
    for length, batch in sorted({(r["length"], r["batch"]) for r in summary}):
        body = []
        for label in sorted(both, key=lambda lab: order.get(lab, math.inf)):
            s = index.get((label, length, batch))
            if s is None:
                continue
            row = [label, cell(s.get("ttft_s"), ".2f"), cell(s.get("ttft_speedup"), ".2f"),
                   cell(s.get("prefill_attn_s"), ".2f"),
                   cell(s.get("tok_s"), ".1f"), cell(s.get("speedup"), ".2f"), cell(s.get("attn_ratio"), ".2f"),
                   cell(s["kv_bytes"] / MB, ".1f"), cell(s.get("kv_ratio"), ".3f"),
                   cell(s["decode_peak_rss"] / MB, ".0f")]  # fmt: skip
            row += [fmt(accuracy(by.get((label, m), [])).score) for m in modes]
            row += [fmt(accuracy(fid.get((label, m), [])).kl, 3) for m in modes]
            body.append(row)
        if body:
            blocks += [Block("h3", f"{length} tokens, batch {batch}"), Block("table", header=header, body=body)]
    return blocks


# ------------------------------------------------------------------------------------------ visual-token methods
RANDOM = "vis:random"  # the random baseline every visual-token method is compared with
QUESTION_TYPES = ("attribute", "existence", "counting", "spatial", "reading")  # the order of data/scenes.py


def _qtype(row: Row) -> str:
    return str(row["task"]).split("/", 1)[-1]


def _item(row: Row) -> tuple[Any, ...]:
    """The question a VLM row answers (model, task and its options: split, scene, question text)."""
    return (row["model"], row["task"], row.get("task_options"))


def _split(row: Row) -> str:
    try:
        return str(json.loads(row.get("task_options") or "{}").get("split", "?"))
    except ValueError:
        return "?"


def _wilson_text(rs: list[Row]) -> str:
    xs = values(rs, "score")
    if not xs:
        return "—"
    lo, hi = wilson(sum(xs), len(xs))
    return f"{mean(xs):.2f} [{lo:.2f}–{hi:.2f}]"


def vlm_spec_table(rows: list[Row]) -> Block:
    """Per visual spec: visual tokens and KV kept, answers, accuracy overall and per question type (95 % Wilson)."""
    types = [t for t in QUESTION_TYPES if any(_qtype(r) == t for r in rows)]
    types += sorted({_qtype(r) for r in rows} - set(types))
    header = ["configuration", "budget", "visual kept", "KV kept", "n", "all questions", *types]
    body = []
    by_label = group(rows, lambda r: (r["label"],))
    for label in ordered_labels(rows):
        rs = by_label[(label,)]
        vk = [x for x in (visual_kept(r) for r in rs) if not math.isnan(x)]
        kk = [x for x in (kv_kept(r) for r in rs) if not math.isnan(x)]
        cells = [_wilson_text([r for r in rs if _qtype(r) == t]) for t in types]
        body.append([label, rs[0]["budget"], fmt(mean(vk), pct=True) if vk else "—",
                     fmt(mean(kk), pct=True) if kk else "—", str(len(rs)), _wilson_text(rs), *cells])  # fmt: skip
    return Block("table", header=header, body=body)


def vlm_sign_tests(rows: list[Row]) -> list[tuple[str, str, Paired]]:
    """(configuration, its random baseline, the paired comparison) for each method but random and the full model,
    against ``vis:random`` at the same budget, on the questions both answered (:func:`~.stats.paired`: the exact
    two-sided sign test on the discordant pairs)."""
    randoms = {r["budget"]: r["label"] for r in rows if r["method"] == RANDOM}
    if not randoms:
        return []
    by_label = group(rows, lambda r: (r["label"],))
    out = []
    for label in ordered_labels(rows):
        first = by_label[(label,)][0]
        base = randoms.get(first["budget"])
        if label != FULL and first["method"] != RANDOM and base is not None:
            out.append((label, base, paired(by_label[(label,)], by_label[(base,)], _item)))
    return out


def vlm_sign_table(rows: list[Row]) -> Block | None:
    """:func:`vlm_sign_tests` as a table; None when the rows have no random baseline to compare with."""
    body = [
        [label, base, str(p.n), str(p.both), str(p.only_a), str(p.only_b), fmt(p.score_a), fmt(p.score_b),
         f"{p.score_a - p.score_b:+.3f}" if p.n else "—", f"{p.p:.3g}"]
        for label, base, p in vlm_sign_tests(rows)
    ]  # fmt: skip
    if not body:
        return None
    header = ["configuration", "vs", "pairs", "both right", "only this right", "only random right", "accuracy",
              "random's", "difference", "p (sign test)"]  # fmt: skip
    return Block("table", header=header, body=body)


def vlm_speed_table(bench_rows: list[Row], eval_rows: list[Row]) -> Block:
    """``tokensieve bench --vlm`` rows: medians per configuration, ratios against the unpruned model of the same
    benchmark model, and the accuracy of the same label where the evaluation rows are of one model and split (the
    model evaluated, named in the header, is not the benchmark's: labels join, weights need not)."""
    sources = sorted({(r["model"], _split(r)) for r in eval_rows})
    acc = group(eval_rows, lambda r: (r["label"],)) if len(sources) == 1 else {}
    med: dict[tuple[str, str], dict[str, float]] = {}
    for (model, label), rs in group(bench_rows, lambda r: (r["model"], r["label"])).items():
        ex = [extra(r) for r in rs]

        def m(xs: list[Any]) -> float:
            vals = [float(x) for x in xs if x is not None]
            return median(vals) if vals else math.nan

        med[(model, label)] = {
            "reps": len(rs),
            "ttft": m([r.get("ttft_s") for r in rs]),
            "cpu": m([e.get("ttft_cpu_s") for e in ex]),
            "vision": m([e.get("vision_s") for e in ex]),
            "lm": m([e.get("lm_prefill_s") for e in ex]),
            "score_ms": 1e3 * m([r.get("compress_s") for r in rs]),
            "flops": m([(e.get("vision_flops") or 0) + (e.get("lm_flops") or 0) for e in ex]),
            "kv": m([r.get("kv_bytes") for r in rs]),
            "rss": m([r.get("prefill_peak_rss") for r in rs]),
            "lm_in": m([e.get("visual_tokens") for e in ex]),
            "kept": m([e.get("kept_tokens") for e in ex]),
            "image": m([e.get("image_tokens") for e in ex]),
        }
    header = ["model", "configuration", "reps", "visual tokens (LM in → kept)", "TTFT s", "TTFT ×", "CPU ×",
              "FLOPs ×", "vision s", "LM prefill s", "scoring ms", "KV MB", "KV ×", "peak RSS MB"]  # fmt: skip
    if acc:
        header.append(f"accuracy ({sources[0][0]}, {sources[0][1]})")

    def ratio(a: float, b: float) -> str:
        return fmt(a / b) if b and not (math.isnan(a) or math.isnan(b)) else "—"

    body = []
    for model in sorted({k[0] for k in med}):
        rows_m = [r for r in bench_rows if r["model"] == model]
        full = med.get((model, FULL))
        for label in ordered_labels(rows_m):
            x = med[(model, label)]
            row = [model, label, str(int(x["reps"])), f"{x['lm_in']:.0f} → {x['kept']:.0f} of {x['image']:.0f}",
                   fmt(x["ttft"], 3), ratio(full["ttft"], x["ttft"]) if full else "—",
                   ratio(full["cpu"], x["cpu"]) if full else "—", ratio(full["flops"], x["flops"]) if full else "—",
                   fmt(x["vision"], 3), fmt(x["lm"], 3), fmt(x["score_ms"], 1), fmt(x["kv"] / MB, 2),
                   ratio(x["kv"], full["kv"]) if full else "—", fmt(x["rss"] / MB, 0)]  # fmt: skip
            if acc:
                row.append(_wilson_text(acc.get((label,), [])))
            body.append(row)
    return Block("table", header=header, body=body)


def vlm_sections(eval_rows: list[Row], bench_rows: list[Row], out: Path, overlays: Path | None = None) -> list[Block]:
    """The visual-token methods of a VLM: per (model, split) of ``tokensieve train vlm-eval --store`` rows, accuracy
    against the visual tokens kept (plot), a table per spec and the paired sign test against random; the kept-patch
    figure (``overlays``, copied into ``out``); the prefill speed of ``tokensieve bench --vlm --store`` rows."""
    if not eval_rows and not bench_rows:
        return []
    blocks = [Block("h2", "Visual-token pruning (VLM)")]
    groups = group(eval_rows, lambda r: (r["model"], _split(r)))
    for (model, split), rows in sorted(groups.items()):
        n_scenes = len({r.get("seed") for r in rows})
        scenes = f"{n_scenes} held-out procedural scene" + ("" if n_scenes == 1 else "s")
        n_q = len({_item(r) for r in rows})
        blocks.append(Block("h3", f"Accuracy of {model} on {split} scenes"))
        blocks.append(Block(
            "p",
            f"{len(rows)} answers: {n_q} questions of {scenes} under "
            f"{len({r['label'] for r in rows})} configurations (`tokensieve train vlm-eval --store`). An answer is "
            "right when the greedy answer is exactly the gold answer and then `<|im_end|>` (query-aware: the question "
            "is in the prompt the methods see). *visual kept* is the visual tokens that reach the language model's "
            "last layer over the image's visual tokens; *KV kept* the KV entries the prefill stored over the unpruned "
            "prompt's. Accuracies with 95 % Wilson intervals; in the plot, methods at one budget are drawn up to "
            "±0.015 apart so that their intervals stay apart.",
        ))  # fmt: skip
        path = out / f"vlm_accuracy_{slug(model)}_{slug(split)}.png"
        if plots.vlm_accuracy(rows, path, f"{model}: accuracy vs visual tokens kept ({split} scenes)", QUESTION_TYPES):
            blocks.append(Block("image", "accuracy vs visual tokens kept", path=path))
        blocks.append(vlm_spec_table(rows))
        sign = vlm_sign_table(rows)
        if sign is not None:
            blocks += [
                Block("h3", f"Against random selection ({model}, {split})"),
                Block(
                    "p",
                    f"Each method against `{RANDOM}` at the same budget, on the questions both answered: *only this "
                    "right* and *only random right* are the discordant pairs; *p* is the exact two-sided sign test on "
                    "them (binomial, p = 1/2). With few discordant pairs no difference can reach significance.",
                ),
                sign,
            ]
    if overlays is not None and overlays.is_file():
        dst = out / "vlm_kept_patches.png"
        if overlays.resolve() != dst.resolve():
            shutil.copyfile(overlays, dst)
        blocks += [
            Block("h3", "Which patches each method keeps"),
            Block(
                "p",
                "Held-out scenes (rows) with their first question in the prompt, one column per configuration "
                "(`tokensieve train vlm-eval --overlays`): darkest — removed before the language model; half-dimmed — "
                "removed inside it; clear — kept to the last layer.",
            ),
            Block("image", "kept patches", path=dst),
        ]
    if bench_rows:
        blocks += [
            Block("h3", "Prefill speed (tokensieve bench --vlm)"),
            Block(
                "p",
                "Medians over repetitions of one prompt with one image; ratios against the unpruned model (`full`) "
                "of the same benchmark model: *TTFT ×* wall time, *CPU ×* process CPU time (steadier on a shared "
                "machine), *FLOPs ×* analytic FLOPs of the vision side and the language model's prefill, *KV ×* "
                "stored KV bytes. *scoring ms* is the methods' own score → select → apply. The benchmark's vision "
                "weights are random (speed does not depend on them); *accuracy*, where shown, is the evaluated "
                "model's (named in the header) under the same label.",
            ),
            vlm_speed_table(bench_rows, eval_rows),
        ]
    return blocks


def vlm_json(eval_rows: list[Row]) -> list[dict[str, Any]]:
    """Machine-readable VLM aggregates per (model, split, configuration, question type or ``all``), and each
    method's sign test against random."""
    out: list[dict[str, Any]] = []
    for (model, split), rows in sorted(group(eval_rows, lambda r: (r["model"], _split(r))).items()):
        for (label,), rs in group(rows, lambda r: (r["label"],)).items():
            for qtype in ["all", *sorted({_qtype(r) for r in rs})]:
                sub = rs if qtype == "all" else [r for r in rs if _qtype(r) == qtype]
                xs = values(sub, "score")
                lo, hi = wilson(sum(xs), len(xs))
                vk = [x for x in (visual_kept(r) for r in sub) if not math.isnan(x)]
                out.append({"model": model, "split": split, "label": label, "method": rs[0]["method"],
                            "budget": rs[0]["budget"], "questions": qtype, "n": len(xs), "right": int(sum(xs)),
                            "accuracy": mean(xs) if xs else None, "lo": lo, "hi": hi,
                            "visual_kept": mean(vk) if vk else None})  # fmt: skip
        for label, base, p in vlm_sign_tests(rows):
            out.append({"model": model, "split": split, "label": label, "vs": base, "pairs": p.n, "both": p.both,
                        "only_this": p.only_a, "only_random": p.only_b, "sign_test_p": p.p})  # fmt: skip
    return out


__all__ = [
    "SPEED_COLUMNS",
    "accuracy_sections",
    "accuracy_table",
    "baseline_table",
    "joined_sections",
    "machine",
    "provenance",
    "speed_cells",
    "speed_sections",
    "speed_table",
    "vlm_json",
    "vlm_sections",
    "vlm_sign_table",
    "vlm_sign_tests",
    "vlm_spec_table",
    "vlm_speed_table",
]
