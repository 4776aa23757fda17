"""An lm-evaluation-harness backend: ``lm_eval --model tokensieve --model_args pretrained=…,spec=snapkv:0.25``.

Importing this module registers the model type ``tokensieve`` with the harness's registry; the harness's own command
does not import it, so run it through ``python -m tokensieve.serve.lmeval`` (the harness's command line, with this
model type registered) or ``import tokensieve.serve.lmeval`` before ``lm_eval.simple_evaluate(model="tokensieve",
…)``. Needs the ``lmeval`` extra (``pip install 'tokensieve[lmeval]'``).

The three requests of the harness's ``LM`` interface, and what compression means for each:

* ``loglikelihood(context, continuation)``: the context is prefilled — and compressed with the spec, before the
  continuation is seen (query-agnostic) — then the continuation is appended uncompressed and scored token by token
  from the logits (:meth:`Compressor.extend`). ``is_greedy`` is whether every continuation token is the argmax.
* ``loglikelihood_rolling(text)``: the text's log-likelihood over disjoint windows of the model's context, each
  prefilled after one token of the window before (the first after the end-of-text token). There is no context to
  compress ahead of a window, so the spec's prefill method has nothing to do here.
* ``generate_until(context, {until, max_gen_toks, temperature, …})``: served by the continuous-batching
  :class:`~tokensieve.serve.engine.Engine` (the spec, stop strings, greedy unless ``temperature > 0``), so many
  requests decode together and each gets what it would get alone.

The scoring logic lives in :class:`SieveScorer`, which does not need the harness (and is tested without it).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from ..engine import Compressor
from ..errors import ConfigError
from ..spec import Spec
from . import require
from .engine import Delta, Done, Engine, Failed, Job, Sampling


class SieveScorer:
    """Log-likelihoods and generations of one model under one spec (the harness-independent half of the backend).

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        spec: what to run (``"snapkv:0.25"``, ``"full"``, …; see docs/CONCEPTS.md).
        max_gen_toks: default longest generation.
        batch_size: most generations decoded together.
    """

    def __init__(self, model: Any, tokenizer: Any, spec: str = "full", *, max_gen_toks: int = 256,
                 batch_size: int = 8) -> None:  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.spec = Spec.parse(spec)
        self.press = Compressor(model, self.spec)
        self.max_gen_toks = int(max_gen_toks)
        self.engine = Engine(model, tokenizer, spec=self.spec, max_batch=int(batch_size), max_tokens=self.max_gen_toks)
        self.max_length = self.engine.context_limit
        eot = getattr(tokenizer, "eos_token_id", None)
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix_token = int(bos if bos is not None else eot if eot is not None else 0)

    # ------------------------------------------------------------------------------------------ tokens
    def _encode(self, text: str, special: bool) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=special)["input_ids"]]

    def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a context and its continuation, cut where the context's tokens end in the whole text's (so
        the continuation is tokenised as it is in context); whitespace ending the context moves to the
        continuation, where tokenizers that attach a space to the next word put it."""
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        context = stripped
        if not context:
            return [self.prefix_token], self._encode(continuation, special=False)
        whole = self._encode(context + continuation, special=True)
        ctx = self._encode(context, special=True)
        if whole[: len(ctx)] != ctx:  # the join changed the context's last token: keep the context's own tokens
            return ctx, self._encode(continuation, special=False)
        return ctx, whole[len(ctx) :]

    # ------------------------------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def score(self, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> tuple[float, bool]:
        """Log-probability of the continuation after the (compressed) context, and whether greedy decoding would
        produce it."""
        if not continuation_ids:
            return 0.0, True
        total = len(context_ids) + len(continuation_ids)
        if total > self.max_length:  # keep the end: the continuation and as much context as fits
            context_ids = list(context_ids)[total - self.max_length :]
        ctx = self.press.prefill(torch.tensor([list(context_ids)], dtype=torch.long))
        first = ctx.logits  # (1, V): predicts the continuation's first token
        cont = torch.tensor([list(continuation_ids)], dtype=torch.long)
        if cont.shape[1] > 1:
            rest = self.press.extend(ctx, cont[:, :-1], return_logits=True)  # (1, n - 1, V)
            assert rest is not None
            logits = torch.cat([first[:, None], rest], dim=1)  # (1, n, V)
        else:
            logits = first[:, None]
        logp = torch.log_softmax(logits.float(), dim=-1)[0]  # (n, V)
        picked = logp.gather(-1, cont[0][:, None])[:, 0]
        greedy = bool((logits[0].argmax(-1) == cont[0]).all())
        return float(picked.sum()), greedy

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return [self.score(*self.split(c, x)) for c, x in pairs]

    @torch.inference_mode()
    def rolling(self, text: str) -> float:
        """Log-likelihood of a whole text over disjoint windows of the model's context (see the module's doc)."""
        ids = self._encode(text, special=False)
        total = 0.0
        prev = self.prefix_token
        window = max(1, self.max_length - 1)
        for start in range(0, len(ids), window):
            chunk = ids[start : start + window]
            lp, _ = self.score([prev], chunk)
            total += lp
            prev = chunk[-1]
        return total

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """Continuous-batched generation: every request is queued at once and decoded with the others."""
        self.engine.start()
        try:
            outs: list[list[str]] = [[] for _ in requests]
            done = [threading.Event() for _ in requests]
            errors: list[str] = []
            for i, (context, kwargs) in enumerate(requests):
                kwargs = dict(kwargs or {})
                until = kwargs.pop("until", None)
                stop = (until,) if isinstance(until, str) else tuple(u for u in (until or ()) if u)
                max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
                temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
                if not kwargs.pop("do_sample", temperature > 0):
                    temperature = 0.0
                ids = self._encode(context, special=True) or [self.prefix_token]
                room = self.max_length - max_new
                ids = ids[-room:] if room > 0 and len(ids) > room else ids

                def emit(event: Any, i: int = i) -> None:
                    if isinstance(event, Delta):
                        outs[i].append(event.text)
                    elif isinstance(event, (Done, Failed)):
                        if isinstance(event, Failed):
                            errors.append(event.message)
                        done[i].set()

                job = Job(ids, self.engine.default, emit, max_new, Sampling(temperature, 1.0, kwargs.get("seed")), stop)
                self.engine.submit(job)
            for event in done:
                event.wait()
            if errors:
                raise ConfigError(f"Generation failed: {errors[0]}")
            return ["".join(o) for o in outs]
        finally:
            self.engine.stop()


