"""Command-line interface: parse → config → library call. No logic lives here."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import TokensieveError, TokensieveWarning
from .results.threads import whole_number as _whole

if TYPE_CHECKING:
    from .spec import Spec


def _params(items: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise TokensieveError(f"--param expects key=value, got {item!r}.")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


def _threads(n: int | None) -> None:
    from .results.threads import use_threads

    use_threads(n)  # the one default of every command: tokensieve.results.threads


def _depth(text: str) -> float:
    try:
        d = float(text)
    except ValueError:
        d = -1.0
    if not 0.0 <= d <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a depth in [0, 1] (0 = start, 1 = end), got {text!r}")
    return d


def check_context(limit: int, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse, before anything is allocated, a prompt plus ``--max-new-tokens`` beyond the model's context."""
    from .errors import PromptError

    if not limit or prompt_tokens + max_new_tokens <= limit:
        return
    if prompt_tokens >= limit:
        raise PromptError(
            f"The prompt has {prompt_tokens} tokens, the model's context {limit}: shorten the prompt to fewer than "
            f"{limit} tokens, with room for the answer."
        )
    raise PromptError(
        f"The prompt has {prompt_tokens} tokens and --max-new-tokens asks for {max_new_tokens} more: "
        f"{prompt_tokens + max_new_tokens} tokens exceed the model's context of {limit}. "
        f"Use --max-new-tokens {limit - prompt_tokens} or less (or shorten the prompt)."
    )


# ---------------------------------------------------------------------------------------------------- commands
def cmd_pull(args: argparse.Namespace) -> int:
    from .adapters.models import pull

    path = pull(args.model, force=args.force)
    print(path)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .registry import list_methods

    infos = list_methods()
    if args.markdown:
        print(methods_markdown(infos), end="")
        return 0
    if args.json:
        print(json.dumps([i.__dict__ for i in infos], indent=2, default=str))
        return 0
    for i in infos:
        params = ", ".join(f"{k}={v}" for k, v in i.params.items()) or "—"
        print(f"{i.name}  [{i.family}]")
        print(f"    {i.summary}")
        print(f"    paper:        {i.paper}")
        if i.rule:
            print(f"    rule:         {i.rule}")
        print(f"    capabilities: {i.capabilities}")
        if i.profile:
            print(f"    needs:        {i.profile}")
        print(f"    parameters:   {params}")
    return 0


def methods_markdown(infos: Sequence[Any]) -> str:
    """docs/METHODS.md, generated from the registry (`tokensieve methods --markdown`)."""
    lines = [
        "# Methods",
        "",
        "Generated from the registry by `tokensieve methods --markdown`; a test keeps it in sync. Each method's",
        "docstring (in `src/tokensieve/methods/`) states its scoring rule and every choice made where the paper is",
        "ambiguous.",
        "",
        "Two families share the registry and the spec grammar: **kv** methods compress a language model's KV cache or",
        "sparsify its attention (capabilities: phases, what happens to the rest, granularity, …); **visual** methods",
        "prune an image's tokens in a vision-language model (capabilities: the stages they act at — vision encoder,",
        "projector, language model — what happens to the rest, and the signals they read). One spec names both:",
        "`todre:0.1/snapkv:0.25`; a visual method named like a KV method is written `vis:name`.",
        "",
        "A third family, **dit**, sparsifies the attention of a diffusion transformer (image and video generation,",
        "docs/DIT.md); it is listed as `dit:name` and a DiT spec names one of them alone (`svg:0.3`, `radial`).",
        "",
        "| method | family | paper | rule | capabilities | parameters |",
        "|---|---|---|---|---|---|",
    ]
    for i in infos:
        params = ", ".join(f"`{k}={v}`" for k, v in i.params.items()) or "—"
        cells = [f"`{i.name}`", i.family, i.paper, i.rule, i.capabilities, params]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    for i in infos:
        lines += [f"## `{i.name}`", "", i.summary, ""]
        if i.profile:
            lines += [f"Needs a {i.profile}.", ""]
    return "\n".join(lines)


def generate_spec(args: argparse.Namespace) -> Spec:
    """The spec of ``tokensieve generate``: ``--spec``, or ``--method`` / ``--param`` / ``--budget``."""
    from .core.budget import Budget
    from .core.capabilities import Phase
    from .registry import create_method
    from .spec import Spec

    params = _params(args.param)
    if args.spec is not None:
        if args.method is not None or args.budget is not None or params:
            raise TokensieveError("--spec names the method, its parameters and budget: drop --method/--param/--budget.")
        return Spec.parse(args.spec)
    budget = Budget.parse(args.budget if args.budget is not None else "1.0")
    method = create_method(args.method or "full", **params)
    decode_only = Phase.PREFILL not in method.capabilities.phases
    return Spec.of(method, budget if method.compresses or decode_only else None)


