"""Long-context tasks generated deterministically from a seed, at a target length in the model's own tokens."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError, UnknownNameError
from .prompts import PromptIds, chat_split, encode

REPEATED_FILLER = ["The grass is green", "The sky is blue", "The sun is yellow", "Here we go", "There and back again."]


@dataclass(frozen=True)
class Sample:
    """One generated example."""

    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    length: int  # target length in tokens
    depth: float  # where the needle sits, 0 = start of the haystack, 1 = end
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)

    def ids(self, tokenizer: Any) -> PromptIds:
        return chat_split(tokenizer, self.context, self.question)


class Task:
    """A task generates samples and scores answers."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    max_new_tokens: ClassVar[int] = 16

    def make(self, tokenizer: Any, length: int, depth: float, seed: int) -> Sample:
        raise NotImplementedError

    def score(self, sample: Sample, output: str) -> float:
        """1.0 if every expected answer appears in the output, else the share that does."""
        found = sum(1 for a in sample.answers if a.lower() in output.lower())
        return found / len(sample.answers) if sample.answers else 0.0


def _fill(
    tokenizer: Any,
    length: int,
    head: str,
    needles: list[str],
    depths: list[float],
    question: str,
    sentences: list[str],
) -> str:
    """A haystack of ``sentences`` (cycled) with ``needles`` at ``depths`` so the prompt has ~``length`` tokens."""
    fixed = len(chat_split(tokenizer, head + " " + " ".join(needles), question))
    room = length - fixed
    if room <= 0:
        raise ConfigError(f"A target length of {length} tokens is too short for this task (needs > {fixed}).")
    units: list[str] = []
    used = 0
    i = 0
    while True:
        s = sentences[i % len(sentences)].strip()
        s = s if s.endswith((".", "!", "?")) else s + "."
        n = len(encode(tokenizer, " " + s))
        if used + n > room:
            break
        units.append(s)
        used += n
        i += 1
    # Insert needles from the deepest to the shallowest so indices stay valid.
    for needle, depth in sorted(zip(needles, depths), key=lambda t: -t[1]):
        at = round(min(max(depth, 0.0), 1.0) * len(units))
        units.insert(at, needle)
    return head + " " + " ".join(units)


@dataclass(frozen=True)
class Passkey(Task):
    """Passkey retrieval: a 5-digit number hidden in repeated filler text (Mohtashami & Jaggi, arXiv:2305.16300)."""

    name: ClassVar[str] = "passkey"
    description: ClassVar[str] = "find a 5-digit pass key hidden at a given depth in filler text"
    max_new_tokens: ClassVar[int] = 12

    def make(self, tokenizer: Any, length: int, depth: float, seed: int) -> Sample:
        rng = random.Random(f"passkey/{length}/{depth}/{seed}")
        key = str(rng.randint(10000, 99999))
        head = (
            "There is an important piece of information hidden inside a lot of irrelevant text. "
            "Find it and memorize it. I will quiz you about it."
        )
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        question = "What is the pass key? Answer with the number only."
        context = _fill(tokenizer, length, head, [needle], [depth], question, REPEATED_FILLER)
        return Sample(self.name, context, question, (key,), length, depth, seed)

    def score(self, sample: Sample, output: str) -> float:
        return 1.0 if sample.answers[0] in re.sub(r"\D", "", output) or sample.answers[0] in output else 0.0


TASKS: dict[str, Task] = {t.name: t for t in (Passkey(),)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UnknownNameError(f"Unknown task '{name}'. Valid tasks: {', '.join(sorted(TASKS))}.")
    return TASKS[name]