def _lm_class() -> type:
    """The harness's ``LM`` subclass, registered as ``tokensieve`` (built on first use: the harness is optional)."""
    require("lm_eval", "lmeval")
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    class TokensieveLM(LM):
        """``--model tokensieve --model_args pretrained=<model>,spec=<spec>[,max_gen_toks=N,threads=N]``."""

        def __init__(self, pretrained: str = "smollm2-135m", spec: str = "full", max_gen_toks: int = 256,
                     batch_size: int | str = 8, threads: int | None = None, **_: Any) -> None:  # fmt: skip
            super().__init__()
            from ..adapters.models import load_model
            from ..results.threads import use_threads

            use_threads(int(threads) if threads is not None else None)
            Spec.parse(spec)  # fail before loading the model
            model, tok = load_model(str(pretrained))
            size = 8 if str(batch_size).startswith("auto") else int(batch_size)
            self.scorer = SieveScorer(model, tok, spec, max_gen_toks=int(max_gen_toks), batch_size=size)

        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return self.scorer.loglikelihood([tuple(r.args) for r in requests])

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> list[float]:
            return [self.scorer.rolling(r.args[0]) for r in requests]

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> list[str]:
            return self.scorer.generate([(r.args[0], r.args[1]) for r in requests])

    register_model("tokensieve")(TokensieveLM)
    return TokensieveLM


def register() -> type:
    """Register the ``tokensieve`` model type with lm-evaluation-harness (idempotent); returns the class."""
    global _REGISTERED
    if _REGISTERED is None:
        _REGISTERED = _lm_class()
    return _REGISTERED


_REGISTERED: type | None = None


def main() -> None:  # pragma: no cover - the harness's own command line
    """``python -m tokensieve.serve.lmeval --model tokensieve --model_args … --tasks …``."""
    register()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["SieveScorer", "register"]
