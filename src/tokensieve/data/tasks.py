"""Long-context tasks generated deterministically from a seed, at a target length in the model's own tokens.

Every task is a small frozen dataclass. ``make(tokenizer, length, depth, seed)`` returns a :class:`Sample` whose
prompt has at most ``length`` tokens of the given tokenizer (chat template included) and close to it;
``score(sample, output)`` returns a number in [0, 1]. The same (task options, length, depth, seed) always gives the
same sample.

The tasks (``TASKS``; ``tokensieve eval --list-tasks``):

* ``passkey`` — a 5-digit pass key in filler text (Mohtashami & Jaggi, arXiv:2305.16300);
* RULER's needle-in-a-haystack family (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context
  Language Models?", arXiv:2404.06654): ``niah_single``, ``niah_multikey`` (distractor needles),
  ``niah_multivalue`` (one key, several values), ``niah_multiquery`` (several keys asked at once), variable
  tracking ``vt``, common-word extraction ``cwe`` and frequent-word extraction ``fwe``;
* ``qa`` — reading comprehension over a long real text: the question quotes the start of a sentence at the given
  depth and the answer is the words that follow it;
* ``ppl`` — perplexity of the continuation of a long real text (no question; query-agnostic only);
* ``prose`` — natural-text fidelity on held-out prose: KL and top-1 agreement to the full model over the next 128
  tokens of text no trained profile saw (query-agnostic only).

Haystack filler (``haystack``): ``"repeat"`` cycles a few fixed sentences (the classic passkey noise), ``"text"``
uses sentences of a real text. Real text comes from ``text`` (see :mod:`tokensieve.data.text`).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError, UnknownNameError
from .prompts import PromptIds, chat_split, encode
from .text import TextSource, sentence_units, text_source
from .words import ADJECTIVES, NOUNS

REPEATED_FILLER = ["The grass is green", "The sky is blue", "The sun is yellow", "Here we go", "There and back again."]
HAYSTACKS = ("repeat", "text")
MODES = ("agnostic", "aware")


@dataclass(frozen=True)
class Sample:
    """One generated example.

    ``context`` is what gets compressed in the query-agnostic setting, ``question`` what follows it (uncompressed);
    ``answer_prefix`` starts the assistant's answer. ``target`` is the text whose log-likelihood is measured
    (default: the answers joined with ", "). Non-chat samples (perplexity) carry their token ids in ``meta``.
    """

    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    length: int  # target length in tokens
    depth: float  # where the needle sits, 0 = start of the haystack, 1 = end
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)
    answer_prefix: str = ""
    target: str | None = None
    chat: bool = True

    def ids(self, tokenizer: Any) -> PromptIds:
        """Token ids of the prompt, split where the question begins."""
        if not self.chat:
            return PromptIds(list(self.meta["context_ids"]), list(self.meta.get("question_ids", [])))
        return chat_split(tokenizer, self.context, self.question, answer_prefix=self.answer_prefix)

    @property
    def target_text(self) -> str:
        return self.target if self.target is not None else ", ".join(self.answers)

    def target_ids(self, tokenizer: Any) -> list[int]:
        """Ids of the reference answer (for its log-likelihood); a leading space follows a non-empty prefix."""
        if "target_ids" in self.meta:
            return list(self.meta["target_ids"])
        text = self.target_text
        if self.answer_prefix and not self.answer_prefix.endswith((" ", "\n")) and not text[:1].isspace():
            text = " " + text
        return encode(tokenizer, text)


@dataclass(frozen=True)
class Task:
    """A task generates samples and scores answers.

    Args:
        haystack: filler between needles, ``"repeat"`` (fixed sentences) or ``"text"`` (real text).
        text: the real-text source spec (``kjv``, ``python-doc``, ``generated``, a file path) for ``haystack="text"``
            and for the real-text tasks.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    max_new_tokens: ClassVar[int] = 16
    uses_depth: ClassVar[bool] = True  # does `depth` change the sample?
    uses_haystack: ClassVar[bool] = True  # does `haystack` change the sample?
    needs_text: ClassVar[bool] = False  # needs a real text whatever the haystack
    modes: ClassVar[tuple[str, ...]] = MODES
    metric: ClassVar[str] = "accuracy"  # "accuracy" (higher is better) or "perplexity" (lower is better)

    haystack: str = "repeat"
    text: str = "kjv"

    def __post_init__(self) -> None:
        if self.haystack not in HAYSTACKS:
            raise ConfigError(f"Unknown haystack {self.haystack!r}: use one of {', '.join(HAYSTACKS)}.")

    # ------------------------------------------------------------------------------------------------- options
    @property
    def uses_text(self) -> bool:
        return self.needs_text or (self.uses_haystack and self.haystack == "text")

    def source(self) -> TextSource:
        return text_source(self.text)

    def check(self) -> None:
        """Fail early if something the task needs (a real text) is missing."""
        if self.uses_text:
            self.source().check()

    def options(self) -> dict[str, Any]:
        """The options that change this task's samples (part of an evaluation cell's key)."""
        out: dict[str, Any] = {}
        if self.uses_haystack:
            out["haystack"] = self.haystack
        if self.uses_text:
            out["text"] = self.source().ident
        return out

    # ---------------------------------------------------------------------------------------------- interface
    def make(self, tokenizer: Any, length: int, depth: float, seed: int) -> Sample:
        raise NotImplementedError

    def score(self, sample: Sample, output: str) -> float:
        """The share of expected answers that appear in the output (case-insensitive)."""
        return match_all(output, sample.answers)

    # ---------------------------------------------------------------------------------------------- helpers
    def rng(self, length: int, depth: float, seed: int) -> random.Random:
        return random.Random(f"{self.name}/{length}/{depth}/{seed}")

    def filler(self, rng: random.Random) -> Iterator[str]:
        """Haystack sentences, in order (repeated sentences, or real text from a seeded offset)."""
        if self.haystack == "repeat":
            return itertools.cycle(REPEATED_FILLER)
        units = sentence_units(self.source())
        start = rng.randrange(len(units))
        return itertools.cycle(units[start:] + units[:start])


