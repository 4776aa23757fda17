"""Turning (context, question) pairs into token ids with the model's chat template.

The split matters: in the query-agnostic setting the context is compressed before the question is seen, so the
context's token ids must be a prefix of the full prompt's ids. :func:`chat_split` renders the chat template once and
cuts the rendered text where the question starts; both halves are tokenised separately and the query-aware setting
uses their concatenation, so the two settings see exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import PromptError


@dataclass(frozen=True)
class PromptIds:
    """Token ids of a chat prompt, split where the question begins."""

    context: list[int]  # system turn + user turn up to the end of the context
    question: list[int]  # the question, the end of the user turn and the assistant header

    @property
    def full(self) -> list[int]:
        return self.context + self.question

    def __len__(self) -> int:
        return len(self.context) + len(self.question)


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_split(
    tokenizer: Any, context: str, question: str, *, separator: str = "\n\n", answer_prefix: str = ""
) -> PromptIds:
    """Render ``context + separator + question`` as one user turn and split the ids at the question.

    ``answer_prefix`` is text that starts the assistant's answer (after the generation header), as RULER does to
    steer the answer's format; it belongs to the question part.
    """
    if not context.strip() and not question.strip():
        raise PromptError("The prompt is empty.")
    marker = "\x00QUESTION\x00"
    content = f"{context}{separator}{marker}" if context else marker
    messages = [{"role": "user", "content": content}]
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # base models: plain text
        rendered = content + "\n"
    head, tail = rendered.split(marker)
    return PromptIds(context=encode(tokenizer, head), question=encode(tokenizer, question + tail + answer_prefix))


def chat_ids(tokenizer: Any, prompt: str, *, system: str | None = None) -> Tensor:
    """``(1, T)`` ids of a single-turn chat prompt (generation header included)."""
    if not prompt or not prompt.strip():
        raise PromptError("The prompt is empty: give some text to answer.")
    messages = [{"role": "user", "content": prompt}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = encode(tokenizer, text)
    else:
        ids = list(tokenizer(prompt)["input_ids"])
    return torch.tensor([ids], dtype=torch.long)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token rows into ``(B, T)`` ids and a 0/1 mask."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r) :] = torch.tensor(r)
            mask[i, T - len(r) :] = 1
    return ids, mask


class TextStream:
    """The text of tokens generated one at a time, released on whole characters (for streaming to a terminal).

    A byte-level tokenizer splits a multi-byte character (an emoji, a CJK character) over several tokens, and
    decoding part of them gives U+FFFD. The standard incremental decoding (as in Hugging Face's text-generation
    servers): decode the tokens since a recent offset together with a few earlier ones for context, release only the
    text that is new, and hold it back while it ends in U+FFFD, i.e. with an incomplete character.
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # tokens before `prefix` are released and not decoded again
        self.read = 0  # tokens before `read` are released

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens))

    def push(self, token: int) -> str:
        """Add a token; returns the text it completes (often empty while a character is incomplete)."""
        self.ids.append(int(token))
        return self._release(final=False)

    def flush(self) -> str:
        """The text still held back (at the end of generation, an incomplete character is released as it is)."""
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]