def cmd_generate(args: argparse.Namespace) -> int:
    from .adapters.models import DEFAULT_MODEL, load_model, model_shape, text_tokenizer
    from .data.prompts import TextStream, chat_ids
    from .demo import budget_notes
    from .engine import compress
    from .errors import CapabilityError, PromptError

    _threads(args.threads)
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    if not prompt.strip():
        raise PromptError("The prompt is empty: give some text to answer.")
    if args.image is not None:
        return generate_with_image(args, prompt)
    spec = generate_spec(args)  # fail on a bad method, parameter or budget before loading the model
    if not spec.visual.is_empty:
        name = spec.visual.named[0].method.name
        raise CapabilityError(
            f"'{name}' is a visual-token method: it prunes an image's tokens in a vision-language model. Give the "
            f"image with --image FILE (and a VLM with --model; the embedded one by default): --spec {spec.label}."
        )
    kwargs = spec.compressor_kwargs()
    model, loaded = load_model(args.model or DEFAULT_MODEL)
    tok = text_tokenizer(loaded)  # a VLM's processor would read the prompt as an image (a URL fetched, a path opened)
    ids = chat_ids(tok, prompt, system=args.system)
    check_context(model_shape(model).max_positions, int(ids.shape[1]), args.max_new_tokens)
    for note in budget_notes(spec, int(ids.shape[1])):
        warnings.warn(note, TokensieveWarning, stacklevel=1)
    press = compress(model, reserve=args.max_new_tokens, **kwargs)
    ctx = press.prefill(ids)
    stream = TextStream(tok)  # whole characters only: an emoji split over tokens is printed once complete

    def on_token(row: int, token: int) -> None:
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()

    gen = press.decode(ctx, args.max_new_tokens, eos_token_ids=[tok.eos_token_id], on_token=on_token)
    sys.stdout.write(stream.flush() + "\n")
    cache = ctx.cache
    print(
        f"[{spec.label}] prompt {ids.shape[1]} tokens · KV {cache.kv_bytes() / 2**20:.2f} MB "
        f"· prefill {ctx.prefill_seconds:.2f} s · decode {gen.tokens_per_second:.1f} tok/s",
        file=sys.stderr,
    )
    return 0