# ------------------------------------------------------------------------------------------------------ scoring
def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def match_all(output: str, answers: tuple[str, ...] | list[str]) -> float:
    """RULER's string_match_all: the share of answers contained in the output (case-insensitive)."""
    if not answers:
        return 0.0
    low = output.lower()
    return sum(1 for a in answers if a.lower() in low) / len(answers)


def continuation_score(output: str, answer: str) -> float:
    """1.0 if the output's first words are the answer's words, else the share of answer words among them."""
    want = normalize(answer).split()
    got = normalize(output).split()[: len(want) + 3]
    if not want:
        return 0.0
    if " ".join(want) in " ".join(got):
        return 1.0
    pool = Counter(got)
    hit = 0
    for w in want:
        if pool[w] > 0:
            pool[w] -= 1
            hit += 1
    return hit / len(want)


# ------------------------------------------------------------------------------------------------------ haystack
def _unit(s: str) -> str:
    s = s.strip()
    return s if s.endswith((".", "!", "?", '"', "'")) else s + "."


def build_haystack(
    tokenizer: Any,
    length: int,
    head: str,
    needles: list[str],
    depths: list[float],
    question: str,
    filler: Iterator[str],
    *,
    answer_prefix: str = "",
) -> str:
    """A context: ``head``, then filler sentences with ``needles`` inserted at ``depths`` (0 = first, 1 = last).

    The whole prompt (chat template, question and answer prefix included) has at most ``length`` tokens and,
    filler permitting, no fewer than ``length`` minus one filler sentence.
    """

    def prompt_len(units: list[str]) -> int:
        return len(chat_split(tokenizer, head + " " + " ".join(units), question, answer_prefix=answer_prefix))

    fixed = prompt_len(needles)
    room = length - fixed
    if room <= 0:
        raise ConfigError(f"A target length of {length} tokens is too short for this task (needs > {fixed}).")
    units: list[str] = []
    used = 0
    for raw in filler:
        s = _unit(raw)
        n = len(encode(tokenizer, " " + s))
        if used + n > room:
            break
        units.append(s)
        used += n
        if len(units) > 100 * length:  # a degenerate filler (zero-token units)
            break

    def place(units: list[str]) -> list[str]:
        out = list(units)
        # Insert needles from the deepest to the shallowest so indices stay valid.
        for needle, depth in sorted(zip(needles, depths), key=lambda t: -t[1]):
            at = round(min(max(depth, 0.0), 1.0) * len(units))
            out.insert(at, needle)
        return out

    while units and prompt_len(place(units)) > length:
        units.pop()  # tokenisation across sentence boundaries can differ from the per-sentence count
    return head + " " + " ".join(place(units))


