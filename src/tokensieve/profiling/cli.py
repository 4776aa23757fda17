"""`tokensieve profile <kind>`: create a per-model profile that a method needs."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..adapters.profiles import Profile, save_profile
from ..errors import ConfigError, PromptError, UnknownNameError
from ..results.threads import whole_number as _whole

STEPS = 32  # teacher-forced decode steps after each calibration text (compresskv, fasa)
ANSWER_ROOM = 32  # tokens a CompressKV passkey trial may decode after its prompt
DEFAULT_LENGTHS = (512, 1024, 2048)  # compresskv's passkey lengths
TEXT_TOKENS = 1024  # compresskv's and fasa's calibration texts
N_RANDOM = 1000  # retrieval-heads: random tokens per repetition
DUO_TOKENS = 1024  # duo: multi-passkey calibration prompts


def _budget(args: argparse.Namespace, limit: int) -> int:
    """The longest calibration sequence allowed: --calibration-tokens, or the model's context."""
    n = args.calibration_tokens
    if n is None:
        return limit or 1 << 62
    if limit and n > limit:
        raise ConfigError(
            f"--calibration-tokens {n} exceeds the model's context of {limit} tokens: use at most {limit}."
        )
    return int(n)


def _where(args: argparse.Namespace, limit: int) -> str:
    if args.calibration_tokens is not None:
        return f"--calibration-tokens {args.calibration_tokens}"
    return f"the model's context of {limit} tokens"


