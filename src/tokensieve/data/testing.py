"""A character-level tokenizer for tests and examples with tiny random models (no files, no downloads).

One token per character: printable ASCII but ``~`` maps to ids ``3 … 96``, every other character to ``3`` (a space);
``0`` pads, ``1`` begins, ``2`` ends a sequence. It has no chat template, so prompts are plain text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

FIRST = 3


class CharTokenizer:
    """Just enough of the Hugging Face tokenizer interface for tokensieve's prompts, tasks and runner."""

    chat_template = None
    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    vocab_size = FIRST + 94  # fits the 97-token tiny test models

    def encode_text(self, text: str) -> list[int]:
        return [FIRST + (ord(c) - 32) if 32 <= ord(c) < 126 else FIRST for c in text]

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        ids = self.encode_text(text)
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False, **_: Any) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i < FIRST:
                if not skip_special_tokens:
                    out.append(["<pad>", "<s>", "</s>"][i])
                continue
            out.append(chr(32 + (i - FIRST)) if i < FIRST + 94 else "?")
        return "".join(out)