# ------------------------------------------------------------------------------------------------------ tasks
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
        context = build_haystack(tokenizer, length, head, [needle], [depth], question, self.filler(rng))
        return Sample(self.name, context, question, (key,), length, depth, seed)

    def score(self, sample: Sample, output: str) -> float:
        return 1.0 if sample.answers[0] in re.sub(r"\D", "", output) or sample.answers[0] in output else 0.0


NIAH_HEAD = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)


def _keys(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in out:
            out.append(k)
    return out


def _numbers(rng: random.Random, n: int, digits: int = 7) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if v not in out:
            out.append(v)
    return out


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass(frozen=True)
class Niah(Task):
    """RULER needle in a haystack (Hsieh et al., arXiv:2404.06654): "One of the special magic numbers for K is: V."

    ``keys`` needles with distinct keys (the others are distractors), ``values`` values per key, ``queries`` keys
    asked at once. The first asked needle sits at ``depth``; the others at seeded uniform depths.
    """

    keys: ClassVar[int] = 1
    values: ClassVar[int] = 1
    queries: ClassVar[int] = 1

    def make(self, tokenizer: Any, length: int, depth: float, seed: int) -> Sample:
        rng = self.rng(length, depth, seed)
        keys = _keys(rng, self.keys)
        values = {k: _numbers(rng, self.values) for k in keys}
        asked = keys[: self.queries]
        needles: list[str] = []
        for k in keys:
            needles += [f"One of the special magic numbers for {k} is: {v}." for v in values[k]]
        depths = [depth] + [rng.random() for _ in needles[1:]]
        answers = tuple(v for k in asked for v in values[k])
        if self.queries == 1 and self.values == 1:
            question = f"What is the special magic number for {asked[0]} mentioned in the provided text?"
            prefix = f"The special magic number for {asked[0]} mentioned in the provided text is"
        else:
            question = f"What are all the special magic numbers for {_join(asked)} mentioned in the provided text?"
            prefix = f"The special magic numbers for {_join(asked)} mentioned in the provided text are"
        context = build_haystack(
            tokenizer, length, NIAH_HEAD, needles, depths, question, self.filler(rng), answer_prefix=prefix
        )
        return Sample(
            self.name, context, question, answers, length, depth, seed, meta={"keys": asked}, answer_prefix=prefix
        )


@dataclass(frozen=True)
class NiahSingle(Niah):
    """RULER single needle: one key, one 7-digit value (Hsieh et al., arXiv:2404.06654)."""

    name: ClassVar[str] = "niah_single"
    description: ClassVar[str] = "RULER: one key-value needle at a given depth; answer its 7-digit value"


@dataclass(frozen=True)
class NiahMultiKey(Niah):
    """RULER multi-key: the asked needle among three distractor needles with other keys (arXiv:2404.06654)."""

    name: ClassVar[str] = "niah_multikey"
    description: ClassVar[str] = "RULER: the asked needle plus 3 distractor needles with other keys"
    keys: ClassVar[int] = 4


@dataclass(frozen=True)
class NiahMultiValue(Niah):
    """RULER multi-value: one key with four values, all of which must be returned (arXiv:2404.06654)."""

    name: ClassVar[str] = "niah_multivalue"
    description: ClassVar[str] = "RULER: one key with 4 values; answer all of them"
    max_new_tokens: ClassVar[int] = 48
    values: ClassVar[int] = 4


@dataclass(frozen=True)
class NiahMultiQuery(Niah):
    """RULER multi-query: four needles with different keys, all four asked at once (arXiv:2404.06654)."""

    name: ClassVar[str] = "niah_multiquery"
    description: ClassVar[str] = "RULER: 4 needles with different keys; answer the values of all 4"
    max_new_tokens: ClassVar[int] = 48
    keys: ClassVar[int] = 4
    queries: ClassVar[int] = 4


@dataclass(frozen=True)
class VariableTracking(Task):
    """RULER variable tracking (arXiv:2404.06654): a chain ``VAR A = 12345``, ``VAR B = VAR A`` … hidden in filler;
    answer every variable that holds the value. One chain of four hops; the statements sit at sorted seeded depths.
    """

    name: ClassVar[str] = "vt"
    description: ClassVar[str] = "RULER: follow a chain of 4 variable assignments; name every variable with the value"
    max_new_tokens: ClassVar[int] = 32
    uses_depth: ClassVar[bool] = False
    hops: ClassVar[int] = 4

    def make(self, tokenizer: Any, length: int, depth: float, seed: int) -> Sample:
        rng = self.rng(length, 0.0, seed)
        names: list[str] = []
        while len(names) < self.hops + 1:
            v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if v not in names:
                names.append(v)
        value = _numbers(rng, 1, 5)[0]
        statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
        depths = sorted(rng.random() for _ in statements)
        head = "Memorize and track the chain(s) of variable assignment hidden in the following text."
        question = f"Find all variables that are assigned the value {value} in the text above."
        prefix = (
            f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables "
            f"are assigned the value {value}, they are:"
        )
        context = build_haystack(
            tokenizer, length, head, statements, depths, question, self.filler(rng), answer_prefix=prefix
        )
        return Sample(self.name, context, question, tuple(names), length, 0.0, seed, answer_prefix=prefix)


def _fit_count(tokenizer: Any, length: int, build: Any, lo: int, hi: int) -> tuple[int, Any]:
    """The largest n in [lo, hi] whose ``build(n)`` prompt fits ``length`` tokens (binary search)."""

    def size(n: int) -> tuple[int, Any]:
        sample = build(n)
        return len(sample.ids(tokenizer)), sample

    n_lo, s_lo = size(lo)
    if n_lo > length:
        raise ConfigError(f"A target length of {length} tokens is too short for this task (needs > {n_lo}).")
    best = (lo, s_lo)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        n, s = size(mid)
        if n <= length:
            lo, best = mid, (mid, s)
        else:
            hi = mid - 1
    return best


@dataclass(frozen=True)
class CommonWords(Task):
    """RULER common-word extraction (arXiv:2404.06654): a numbered list in which 10 words appear much more often
    than the others; answer the 10 most common words. Their frequency grows with the list (≥ 5 each, about half the
    list), every other word appears twice.
    """

    name: ClassVar[str] = "cwe"
    description: ClassVar[str] = "RULER: list the 10 most common words of a long numbered word list"
    max_new_tokens: ClassVar[int] = 48
    uses_depth: ClassVar[bool] = False
    uses_haystack: ClassVar[bool] = False
    common: ClassVar[int] = 10

    def _build(self, rng_seed: str, n: int, length: int, seed: int) -> Sample:
        rng = random.Random(rng_seed)
        words = list(NOUNS)
        rng.shuffle(words)
        common = words[: self.common]
        freq = max(5, round(0.5 * n / self.common))
        rest = max(0, n - freq * self.common)
        pool = words[self.common :]
        per = max(2, -(-rest // len(pool)))
        uncommon = [w for w in pool[: max(1, rest // per)] for _ in range(per)]
        items = [w for w in common for _ in range(freq)] + uncommon
        rng.shuffle(items)
        context = (
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n" + " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        )
        question = "Question: What are the 10 most common words in the above list?"
        prefix = "Answer: The top 10 words that appear most often in the list are:"
        return Sample(
            self.name, context, question, tuple(common), length, 0.0, seed, answer_prefix=prefix,
            meta={"items": len(items), "common_freq": freq, "other_freq": per},
        )  # fmt: skip

    def make(self, tokenizer: Any, length: int, depth: float, seed: int) -> Sample:
        rng_seed = f"{self.name}/{length}/{seed}"
        _, sample = _fit_count(
            tokenizer, length, lambda n: self._build(rng_seed, n, length, seed), self.common * 5 + 2, length
        )
        return sample


@dataclass(frozen=True)
class FrequentWords(Task):
    """RULER frequent-word extraction (arXiv:2404.06654): coded words drawn from a Zipf distribution (α = 2);
    answer the three most frequent. Ties between the third and fourth word are broken so the answer is unique.
    """

    name: ClassVar[str] = "fwe"
    description: ClassVar[str] = "RULER: name the 3 most frequent coded words of a Zipf-distributed text"
    max_new_tokens: ClassVar[int] = 24
    uses_depth: ClassVar[bool] = False
    uses_haystack: ClassVar[bool] = False
    alpha: ClassVar[float] = 2.0
    vocab: ClassVar[int] = 200

    def _build(self, stream: list[str], n: int, length: int, seed: int) -> Sample:
        words = list(stream[:n])
        counts = Counter(words)
        ranked = sorted(counts, key=lambda w: (-counts[w], stream.index(w)))
        while len(ranked) > 3 and counts[ranked[2]] == counts[ranked[3]]:
            # make the third word strictly more frequent than the fourth: turn one occurrence of the fourth into it
            j = len(words) - 1 - words[::-1].index(ranked[3])
            words[j] = ranked[2]
            counts = Counter(words)
            ranked = sorted(counts, key=lambda w: (-counts[w], stream.index(w)))
        top = tuple(ranked[:3])
        context = (
            "Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words.\n... " + " ".join(words) + " ..."
        )
        question = (
            "Question: Do not provide any explanation. Please ignore the dots '....'. "
            "What are the three most frequently appeared words in the above coded text?"
        )
        prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
        return Sample(
            self.name, context, question, top, length, 0.0, seed, answer_prefix=prefix,
            meta={"counts": [counts[w] for w in top]},
        )  # fmt: skip

    def make(self, tokenizer: Any, length: int, depth: float, seed: int) -> Sample:
        rng = random.Random(f"{self.name}/{length}/{seed}")
        vocab: list[str] = []
        while len(vocab) < self.vocab:
            w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 6)))
            if w not in vocab:
                vocab.append(w)
        weights = [1.0 / (r + 1) ** self.alpha for r in range(len(vocab))]
        stream = rng.choices(vocab, weights=weights, k=length)
        _, sample = _fit_count(tokenizer, length, lambda n: self._build(stream, n, length, seed), 8, length)
        return sample


@dataclass(frozen=True)
class ReadingQA(Task):
    """Question answering over a long real text (cloze reading comprehension).

    A passage of the real text fills the prompt; the question quotes the first words of a sentence at ``depth``
    (a quote found once in the passage) and asks for the whole sentence; the answer starts with the quote, and the
    score is how many of the four words that follow it come next.
    """

    name: ClassVar[str] = "qa"
    description: ClassVar[str] = "real text: quote a sentence start at a given depth; answer with the next 4 words"
    max_new_tokens: ClassVar[int] = 12
    uses_haystack: ClassVar[bool] = False
    needs_text: ClassVar[bool] = True
    quote_words: ClassVar[int] = 8
    answer_words: ClassVar[int] = 4

    def make(self, tokenizer: Any, length: int, depth: float, seed: int) -> Sample:
        rng = random.Random(f"{self.name}/{length}/{seed}")  # the passage does not depend on depth
        units = sentence_units(self.source())
        start = rng.randrange(len(units))
        passage = list(itertools.islice(itertools.cycle(units[start:] + units[:start]), 0, 4 * length))
        need = self.quote_words + self.answer_words
        head = "Read the following text carefully. I will ask you about it afterwards."
        budget = length
        for _ in range(8):
            sample = self._make(tokenizer, length, budget, depth, seed, head, passage, need)
            excess = len(sample.ids(tokenizer)) - length
            if excess <= 0:
                return sample
            budget -= excess  # the real question is longer than the probe: give the passage fewer tokens
        raise ConfigError(f"Could not fit a question-answering sample into {length} tokens; use a longer length.")

    def _make(
        self,
        tokenizer: Any,
        length: int,
        budget: int,
        depth: float,
        seed: int,
        head: str,
        passage: list[str],
        need: int,
    ) -> Sample:
        probe_q = f'Which words follow "{" ".join(["word"] * self.quote_words)}" in the text above?'
        context = build_haystack(tokenizer, budget, head, [], [], probe_q, iter(passage))
        body = context[len(head) + 1 :]
        sents = [u.strip() for u in re.split(r"(?<=[.!?])\s+", body) if u.strip()]
        candidates = [i for i, s in enumerate(sents) if len(s.split()) >= need]
        if not candidates:
            raise ConfigError(f"The text has no sentence of {need}+ words within {length} tokens; use a longer text.")
        aim = depth * (len(sents) - 1)
        for i in sorted(candidates, key=lambda i: (abs(i - aim), i)):
            words = sents[i].split()
            quote = " ".join(words[: self.quote_words])
            if context.count(quote) == 1:
                answer = " ".join(words[self.quote_words : need])
                break
        else:
            raise ConfigError("Could not find a sentence start that occurs once in the passage; use another text.")
        question = f'Find the sentence of the text above that begins with "{quote}" and repeat it in full.'
        return Sample(
            self.name,
            context,
            question,
            (re.sub(r"[^\w\s'-]+$", "", answer),),
            length,
            depth,
            seed,
            meta={"sentence": i, "sentences": len(sents)},
            answer_prefix=f'"{quote}',
            target=" " + answer,
        )

    def score(self, sample: Sample, output: str) -> float:
        return continuation_score(output, sample.answers[0])


@dataclass(frozen=True)
class Perplexity(Task):
    """Perplexity of a long real text: ``continuation`` tokens starting at a paragraph chosen by the seed are
    teacher-forced and scored after the ``length`` tokens of text that precede them (the compressed context). The
    same seed scores the same tokens at every length. No question, so query-agnostic only; lower is better.
    """

    name: ClassVar[str] = "ppl"
    description: ClassVar[str] = "real text: perplexity of the next 64 tokens after a long passage"
    max_new_tokens: ClassVar[int] = 0
    uses_depth: ClassVar[bool] = False
    uses_haystack: ClassVar[bool] = False
    needs_text: ClassVar[bool] = True
    modes: ClassVar[tuple[str, ...]] = ("agnostic",)
    metric: ClassVar[str] = "perplexity"
    continuation: ClassVar[int] = 64

    def make(self, tokenizer: Any, length: int, depth: float, seed: int) -> Sample:
        # The scored continuation depends on the seed only: every length predicts the same tokens from more or
        # less of the text that precedes them, so perplexity across lengths measures the use of context.
        rng = random.Random(f"{self.name}/{seed}")
        text = self.source().text()
        starts = [m.end() for m in re.finditer(r"\n\n", text)] or [0]
        doubled = text + "\n\n" + text  # a short text wraps around
        at = starts[rng.randrange(len(starts))] + len(text) + 2
        tgt_ids = encode(tokenizer, doubled[at : at + 40 * self.continuation])[: self.continuation]
        window = 6 * length
        while True:
            ctx_ids = encode(tokenizer, doubled[max(0, at - window) : at])
            if len(ctx_ids) > length or window >= at:
                break
            window *= 2
        if len(ctx_ids) < length or len(tgt_ids) < self.continuation:
            raise ConfigError(f"The text is too short for {length} + {self.continuation} tokens; use a longer text.")
        ctx_ids = ctx_ids[-length:]
        return Sample(
            self.name,
            tokenizer.decode(ctx_ids),
            "",
            (),
            length,
            0.0,
            seed,
            meta={"context_ids": ctx_ids, "target_ids": tgt_ids},
            target=tokenizer.decode(tgt_ids),
            chat=False,
        )

    def score(self, sample: Sample, output: str) -> float:
        raise ConfigError("The perplexity task is scored from log-likelihoods, not from generated text.")


@dataclass(frozen=True)
class Prose(Perplexity):
    """Natural-text fidelity on held-out prose: the ``length`` tokens of text before a paragraph start are the
    (compressed) context and the next ``continuation`` tokens are teacher-forced; a cell's KL to the full model and
    top-1 agreement over them are the measurement (its score is their perplexity, lower is better). The text is the
    held-out part of real sources (:func:`tokensieve.data.text.held_out_split`: the last 10 % of each, which no
    trained profile saw), one source per seed in turn — the King James Bible, the Python reference topics, the
    standard-library docstrings. No question: query-agnostic only."""

    name: ClassVar[str] = "prose"
    description: ClassVar[str] = "held-out prose (kjv, python-topics, stdlib by seed): KL / top-1 to the full model"
    needs_text: ClassVar[bool] = False
    continuation: ClassVar[int] = 128
    sources: ClassVar[tuple[str, ...]] = ("kjv", "python-topics", "stdlib")

    def check(self) -> None:
        for name in self.sources:
            text_source(name).check()

    def options(self) -> dict[str, Any]:
        return {"prose": [text_source(n).ident for n in self.sources]}

    def make(self, tokenizer: Any, length: int, depth: float, seed: int) -> Sample:
        from .text import held_out_split

        source = text_source(self.sources[seed % len(self.sources)])
        held = held_out_split(source.text())[1]
        rng = random.Random(f"{self.name}/{seed}")
        starts = [m.end() for m in re.finditer(r"\n\n", held)]
        # starts with room for the context before them and the continuation after them, tried in a seeded order
        room = [a for a in starts if a >= 3 * length and len(held) - a >= 8 * self.continuation]
        rng.shuffle(room)
        for at in room:
            ctx_ids = encode(tokenizer, held[max(0, at - 12 * length) : at])
            tgt_ids = encode(tokenizer, held[at : at + 40 * self.continuation])[: self.continuation]
            if len(ctx_ids) >= length and len(tgt_ids) == self.continuation:
                break
        else:
            raise ConfigError(
                f"The held-out part of '{source.name}' is too short for {length} + {self.continuation} tokens; use a "
                "shorter length."
            )
        ctx_ids = ctx_ids[-length:]
        return Sample(
            self.name,
            tokenizer.decode(ctx_ids),
            "",
            (),
            length,
            0.0,
            seed,
            meta={"context_ids": ctx_ids, "target_ids": tgt_ids, "source": source.name},
            target=tokenizer.decode(tgt_ids),
            chat=False,
        )


TASK_CLASSES: tuple[type[Task], ...] = (
    Passkey,
    NiahSingle,
    NiahMultiKey,
    NiahMultiValue,
    NiahMultiQuery,
    VariableTracking,
    CommonWords,
    FrequentWords,
    ReadingQA,
    Perplexity,
    Prose,
)
TASKS: dict[str, Task] = {cls.name: cls() for cls in TASK_CLASSES}


def task_names() -> list[str]:
    return list(TASKS)


def get_task(name: str, **options: Any) -> Task:
    """A task by name, optionally with options (``haystack="text"``, ``text="kjv"``)."""
    key = name.strip().lower()
    if key not in TASKS:
        raise UnknownNameError(f"Unknown task '{name}'. Valid tasks: {', '.join(TASKS)}.")
    return dataclasses.replace(TASKS[key], **options) if options else TASKS[key]