def _retrieval_heads(model: Any, tok: Any, args: argparse.Namespace, limit: int) -> Profile:
    from .retrieval_heads import profile_retrieval_heads

    room = _budget(args, limit)
    n_random = args.n_random if args.n_random is not None else min(N_RANDOM, (room - 1) // args.repeats)
    need = 1 + n_random * args.repeats
    if need > room or n_random < 2:
        fix = "lower --n-random or --repeats" if args.n_random is not None else "lower --repeats"
        raise ConfigError(
            f"The retrieval-heads probe needs 1 + --n-random {n_random} x --repeats {args.repeats} = {need} tokens, "
            f"beyond {_where(args, limit)}: {fix} (without --n-random it is derived from what fits)."
        )
    return profile_retrieval_heads(model, n_random=n_random, repeats=args.repeats, seed=args.seed,
                                   progress=not args.no_progress)  # fmt: skip


def _compresskv(model: Any, tok: Any, args: argparse.Namespace, limit: int) -> Profile:
    from .semantic_heads import profile_compresskv

    room = _budget(args, limit)
    if args.lengths is not None:
        lengths = list(args.lengths)
        too_long = [n for n in lengths if n + ANSWER_ROOM > room]
        if too_long:
            raise ConfigError(
                f"--lengths {','.join(map(str, too_long))}: a passkey prompt plus up to {ANSWER_ROOM} answer tokens "
                f"must fit {_where(args, limit)}; use lengths <= {room - ANSWER_ROOM}."
            )
    else:
        lengths = [n for n in DEFAULT_LENGTHS if n + ANSWER_ROOM <= room] or [room - ANSWER_ROOM]
    text_tokens = min(TEXT_TOKENS, room)
    if min(lengths) < 64 or text_tokens <= STEPS + 32:
        raise ConfigError(
            f"CompressKV's calibration needs passkey prompts of >= 64 tokens and texts of > {STEPS + 32} tokens; "
            f"{_where(args, limit)} leaves too little room: raise --calibration-tokens or give --lengths."
        )
    return profile_compresskv(model, tok, lengths=lengths, samples=args.samples, seed=args.seed, steps=STEPS,
                              text_tokens=text_tokens, progress=not args.no_progress)  # fmt: skip


def _fasa(model: Any, tok: Any, args: argparse.Namespace, limit: int) -> Profile:
    from .frequency_chunks import DEFAULT_KS, profile_frequency_chunks

    room = _budget(args, limit)
    prompt_tokens = min(TEXT_TOKENS, room - STEPS)
    if prompt_tokens <= min(DEFAULT_KS):
        raise ConfigError(
            f"FASA's calibration needs prompts of more than {min(DEFAULT_KS)} tokens plus {STEPS} decode steps; "
            f"{_where(args, limit)} leaves {max(prompt_tokens, 0)}: raise --calibration-tokens."
        )
    return profile_frequency_chunks(model, tok, samples=args.samples, seed=args.seed, prompt_tokens=prompt_tokens,
                                    steps=STEPS, progress=not args.no_progress)  # fmt: skip


def _duo(model: Any, tok: Any, args: argparse.Namespace, limit: int) -> Profile:
    from .duo_heads import profile_duo

    length = min(DUO_TOKENS, _budget(args, limit))
    if length <= args.sink + args.recent:
        raise ConfigError(
            f"DuoAttention's calibration prompts must be longer than the streaming window ({args.sink} + {args.recent} "
            f"tokens) to tell the heads apart; {_where(args, limit)} allows {length}: lower --sink/--recent."
        )
    return profile_duo(model, tok, steps=args.steps, length=length, sink=args.sink, recent=args.recent,
                       samples=args.samples, seed=args.seed, progress=not args.no_progress)  # fmt: skip


def _minference(model: Any, tok: Any, args: argparse.Namespace, limit: int) -> Profile:
    from .head_patterns import profile_head_patterns

    return profile_head_patterns(model, tok, tokens=min(2048, _budget(args, limit)), seed=args.seed,
                                 progress=not args.no_progress)  # fmt: skip


KINDS: dict[str, tuple[str, Callable[[Any, Any, argparse.Namespace, int], Profile]]] = {
    "retrieval-heads": ("RazorAttention: echo and induction heads from repeated random tokens", _retrieval_heads),
    "compresskv": ("CompressKV: semantic retrieval heads per layer and per-layer eviction error", _compresskv),
    "fasa": ("FASA: dominant RoPE frequency chunks per layer and KV head", _fasa),
    "duo": ("DuoAttention: retrieval vs streaming KV heads, gates trained on multi-passkey prompts", _duo),
    "minference": (
        "MInference: a sparse prefill pattern per layer and query head (A-shape, vertical-slash, block)",
        _minference,
    ),
}


def cmd_profile(args: argparse.Namespace) -> int:
    from ..adapters.models import load_model, model_shape
    from ..results.threads import use_threads

    if args.kind not in KINDS:
        raise UnknownNameError(f"Unknown profile kind '{args.kind}'. Kinds: {', '.join(KINDS)}.")
    use_threads(args.threads)
    model, tok = load_model(args.model)
    limit = model_shape(model).max_positions
    t0 = time.perf_counter()
    try:
        profile = KINDS[args.kind][1](model, tok, args, limit)
    except PromptError as exc:  # a calibration prompt the checks above did not foresee
        raise ConfigError(
            f"A {args.kind} calibration prompt does not fit {_where(args, limit)} ({exc}) Shorten the calibration "
            "with --calibration-tokens."
        ) from None
    path = save_profile(profile, Path(args.out) if args.out else None)
    print(
        f"{args.kind} profile for {profile.model} written to {path} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr
    )
    print(path)
    return 0


def _lengths(text: str) -> list[int]:
    out = [_whole(64)(x.strip()) for x in text.split(",") if x.strip()]
    if not out:
        raise argparse.ArgumentTypeError("give comma-separated prompt lengths, e.g. 256,512")
    return out


def add_commands(sub: Any) -> None:
    from ..adapters.models import DEFAULT_MODEL
    from ..results.threads import add_threads_argument

    kinds = "\n".join(f"  {k:16s} {d}" for k, (d, _) in KINDS.items())
    sp = sub.add_parser(
        "profile",
        help="create a per-model profile a method needs (retrieval heads, CompressKV, FASA, DuoAttention)",
        description=f"Profile kinds:\n{kinds}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.add_argument("kind", choices=list(KINDS))
    sp.add_argument("--model", default=DEFAULT_MODEL)
    add_threads_argument(sp)
    sp.add_argument("--out", default=None, help="output file (default: the user cache, where methods find it)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument(
        "--calibration-tokens",
        type=_whole(1),
        default=None,
        metavar="N",
        help="longest calibration sequence in tokens (default: the model's context); the defaults below shrink to "
        "fit it — for models with a short context",
    )
    sp.add_argument(
        "--n-random",
        type=_whole(2, " (random tokens per repetition)"),
        default=None,
        help=f"retrieval-heads: random tokens per repetition (default {N_RANDOM}, fewer if the probe would not fit)",
    )
    sp.add_argument("--repeats", type=_whole(2), default=4, help="retrieval-heads: repetitions (default 4)")
    sp.add_argument("--samples", type=_whole(1), default=8, help="compresskv/fasa/duo: calibration samples (default 8)")
    sp.add_argument("--steps", type=_whole(1), default=120, help="duo: optimisation steps (default 120)")
    sp.add_argument("--sink", type=_whole(0), default=64, help="duo: sink tokens of streaming heads (default 64)")
    sp.add_argument("--recent", type=_whole(1), default=256, help="duo: recent tokens of streaming heads (default 256)")
    sp.add_argument(
        "--lengths",
        type=_lengths,
        default=None,
        help="compresskv: passkey lengths, comma-separated (default 512,1024,2048, those that fit the context)",
    )
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_profile)