def generate_with_image(args: argparse.Namespace, prompt: str) -> int:
    """``generate --image``: a question about an image to a vision-language model, with visual-token pruning and a KV
    method from one spec (``pool:64/snapkv:0.5``, docs/VLM_PRUNING.md)."""
    import time

    from .adapters.models import load_model
    from .adapters.vlm import VLM_NAME
    from .engine import compress
    from .errors import CapabilityError
    from .spec import Spec

    if args.method is not None or args.budget is not None or args.param:
        raise TokensieveError("With --image, write what to run with --spec (e.g. pool:64/snapkv:0.5).")
    spec = Spec.parse(args.spec or "full")  # a bad spec fails before the model loads
    spec.compressor_kwargs()
    image = read_image(args.image)
    model, processor = load_model(args.model or VLM_NAME)
    if not hasattr(processor, "image_processor"):
        raise CapabilityError(
            f"--image needs a vision-language model; '{args.model}' is a text model (leave out --model for the "
            f"embedded VLM, {VLM_NAME})."
        )
    press = compress(model, spec, reserve=args.max_new_tokens)
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = [*system, {"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    enc = processor(text=text, images=[image], return_tensors="pt")
    t0 = time.perf_counter()
    ctx = press.prefill_images(enc, positions=args.positions)
    t1 = time.perf_counter()
    tok = processor.tokenizer
    gen = press.decode(ctx, args.max_new_tokens, eos_token_ids=tok.eos_token_id)
    t2 = time.perf_counter()
    ids = gen.tokens[0]
    print(tok.decode(ids, skip_special_tokens=True))
    visual = " → ".join(f"{stage} {n[0]}" for stage, n in ctx.visual_tokens.items())
    print(
        f"[{spec.label}] prompt {enc['input_ids'].shape[1]} tokens · visual tokens {visual or 'all'} · KV "
        f"{ctx.cache.kv_bytes() / 2**20:.2f} MB · prefill {t1 - t0:.2f} s · decode {len(ids) / max(t2 - t1, 1e-9):.1f} "
        "tok/s",
        file=sys.stderr,
    )
    return 0


MAX_IMAGE_PIXELS = 50_000_000  # larger images are refused before they are decoded (a 20000 x 20000 PNG is 400 M)


def read_image(path: str) -> Any:
    """An RGB image from a file, or a :class:`PromptError` saying why not: unreadable, not an image, or larger than
    :data:`MAX_IMAGE_PIXELS` (checked from the header, before the pixels are decoded)."""
    from PIL import Image

    from .errors import PromptError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by our own limit
            im = Image.open(path)
        with im:
            w, h = im.size
            if w * h <= MAX_IMAGE_PIXELS:
                return im.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise PromptError(f"The image '{path}' is too large to read safely: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises SyntaxError for some broken files
        raise PromptError(f"Cannot read the image '{path}': {exc}") from None
    raise PromptError(
        f"The image '{path}' is {w} x {h} pixels; at most {MAX_IMAGE_PIXELS:,} pixels are read. Resize it."
    )


DEMO_METHODS = "full,streaming_llm,snapkv,knorm,razor,compresskv"


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .spec import split_specs

    _threads(args.threads)
    methods = split_specs(args.methods)
    run_demo(
        model_name=args.model,
        methods=methods,
        budget=args.budget,
        length=args.length,
        depth=args.depth,
        seed=args.seed,
        agnostic=args.agnostic,
        progress=not args.no_progress,
    )
    return 0


# ------------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from .adapters.models import DEFAULT_MODEL
    from .results.threads import add_threads_argument

    p = argparse.ArgumentParser(
        prog="tokensieve",
        description="Decide which tokens matter: KV-cache compression and sparse attention, measured.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default=DEFAULT_MODEL, help="embedded model name, local HF directory or hub id")
        add_threads_argument(sp)

    sp = sub.add_parser("pull", help="fetch the embedded model and convert it to safetensors (once)")
    sp.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    sp.add_argument("--force", action="store_true", help="convert again even if it is cached")
    sp.set_defaults(func=cmd_pull)

    sp = sub.add_parser("methods", help="list registered methods with their papers, capabilities and parameters")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--markdown", action="store_true", help="the table of docs/METHODS.md")
    sp.set_defaults(func=cmd_methods)

    sp = sub.add_parser("generate", help="stream a chat answer, optionally from a compressed cache")
    sp.add_argument("prompt", help="the user message ('-' reads stdin)")
    common(sp)
    sp.set_defaults(model=None)  # the embedded text model, or with --image the embedded VLM
    sp.add_argument(
        "--spec",
        default=None,
        help="what to run, e.g. snapkv:0.25, snapkv[window=64]:0.25+quest[page=32]:0.125, +h2o:512 "
        "(prefill[:budget][+decode[:budget]]; see docs/CONCEPTS.md)",
    )
    sp.add_argument("--method", default=None, help="registered method (see `tokensieve methods`); default full")
    sp.add_argument("--budget", default=None, help="KV budget: ratio (0.25, 25%%) or token count (256); default 1.0")
    sp.add_argument("--param", action="append", metavar="KEY=VALUE", help="method parameter (repeatable)")
    sp.add_argument("--max-new-tokens", type=_whole(1), default=256, help="longest answer in tokens (default 256)")
    sp.add_argument("--system", default=None, help="optional system prompt")
    sp.add_argument(
        "--image",
        default=None,
        metavar="FILE",
        help="ask about this image (a vision-language --model; default the embedded VLM, smollm2-135m-llava); --spec "
        "may then start with visual-token methods, "
        "e.g. pool:64/snapkv:0.5 (docs/VLM_PRUNING.md)",
    )
    sp.add_argument(
        "--positions",
        choices=("official", "keep", "renumber"),
        default="official",
        help="with --image: the language model's positions after pruning — as each method's official code leaves "
        "them (default: FastV keeps them, the others renumber), kept, or renumbered without gaps",
    )
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("demo", help="answer a long-context passkey question with several methods, side by side")
    common(sp)
    sp.add_argument(
        "--methods",
        "--specs",
        "--spec",
        dest="methods",
        default=DEMO_METHODS,
        help=f"comma-separated specs, e.g. snapkv,+quest[page=32],snapkv:0.25+h2o:256 (default: {DEMO_METHODS}); "
        "a spec without a budget gets --budget; `tokensieve methods` lists the methods",
    )
    sp.add_argument(
        "--agnostic", action="store_true", help="compress the context before the question is seen (cache reuse)"
    )
    sp.add_argument("--budget", default="0.1", help="budget of the specs that give none (default 0.1 = 90%% off)")
    sp.add_argument("--length", type=_whole(1), default=1024, help="prompt length in tokens")
    sp.add_argument("--depth", type=_depth, default=0.5, help="needle depth, 0 (start) … 1 (end)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_demo)

    # Larger command groups live next to their code and add their own sub-commands.
    for module in _COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return p


# Modules that define `add_commands(subparsers)`; a module that is absent is skipped.
_COMMAND_MODULES = [
    m
    for m in (
        "tokensieve.eval.cli",
        "tokensieve.bench.cli",
        "tokensieve.profiling.cli",
        "tokensieve.train.cli",
        "tokensieve.bench.video",
        "tokensieve.serve.cli",
        "tokensieve.report",
    )
    if importlib.util.find_spec(m.rsplit(".", 1)[0]) is not None and importlib.util.find_spec(m) is not None
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    show = warnings.showwarning

    def one_line(message: Warning | str, category: type[Warning], *rest: Any, **kw: Any) -> None:
        if issubclass(category, TokensieveWarning):  # ours: a sentence for the user, not a source line
            print(f"tokensieve: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *rest, **kw)

    warnings.showwarning = one_line
    try:
        return int(args.func(args) or 0)
    except TokensieveError as exc:
        print(f"tokensieve: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`tokensieve methods --json | head -1`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush at exit
        return 0
    except KeyboardInterrupt:
        print("tokensieve: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = show


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__: list[Any] = ["build_parser", "main"]
