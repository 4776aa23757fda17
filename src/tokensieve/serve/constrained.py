"""Grammar-constrained decoding for the server: ``response_format`` (``json_object``, ``json_schema``) and forced
tool calls, with llguidance (the ``constrained`` extra, imported only when a request asks for a grammar).

A request's grammar is compiled once, when the request is checked (a bad schema is a 400 before any work), into a
matcher that follows the answer token by token: before each sampling step it gives the tokens the grammar allows
(a bitmask over the vocabulary, computed on the CPU), after it consumes the token chosen. The answer ends when the
grammar is complete (the matcher stops) or the model chooses an end-of-sequence token where the grammar allows one.

Why llguidance: it installs as one self-contained wheel beside torch 2.13 (no dependency at all), compiles a JSON
schema lazily (no vocabulary-wide automaton built up front, so a schema costs milliseconds, not seconds), computes
a mask in tens of microseconds on one CPU core, and is the grammar engine vLLM, SGLang and llama.cpp use. xgrammar
pulls in triton and apache-tvm-ffi (a GPU compiler stack on a CPU server); outlines-core builds a regex automaton
over the whole vocabulary per schema and has no recursive schemas.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import require

EXTRA = "constrained"


def llguidance() -> Any:
    """The llguidance module, or a ConfigError naming the extra that provides it."""
    return require("llguidance", EXTRA)


class _Encoder:
    """A slow tokenizer's encoding as llguidance calls it: text → ids, no special tokens added."""

    def __init__(self, tokenizer: Any, tokens: list[bytes], eos: int, bos: int | None, special: list[int]) -> None:
        self._tokenizer = tokenizer
        self.tokens = tokens
        self.eos_token_id = eos
        self.bos_token_id = bos
        self.special_token_ids = special

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text only")
        return [int(i) for i in self._tokenizer(text, add_special_tokens=False)["input_ids"]]


def grammar_tokenizer(tokenizer: Any, vocab_size: int, eos: Iterable[int]) -> Any:
    """An ``llguidance.LLTokenizer`` for ``tokenizer`` over the model's ``vocab_size`` ids (ids past the tokenizer's
    own are never allowed). A fast (Rust) tokenizer is handed over whole; any other one token by token, each id's
    text as it decodes alone (right for tokenizers whose tokens are whole characters or words)."""
    lg = llguidance()
    eos_ids = sorted(int(i) for i in eos)
    eos_token: int | list[int] | None = eos_ids if eos_ids else None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        return lg.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos_token)
    n = int(getattr(tokenizer, "vocab_size", vocab_size))
    special = [int(i) for i in {getattr(tokenizer, k, None) for k in ("pad_token_id", "bos_token_id",
                                                                        "eos_token_id")} if i is not None]  # fmt: skip
    tokens = []
    for i in range(n):
        text = tokenizer.decode([i], skip_special_tokens=False)
        tokens.append(text.encode("utf-8"))
    first_eos = eos_ids[0] if eos_ids else int(getattr(tokenizer, "eos_token_id", 0))
    wrapper = lg.TokenizerWrapper(_Encoder(tokenizer, tokens, first_eos, getattr(tokenizer, "bos_token_id", None),
                                           special))  # fmt: skip
    return lg.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=eos_token)


class GrammarError(ValueError):
    """A grammar (a JSON schema) that cannot be compiled; the message says why."""


def json_schema_grammar(schema: dict[str, Any] | bool) -> str:
    """llguidance's grammar for JSON matching ``schema`` (compact: no optional whitespace, so a model cannot spend
    its tokens on blank space inside the JSON)."""
    lg = llguidance()
    if schema is True:
        schema = {}
    try:
        return str(lg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False}))
    except ValueError as exc:
        raise GrammarError(str(exc)) from None


class Constraint:
    """One answer's grammar: the allowed tokens before each step, the token chosen after it."""

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        lg = llguidance()
        self._matcher = lg.LLMatcher(tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())

    def allowed(self, V: int) -> Tensor:
        """``(V,)`` bool: the tokens the grammar allows next."""
        raw = self._matcher.compute_bitmask()  # little-endian 32-bit words: token i is bit i % 32 of word i // 32
        if self._matcher.is_error():
            raise RuntimeError(f"the grammar failed: {self._matcher.get_error()}")
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)  # (words * 4,)
        bits = (data[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1  # (bytes, 8) bit j of byte i = token 8i+j
        mask = bits.reshape(-1).bool()
        out = torch.zeros(V, dtype=torch.bool)
        n = min(V, int(mask.numel()))
        out[:n] = mask[:n]
        return out

    def advance(self, token: int) -> None:
        """Consume the chosen token (one the mask allowed)."""
        if not self._matcher.consume_token(int(token)):
            raise RuntimeError(f"the grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """Whether the grammar is complete and admits nothing more."""
        return bool(self._matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        return bool(self._matcher.is_accepting())


class Grammars:
    """An engine's grammar support: the llguidance tokenizer, built once (about a second for a large vocabulary)
    at the first request that needs it."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab = vocab_size
        self._eos = list(eos)
        self._lock = threading.Lock()
        self._ll: Any = None

    def tokenizer(self) -> Any:
        with self._lock:
            if self._ll is None:
                self._ll = grammar_tokenizer(self._tokenizer, self._vocab, self._eos)
            return self._ll

    def compile(self, grammar: str) -> Constraint:
        return Constraint(self.tokenizer(), grammar)


__all__ = ["EXTRA", "Constraint", "GrammarError", "Grammars", "grammar_tokenizer", "json_schema_grammar", "llguidance"]
