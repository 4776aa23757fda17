"""`tokensieve profile <kind>`: create a per-model profile that a method needs."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..adapters.profiles import Profile, save_profile
from ..errors import UnknownNameError


def _retrieval_heads(model: Any, tok: Any, args: argparse.Namespace) -> Profile:
    from .retrieval_heads import profile_retrieval_heads

    return profile_retrieval_heads(model, n_random=args.n_random, repeats=args.repeats, seed=args.seed)


def _compresskv(model: Any, tok: Any, args: argparse.Namespace) -> Profile:
    from .semantic_heads import profile_compresskv

    return profile_compresskv(model, tok, lengths=args.lengths, samples=args.samples, seed=args.seed)


def _fasa(model: Any, tok: Any, args: argparse.Namespace) -> Profile:
    from .frequency_chunks import profile_frequency_chunks

    return profile_frequency_chunks(model, tok, samples=args.samples, seed=args.seed)


KINDS: dict[str, tuple[str, Callable[[Any, Any, argparse.Namespace], Profile]]] = {
    "retrieval-heads": ("RazorAttention: echo and induction heads from repeated random tokens", _retrieval_heads),
    "compresskv": ("CompressKV: semantic retrieval heads per layer and per-layer eviction error", _compresskv),
    "fasa": ("FASA: dominant RoPE frequency chunks per layer and KV head", _fasa),
}


def cmd_profile(args: argparse.Namespace) -> int:
    from ..adapters.models import load_model

    if args.kind not in KINDS:
        raise UnknownNameError(f"Unknown profile kind '{args.kind}'. Kinds: {', '.join(KINDS)}.")
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, tok = load_model(args.model)
    t0 = time.perf_counter()
    profile = KINDS[args.kind][1](model, tok, args)
    path = save_profile(profile, Path(args.out) if args.out else None)
    print(
        f"{args.kind} profile for {profile.model} written to {path} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr
    )
    print(path)
    return 0


def add_commands(sub: Any) -> None:
    from ..adapters.models import DEFAULT_MODEL

    kinds = "\n".join(f"  {k:16s} {d}" for k, (d, _) in KINDS.items())
    sp = sub.add_parser(
        "profile",
        help="create a per-model profile a method needs (retrieval heads, CompressKV, FASA)",
        description=f"Profile kinds:\n{kinds}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.add_argument("kind", choices=list(KINDS))
    sp.add_argument("--model", default=DEFAULT_MODEL)
    sp.add_argument("--threads", type=int, default=None)
    sp.add_argument("--out", default=None, help="output file (default: the user cache, where methods find it)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--n-random", type=int, default=1000, help="retrieval-heads: random tokens per repetition")
    sp.add_argument("--repeats", type=int, default=4, help="retrieval-heads: repetitions")
    sp.add_argument("--samples", type=int, default=8, help="compresskv/fasa: calibration samples")
    sp.add_argument(
        "--lengths",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[512, 1024, 2048],
        help="compresskv: needle lengths (comma-separated)",
    )
    sp.set_defaults(func=cmd_profile)
