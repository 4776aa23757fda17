"""`tokensieve generate-video PROMPT --out clip.gif`: one clip of the embedded video DiT, dense or under a DiT spec."""

from __future__ import annotations

import argparse
import time
from typing import Any


def cmd_generate_video(args: argparse.Namespace) -> int:
    import torch

    from ..adapters.diffusion import sparsify
    from ..adapters.diffusion.embedded import load_embedded, sample, write_gif

    torch.set_num_threads(args.threads)
    model = load_embedded(args.model)
    model.parse(args.prompt)  # a prompt the model cannot condition on is refused before any work
    sieve = sparsify(model.transformer, args.spec, num_steps=args.steps) if args.spec != "full" else None
    t0 = time.perf_counter()
    if sieve is not None:
        with sieve:
            video = sample(model, [args.prompt], [args.seed], steps=args.steps, guidance=args.guidance, sieve=sieve)
    else:
        video = sample(model, [args.prompt], [args.seed], steps=args.steps, guidance=args.guidance)
    dt = time.perf_counter() - t0
    path = write_gif(video[0], args.out, scale=args.scale)
    extra = "" if sieve is None else f", attention density {sieve.stats.density():.2f}"
    print(f"{path} ({dt:.1f} s{extra})")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("generate-video", help="a clip of the embedded video DiT as an animated GIF (docs/DIT.md)")
    p.add_argument("prompt", help='e.g. "a red circle moving right"')
    p.add_argument("--out", default="clip.gif")
    p.add_argument("--model", default=None, help="a folder written by `train video-dit` (default: the shipped model)")
    p.add_argument("--spec", default="full", help="a DiT spec, e.g. svg:0.3, radial, svg2[top_p=0.9] (default: dense)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--scale", type=int, default=4, help="upscale the GIF this many times")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_generate_video)
