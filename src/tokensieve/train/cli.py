"""`tokensieve train vlm` (train the embedded VLM) and `tokensieve train vlm-eval` (its accuracy on held-out scenes,
with all or a random fraction of the visual tokens)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def _train_args(p: argparse.ArgumentParser) -> None:
    from .vlm import TrainConfig

    defaults = TrainConfig()
    helps = {
        "out": "run directory: checkpoint/, train.log and final/ (rerunning the same command resumes)",
        "seed": "seed of initialisation and of every step's scenes and questions",
        "vision_steps": "steps of stage 1 (vision tower on dense targets)",
        "vision_batch": "images per stage-1 step",
        "steps": "steps of stage 2 (the whole VLM on conversations)",
        "batch": "images (conversations) per stage-2 step",
        "turns": "at most this many questions per conversation (drawn 1..turns)",
        "lora_rank": "rank of the LoRA factors on the language model (0: the language model is frozen as it is)",
        "lora_targets": "comma-separated Linear modules of each decoder layer that get LoRA factors",
        "text_layers": "decoder layers: SmolLM2's first N (0: all 30), or N new ones (with --text-hidden)",
        "text_hidden": "> 0: train a Llama decoder of this width from scratch instead of using SmolLM2's layers",
        "lr_text": "learning rate of the from-scratch decoder",
        "minutes": "wall-clock budget over the whole run (resumes included); the run stops and saves when it is spent",
        "autocast_bf16": "run the language model under bfloat16 autocast",
        "packed": "stage 2: every question of an image is its own branch after one image pass (as evaluated); "
        "--no-packed: one multi-turn conversation of 1..turns questions",
        "balanced": "stage 2: scenes drawn around a counting question whose answer its words do not tell",
        "caption": "stage 2: also answer 'List the objects.' (every object, left to right) for every image",
        "curriculum": "stage 2: scenes grow from 1 to 7 objects over the first N steps (needs --balanced)",
        "eval_every": "stage 2: every N steps, greedy accuracy on --eval-scenes validation scenes into train.log",
        "eval_scenes": "validation scenes of the periodic evaluation (one question of each type each)",
        "schedule": "stage 2's learning rate after the warm-up: cosine (to 0.1× over all steps) or wsd (constant, "
        "then cosine over the last --decay fraction; --steps may change on resume until the decay begins)",
        "decay": "with --schedule wsd: the fraction of the steps over which the rate decays",
    }
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helps.get(f.name))
        else:
            p.add_argument(flag, type=type(default), default=default, help=helps.get(f.name))
    p.add_argument("--ship", action="store_true", help="copy the final weights into the package (tokensieve/weights/)")
    p.add_argument("--no-progress", action="store_true")


def _check_vlm_config(cfg: Any) -> None:
    """Refuse settings the VLM trainer cannot run with, before a model is built (one message per mistake)."""
    if cfg.steps < 0 or cfg.vision_steps < 0 or cfg.batch < 1 or cfg.turns < 1:
        raise ConfigError("steps and vision-steps must be ≥ 0, batch and turns ≥ 1")
    positive = {
        "--hidden-size": cfg.hidden_size, "--num-layers": cfg.num_layers, "--num-heads": cfg.num_heads,
        "--text-heads": cfg.text_heads, "--text-kv-heads": cfg.text_kv_heads, "--vision-batch": cfg.vision_batch,
        "--checkpoint-every": cfg.checkpoint_every, "--log-every": cfg.log_every, "--threads": cfg.threads,
    }  # fmt: skip
    for flag, value in positive.items():
        if value < 1:
            raise ConfigError(f"{flag} must be ≥ 1, got {value}")
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"--hidden-size {cfg.hidden_size} must be a multiple of --num-heads {cfg.num_heads}")
    if not 0 <= cfg.text_layers <= 30:
        raise ConfigError(f"--text-layers takes 0 (all 30 of SmolLM2's layers) to 30, got {cfg.text_layers}")
    if cfg.text_hidden < 0 or cfg.text_intermediate < 0:
        raise ConfigError("--text-hidden and --text-intermediate must be ≥ 0 (0: SmolLM2's own decoder)")
    if cfg.text_hidden and (cfg.text_hidden % cfg.text_heads or cfg.text_heads % cfg.text_kv_heads):
        raise ConfigError(
            f"--text-hidden {cfg.text_hidden} must be a multiple of --text-heads {cfg.text_heads}, "
            f"itself a multiple of --text-kv-heads {cfg.text_kv_heads}"
        )
    if cfg.lora_rank < 0 or cfg.lora_alpha <= 0:
        raise ConfigError(f"--lora-rank must be ≥ 0 and --lora-alpha > 0, got {cfg.lora_rank} and {cfg.lora_alpha}")
    rates = {"--vision-lr": cfg.vision_lr, "--lr-vision": cfg.lr_vision, "--lr-projector": cfg.lr_projector,
             "--lr-lora": cfg.lr_lora, "--lr-text": cfg.lr_text, "--aux-weight": cfg.aux_weight}  # fmt: skip
    for flag, value in rates.items():
        if not value >= 0 or value == float("inf"):
            raise ConfigError(f"{flag} must be a finite number ≥ 0, got {value}")
    if cfg.warmup < 0 or cfg.curriculum < 0:
        raise ConfigError("--warmup and --curriculum must be ≥ 0")
    if not cfg.minutes > 0:
        raise ConfigError(f"--minutes must be > 0, got {cfg.minutes}")


def cmd_train_vlm(args: argparse.Namespace) -> int:
    from .vlm import TrainConfig, Trainer, ship

    values: dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "extra"}
    cfg = TrainConfig(**values)
    _check_vlm_config(cfg)
    if cfg.schedule not in ("cosine", "wsd"):
        raise ConfigError(f"--schedule is cosine or wsd, not {cfg.schedule!r}")
    if not 0 < cfg.decay <= 1:
        raise ConfigError(f"--decay is a fraction of the steps in (0, 1], got {cfg.decay}")
    if cfg.curriculum > 0 and not cfg.balanced:
        raise ConfigError("--curriculum draws scenes of 1..7 objects, which only --balanced scenes have")
    if cfg.eval_every < 0 or cfg.eval_scenes < 1:
        raise ConfigError("--eval-every must be ≥ 0 and --eval-scenes ≥ 1")
    command = "tokensieve train vlm " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    trainer = Trainer(cfg, progress=not args.no_progress, command=command)
    path = trainer.run()
    print(path)
    if args.ship:
        from ..adapters.vlm import VLM_NAME, weights_dir

        dst = ship(cfg.out, weights_dir(VLM_NAME), command=command)
        print(f"shipped to {dst}")
    return 0


def cmd_vlm_eval(args: argparse.Namespace) -> int:
    import torch

    from ..adapters.vlm import load_vlm
    from .evaluate import evaluate, markdown_table
    from .vlm_store import open_store, store_eval, store_overlays

    torch.set_num_threads(args.threads)
    fractions = tuple(float(x) for x in args.keep.split(",") if x.strip())
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(f"--keep takes fractions in (0, 1], got {args.keep!r}")
    if getattr(args, "store", None) and not args.methods:
        raise ConfigError("--store records the visual-token method comparison: give --methods (and --budgets).")
    store = open_store(args)  # a store that cannot be written fails before the model loads
    model, processor = load_vlm(args.model)
    if args.methods:
        from .evaluate import evaluate_specs, spec_table, visual_specs

        specs = visual_specs(args.methods, args.budgets)
        if args.overlays:
            from .overlays import overlay_figure

            path = overlay_figure(model, processor, specs, Path(args.overlays), n_scenes=args.scenes)
            print(f"overlays: {path}")
            if store is not None:
                store_overlays(store, args, model, specs, path)
            return 0
        if store is not None:
            by_spec = store_eval(store, args, model, processor, specs)
        else:
            by_spec = evaluate_specs(
                model, processor, specs, n_scenes=args.scenes, split=args.split, progress=not args.no_progress
            )
        print(spec_table(by_spec))
        if args.json:
            payload = {
                s: {"overall": a.overall(), "right": dict(a.right), "total": dict(a.total), "questions": a.count()}
                for s, a in by_spec.items()
            }
            Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        return 0
    from .evaluate import as_json, control_table, prior_accuracy

    common = {"n_scenes": args.scenes, "split": args.split, "seed": args.seed, "progress": not args.no_progress}
    results = evaluate(model, processor, fractions=fractions, **common)
    print(markdown_table(results))
    main = max(fractions)
    rows = {f"model ({'all' if main >= 1 else f'{100 * main:.0f} % random'} visual tokens)": results[main]}
    rows["prior (no image: best answer to the words)"] = prior = prior_accuracy(args.scenes, args.split)
    swap = None
    if args.swap_images:
        swap = evaluate(model, processor, fractions=(main,), swap_images=True, **common)[main]
        rows["image swap (another scene's image)"] = swap
    print()
    print(control_table(rows))
    if args.json:
        data: dict[str, Any] = {**as_json(results[main]), "keep": {str(f): as_json(a) for f, a in results.items()}}
        data["prior"] = as_json(prior)
        if swap is not None:
            data["swap_images"] = as_json(swap)
        data["model"] = args.model
        data["split"] = args.split
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("train", help="training runs of the lab (the embedded VLM)")
    tsub = p.add_subparsers(dest="train_command", required=True)
    from .spkv import add_commands as add_spkv_commands  # `tokensieve train spkv`: SP-KV's write gate
    from .spkv_figure import add_command as add_spkv_figure_command  # `tokensieve train spkv-figure`

    add_spkv_commands(tsub)
    add_spkv_figure_command(tsub)
    from .retention import add_commands as add_retention_commands  # `tokensieve train retention`: global gates

    add_retention_commands(tsub)
    from .kvzap import add_commands as add_kvzap_commands  # `tokensieve train kvzap`: KVzap's surrogates

    add_kvzap_commands(tsub)
    v = tsub.add_parser("vlm", help="train the embedded VLM on procedural scenes (resumable; see docs/VLM.md)")
    _train_args(v)
    v.set_defaults(func=cmd_train_vlm)
    e = tsub.add_parser("vlm-eval", help="accuracy of the VLM on held-out scenes, all or random visual tokens kept")
    e.add_argument("--model", default="smollm2-135m-llava", help="the embedded VLM's name or a run's final/ directory")
    e.add_argument("--scenes", type=int, default=100, help="held-out scenes (one question of each type per scene)")
    e.add_argument("--keep", default="1,0.33,0.11", help="fractions of visual tokens kept (random, removed at the LM)")
    e.add_argument("--split", default="test", choices=["val", "test"])
    e.add_argument("--seed", type=int, default=0, help="seed of the random choice of kept tokens")
    e.add_argument(
        "--methods",
        default="",
        help="visual-token methods to compare through the pruning adapters (comma-separated, 'all' = every "
        "registered one), each at every --budgets value; the full model is always included (instead of --keep)",
    )
    e.add_argument("--budgets", default="0.33,0.22,0.11", help="visual tokens kept per image, with --methods")
    e.add_argument(
        "--overlays",
        default=None,
        metavar="PNG",
        help="with --methods: instead of accuracy, draw the patches each spec keeps over the first --scenes images",
    )
    e.add_argument(
        "--swap-images",
        action="store_true",
        help="also the image-swap control: each scene's questions asked with another test scene's image",
    )
    e.add_argument(
        "--store",
        default=None,
        metavar="FILE",
        help="with --methods: write one row per (spec, scene, question) to this SQLite results store (resumable; "
        "`tokensieve report FILE` renders it); with --overlays: record the figure there for the report",
    )
    e.add_argument("--threads", type=int, default=2)
    e.add_argument(
        "--json",
        default=None,
        help="also write the numbers to this JSON file: overall, per_type, questions (the largest --keep), every "
        "--keep fraction, the image-blind prior and, with --swap-images, the control",
    )
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_vlm_eval)
    from .daam_cli import add_commands as add_daam_commands

    add_daam_commands(tsub)
    from .video_dit import add_commands as add_video_commands  # `tokensieve train video-dit`, `train video-gate`

    add_video_commands(tsub)
